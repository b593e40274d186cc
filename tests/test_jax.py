"""hgrn_cupy.jax: values and gradients against the float64 NumPy reference, eagerly and under jit,
grad through a loss against a pure-JAX scan, vmap, varlen, bfloat16 and float32; the CUDA plumbing
(XLA buffers, pointers, layouts, workspace, offsets guard) checked on CPU with fake engines; and,
marked ``gpu``, the same checks on the CUDA kernels of both engines."""
import subprocess
import sys

import numpy as np
import pytest
from conftest import TOL, rel_err, to_numpy

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import hgrn_cupy as hc  # noqa: E402
import hgrn_cupy.jax as hj  # noqa: E402
from hgrn_cupy import xla  # noqa: E402
from hgrn_cupy import checks  # noqa: E402
from hgrn_cupy.engines import chunk as hc_chunk  # noqa: E402
from hgrn_cupy.engines.layout import layout_vector_width, row_major  # noqa: E402
from hgrn_cupy.nvrtc import accumulation_dtype  # noqa: E402

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


# ----------------------------------------------------------------------------------------------
# helpers

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


def call(fn, mode, x, g, h0, cu, reverse, output_final_state=True):
    def f(x, g, h0, cu):
        return fn(x, g, h0, output_final_state, cu, reverse)
    return (jax.jit(f) if mode == "jit" else f)(x, g, h0, cu)


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


# ----------------------------------------------------------------------------------------------
# values and gradients against the float64 reference (CPU: the NumPy path under pure_callback)

def reference_matrix(test):
    """The matrix the reference tests share: every dtype, both time directions, dense and varlen, eager
    and jitted (the same parameters, in the same order, as four stacked parametrize marks)."""
    for mark in (pytest.mark.parametrize("dtype", DTYPES), pytest.mark.parametrize("reverse", REVERSE),
                 pytest.mark.parametrize("varlen", VARLEN), pytest.mark.parametrize("mode", MODES)):
        test = mark(test)
    return test


@reference_matrix
def test_forward_matches_reference(rng, dtype, reverse, varlen, mode):
    x, g, h0, cu = make_inputs(rng, varlen, dtype)
    o, ht = call(hj.hgrn, mode, x, g, h0, cu, reverse)
    ro, rht = reference(x, g, h0, cu, reverse)
    assert o.dtype == x.dtype and o.shape == x.shape
    assert ht.dtype == jnp.float32 and ht.shape == h0.shape
    assert rel_err(o, ro) <= TOL[dtype]
    assert rel_err(ht, rht) <= TOL["float32"]  # states accumulate in float32 whatever the input dtype


@pytest.mark.parametrize("name", list(FUNCS))
def test_every_engine_and_no_final_state(rng, name):
    x, g, _, _ = make_inputs(rng, False, "float32", h0=False)
    o, ht = FUNCS[name](x, g)
    assert ht is None
    assert rel_err(o, reference(x, g, None, None, False)[0]) <= TOL["float32"]


@reference_matrix
def test_vjp_matches_reference(rng, dtype, reverse, varlen, mode):
    x, g, h0, cu = make_inputs(rng, varlen, dtype)

    def f(x, g, h0):
        return hj.hgrn(x, g, h0, True, cu, reverse)

    def grads(x, g, h0, do, dht):
        out, pullback = jax.vjp(f, x, g, h0)
        return out, pullback((do, dht))

    do = jnp.asarray(rng.standard_normal(x.shape), dtype=dtype)
    dht = jnp.asarray(rng.standard_normal(h0.shape), dtype=jnp.float32)
    (o, ht), (dx, dg, dh0) = (jax.jit(grads) if mode == "jit" else grads)(x, g, h0, do, dht)
    _, (rdx, rdg, rdh0) = reference(x, g, h0, cu, reverse, do, dht)
    assert (dx.dtype, dg.dtype, dh0.dtype) == (x.dtype, g.dtype, h0.dtype)
    assert rel_err(dx, rdx) <= TOL[dtype]
    assert rel_err(dg, rdg) <= TOL[dtype]
    assert rel_err(dh0, rdh0) <= TOL[dtype]


