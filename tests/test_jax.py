"""``hgrn_cupy.jax`` on the CPU: values and gradients against the float64 NumPy reference, eagerly and
under jit (every dtype, both directions, dense and varlen, bfloat16 and float32, float64 with x64);
``jax.grad`` of a loss against a pure-JAX scan; vmap; and the argument checks.
"""
import subprocess
import sys

import numpy as np
import pytest
from conftest import TOL, rel_err, to_numpy

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import hgrn_cupy.jax as hj  # noqa: E402
from jax_helpers import DTYPES, FUNCS, MODES, REVERSE, VARLEN, make_inputs, reference, scan_hgrn  # noqa: E402
from jax_helpers import on_cpu_unless_gpu_test, rng  # noqa: E402, F401  (fixtures)


def call(fn, mode, x, g, h0, cu, reverse, output_final_state=True):
    def f(x, g, h0, cu):
        return fn(x, g, h0, output_final_state, cu, reverse)
    return (jax.jit(f) if mode == "jit" else f)(x, g, h0, cu)


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


def _enable_x64():
    enable = getattr(jax, "enable_x64", None)
    if enable is None:  # older JAX
        enable = pytest.importorskip("jax.experimental").enable_x64
    return enable


def test_numpy_offsets_past_int32_without_x64(rng):
    """Without 64-bit types JAX would wrap NumPy int64 offsets past int32 into other offsets (2**32 + 2 -> 2);
    they are refused by name instead, and int64 offsets that fit run."""
    x, g, _, cu = make_inputs(rng, True, "float32")
    T = x.shape[1]
    with _enable_x64()(False):
        with pytest.raises(ValueError, match=r"^cu_seqlens holds values past int32"):
            hj.hgrn(x, g, cu_seqlens=np.array([0, 2**32 + 2, T], np.int64))
        o, _ = hj.hgrn(x, g, cu_seqlens=np.asarray(cu, np.int64))
        assert rel_err(o, reference(x, g, None, cu, False)[0]) <= TOL["float32"]


def test_float64_with_x64(rng):
    with _enable_x64()(True):
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
    ("cu float", TypeError, r"^cu_seqlens has dtype float32; supported: int32, int64"),
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
