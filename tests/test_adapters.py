"""The public functions on CPU arrays: NumPy, PyTorch and JAX in, the same kind out, matching the
float64 reference; and every bad argument rejected by name before anything runs.  Needs no GPU."""
import numpy as np
import pytest
from conftest import TOL, rel_err, to_numpy

import hgrn_cupy as hc

DTYPES = ("float32", "float16", "bfloat16", "float64")
REVERSE = [pytest.param(False, id="forward"), pytest.param(True, id="reverse")]
VARLEN = [pytest.param(False, id="dense"), pytest.param(True, id="varlen")]
CU_SEQLENS = (0, 11, 11, 40, 53)  # packed into B = 1, T = 53; the second sequence is empty
DENSE_SHAPE = (3, 41, 19)


@pytest.fixture
def rng():
    seed = np.random.SeedSequence().entropy
    print(f"rng seed: {seed}")  # shown on failure, to replay a bad draw
    return np.random.default_rng(seed)


@pytest.fixture(params=["numpy", "torch", "jax"])
def fw(request):
    """The array library under test; JAX runs with 64-bit types on so float64 stays float64."""
    if request.param == "torch":
        pytest.importorskip("torch")
    if request.param != "jax":
        yield request.param
        return
    jax = pytest.importorskip("jax")
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield "jax"
    finally:
        jax.config.update("jax_enable_x64", before)


# ----------------------------------------------------------------------------------------------
# helpers

def make(fw, a, dtype):
    """The NumPy float64 array ``a`` as a ``dtype`` array of framework ``fw``."""
    if fw == "numpy":
        if dtype == "bfloat16":
            return a.astype(pytest.importorskip("ml_dtypes").bfloat16)
        return a.astype(dtype)
    if fw == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(a)).to(getattr(torch, dtype))
    import jax.numpy as jnp

    return jnp.asarray(a, dtype=getattr(jnp, dtype))


def make_index(fw, values):
    dt = "int32" if fw == "jax" else "int64"
    a = np.asarray(values, dtype=dt)
    if fw == "torch":
        import torch

        return torch.from_numpy(a)
    if fw == "jax":
        import jax.numpy as jnp

        return jnp.asarray(a)
    return a


def dtype_name(a) -> str:
    return str(a.dtype).replace("torch.", "")


def assert_native(fw, a, dtype):
    """``a`` is a CPU array of framework ``fw`` with dtype ``dtype``."""
    if fw == "numpy":
        assert isinstance(a, np.ndarray)
    elif fw == "torch":
        import torch

        assert isinstance(a, torch.Tensor) and a.device.type == "cpu"
    else:
        import jax

        assert isinstance(a, jax.Array) and {d.platform for d in a.devices()} == {"cpu"}
    assert dtype_name(a) == dtype, f"dtype {dtype_name(a)}, expected {dtype}"


def gates(rng, shape):
    """Forget gates in log space, g = log(sigmoid(z)) <= 0."""
    return -np.logaddexp(0.0, -rng.standard_normal(shape))


def problem(rng, varlen):
    """Fresh float64 inputs: x, g [B, T, D]; h0, dht [N, D]; cu_seqlens values or None."""
    if varlen:
        B, T, D = 1, CU_SEQLENS[-1], 23
        N, cu = len(CU_SEQLENS) - 1, CU_SEQLENS
    else:
        (B, T, D), cu = DENSE_SHAPE, None
        N = B
    x = rng.standard_normal((B, T, D))
    return x, gates(rng, (B, T, D)), rng.standard_normal((N, D)), rng.standard_normal((N, D)), cu


def snapshot(*arrays):
    return [None if a is None else to_numpy(a) for a in arrays]


def assert_unchanged(arrays, snap):
    for a, s in zip(arrays, snap):
        if a is not None:
            assert np.array_equal(to_numpy(a), s), "an input was modified"


def accumulation(*dtypes):
    return "float64" if "float64" in dtypes else "float32"


# ----------------------------------------------------------------------------------------------
# results match the reference, in the caller's array type