def test_mixed_dtypes_and_bf16_state(rng):
    x, g, _, _ = make_inputs(rng, False, "bfloat16", h0=False, g_dtype="float32")
    h0 = jnp.asarray(rng.standard_normal((x.shape[0], x.shape[2])), dtype=jnp.bfloat16)

    def loss(x, g, h0):
        o, ht = hj.hgrn(x, g, h0, True)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(ht)

    dx, dg, dh0 = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, g, h0)
    assert (dx.dtype, dg.dtype, dh0.dtype) == (jnp.bfloat16, jnp.float32, jnp.bfloat16)
    do = 2 * to_numpy(hj.hgrn(x, g, h0)[0])  # d loss / d o, exact in bfloat16
    _, (rdx, rdg, rdh0) = reference(x, g, h0, None, False, do, np.ones(h0.shape))
    assert rel_err(dx, rdx) <= TOL["bfloat16"]
    assert rel_err(dg, rdg) <= TOL["bfloat16"]
    assert rel_err(dh0, rdh0) <= TOL["bfloat16"]


def test_float64_with_x64(rng):
    enable = getattr(jax, "enable_x64", None)
    if enable is None:  # older JAX
        enable = pytest.importorskip("jax.experimental").enable_x64
    with enable(True):
        x, g, h0, cu = make_inputs(rng, True, "float64")
        h0 = h0.astype(jnp.float64)
        o, ht = jax.jit(lambda x, g, h0: hj.hgrn(x, g, h0, True, cu))(x, g, h0)
        ro, rht = reference(x, g, h0, cu, False)
        assert o.dtype == jnp.float64 and ht.dtype == jnp.float64
        assert rel_err(o, ro) <= TOL["float64"] and rel_err(ht, rht) <= TOL["float64"]


# ----------------------------------------------------------------------------------------------
# jax.grad of a loss through the op, against the same loss through a pure-JAX scan

@pytest.mark.parametrize("varlen", VARLEN)
@pytest.mark.parametrize("reverse", REVERSE)
def test_grad_of_loss_matches_pure_jax_scan(rng, reverse, varlen):
    x, g, h0, cu = make_inputs(rng, varlen, "float32")
    w = jnp.asarray(rng.standard_normal(x.shape), dtype=jnp.float32)
    v = jnp.asarray(rng.standard_normal(h0.shape), dtype=jnp.float32)

    def loss(impl):
        def f(x, g, h0):
            o, ht = impl(x, g, h0)
            return jnp.sum(jnp.tanh(o) * w) + jnp.sum(ht * v)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    ours = loss(lambda x, g, h0: hj.hgrn(x, g, h0, True, cu, reverse))(x, g, h0)
    scan = loss(lambda x, g, h0: scan_hgrn(x, g, h0, cu, reverse))(x, g, h0)
    assert abs(float(ours[0]) - float(scan[0])) <= 1e-4 * max(1.0, abs(float(scan[0])))
    for a, b in zip(ours[1], scan[1]):
        assert rel_err(a, b) <= 5 * TOL["float32"]


def test_grad_without_initial_state_or_final_state(rng):
    x, g, _, _ = make_inputs(rng, False, "float32", h0=False)
    w = jnp.asarray(rng.standard_normal(x.shape), dtype=jnp.float32)
    ours = jax.grad(lambda x, g: jnp.sum(hj.hgrn(x, g)[0] * w), argnums=(0, 1))(x, g)  # eager
    scan = jax.jit(jax.grad(lambda x, g: jnp.sum(scan_hgrn(x, g)[0] * w), argnums=(0, 1)))(x, g)
    for a, b in zip(ours, scan):
        assert rel_err(a, b) <= 5 * TOL["float32"]


def test_final_state_requested_but_unused(rng):
    """The cotangent of an unused ht arrives as zeros; gradients equal those without ht."""
    x, g, h0, _ = make_inputs(rng, False, "float32")
    a = jax.grad(lambda x: jnp.sum(hj.hgrn(x, g, h0, True)[0]))(x)
    b = jax.grad(lambda x: jnp.sum(hj.hgrn(x, g, h0, False)[0]))(x)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_forward_mode_is_not_supported(rng):
    x, g, _, _ = make_inputs(rng, False, "float32", h0=False)
    with pytest.raises(TypeError, match=r"^can't apply forward-mode autodiff \(jvp\) to a custom_vjp function"):
        jax.jvp(lambda x: hj.hgrn(x, g)[0], (x,), (x,))


