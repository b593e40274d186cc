"""The CUDA plumbing of ``hgrn_cupy.jax``, exercised on CPU: ``buffer_callback`` hands XLA's CPU
buffers to fake engines (and a fake offsets guard) whose launches compute with the NumPy reference
through the very pointers, layouts, workspace and offsets the CUDA branch builds; and the pointers
read from DLPack.
"""
import numpy as np
import pytest
from conftest import TOL, device_scope_on, rel_err

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import hgrn_cupy as hc  # noqa: E402
import hgrn_cupy.jax as hj  # noqa: E402
from hgrn_cupy import xla  # noqa: E402
from hgrn_cupy import checks  # noqa: E402
from hgrn_cupy.engines import chunk as hc_chunk  # noqa: E402
from hgrn_cupy.engines.layout import layout_vector_width, row_major  # noqa: E402
from hgrn_cupy.nvrtc import accumulation_dtype  # noqa: E402
from jax_helpers import CU_SEQLENS, DTYPES, FUNCS, VARLEN, make_inputs, reference  # noqa: E402
from jax_helpers import on_cpu_unless_gpu_test, rng  # noqa: E402, F401  (fixtures)


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
            if N == 0:  # as the engines: no sequence, nothing to compute
                return None
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


@pytest.fixture
def fake_device(monkeypatch):
    """Route the CUDA branch to CPU: lower it on CPU and swap the engines (and the offsets guard) for
    NumPy fakes."""
    import hgrn_cupy.engines as engines

    fakes = FakeEngines()
    fakes.guard = FakeGuard()
    monkeypatch.setattr(xla, "_launch_stream", lambda ctx: _STREAM)
    monkeypatch.setattr(xla, "_device_scope", device_scope_on(0))
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


def test_device_guard_without_a_sequence(fake_device, rng):
    """Offsets of one entry (no sequence) against T > 0 under jit: the engines have nothing to compute, the
    guard still checks the offsets and fills every output, forward and backward, with NaN."""
    x, g, _, _ = make_inputs(rng, True, "float32")

    def loss(x, g, cu):
        o, _ = hj.chunk_hgrn(x, g, None, False, cu)
        return jnp.sum(o), o

    (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, g, jnp.zeros(1, jnp.int32))
    for a in (o,) + tuple(grads):
        assert a.shape == x.shape and bool(jnp.isnan(a).all())
    assert fake_device.calls == [] and fake_device.guard.checked == [False, False]


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


def test_auto_under_jit_warns_when_nothing_is_tuned(fake_device, rng, monkeypatch, tmp_path):
    """Traced on a GPU (faked) with nothing stored for the call's classes, ``hgrn`` runs the built-in
    rule's engine and says so once per class, the forward's and the backward's, naming the shape; a
    second trace of the same classes says nothing more."""
    import warnings

    import cupy
    from hgrn_cupy import tuning

    monkeypatch.setenv("HGRN_CUPY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cupy.cuda.runtime, "getDevice", lambda: 0)
    tuning.forget()
    tuning._device_keys[0] = "Fake GPU|sm_90|test"
    x, g, _, _ = make_inputs(rng, False, "float32", shape=(2, 80, 16))

    def loss(x, g):
        return jnp.sum(hj.hgrn(x, g)[0])

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            jax.jit(jax.grad(loss, argnums=(0, 1)))(x, g)
            jax.jit(jax.grad(lambda x, g: 2 * loss(x, g), argnums=(0, 1)))(x, g)  # a new trace, same classes
    finally:
        tuning.forget()
    msgs = [str(w.message) for w in caught if w.category is hc.UntunedWarning]
    assert len(msgs) == 2 and "a forward" in msgs[0] and "a backward" in msgs[1], msgs
    assert all("float32/float32 2x80x16" in m and "python -m hgrn_cupy tune 2x80x16 --dtype float32" in m for m in msgs)
    assert "call hgrn_cupy.hgrn (the top level" in msgs[0] and "call hgrn_cupy.hgrn_backward (the top" in msgs[1]
    assert all("JAX tracing" in m and "capture" not in m for m in msgs)
    assert [c[1] for c in fake_device.calls] == ["fwd", "bwd"] * 2
