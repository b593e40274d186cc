"""Bad input, one table of cases across every front end.

Front ends: the top level on NumPy arrays, on CuPy arrays (``gpu``) and on torch CPU tensors;
``hgrn_cupy.torch.hgrn`` with inputs that require gradients (the custom-op path); ``hgrn_cupy.jax.hgrn``
eagerly and under ``jax.jit`` (the flags closed over, the arrays traced).  Every case expects the
library's own exception type and a message that starts with the argument's name (the format of the
checks: "x must ...", "cu_seqlens must ..."); no case may modify an input.

Under ``jax.jit`` the values of ``cu_seqlens`` cannot be read on the host: there the policy is that every
output of a call with invalid offsets is NaN.  The same holds on the GPU when
``hgrn_cupy.config.check_cu_seqlens_values`` is False and inside a CUDA-graph capture (``gpu`` tests at the
end).  Also here: ``np.memmap`` inputs work and give plain ``np.ndarray`` results; masked arrays are
refused.  Inputs are fixed (seeded in ``bad_input_cases``), so every failure replays.
"""
import numpy as np
import pytest
from bad_input_cases import (
    BAD_OFFSETS, CASE, CU, FRONT_ENDS, SEED, _cupy, _torch, assert_unmodified, base_inputs, call, fe_params,
    make_args, snapshot)
from conftest import TOL, capture_torch, rel_err, to_numpy

import hgrn_cupy as hc


@pytest.fixture
def fe(request):
    pytest.importorskip(FRONT_ENDS[request.param].module)
    if request.param == "numpy" or request.param.startswith("jax"):
        pytest.importorskip("torch")  # their foreign arrays
    return FRONT_ENDS[request.param]


# ----------------------------------------------------------------------------------------------
# the table (``CASE`` of bad_input_cases) on every front end


@pytest.mark.parametrize("fe", fe_params(), indirect=True)
@pytest.mark.parametrize("case", list(CASE))
def test_bad_input(fe, case):
    varlen, change, error, pattern = CASE[case]
    args = make_args(fe, varlen, change)
    snap = snapshot(args)
    if fe.jit and case in BAD_OFFSETS:
        # Under jit the values are not known on the host: every output is NaN instead.
        o, ht = call(fe, args)
        assert np.isnan(to_numpy(o)).all(), "o is not all NaN under jit with invalid cu_seqlens"
        assert ht is not None and np.isnan(to_numpy(ht)).all(), "ht is not all NaN under jit with invalid cu_seqlens"
    else:
        with pytest.raises(error, match=pattern):
            call(fe, args)
    assert_unmodified(args, snap)


# ----------------------------------------------------------------------------------------------
# what is accepted: NumPy bools for the flags, valid offsets under jit


def reference(args):
    a = {k: (None if v is None else to_numpy(v)) for k, v in args.items() if hasattr(v, "shape") or v is None}
    cu = None if a["cu_seqlens"] is None else a["cu_seqlens"].astype(np.int64)
    return hc.naive_recurrent_hgrn(a["x"], a["g"], a["initial_state"], True, cu, bool(args["reverse"]))


@pytest.mark.parametrize("fe", fe_params(), indirect=True)
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_numpy_bools_are_accepted(fe, varlen):
    args = make_args(fe, varlen)
    args.update(output_final_state=np.bool_(True), reverse=np.bool_(True))
    snap = snapshot(args)
    o, ht = call(fe, args)
    o_ref, ht_ref = reference(args)
    assert rel_err(o, o_ref) <= TOL["float32"] and rel_err(ht, ht_ref) <= TOL["float32"]
    assert_unmodified(args, snap)


@pytest.mark.parametrize("fe", [pytest.param("jax_jit", id="jax_jit")], indirect=True)
@pytest.mark.parametrize("offsets", [CU, (0, 0, 12, 12), (0, 12, 12, 12), (0, 1, 2, 12)],
                         ids=["empty_middle", "empty_first_last", "empty_tail", "short_heads"])
def test_valid_offsets_under_jit(fe, offsets):
    """Valid offsets under jit give the reference's result (the guard must not fire)."""
    args = make_args(fe, True, lambda a: {"cu_seqlens": np.asarray(offsets, np.int32)})
    for reverse in (False, True):
        args["reverse"] = reverse
        o, ht = call(fe, args)
        o_ref, ht_ref = reference(args)
        assert rel_err(o, o_ref) <= TOL["float32"] and rel_err(ht, ht_ref) <= TOL["float32"], (offsets, reverse)