# ----------------------------------------------------------------------------------------------
# vmap: an extra leading axis folds into the batch (dense) or into more packed sequences (varlen)

@pytest.mark.parametrize("varlen", VARLEN)
@pytest.mark.parametrize("reverse", REVERSE)
def test_vmap_matches_loop(rng, reverse, varlen):
    V = 3
    xs, gs, hs, cus = zip(*[make_inputs(rng, varlen, "float32") for _ in range(V)])
    X, G, H = jnp.stack(xs), jnp.stack(gs), jnp.stack(hs)
    if varlen:  # a different packing per example
        cus = [jnp.asarray(c, jnp.int32) for c in ((0, 11, 11, 40, 53), (0, 0, 20, 52, 53), (0, 5, 6, 7, 53))]
    f = lambda x, g, h0, cu: hj.hgrn(x, g, h0, True, cu, reverse)  # noqa: E731
    in_axes = (0, 0, 0, 0 if varlen else None)
    o, ht = jax.jit(jax.vmap(f, in_axes=in_axes))(X, G, H, jnp.stack(cus) if varlen else None)
    assert o.shape == X.shape and ht.shape == H.shape
    for v in range(V):
        ro, rht = reference(xs[v], gs[v], hs[v], cus[v] if varlen else None, reverse)
        assert rel_err(o[v], ro) <= TOL["float32"]
        assert rel_err(ht[v], rht) <= TOL["float32"]


def test_vmap_with_unbatched_arguments_and_grad(rng):
    """Only some arguments batched (the others broadcast), nested vmap, and grad of a vmapped loss."""
    x, g, h0, cu = make_inputs(rng, True, "float32")
    X = jnp.stack([x, 2 * x])
    f = lambda x, g, h0: hj.hgrn(x, g, h0, True, cu)  # noqa: E731
    o, ht = jax.vmap(f, in_axes=(0, None, None))(X, g, h0)
    for v in range(2):
        ro, rht = reference(X[v], g, h0, cu, False)
        assert rel_err(o[v], ro) <= TOL["float32"] and rel_err(ht[v], rht) <= TOL["float32"]

    XX = jnp.stack([X, -X])
    o2, _ = jax.vmap(jax.vmap(f, in_axes=(0, None, None)), in_axes=(0, None, None))(XX, g, h0)
    assert rel_err(o2[1, 1], reference(-X[1], g, h0, cu, False)[0]) <= TOL["float32"]

    def loss(impl):
        return lambda X, g, h0: jnp.sum(jnp.sin(jax.vmap(impl, in_axes=(0, None, None))(X, g, h0)[0]))
    ours = jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(X, g, h0)
    scan = jax.jit(jax.grad(loss(lambda x, g, h0: scan_hgrn(x, g, h0, cu)), argnums=(0, 1, 2)))(X, g, h0)
    for a, b in zip(ours, scan):
        assert rel_err(a, b) <= 5 * TOL["float32"]

    per_example = jax.vmap(jax.grad(lambda x: jnp.sum(f(x, g, h0)[0] ** 2)))(X)  # eager
    ref_grad = jax.jit(jax.grad(lambda x: jnp.sum(scan_hgrn(x, g, h0, cu)[0] ** 2)))
    for v in range(2):
        rgrad = ref_grad(X[v])
        assert rel_err(per_example[v], rgrad) <= 5 * TOL["float32"]


# ----------------------------------------------------------------------------------------------
# argument checks