@pytest.mark.parametrize("varlen", VARLEN)
@pytest.mark.parametrize("reverse", REVERSE)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward(fw, dtype, reverse, varlen, rng):
    x64, g64, h064, _, cu_values = problem(rng, varlen)
    x, g, h0 = make(fw, x64, dtype), make(fw, g64, dtype), make(fw, h064, dtype)
    cu = None if cu_values is None else make_index(fw, cu_values)
    snap = snapshot(x, g, h0, cu)

    o, ht = hc.hgrn(x, g, initial_state=h0, output_final_state=True, cu_seqlens=cu, reverse=reverse)

    assert_unchanged((x, g, h0, cu), snap)
    assert_native(fw, o, dtype)
    assert_native(fw, ht, accumulation(dtype))
    o_ref, ht_ref = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g), to_numpy(h0), True, cu_values, reverse)
    assert rel_err(o, o_ref) <= TOL[dtype]
    assert rel_err(ht, ht_ref) <= TOL[accumulation(dtype)]


@pytest.mark.parametrize("varlen", VARLEN)
@pytest.mark.parametrize("reverse", REVERSE)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward(fw, dtype, reverse, varlen, rng):
    x64, g64, h064, dht64, cu_values = problem(rng, varlen)
    g, h0 = make(fw, g64, dtype), make(fw, h064, dtype)
    cu = None if cu_values is None else make_index(fw, cu_values)
    o, _ = hc.hgrn(make(fw, x64, dtype), g, initial_state=h0, cu_seqlens=cu, reverse=reverse)
    do = make(fw, rng.standard_normal(x64.shape), dtype)  # a random cotangent for every output
    dht = make(fw, dht64, "float32")
    snap = snapshot(g, o, do, dht, h0, cu)

    dx, dg, dh0 = hc.hgrn_backward(g, o, do, dht=dht, initial_state=h0, cu_seqlens=cu, reverse=reverse)

    assert_unchanged((g, o, do, dht, h0, cu), snap)
    for a in (dx, dg, dh0):
        assert_native(fw, a, dtype)
    ref = hc.naive_recurrent_hgrn_bwd(to_numpy(g), to_numpy(o), to_numpy(do), to_numpy(dht), to_numpy(h0),
                                      cu_values, reverse)
    for name, out, want in zip(("dx", "dg", "dh0"), (dx, dg, dh0), ref):
        assert rel_err(out, want) <= TOL[dtype], name


@pytest.mark.parametrize("x_dtype, g_dtype", [("float16", "float32"), ("float32", "bfloat16"),
                                              ("bfloat16", "float64"), ("float64", "float16")])
def test_mixed_dtypes(fw, x_dtype, g_dtype, rng):
    x64, g64, _, _, _ = problem(rng, False)
    x, g = make(fw, x64, x_dtype), make(fw, g64, g_dtype)
    o, ht = hc.hgrn(x, g, output_final_state=True)
    assert_native(fw, o, x_dtype)
    assert_native(fw, ht, accumulation(x_dtype, g_dtype))
    o_ref, ht_ref = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g), None, True)
    assert rel_err(o, o_ref) <= TOL[x_dtype]
    assert rel_err(ht, ht_ref) <= TOL[accumulation(x_dtype, g_dtype)]

    do = make(fw, rng.standard_normal(x64.shape), x_dtype)
    dx, dg, dh0 = hc.hgrn_backward(g, o, do)
    assert dh0 is None
    assert_native(fw, dx, x_dtype)
    assert_native(fw, dg, g_dtype)
    dx_ref, dg_ref, _ = hc.naive_recurrent_hgrn_bwd(to_numpy(g), to_numpy(o), to_numpy(do))
    assert rel_err(dx, dx_ref) <= TOL[x_dtype]
    assert rel_err(dg, dg_ref) <= TOL[g_dtype]


