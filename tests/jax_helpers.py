"""Shared plumbing of the ``hgrn_cupy.jax`` tests: the parameter tables, the ``rng`` fixture and the
autouse ``on_cpu_unless_gpu_test`` fixture, random inputs, the float64 NumPy reference, and a pure-JAX
scan to check gradients of whole losses against.

Test modules import what they use by name (``from jax_helpers import ...``), fixtures included; the
autouse fixture applies only in the modules that import it.
"""
import numpy as np
import pytest
from conftest import to_numpy

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import hgrn_cupy as hc  # noqa: E402
import hgrn_cupy.jax as hj  # noqa: E402


FUNCS = {"hgrn": hj.hgrn, "chunk": hj.chunk_hgrn, "fused_recurrent": hj.fused_recurrent_hgrn}
DTYPES = ("float32", "bfloat16")
REVERSE = [pytest.param(False, id="forward"), pytest.param(True, id="reverse")]
VARLEN = [pytest.param(False, id="dense"), pytest.param(True, id="varlen")]
MODES = ("eager", "jit")
CU_SEQLENS = (0, 11, 11, 40, 53)  # packed into B = 1, T = 53; the second sequence is empty
DENSE_SHAPE = (3, 41, 19)


@pytest.fixture(autouse=True)
def on_cpu_unless_gpu_test(request):
    """Unmarked tests check the CPU path and run on CPU even where JAX has a GPU (which would
    otherwise be the default device); ``gpu`` tests put their arrays on the GPU themselves."""
    if request.node.get_closest_marker("gpu"):
        yield
        return
    with jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.fixture
def rng():
    seed = np.random.SeedSequence().entropy
    print(f"rng seed: {seed}")  # shown on failure, to replay a bad draw
    return np.random.default_rng(seed)


def log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


def make_inputs(rng, varlen, dtype, h0=True, shape=DENSE_SHAPE, cu_seqlens=CU_SEQLENS, g_dtype=None):
    """Fresh random (x, g, initial_state, cu_seqlens) as JAX arrays; states float32."""
    if varlen:
        shape = (1, cu_seqlens[-1], shape[2])
    N = shape[0] if not varlen else len(cu_seqlens) - 1
    x = jnp.asarray(rng.standard_normal(shape), dtype=dtype)
    g = jnp.asarray(log_sigmoid(rng.standard_normal(shape)), dtype=g_dtype or dtype)
    s = jnp.asarray(rng.standard_normal((N, shape[2])), dtype=jnp.float32) if h0 else None
    cu = jnp.asarray(np.asarray(cu_seqlens, np.int32)) if varlen else None
    return x, g, s, cu


def f64(a):
    return None if a is None else to_numpy(a)


def reference(x, g, h0, cu, reverse, do=None, dht=None):
    """(o, ht) and, given cotangents, (dx, dg, dh0), all float64 from the (rounded) inputs."""
    cu_np = None if cu is None else np.asarray(cu)
    o, ht = hc.naive_recurrent_hgrn(f64(x), f64(g), f64(h0), True, cu_np, reverse)
    if do is None:
        return o, ht
    return (o, ht), hc.naive_recurrent_hgrn_bwd(f64(g), o, f64(do), f64(dht), f64(h0), cu_np, reverse)



def scan_hgrn(x, g, h0=None, cu=None, reverse=False):
    """Pure-JAX HGRN by ``lax.associative_scan`` on the affine pairs (a, b) = (exp(g), x).

    Varlen: each sequence start gets a = 0 and b = x + exp(g) * h0[n]; cu must be concrete.
    Returns (o in float32, ht)."""
    B, T, D = x.shape
    if reverse:  # mirror time; packed sequences then come in the opposite order
        if cu is None:
            o, ht = scan_hgrn(x[:, ::-1], g[:, ::-1], h0)
            return o[:, ::-1], ht
        o, ht = scan_hgrn(x[:, ::-1], g[:, ::-1], None if h0 is None else h0[::-1], T - np.asarray(cu)[::-1])
        return o[:, ::-1], ht[::-1]
    a, b = jnp.exp(g.astype(jnp.float32)), x.astype(jnp.float32)
    if cu is None:
        if h0 is not None:
            b = b.at[:, 0].add(a[:, 0] * h0)
    else:
        c = np.asarray(cu)
        for n in range(len(c) - 1):
            if c[n] < c[n + 1]:
                if h0 is not None:
                    b = b.at[0, c[n]].add(a[0, c[n]] * h0[n])
                a = a.at[0, c[n]].set(0.0)
    _, o = jax.lax.associative_scan(lambda e, l: (l[0] * e[0], l[0] * e[1] + l[1]), (a, b), axis=1)
    if cu is None:
        ht = o[:, -1]
    else:
        c = np.asarray(cu)
        zero = jnp.zeros((D,), jnp.float32)
        ht = jnp.stack([o[0, c[n + 1] - 1] if c[n] < c[n + 1] else (zero if h0 is None else h0[n])
                        for n in range(len(c) - 1)])
    return o, ht