@pytest.mark.parametrize("case, error, match", [
    ("x 2-D", ValueError, r"^x must have 3 dimensions"),
    ("g shape", ValueError, r"^g must have shape"),
    ("int x", TypeError, r"^x has dtype int32"),
    ("state shape", ValueError, r"^initial_state must have shape"),
    ("cu with B > 1", ValueError, r"^cu_seqlens packs sequences .* needs B == 1"),
    ("cu float", ValueError, r"^cu_seqlens must be a 1-D int32 or int64"),
    ("cu start", ValueError, r"^cu_seqlens must start at 0"),
    ("cu decreasing", ValueError, r"^cu_seqlens must be non-decreasing"),
    ("cu end", ValueError, r"^cu_seqlens must end at T"),
    ("reverse not bool", TypeError, r"^reverse must be a bool"),
])
def test_bad_arguments_are_rejected(rng, case, error, match):
    x, g, h0, _ = make_inputs(rng, False, "float32")
    x1, g1 = x[:1], g[:1]
    T = x.shape[1]
    cu = lambda *v: jnp.asarray(v, jnp.int32)  # noqa: E731
    calls = {
        "x 2-D": lambda: hj.hgrn(x[0], g[0]),
        "g shape": lambda: hj.hgrn(x, g[:, :-1]),
        "int x": lambda: hj.hgrn(x.astype(jnp.int32), g),
        "state shape": lambda: hj.hgrn(x, g, h0[:-1]),
        "cu with B > 1": lambda: hj.hgrn(x, g, cu_seqlens=cu(0, T)),
        "cu float": lambda: hj.hgrn(x1, g1, cu_seqlens=jnp.asarray([0.0, T])),
        "cu start": lambda: hj.hgrn(x1, g1, cu_seqlens=cu(1, T)),
        "cu decreasing": lambda: hj.hgrn(x1, g1, cu_seqlens=cu(0, 9, 5, T)),
        "cu end": lambda: hj.hgrn(x1, g1, cu_seqlens=cu(0, T - 1)),
        "reverse not bool": lambda: hj.hgrn(x, g, reverse=1),
    }
    with pytest.raises(error, match=match):
        calls[case]()


def test_import_hgrn_cupy_does_not_import_jax():
    code = "import sys, hgrn_cupy; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------
# the CUDA plumbing, exercised on CPU: buffer_callback hands XLA's CPU buffers to fake engines whose
# launches compute with the NumPy reference through the very pointers and layouts we build

def _view(ptr, shape, dtype, strides=None):
    """Host memory at ``ptr`` as a NumPy array (``strides`` in elements; default row-major)."""
    dt = np.dtype(jnp.dtype(dtype))
    n = int(np.prod(shape))
    if n == 0:
        return np.empty(shape, dt)
    import ctypes

    strides = strides or row_major(shape)
    span = sum((k - 1) * s for k, s in zip(shape, strides)) + 1
    base = np.frombuffer((ctypes.c_char * (span * dt.itemsize)).from_address(ptr), dt)
    return np.lib.stride_tricks.as_strided(base, shape, [s * dt.itemsize for s in strides])


def _state_view(ptr, N, D, acc):
    return None if not ptr else _view(ptr, (N, D), acc)


class FakeEngines:
    """Stand-ins for the engines' ``prepare``: each launch records what it was given and computes the
    reference on host memory through its pointers, the prepared layouts (``Arr``) and the offsets."""

    def __init__(self):
        self.calls = []

    def prepare(self, engine):
        def prepare(direction, tensors, N, reverse, device, varlen=False):
            assert device == 0
            B, T, D = tensors[0].shape
            assert all(a.shape == (B, T, D) and a.strides == row_major((B, T, D)) for a in tensors), tensors
            # the dtypes the engines read: (x, g) forward, (o, g) backward
            xd, gd = (tensors[0].dtype, tensors[1].dtype) if direction == 0 else (tensors[1].dtype, tensors[0].dtype)
            acc = accumulation_dtype(xd, gd)

            def launch(stream, pointers, states, cu, workspace):
                self.calls.append((engine, ("fwd", "bwd")[direction], xd, gd, N, reverse, varlen))
                assert stream == _STREAM and len(pointers) == len(tensors) and all(pointers)
                assert bool(cu[0]) == varlen
                if engine == "chunk":  # the scratch is an XLA buffer of this call, fresh: the launch fills it
                    nbytes = hc_chunk.workspace_layout(N, T, D, varlen, np.dtype(acc).itemsize, direction,
                                                       layout_vector_width(D, tensors))[3]
                    ptr, owner, filled, size = workspace(nbytes, np.dtype(acc).itemsize, stream)
                    assert not filled and size == nbytes
                    _view(ptr, (nbytes,), "uint8")[:] = 0xAB
                offsets = None
                if varlen:
                    offsets = _view(cu[0], (N + 1,), "int64" if cu[1] else "int32").copy()
                    if not checks.offsets_valid(offsets, T):
                        return  # a kernel on invalid offsets writes nothing meaningful; the guard fills NaN
                t = [_view(p, a.shape, a.dtype, a.strides) for p, a in zip(pointers, tensors)]
                if direction == 0:
                    h0, ht = states
                    o, hT = hc.naive_recurrent_hgrn(t[0], t[1], _state_view(h0, N, D, acc), True, offsets, reverse,
                                                    compute_dtype=acc)
                    t[2][...] = o
                    if ht:
                        _view(ht, (N, D), acc)[...] = hT
                else:
                    h0, dht, dh0 = states
                    dx, dg, dh = hc.naive_recurrent_hgrn_bwd(t[0], t[1], t[2], _state_view(dht, N, D, acc),
                                                             _state_view(h0, N, D, acc), offsets, reverse,
                                                             compute_dtype=acc)
                    t[3][...], t[4][...] = dx, dg
                    if dh0:
                        _view(dh0, (N, D), acc)[...] = dh
            return launch
        return prepare


