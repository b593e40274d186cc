"""The CUDA kernels of both engines inside JAX programs (GPU-marked; run where JAX and CuPy both see a
GPU): values and gradients against the float64 reference, eagerly and under jit; the compiled program
calling our kernels, with identical results on repeated calls; vmap and grad against a pure-JAX scan.
"""
import numpy as np
import pytest
from conftest import TOL, rel_err

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from jax_helpers import (CU_SEQLENS, DTYPES, FUNCS, MODES, REVERSE, VARLEN, make_inputs,  # noqa: E402
                         reference, scan_hgrn)
from jax_helpers import on_cpu_unless_gpu_test, rng  # noqa: E402, F401  (fixtures)


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


@pytest.mark.gpu
def test_gpu_top_level_call_tunes_what_jit_then_takes(rng, monkeypatch, tmp_path):
    """Under jit ``hgrn`` cannot measure: with nothing stored it warns once for the forward and once for the
    backward.  One eager call of the top level's ``hgrn`` and ``hgrn_backward`` on JAX arrays of the class
    measures and stores; a new program of the same class then runs the stored launches, warning no more."""
    import warnings

    import hgrn_cupy as hc
    from hgrn_cupy import jax as hj
    from hgrn_cupy import tuning

    monkeypatch.setenv("HGRN_CUPY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hc.config, "engine", "auto")
    monkeypatch.setattr(hc.config, "tune", True)
    x, g, _, _ = gpu_inputs(rng, False, "float32", (2, 300, 64))

    def untuned(scale):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grads = jax.jit(jax.grad(lambda x, g: scale * jnp.sum(hj.hgrn(x, g)[0]), argnums=(0, 1)))(x, g)
            jax.block_until_ready(grads)
        return [str(w.message) for w in caught if w.category is hc.UntunedWarning]

    tuning.forget()
    try:
        assert len(untuned(1.0)) == 2
        tuning.forget()  # the warnings given are forgotten too: what silences the next trace is the store
        o, _ = hc.hgrn(x, g)
        hc.hgrn_backward(g, o, jnp.ones_like(o))
        assert len(tuning._memory) == 2, tuning._memory
        assert untuned(2.0) == []
    finally:
        tuning.forget()