@pytest.mark.parametrize("engine", ["hgrn", "chunk_hgrn", "fused_recurrent_hgrn"])
def test_every_forward_entry_point_runs_on_cpu(engine, rng):
    x64, g64, h064, _, _ = problem(rng, False)
    x, g = x64.astype(np.float32), g64.astype(np.float32)
    o, ht = getattr(hc, engine)(x, g)
    assert ht is None
    assert rel_err(o, hc.naive_recurrent_hgrn(x64, g64)[0]) <= TOL["float32"]
    o, ht = getattr(hc, engine)(x, g, initial_state=h064.astype(np.float32), output_final_state=True)
    o_ref, ht_ref = hc.naive_recurrent_hgrn(x64, g64, h064.astype(np.float32), True)
    assert rel_err(o, o_ref) <= TOL["float32"] and rel_err(ht, ht_ref) <= TOL["float32"]


@pytest.mark.parametrize("engine", ["auto", "chunk", "fused_recurrent"])
def test_backward_engines_run_on_cpu(engine, rng):
    x64, g64, h064, dht64, _ = problem(rng, False)
    g, h0 = g64.astype(np.float32), h064.astype(np.float32)
    o, _ = hc.hgrn(x64.astype(np.float32), g, initial_state=h0)
    do, dht = rng.standard_normal(o.shape).astype(np.float32), dht64.astype(np.float32)
    got = hc.hgrn_backward(g, o, do, dht, h0, engine=engine)
    ref = hc.naive_recurrent_hgrn_bwd(g, o, do, dht, h0, compute_dtype=np.float64)
    for out, want in zip(got, ref):
        assert rel_err(out, want) <= TOL["float32"]


def test_int32_and_int64_cu_seqlens_agree(rng):
    x64, g64, h064, _, cu_values = problem(rng, True)
    runs = [hc.hgrn(x64, g64, h064, True, np.asarray(cu_values, dt)) for dt in ("int32", "int64")]
    assert rel_err(runs[0][0], runs[1][0]) == 0 and rel_err(runs[0][1], runs[1][1]) == 0


# ----------------------------------------------------------------------------------------------
# bad input: the documented error, naming the argument, before anything runs

def _forward_args(rng, varlen=False):
    x, g, h0, _, cu = problem(rng, varlen)
    return dict(x=x.astype(np.float32), g=g.astype(np.float32), initial_state=h0.astype(np.float32),
                cu_seqlens=None if cu is None else np.asarray(cu, np.int64))


def _exact(a):
    """A copy to compare against later, in the array's own dtype for NumPy (int, complex included)."""
    return a.copy() if isinstance(a, np.ndarray) else to_numpy(a)


def _torch(a):
    torch = pytest.importorskip("torch")
    return torch.from_numpy(np.ascontiguousarray(a))


def _jax(a):
    jnp = pytest.importorskip("jax.numpy")
    return jnp.asarray(a)


def _torch_transposed(a):
    """A [B, T, D] torch view whose last axis has stride T (from a [B, D, T] tensor)."""
    return _torch(np.ascontiguousarray(a.transpose(0, 2, 1))).transpose(1, 2)