class FakeGuard:
    """Stand-in for ``hgrn_cupy.engines.guard`` (the device check of offsets not checked on the host):
    ``check`` sets the flag where the offsets are invalid, ``fill`` then writes NaN (all-ones bytes)
    over every output it is given."""

    def __init__(self):
        self.checked = []

    def prepare(self, device, cu_dtype):
        assert device == 0 and cu_dtype in ("int32", "int64")
        guard = self

        class Checker:
            def check(self, stream, cu_ptr, n, T, flag_ptr):
                assert stream == _STREAM
                ok = checks.offsets_valid(_view(cu_ptr, (n,), cu_dtype), T)
                guard.checked.append(ok)
                _view(flag_ptr, (1,), "int32")[0] = 0 if ok else 1

            def fill(self, stream, flag_ptr, outputs):
                assert stream == _STREAM and outputs
                if _view(flag_ptr, (1,), "int32")[0]:
                    for ptr, nbytes in outputs:
                        _view(ptr, (nbytes,), "uint8")[:] = 0xFF
        return Checker()


_STREAM = 1234


class _NoScope:
    def __init__(self, device):
        assert device == 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def fake_device(monkeypatch):
    """Route the CUDA branch to CPU: lower it on CPU and swap the engines (and the offsets guard) for
    NumPy fakes."""
    import hgrn_cupy.engines as engines

    fakes = FakeEngines()
    fakes.guard = FakeGuard()
    monkeypatch.setattr(xla, "_launch_stream", lambda ctx: _STREAM)
    monkeypatch.setattr(xla, "_device_scope", _NoScope)
    for name, module in engines.ENGINES.items():
        monkeypatch.setattr(module, "prepare", fakes.prepare(name))
    monkeypatch.setattr(engines, "guard", fakes.guard, raising=False)
    # The branch chosen on CUDA, made the only one (eager platform_dependent picks by platform).
    monkeypatch.setattr(hj, "_host_forward", xla.device_forward)
    monkeypatch.setattr(hj, "_host_backward", xla.device_backward)
    hj._forward_op.cache_clear()
    hj._backward_op.cache_clear()
    jax.clear_caches()  # traces made before the swap must not be reused, nor these after it
    yield fakes
    monkeypatch.undo()
    hj._forward_op.cache_clear()
    hj._backward_op.cache_clear()
    jax.clear_caches()