@pytest.mark.parametrize("bad", list(BAD_OFFSETS), ids=list(BAD_OFFSETS))
def test_jit_grad_with_bad_offsets_is_nan(bad):
    """Under jit the backward of a call with invalid offsets is all NaN too (every output of the call)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    import hgrn_cupy.jax as hj

    a = make_args(FRONT_ENDS["jax_jit"], True, lambda a: {"cu_seqlens": np.asarray(BAD_OFFSETS[bad], np.int32)})

    def loss(x, g, h0, cu):
        o, ht = hj.hgrn(x, g, h0, True, cu)
        return jnp.sum(o) + jnp.sum(ht)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(a["x"], a["g"], a["initial_state"], a["cu_seqlens"])
    for name, d in zip(("dx", "dg", "dh0"), grads):
        assert np.isnan(to_numpy(d)).all(), f"{name} is not all NaN under jit with cu_seqlens {BAD_OFFSETS[bad]}"


# ----------------------------------------------------------------------------------------------
# NumPy subclasses: memmap in (plain arrays out), masked arrays refused


def _memmap(tmp_path, name, a):
    m = np.memmap(tmp_path / f"{name}.bin", dtype=a.dtype, mode="w+", shape=a.shape)
    m[...] = a
    m.flush()
    return m


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_memmap_inputs(tmp_path, varlen, reverse):
    x, g, h0, cu = base_inputs(varlen)
    mx, mg, mh0 = _memmap(tmp_path, "x", x), _memmap(tmp_path, "g", g), _memmap(tmp_path, "h0", h0)
    mcu = None if cu is None else _memmap(tmp_path, "cu", cu)
    o_ref, ht_ref = hc.hgrn(x, g, h0, True, cu, reverse)
    o, ht = hc.hgrn(mx, mg, mh0, True, mcu, reverse)
    assert type(o) is np.ndarray and type(ht) is np.ndarray, (type(o), type(ht))
    assert np.array_equal(o, o_ref) and np.array_equal(ht, ht_ref)

    rng = np.random.default_rng(SEED + 7)
    do = rng.standard_normal(o.shape).astype(np.float32)
    dht = rng.standard_normal(ht.shape).astype(np.float32)
    want = hc.hgrn_backward(g, o_ref, do, dht, h0, cu, reverse)
    got = hc.hgrn_backward(mg, _memmap(tmp_path, "o", o_ref), _memmap(tmp_path, "do", do),
                           _memmap(tmp_path, "dht", dht), mh0, mcu, reverse)
    for name, a, b in zip(("dx", "dg", "dh0"), got, want):
        assert type(a) is np.ndarray, (name, type(a))
        assert np.array_equal(a, b), name
    for m, a in ((mx, x), (mg, g), (mh0, h0)):
        assert np.array_equal(np.asarray(m), a), "a memmap input was modified"


@pytest.mark.parametrize("func, name", [("hgrn", n) for n in ("x", "g", "initial_state")]
                         + [("hgrn_backward", n) for n in ("g", "o", "do", "dht")])
def test_masked_arrays_are_refused(func, name):
    x, g, h0, _ = base_inputs(False)
    o, ht = hc.hgrn(x, g, h0, True)
    if func == "hgrn":
        args = dict(x=x, g=g, initial_state=h0, output_final_state=True)
    else:
        args = dict(g=g, o=o, do=np.ones_like(o), dht=np.ones_like(ht), initial_state=h0)
    args[name] = np.ma.masked_array(args[name], mask=np.zeros(args[name].shape, bool))
    with pytest.raises(TypeError, match=rf"^{name}\b.*[Mm]asked"):
        getattr(hc, func)(**args)


@pytest.mark.parametrize("front", ["top level", "hgrn_cupy.torch"])
@pytest.mark.parametrize("name", ["x", "g", "initial_state", "cu_seqlens"])
@pytest.mark.parametrize("how", ["sparse", "meta"])
def test_torch_tensors_the_kernels_cannot_read(front, name, how):
    """A sparse torch tensor, or one on the meta device, is refused by name (TypeError) through either
    front end; the same inputs dense and on the CPU pass."""
    pytest.importorskip("torch")
    x, g, h0, cu = (_torch(a) for a in base_inputs(True))
    args = dict(x=x, g=g, initial_state=h0, cu_seqlens=cu)
    if front == "hgrn_cupy.torch":
        import hgrn_cupy.torch as differentiable

        func = differentiable.hgrn
        args["x"] = x.clone().requires_grad_()
    else:
        func = hc.hgrn
    assert func(**args)[0].shape == x.shape
    args[name] = args[name].detach().to_sparse() if how == "sparse" else args[name].detach().to("meta")
    pattern = r"torch\.sparse_coo tensor.*dense" if how == "sparse" else "on the meta device"
    with pytest.raises(TypeError, match=rf"^{name} is .*{pattern}"):
        func(**args)


# ----------------------------------------------------------------------------------------------
# GPU: unchecked offsets (config switch, CUDA-graph capture) give all-NaN outputs


def _gpu(framework):
    """NumPy -> a GPU array of ``framework`` (cupy or torch)."""
    pytest.importorskip(framework)
    if framework == "cupy":
        return _cupy
    return lambda a: _torch(a).cuda()


def _gpu_args(framework):
    """The varlen float32 inputs on the GPU, cu_seqlens int32."""
    dev = _gpu(framework)
    x, g, h0, cu = base_inputs(True)
    return dev(x), dev(g), dev(h0), dev(cu.astype(np.int32))


def _write(dst, values, framework):
    """Write ``values`` into the GPU array ``dst`` in place, on the current stream."""
    dst[...] = _gpu(framework)(np.asarray(values, np.int32))


GPU_FORWARD = {"hgrn": "auto", "chunk_hgrn": "chunk", "fused_recurrent_hgrn": "fused_recurrent"}


@pytest.fixture
def unchecked_offsets():
    before = hc.config.check_cu_seqlens_values
    hc.config.check_cu_seqlens_values = False
    try:
        yield
    finally:
        hc.config.check_cu_seqlens_values = before


@pytest.mark.gpu
@pytest.mark.parametrize("framework", ["cupy", "torch"])
@pytest.mark.parametrize("func", list(GPU_FORWARD))
@pytest.mark.parametrize("bad", list(BAD_OFFSETS), ids=list(BAD_OFFSETS))
def test_unchecked_bad_offsets_give_nan_gpu(framework, func, bad, unchecked_offsets):
    """With the host check off, every output of a forward or backward with invalid offsets is NaN (and
    valid offsets still give the right result)."""
    x, g, h0, cu = _gpu_args(framework)
    o_good, ht_good = getattr(hc, func)(x, g, h0, True, cu + 0)
    o_ref, ht_ref = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g), to_numpy(h0), True, np.asarray(CU))
    assert rel_err(o_good, o_ref) <= TOL["float32"] and rel_err(ht_good, ht_ref) <= TOL["float32"]
    snap = snapshot(dict(x=x, g=g, h0=h0, o_good=o_good))
    _write(cu, BAD_OFFSETS[bad], framework)
    o, ht = getattr(hc, func)(x, g, h0, True, cu)
    assert np.isnan(to_numpy(o)).all() and np.isnan(to_numpy(ht)).all(), f"{func} with {BAD_OFFSETS[bad]}"
    dx, dg, dh0 = hc.hgrn_backward(g, o_good, o_good * 0 + 1, ht_good * 0 + 0.5, h0, cu, engine=GPU_FORWARD[func])
    for name, d in (("dx", dx), ("dg", dg), ("dh0", dh0)):
        assert np.isnan(to_numpy(d)).all(), (
            f"{name} of hgrn_backward(engine={GPU_FORWARD[func]!r}) with cu_seqlens {BAD_OFFSETS[bad]}")
    assert_unmodified(dict(x=x, g=g, h0=h0, o_good=o_good), snap)


@pytest.mark.gpu
@pytest.mark.parametrize("framework", ["cupy", "torch"])
@pytest.mark.parametrize("func", list(GPU_FORWARD))
def test_unchecked_offsets_without_a_sequence_give_nan_gpu(framework, func, unchecked_offsets):
    """With the host check off, cu_seqlens of one entry (no sequence) against T > 0 make every output of a
    forward and a backward NaN (no engine kernel runs; the guard fills them)."""
    x, g, _, _ = _gpu_args(framework)
    cu = _gpu(framework)(np.zeros(1, np.int32))
    o, ht = getattr(hc, func)(x, g, None, True, cu)
    assert tuple(ht.shape) == (0, x.shape[2]) and np.isnan(to_numpy(o)).all(), func
    dx, dg, _ = hc.hgrn_backward(g, x, x, None, None, cu, engine=GPU_FORWARD[func])
    assert np.isnan(to_numpy(dx)).all() and np.isnan(to_numpy(dg)).all(), func


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["hgrn", "chunk_hgrn", "fused_recurrent_hgrn"])
def test_cuda_graph_bad_offsets_give_nan(name):
    """Capture a torch CUDA graph of a varlen call, then replay it after writing each kind of bad offsets
    into the captured cu_seqlens buffer (all NaN), and after writing good ones back (right again)."""
    torch = pytest.importorskip("torch")
    import hgrn_cupy.torch as htorch

    fn = getattr(htorch, name)
    x, g, h0, cu = _gpu_args("torch")
    assert hc.config.check_cu_seqlens_values  # the capture itself must skip the host check
    graph, (o, ht) = capture_torch(lambda: fn(x, g, h0, True, cu))
    o_ref, ht_ref = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g), to_numpy(h0), True, np.asarray(CU))
    for bad, values in BAD_OFFSETS.items():
        _write(cu, values, "torch")
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isnan(o).all() and torch.isnan(ht).all(), f"replay with {bad} {values}"
        _write(cu, CU, "torch")
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(o, o_ref) <= TOL["float32"] and rel_err(ht, ht_ref) <= TOL["float32"], f"replay after {bad}"