# (id, change to the valid arguments, varlen, error, pattern); patterns anchor on the argument name.
FORWARD_CASES = [
    ("x_rank2", lambda a: {"x": a["x"][0]}, False, ValueError, r"^x\b"),
    ("x_rank4", lambda a: {"x": a["x"][None]}, False, ValueError, r"^x\b"),
    ("g_rank2", lambda a: {"g": a["g"][0]}, False, ValueError, r"^g\b"),
    ("g_shape_differs", lambda a: {"g": a["g"][:, :-1]}, False, ValueError, r"^g\b"),
    ("x_shape_differs", lambda a: {"x": a["x"][:, :, :-1].copy()}, False, ValueError, r"^g\b"),
    ("x_int32", lambda a: {"x": a["x"].astype(np.int32)}, False, TypeError, r"^x\b"),
    ("g_complex64", lambda a: {"g": a["g"].astype(np.complex64)}, False, TypeError, r"^g\b"),
    ("initial_state_int32", lambda a: {"initial_state": a["initial_state"].astype(np.int32)}, False, TypeError,
     r"^initial_state\b"),
    ("x_list", lambda a: {"x": a["x"].tolist()}, False, TypeError, r"^x\b"),
    ("g_torch", lambda a: {"g": _torch(a["g"])}, False, TypeError, r"^g\b"),
    ("x_torch", lambda a: {"x": _torch(a["x"])}, False, TypeError, r"^g\b"),
    ("g_jax", lambda a: {"g": _jax(a["g"])}, False, TypeError, r"^g\b"),
    ("initial_state_torch", lambda a: {"initial_state": _torch(a["initial_state"])}, False, TypeError,
     r"^initial_state\b"),
    ("cu_seqlens_torch", lambda a: {"cu_seqlens": _torch(a["cu_seqlens"])}, True, TypeError, r"^cu_seqlens\b"),
    ("initial_state_rows", lambda a: {"initial_state": a["initial_state"][:-1]}, False, ValueError,
     r"^initial_state\b"),
    ("initial_state_rank3", lambda a: {"initial_state": a["initial_state"][None]}, False, ValueError,
     r"^initial_state\b"),
    ("initial_state_rows_varlen", lambda a: {"initial_state": a["initial_state"][:1]}, True, ValueError,
     r"^initial_state\b"),
    ("cu_seqlens_2d", lambda a: {"cu_seqlens": a["cu_seqlens"][None]}, True, ValueError, r"^cu_seqlens\b"),
    ("cu_seqlens_float", lambda a: {"cu_seqlens": a["cu_seqlens"].astype(np.float32)}, True, TypeError,
     r"^cu_seqlens\b"),
    ("cu_seqlens_empty", lambda a: {"cu_seqlens": a["cu_seqlens"][:0], "initial_state": None}, True, ValueError,
     r"^cu_seqlens\b"),
    ("cu_seqlens_start", lambda a: {"cu_seqlens": a["cu_seqlens"] + np.array([1, 0, 0, 0, 0])}, True, ValueError,
     r"^cu_seqlens\b"),
    ("cu_seqlens_decreasing", lambda a: {"cu_seqlens": np.array([0, 30, 11, 40, 53])}, True, ValueError,
     r"^cu_seqlens\b"),
    ("cu_seqlens_end", lambda a: {"cu_seqlens": a["cu_seqlens"] - np.array([0, 0, 0, 0, 1])}, True, ValueError,
     r"^cu_seqlens\b"),
    ("cu_seqlens_batch2", lambda a: {"cu_seqlens": np.array([0, 20, 41]), "initial_state": None}, False,
     ValueError, r"^cu_seqlens\b"),
    ("x_strided_last_axis", lambda a: {"x": np.repeat(a["x"], 2, axis=2)[:, :, ::2]}, False, ValueError, r"^x\b"),
    ("g_strided_last_axis", lambda a: {"g": np.repeat(a["g"], 2, axis=2)[:, :, ::2]}, False, ValueError, r"^g\b"),
    ("x_torch_transposed", lambda a: {"x": _torch_transposed(a["x"]), "g": _torch(a["g"]),
                                      "initial_state": _torch(a["initial_state"])}, False, ValueError, r"^x\b"),
    ("g_torch_transposed", lambda a: {"x": _torch(a["x"]), "g": _torch_transposed(a["g"]),
                                      "initial_state": _torch(a["initial_state"])}, False, ValueError, r"^g\b"),
    ("reverse_int", lambda a: {"reverse": 1}, False, TypeError, r"^reverse\b"),
    ("reverse_str", lambda a: {"reverse": "True"}, False, TypeError, r"^reverse\b"),
    ("reverse_none", lambda a: {"reverse": None}, False, TypeError, r"^reverse\b"),
]


@pytest.mark.parametrize("func", ["hgrn", "chunk_hgrn", "fused_recurrent_hgrn"])
@pytest.mark.parametrize("change, varlen, error, pattern",
                         [pytest.param(*case[1:], id=case[0]) for case in FORWARD_CASES])