@pytest.mark.parametrize("with_states", [pytest.param(True, id="states"), pytest.param(False, id="no-states")])
@pytest.mark.parametrize("varlen", VARLEN)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["chunk", "fused_recurrent"])
def test_device_plumbing_on_cpu(fake_device, rng, name, dtype, varlen, with_states):
    x, g, h0, cu = make_inputs(rng, varlen, dtype, h0=with_states)
    reverse = dtype == "bfloat16"  # both directions covered, ids stay readable

    def f(x, g, h0):
        return FUNCS[name](x, g, h0, with_states, cu, reverse)

    (o, ht), pullback = jax.vjp(f, x, g, h0) if with_states else jax.vjp(lambda x, g: f(x, g, None), x, g)
    do = jnp.asarray(rng.standard_normal(x.shape), dtype=dtype)
    dht = jnp.asarray(rng.standard_normal((len(CU_SEQLENS) - 1 if varlen else x.shape[0], x.shape[2])),
                      jnp.float32) if with_states else None
    grads = pullback((do, dht))
    (ro, rht), (rdx, rdg, rdh0) = reference(x, g, h0, cu, reverse, do, dht)
    assert rel_err(o, ro) <= TOL[dtype]
    assert rel_err(grads[0], rdx) <= TOL[dtype] and rel_err(grads[1], rdg) <= TOL[dtype]
    if with_states:
        assert rel_err(ht, rht) <= TOL["float32"] and rel_err(grads[2], rdh0) <= TOL["float32"]
    else:
        assert ht is None
    engines = {c[0] for c in fake_device.calls}
    assert engines == {name}, fake_device.calls
    assert [c[1] for c in fake_device.calls] == ["fwd", "bwd"]
    assert all(c[6] == varlen and c[5] == reverse for c in fake_device.calls)
    # traced offsets are checked on the device (the guard), before each launch
    assert fake_device.guard.checked == ([True, True] if varlen else [])


@pytest.mark.parametrize("cu_seqlens", [(0, 11, 5, 40, 53), (0, 11, 11, 40, 52), (1, 11, 11, 40, 53)],
                         ids=["decreasing", "short", "late_start"])
def test_device_guard_on_cpu(fake_device, rng, cu_seqlens):
    """Offsets that cannot be checked on the host (under jit) and are invalid: the guard runs before the
    launch and every output of the call, forward and backward, is NaN; valid ones leave them finite."""
    x, g, h0, _ = make_inputs(rng, True, "float32")

    def loss(x, g, h0, cu):
        o, ht = hj.fused_recurrent_hgrn(x, g, h0, True, cu)
        return jnp.sum(o) + jnp.sum(ht), (o, ht)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    for cu, valid in ((CU_SEQLENS, True), (cu_seqlens, False)):
        (_, (o, ht)), grads = step(x, g, h0, jnp.asarray(cu, jnp.int32))
        for a in (o, ht) + tuple(grads):
            assert bool(jnp.isfinite(a).all()) if valid else bool(jnp.isnan(a).all()), (cu, a)
    assert fake_device.guard.checked == [True, True, False, False]


def test_device_plumbing_under_vmap(fake_device, rng):
    """vmap folds into one launch with V*N sequences."""
    x, g, h0, cu = make_inputs(rng, True, "float32")
    X, H = jnp.stack([x, -x]), jnp.stack([h0, 2 * h0])
    o, ht = jax.jit(jax.vmap(lambda x, h0: hj.chunk_hgrn(x, g, h0, True, cu)))(X, H)
    for v in range(2):
        ro, rht = reference(X[v], g, H[v], cu, False)
        assert rel_err(o[v], ro) <= TOL["float32"] and rel_err(ht[v], rht) <= TOL["float32"]
    assert fake_device.calls == [("chunk", "fwd", "float32", "float32", 2 * (len(CU_SEQLENS) - 1), False, True)]
    assert fake_device.guard.checked == [True]


def test_data_ptr_reads_dlpack(rng):
    """The pointer the launchers get is the buffer's first element (checked on CPU buffers)."""
    from jax.experimental.buffer_callback import buffer_callback

    seen = {}

    def cb(ctx, out, x):
        seen["x"] = (xla._data_ptr(x), np.asarray(x).ctypes.data)
        seen["out"] = (xla._data_ptr(out), np.asarray(out).ctypes.data)
        seen["versioned"] = xla._capsule_data_ptr(x.__dlpack__(max_version=(1, 0)))
        np.asarray(out)[...] = np.asarray(x).astype(np.float32)

    x = jnp.asarray(rng.standard_normal((5, 7)), jnp.bfloat16)
    y = jax.jit(buffer_callback(cb, jax.ShapeDtypeStruct(x.shape, jnp.float32)))(x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x).astype(np.float32))
    assert seen["x"][0] == seen["x"][1] == seen["versioned"] and seen["out"][0] == seen["out"][1]