def test_forward_rejects(func, change, varlen, error, pattern, rng):
    args = _forward_args(rng, varlen)
    args.update(change(args))
    arrays = [a for a in args.values() if hasattr(a, "dtype")]
    snap = [_exact(a) for a in arrays]
    with pytest.raises(error, match=pattern):
        getattr(hc, func)(output_final_state=True, **args)
    for a, s in zip(arrays, snap):
        assert np.array_equal(_exact(a), s), "an input was modified"


def _backward_args(rng, varlen=False):
    a = _forward_args(rng, varlen)
    o, _ = hc.hgrn(a["x"], a["g"], a["initial_state"], cu_seqlens=a["cu_seqlens"])
    return dict(g=a["g"], o=o, do=rng.standard_normal(o.shape).astype(np.float32),
                dht=rng.standard_normal(a["initial_state"].shape).astype(np.float32),
                initial_state=a["initial_state"], cu_seqlens=a["cu_seqlens"])


BACKWARD_CASES = [
    ("o_rank2", lambda a: {"o": a["o"][0]}, False, ValueError, r"^o\b"),
    ("g_shape_differs", lambda a: {"g": a["g"][:, 1:]}, False, ValueError, r"^g\b"),
    ("do_shape_differs", lambda a: {"do": a["do"][:, :, 1:]}, False, ValueError, r"^do\b"),
    ("do_int32", lambda a: {"do": a["do"].astype(np.int32)}, False, TypeError, r"^do\b"),
    ("o_complex64", lambda a: {"o": a["o"].astype(np.complex64)}, False, TypeError, r"^o\b"),
    ("do_torch", lambda a: {"do": _torch(a["do"])}, False, TypeError, r"^do\b"),
    ("dht_torch", lambda a: {"dht": _torch(a["dht"])}, False, TypeError, r"^dht\b"),
    ("dht_rows", lambda a: {"dht": a["dht"][1:]}, False, ValueError, r"^dht\b"),
    ("initial_state_rows", lambda a: {"initial_state": a["initial_state"][1:]}, False, ValueError,
     r"^initial_state\b"),
    ("do_strided_last_axis", lambda a: {"do": np.repeat(a["do"], 2, axis=2)[:, :, ::2]}, False, ValueError,
     r"^do\b"),
    ("cu_seqlens_end", lambda a: {"cu_seqlens": a["cu_seqlens"][:-1], "dht": a["dht"][:-1],
                                  "initial_state": a["initial_state"][:-1]}, True, ValueError, r"^cu_seqlens\b"),
    ("cu_seqlens_batch3", lambda a: {"cu_seqlens": np.array([0, 41, 41, 41])}, False, ValueError,
     r"^cu_seqlens\b"),
    ("reverse_int", lambda a: {"reverse": 0}, False, TypeError, r"^reverse\b"),
]


@pytest.mark.parametrize("change, varlen, error, pattern",
                         [pytest.param(*case[1:], id=case[0]) for case in BACKWARD_CASES])
def test_backward_rejects(change, varlen, error, pattern, rng):
    args = _backward_args(rng, varlen)
    args.update(change(args))
    with pytest.raises(error, match=pattern):
        hc.hgrn_backward(**args)


def test_rejects_unknown_backward_engine(rng):
    args = _backward_args(rng)
    with pytest.raises(ValueError, match="engine"):
        hc.hgrn_backward(**args, engine="scan")


def test_a_float64_state_is_cast_to_the_accumulation_dtype(rng):
    """initial_state in float64 with float32 x and g: the call accumulates in float32, as the kernels do,
    with the state cast to it: ht float32, bit for bit what a float32 initial_state gives."""
    x64, g64, h064, _, _ = problem(rng, False)
    x, g = x64.astype(np.float32), g64.astype(np.float32)
    o, ht = hc.hgrn(x, g, initial_state=h064, output_final_state=True)
    o32, ht32 = hc.hgrn(x, g, initial_state=h064.astype(np.float32), output_final_state=True)
    assert ht.dtype == np.float32 and np.array_equal(ht, ht32) and np.array_equal(o, o32)