# ----------------------------------------------------------------------------------------------
# the CUDA kernels inside compiled programs (run where JAX and CuPy both see a GPU)

def _jax_gpu():
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("JAX has no GPU backend here (CPU jaxlib)")


def gpu_inputs(rng, varlen, dtype, shape, cu_seqlens=CU_SEQLENS):
    dev = _jax_gpu()
    return tuple(None if a is None else jax.device_put(a, dev)
                 for a in make_inputs(rng, varlen, dtype, shape=shape, cu_seqlens=cu_seqlens))


GPU_CASES = [
    pytest.param(False, (3, 41, 19), id="dense-small"),
    pytest.param(False, (2, 700, 70), id="dense-6chunks"),  # several chunks and channel tiles
    pytest.param(True, None, id="varlen"),
]
GPU_CU = (0, 11, 11, 300, 301, 613)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reverse", REVERSE)
@pytest.mark.parametrize("varlen, shape", GPU_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["chunk", "fused_recurrent", "hgrn"])
def test_gpu_forward_backward(poison, rng, name, dtype, varlen, shape, reverse, mode):
    x, g, h0, cu = gpu_inputs(rng, varlen, dtype, shape or (1, GPU_CU[-1], 37), GPU_CU)

    def step(x, g, h0, do, dht):
        (o, ht), pullback = jax.vjp(lambda x, g, h0: FUNCS[name](x, g, h0, True, cu, reverse), x, g, h0)
        return o, ht, pullback((do, dht))

    do = jax.device_put(jnp.asarray(rng.standard_normal(x.shape), dtype), x.devices().pop())
    dht = jax.device_put(jnp.asarray(rng.standard_normal(h0.shape), jnp.float32), x.devices().pop())
    o, ht, (dx, dg, dh0) = (jax.jit(step) if mode == "jit" else step)(x, g, h0, do, dht)
    assert o.devices() == x.devices()
    (ro, rht), (rdx, rdg, rdh0) = reference(x, g, h0, cu, reverse, do, dht)
    assert rel_err(o, ro) <= TOL[dtype]
    assert rel_err(ht, rht) <= TOL["float32"]
    assert rel_err(dx, rdx) <= TOL[dtype]
    assert rel_err(dg, rdg) <= TOL[dtype]
    assert rel_err(dh0, rdh0) <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["chunk", "fused_recurrent"])
def test_gpu_program_calls_our_kernels(rng, name):
    """The compiled program holds the GPU buffer callback (not the host fallback), and repeated
    calls give identical results (no stale workspace state between launches)."""
    x, g, h0, _ = gpu_inputs(rng, False, "float32", (2, 700, 70))
    f = jax.jit(lambda x, g, h0: FUNCS[name](x, g, h0, True))
    text = f.lower(x, g, h0).as_text()
    assert "xla_buffer_python_gpu_callback" in text, text[:2000]
    first = [np.asarray(a) for a in f(x, g, h0)]
    for _ in range(3):
        again = [np.asarray(a) for a in f(x, g, h0)]
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["chunk", "fused_recurrent"])
@pytest.mark.parametrize("varlen", VARLEN)
def test_gpu_vmap_and_grad(poison, rng, name, varlen):
    x, g, h0, cu = gpu_inputs(rng, varlen, "float32", (2, 300, 40), GPU_CU)
    X = jnp.stack([x, -x])
    f = lambda x, g, h0: FUNCS[name](x, g, h0, True, cu)  # noqa: E731

    def loss(impl):
        return lambda X, g, h0: jnp.sum(jnp.sin(jax.vmap(impl, in_axes=(0, None, None))(X, g, h0)[0]))

    o, ht = jax.jit(jax.vmap(f, in_axes=(0, None, None)))(X, g, h0)
    for v in range(2):
        ro, rht = reference(X[v], g, h0, cu, False)
        assert rel_err(o[v], ro) <= TOL["float32"] and rel_err(ht[v], rht) <= TOL["float32"]
    ours = jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(X, g, h0)
    scan = jax.jit(jax.grad(loss(lambda x, g, h0: scan_hgrn(x, g, h0, cu)), argnums=(0, 1, 2)))(X, g, h0)
    for a, b in zip(ours, scan):
        assert rel_err(a, b) <= 5 * TOL["float32"]
