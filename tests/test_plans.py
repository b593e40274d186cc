"""Planned calls: a forward whose arrays match an earlier valid call (framework, device, dtype, shape,
strides: the key) skips the checks and reuses that call's prepared launch (``ops._lookup``).

CPU: a cached key never lets a bad argument through; and with a recording driver standing in for CUDA
(torch CPU tensors posing as CUDA ones, a reference "kernel" reading and writing through the packed
parameters), the planned launch hands the kernel what the checked path hands it and computes the
reference.  GPU-marked: planned CuPy and torch calls against the reference, on the caller's stream.
"""
import ctypes
import types

import numpy as np
import pytest
from conftest import TOL, force_block_walks, rel_err, to_numpy

import hgrn_cupy as hc
from hgrn_cupy import _backend as bk
from hgrn_cupy._compile import BLOCK_FWD, ITEMSIZE, STEP
from hgrn_cupy import fused_recurrent, ops
from hgrn_cupy.naive import bf16_bits_to_float32, float32_to_bf16_bits


@pytest.fixture
def fresh_plans(monkeypatch):
    """An empty plan cache for the test, thrown away after it."""
    monkeypatch.setattr(ops, "_plans", {})
    return ops._plans


# ----------------------------------------------------------------------------------------------
# a cached key still rejects every bad argument (CPU; NumPy and torch arrays are planned)

def _arrays(fw, rng):
    x = rng.standard_normal((3, 7, 5)).astype(np.float32)
    g = -np.logaddexp(0.0, -rng.standard_normal((3, 7, 5))).astype(np.float32)
    h0 = rng.standard_normal((3, 5)).astype(np.float32)
    if fw == "torch":
        torch = pytest.importorskip("torch")
        return tuple(torch.from_numpy(a) for a in (x, g, h0))
    return x, g, h0


def _other(a):
    """``a`` in the other planned framework."""
    if isinstance(a, np.ndarray):
        return pytest.importorskip("torch").from_numpy(a.copy())
    return a.numpy().copy()


def _strided_last_axis(a):
    if isinstance(a, np.ndarray):
        return np.repeat(a, 2, axis=2)[:, :, ::2]
    return a.repeat_interleave(2, dim=2)[:, :, ::2]


def _astype(a, name):
    if isinstance(a, np.ndarray):
        return a.astype(name)
    return a.to(getattr(pytest.importorskip("torch"), name))


# (id, change to (x, g, h0, reverse), error, pattern)
CHANGES = [
    ("x_int32", lambda x, g, h, r: (_astype(x, "int32"), g, h, r), TypeError, r"^x\b"),
    ("g_int64", lambda x, g, h, r: (x, _astype(g, "int64"), h, r), TypeError, r"^g\b"),
    ("h0_int32", lambda x, g, h, r: (x, g, _astype(h, "int32"), r), TypeError, r"^initial_state\b"),
    ("g_fewer_steps", lambda x, g, h, r: (x, g[:, :-1], h, r), ValueError, r"^g\b"),
    ("x_fewer_channels", lambda x, g, h, r: (x[:, :, :-1], g, h, r), ValueError, r"^g\b"),
    ("x_rank2", lambda x, g, h, r: (x[0], g, h, r), ValueError, r"^x\b"),
    ("x_last_axis_strided", lambda x, g, h, r: (_strided_last_axis(x), g, h, r), ValueError, r"^x\b"),
    ("g_last_axis_strided", lambda x, g, h, r: (x, _strided_last_axis(g), h, r), ValueError, r"^g\b"),
    ("h0_rows", lambda x, g, h, r: (x, g, h[:-1], r), ValueError, r"^initial_state\b"),
    ("h0_rank3", lambda x, g, h, r: (x, g, h[None], r), ValueError, r"^initial_state\b"),
    ("g_other_framework", lambda x, g, h, r: (x, _other(g), h, r), TypeError, r"^g\b"),
    ("h0_other_framework", lambda x, g, h, r: (x, g, _other(h), r), TypeError, r"^initial_state\b"),
    ("h0_list", lambda x, g, h, r: (x, g, h.tolist(), r), TypeError, r"^initial_state\b"),
    ("reverse_int", lambda x, g, h, r: (x, g, h, 1), TypeError, r"^reverse\b"),
    ("reverse_none", lambda x, g, h, r: (x, g, h, None), TypeError, r"^reverse\b"),
]


@pytest.mark.parametrize("fw", ["numpy", "torch"])
@pytest.mark.parametrize("change, error, pattern", [pytest.param(*c[1:], id=c[0]) for c in CHANGES])
def test_cached_key_still_checks(fw, change, error, pattern, fresh_plans):
    rng = np.random.default_rng()
    x, g, h0 = _arrays(fw, rng)
    good = hc.fused_recurrent_hgrn(x, g, h0, True)
    assert len(fresh_plans) == 1, "a valid call should leave its plan"
    again = hc.fused_recurrent_hgrn(x, g, h0, True)  # planned
    for a, b in zip(good, again):
        assert np.array_equal(to_numpy(a), to_numpy(b))
    bx, bg, bh, br = change(x, g, h0, False)
    with pytest.raises(error, match=pattern):
        hc.fused_recurrent_hgrn(bx, bg, bh, True, None, br)


def test_numpy_bool_reverse_is_checked_and_equal(fresh_plans):
    """``reverse`` as a NumPy bool is legal; such calls take the checked path and agree."""
    x, g, h0 = _arrays("numpy", np.random.default_rng())
    a = hc.hgrn(x, g, h0, True, None, True)
    b = hc.hgrn(x, g, h0, True, None, np.bool_(True))
    for u, v in zip(a, b):
        assert np.array_equal(u, v)


# ----------------------------------------------------------------------------------------------
# the planned launch on a recording driver (CPU): torch CPU tensors pose as CUDA tensors

NP_STORAGE = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": np.uint16}
FWD_ARGS = ("x", "g", "o", "sxb", "sxt", "sgb", "sgt", "sob", "sot", "h0", "ht", "cu", "cu64", "T", "D", "reverse")
STEP_ARGS = ("x", "g", "o", "sxb", "sgb", "sob", "h0", "ht", "N", "D")  # fused_recurrent_step (T = 1)
POINTERS = ("x", "g", "o", "h0", "ht")


def _view(ptr, shape, strides, dtype):
    """A NumPy view of device memory that is really host memory (strides in elements)."""
    st = NP_STORAGE[dtype]
    size = np.dtype(st).itemsize
    if 0 in shape:
        return np.zeros(shape, st)
    lo = sum(min(0, (n - 1) * s) for n, s in zip(shape, strides))
    hi = sum(max(0, (n - 1) * s) for n, s in zip(shape, strides))
    base = np.frombuffer((ctypes.c_char * ((hi - lo + 1) * size)).from_address(ptr + lo * size), st)
    return np.lib.stride_tricks.as_strided(base[-lo:], shape, [s * size for s in strides])


def _load(v, dtype):
    return bf16_bits_to_float32(v) if dtype == "bfloat16" else v


def _store(v, a, dtype):
    v[...] = float32_to_bf16_bits(np.asarray(a, np.float32)) if dtype == "bfloat16" else a


class RecordingDriver:
    """``get_function`` and ``driver.launchKernel`` stand-ins: each launch is recorded with its
    arguments read back from the packed parameters, then computed by the reference."""

    def __init__(self):
        self.functions, self.launches = {}, []

    def get_function(self, engine, direction, x_dtype, g_dtype, device, options=(), varlen=False, vec=1):
        key = (engine, direction, x_dtype, g_dtype, device, options, varlen, vec)
        if key not in self.functions:
            self.functions[key] = types.SimpleNamespace(ptr=1000 + len(self.functions), key=key)
        return self.functions[key]

    def launch_kernel(self, fn_ptr, gx, gy, gz, bx, by, bz, shmem, stream, params, extra):
        (key,) = [k for k, f in self.functions.items() if f.ptr == fn_ptr]
        engine, direction, xd, gd = key[:4]
        assert engine == "fused_recurrent" and direction in (0, STEP, BLOCK_FWD)
        # the block walk: (32, BLOCK_WARPS) threads share 32 * VEC channels, the same arguments
        if direction == STEP:
            return self.launch_step(key, gx, gy, gz, bx, by, bz, stream, params)
        slots = (ctypes.c_void_p * len(FWD_ARGS)).from_address(params)
        a = dict(zip(FWD_ARGS, (ctypes.c_int64.from_address(p).value for p in slots)))
        self.launches.append({"fn": key, "grid": (gx, gy, gz), "block": (bx, by, bz), "stream": stream, **a})
        acc = "float64" if "float64" in (xd, gd) else "float32"
        N, T, D = gy, a["T"], a["D"]
        vec = key[7]  # channels per thread: D, pointers and strides are multiples of it
        assert a["cu"] == 0 and gx * bx * vec >= D > (gx - 1) * bx * vec and D % vec == 0
        assert a["x"] % (vec * ITEMSIZE[xd]) == 0 and a["o"] % (vec * ITEMSIZE[xd]) == 0
        assert a["g"] % (vec * ITEMSIZE[gd]) == 0
        assert all(a[k] % vec == 0 for k in ("sxb", "sxt", "sgb", "sgt", "sob", "sot"))
        x = _load(_view(a["x"], (N, T, D), (a["sxb"], a["sxt"], 1), xd), xd)
        g = _load(_view(a["g"], (N, T, D), (a["sgb"], a["sgt"], 1), gd), gd)
        h0 = _view(a["h0"], (N, D), (D, 1), acc) if a["h0"] else None
        o, ht = hc.naive_recurrent_hgrn(x, g, h0, True, None, bool(a["reverse"]))
        _store(_view(a["o"], (N, T, D), (a["sob"], a["sot"], 1), xd), o, xd)
        if a["ht"]:
            _view(a["ht"], (N, D), (D, 1), acc)[...] = ht


    def launch_step(self, key, gx, gy, gz, bx, by, bz, stream, params):
        """The single-step (T = 1) kernel: VEC channels per thread over the flattened [N, D]."""
        xd, gd, vec = key[2], key[3], key[7]
        slots = (ctypes.c_void_p * len(STEP_ARGS)).from_address(params)
        a = dict(zip(STEP_ARGS, (ctypes.c_int64.from_address(p).value for p in slots)))
        self.launches.append({"fn": key, "grid": (gx, gy, gz), "block": (bx, by, bz), "stream": stream, **a})
        acc = "float64" if "float64" in (xd, gd) else "float32"
        N, D = a["N"], a["D"]
        assert (gy, gz, by, bz) == (1, 1, 1, 1) and D % vec == 0 and gx * bx * vec >= N * D
        assert a["x"] % (vec * ITEMSIZE[xd]) == 0 and a["g"] % (vec * ITEMSIZE[gd]) == 0
        x = _load(_view(a["x"], (N, 1, D), (a["sxb"], 1, 1), xd), xd)
        g = _load(_view(a["g"], (N, 1, D), (a["sgb"], 1, 1), gd), gd)
        h0 = _view(a["h0"], (N, D), (D, 1), acc) if a["h0"] else None
        o, ht = hc.naive_recurrent_hgrn(x, g, h0, True)
        _store(_view(a["o"], (N, 1, D), (a["sob"], 1, 1), xd), o, xd)
        if a["ht"]:
            _view(a["ht"], (N, D), (D, 1), acc)[...] = ht


@pytest.fixture
def fake_cuda(monkeypatch, fresh_plans):
    torch = pytest.importorskip("torch")
    driver = pytest.importorskip("cupy_backends.cuda.api.driver")
    cupy = pytest.importorskip("cupy")
    rec = RecordingDriver()
    stream = types.SimpleNamespace(ptr=77)
    monkeypatch.setattr(type(bk.TORCH), "is_gpu", lambda self, a: True)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: stream.ptr, raising=False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(
        cuda_stream=stream.ptr))
    monkeypatch.setattr(cupy.cuda.runtime, "getDevice", lambda: None)  # a CPU tensor's device index
    monkeypatch.setattr(cupy.cuda.runtime, "setDevice", lambda device: None)
    monkeypatch.setattr(fused_recurrent, "get_function", rec.get_function)
    monkeypatch.setattr(driver, "launchKernel", rec.launch_kernel)
    monkeypatch.setattr(ops, "_capturing", lambda stream_ptr: False)
    monkeypatch.setattr(ops, "_kept", {})
    rec.stream = stream
    return rec


def _torch_case(gen, case, device="cpu"):
    """x, g, h0 as torch tensors; drawn on the CPU with ``gen`` in float64, then moved and cast.  The
    "views" layout reads x and g as the two halves of one projection (batch and time strides 2 D)
    and h0 as every other column of a wider tensor."""
    import torch

    B, T, D, xd, gd, hd, layout = case
    x = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, D, generator=gen, dtype=torch.float64))
    h0 = torch.randn(B, 2 * D, generator=gen, dtype=torch.float64)
    if layout == "views":
        assert xd == gd
        x, g = torch.cat([x, g], -1).to(device, getattr(torch, xd)).chunk(2, -1)
        h0 = h0.to(device, getattr(torch, hd))[:, ::2]
    else:
        x, g = x.to(device, getattr(torch, xd)), g.to(device, getattr(torch, gd))
        h0 = h0[:, :D].contiguous().to(device, getattr(torch, hd)) if hd else None
    return x, g, h0


def _tol(case):
    return max(TOL[CASES[case][3]], TOL[CASES[case][4]])


CASES = {  # (B, T, D, x dtype, g dtype, h0 dtype or None, layout)
    "decode_f32": (1, 1, 1024, "float32", "float32", "float32", "dense"),
    "decode_bf16": (1, 1, 1024, "bfloat16", "bfloat16", "float32", "dense"),
    "batch_mixed_f16_state": (3, 5, 33, "bfloat16", "float32", "float16", "dense"),
    "float64_g_f32_state": (2, 4, 9, "float32", "float64", "float32", "dense"),
    "views": (2, 6, 17, "float32", "float32", "float32", "views"),
    "no_state": (2, 3, 65, "float16", "float16", None, "dense"),
    "empty_time": (2, 0, 8, "float32", "float32", "float32", "dense"),
    "no_channels": (2, 3, 0, "float32", "float32", "float32", "dense"),
}


@pytest.mark.parametrize("reverse", [False, True], ids=["fwdtime", "reverse"])
@pytest.mark.parametrize("final", [True, False], ids=["final", "no_final"])
@pytest.mark.parametrize("case", list(CASES))
def test_planned_launch_matches_checked_launch(case, final, reverse, fake_cuda):
    torch = pytest.importorskip("torch")
    import hgrn_cupy.torch as htorch

    gen = torch.Generator().manual_seed(1234)
    x, g, h0 = _torch_case(gen, CASES[case])
    acc = torch.float64 if torch.float64 in (x.dtype, g.dtype) else torch.float32
    ref_o, ref_ht = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g), None if h0 is None else to_numpy(h0), True,
                                            None, reverse)
    tol = _tol(case)

    # the checked path (a NumPy bool is never planned), then planned calls through both front doors
    runs = [hc.fused_recurrent_hgrn(x, g, h0, final, None, np.bool_(reverse))]
    assert not ops._plans
    runs.append(hc.fused_recurrent_hgrn(x, g, h0, final, None, reverse))  # makes the plan
    assert len(ops._plans) == 1
    fake_cuda.stream.ptr = 78  # the stream is read at every call
    runs.append(hc.fused_recurrent_hgrn(x, g, h0, final, None, reverse))
    with torch.no_grad():
        runs.append(htorch.fused_recurrent_hgrn(x, g, h0, final, None, reverse))
    assert len(ops._plans) == 1

    launches = fake_cuda.launches
    if 0 in (x.shape[0], x.shape[2]):
        assert not launches
    else:
        assert len(launches) == len(runs)
        assert [ln["stream"] for ln in launches] == [77, 77, 78, 78]
        for ln in launches[1:]:
            same = {k: v for k, v in ln.items() if k not in POINTERS + ("stream",)}
            assert same == {k: v for k, v in launches[0].items() if k not in POINTERS + ("stream",)}
            assert (ln["x"], ln["g"]) == (x.data_ptr(), g.data_ptr())
            assert (ln["ht"] != 0) == final and (ln["h0"] != 0) == (h0 is not None)
            if h0 is not None and h0.dtype == acc and h0.is_contiguous():
                assert ln["h0"] == h0.data_ptr()  # read in place
    for o, ht in runs:
        assert o.dtype == x.dtype and o.shape == x.shape and o.is_contiguous()
        assert rel_err(o, ref_o) <= tol
        if final:
            assert ht.dtype == acc and ht.shape == (x.shape[0], x.shape[2])
            assert rel_err(ht, ref_ht) <= tol
        else:
            assert ht is None


def test_poisoned_outputs_take_the_checked_path(fake_cuda, monkeypatch):
    """With POISON_OUTPUTS on, a planned call allocates through the framework (NaN-filled) first."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(5)
    x, g, h0 = _torch_case(gen, CASES["decode_f32"])
    hc.fused_recurrent_hgrn(x, g, h0, True)
    filled = []
    monkeypatch.setattr(bk, "POISON_OUTPUTS", True)
    real_empty = bk.TORCH.empty
    monkeypatch.setattr(type(bk.TORCH), "empty", lambda self, *a: filled.append(a) or real_empty(*a))
    o, ht = hc.fused_recurrent_hgrn(x, g, h0, True)
    assert len(filled) == 2 and len(fake_cuda.launches) == 2
    ref_o, ref_ht = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g), to_numpy(h0), True)
    assert rel_err(o, ref_o) <= TOL["float32"] and rel_err(ht, ref_ht) <= TOL["float32"]


# ----------------------------------------------------------------------------------------------
# GPU: planned calls through CuPy and torch, against the reference

GPU_CASES = ["decode_f32", "decode_bf16", "batch_mixed_f16_state", "views", "no_state", "chunks_bf16"]
CASES["chunks_bf16"] = (2, 700, 136, "bfloat16", "bfloat16", "float32", "dense")  # GPU only: many chunks


def _to_cupy(t):
    cupy = pytest.importorskip("cupy")
    import torch

    if t.dtype == torch.bfloat16:
        ml_dtypes = pytest.importorskip("ml_dtypes")
        return cupy.from_dlpack(t.view(torch.int16)).view(ml_dtypes.bfloat16)
    return cupy.from_dlpack(t)


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["fused_recurrent", "chunk"])
@pytest.mark.parametrize("fw", ["cupy", "torch"])
@pytest.mark.parametrize("case", GPU_CASES)
def test_planned_calls_gpu(fw, case, engine):
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(7)
    x, g, h0 = _torch_case(gen, CASES[case], "cuda")
    if fw == "cupy":
        x, g, h0 = (None if a is None else _to_cupy(a) for a in (x, g, h0))
    ref = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g), None if h0 is None else to_numpy(h0), True)
    forward = hc.chunk_hgrn if engine == "chunk" else hc.fused_recurrent_hgrn
    for _ in range(3):  # the first call makes the plan, the others use it
        o, ht = forward(x, g, h0, True)
        assert rel_err(o, ref[0]) <= _tol(case) and rel_err(ht, ref[1]) <= _tol(case)
        assert type(o) is type(x) and o.dtype == x.dtype


@pytest.mark.gpu
@pytest.mark.parametrize("fw", ["cupy", "torch"])
def test_planned_chunk_call_follows_each_calls_alignment(fw, fresh_plans):
    """Two calls with one key (shape, strides, dtypes) whose pointers differ in alignment: the planned
    chunk launch takes 16-byte accesses for the first and element accesses for the second."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(11)
    base_x = torch.randn(2, 700, 144, generator=gen, dtype=torch.float64)
    base_g = torch.nn.functional.logsigmoid(torch.randn(2, 700, 144, generator=gen, dtype=torch.float64))
    bx, bg = base_x.to("cuda", torch.bfloat16), base_g.to("cuda", torch.bfloat16)
    for off in (0, 1, 0):  # 16-byte aligned, 2 bytes off, aligned again
        x, g = bx[:, :, off:off + 136], bg[:, :, off:off + 136]
        if fw == "cupy":
            x, g = _to_cupy(x), _to_cupy(g)
        o, ht = hc.chunk_hgrn(x, g, None, True)
        ref = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g), None, True)
        assert rel_err(o, ref[0]) <= TOL["bfloat16"] and rel_err(ht, ref[1]) <= TOL["bfloat16"]
    assert len(fresh_plans) == 1


@pytest.mark.gpu
def test_planned_torch_call_on_a_side_stream():
    """The planned launch goes on torch's current stream: the side stream first sleeps, then
    overwrites the inputs; a kernel queued on any other stream would read the old values."""
    torch = pytest.importorskip("torch")
    import hgrn_cupy.torch as htorch

    gen = torch.Generator().manual_seed(11)
    x, g, h0 = _torch_case(gen, CASES["decode_f32"], "cuda")
    new = [a + 1 for a in (x, g.exp() - 2, h0)]
    with torch.no_grad():
        htorch.fused_recurrent_hgrn(x, g, h0, True)  # the plan
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            torch.cuda._sleep(50_000_000)
            for a, b in zip((x, g, h0), new):
                a.copy_(b)
            o, ht = htorch.fused_recurrent_hgrn(x, g, h0, True)
        s.synchronize()
    ref = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g), to_numpy(h0), True)
    assert rel_err(o, ref[0]) <= TOL["float32"] and rel_err(ht, ref[1]) <= TOL["float32"]


def _three_bf16_calls(gen, layout, vec):
    """Three fused forward calls (checked, plan made, planned) on 3 x 5 x D bfloat16 inputs against the
    reference: D = 36 ("dense": contiguous; "odd_offset": views one element off a tensor of D + vec
    columns, so the strides are multiples of ``vec`` and the pointers are checked at each call) or 35."""
    D = 35 if layout == "odd_d" else 36
    x, g, h0 = _torch_case(gen, (3, 5, D + vec, "bfloat16", "bfloat16", "float32", "dense"))
    if layout == "odd_offset":
        x, g, h0 = x[..., 1:D + 1], g[..., 1:D + 1], h0[:, 1:D + 1].contiguous()
    else:
        x, g, h0 = x[..., :D].contiguous(), g[..., :D].contiguous(), h0[:, :D].contiguous()
    ref_o, ref_ht = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g), to_numpy(h0), True)
    for _ in range(3):
        o, ht = hc.fused_recurrent_hgrn(x, g, h0, True)
        assert rel_err(o, ref_o) <= TOL["bfloat16"] and rel_err(ht, ref_ht) <= TOL["bfloat16"]
    assert len(ops._plans) == 1


@pytest.mark.parametrize("layout", ["dense", "odd_offset", "odd_d"])
def test_two_channels_per_thread_where_the_layout_allows(layout, fake_cuda, monkeypatch):
    """The fused walk takes two channels per thread from WALK_VEC_MIN_CHANNELS on (lowered to 0 here)
    where D, strides and this call's pointers allow it, and one otherwise, planned or not."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(fused_recurrent, "WALK_VEC_MIN_CHANNELS", 0)
    _three_bf16_calls(torch.Generator().manual_seed(7), layout, 2)
    vecs = [ln["fn"][7] for ln in fake_cuda.launches]
    assert vecs == [2, 2, 2] if layout == "dense" else vecs == [1, 1, 1]


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("layout", ["dense", "odd_offset", "odd_d"])
def test_block_walk_where_the_layout_allows(layout, narrow, fake_cuda, monkeypatch):
    """The fused forward runs as a block walk (32 x BLOCK_WARPS threads on 32 * VEC channels; 8-byte
    lanes, or 4-byte ones below BLOCK_WALK_NARROW_BELOW channels) where its channel band and T allow
    (opened to everything here) and D, strides and this call's pointers allow the lanes; the thread walk
    otherwise, planned or not."""
    torch = pytest.importorskip("torch")
    force_block_walks(monkeypatch, narrow)
    vec = 2 if narrow else 4
    _three_bf16_calls(torch.Generator().manual_seed(8), layout, vec)
    got = [(ln["fn"][1], ln["fn"][7], ln["grid"], ln["block"]) for ln in fake_cuda.launches]
    if layout == "dense":
        assert got == [(BLOCK_FWD, vec, (1, 3, 1), (32, fused_recurrent.BLOCK_WARPS, 1))] * 3
    else:
        assert [k[:2] for k in got] == [(0, 1)] * 3


BACKWARD_CASES = {  # (B, T, D, o and do dtype, g dtype, do dtype, layout)
    "bf16_chunks": (2, 700, 136, "bfloat16", "bfloat16", "bfloat16", "dense"),
    "f32_do_cast": (3, 300, 40, "float32", "float32", "bfloat16", "dense"),
    "time_stride": (2, 333, 64, "float16", "float32", "float16", "time_stride"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["fused_recurrent", "chunk"])
@pytest.mark.parametrize("fw", ["cupy", "torch"])
@pytest.mark.parametrize("case", list(BACKWARD_CASES))
def test_planned_backward_gpu(fw, case, engine, fresh_plans):
    """Backward calls without states: the first makes the plan, the others use it; each against the
    reference, and the planned results equal the checked path's."""
    torch = pytest.importorskip("torch")
    B, T, D, od, gd, dd, layout = BACKWARD_CASES[case]
    gen = torch.Generator().manual_seed(13)
    step = 3 if layout == "time_stride" else 1
    x = torch.randn(B, T * step, D, generator=gen, dtype=torch.float64)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T * step, D, generator=gen, dtype=torch.float64))
    do = torch.randn(B, T * step, D, generator=gen, dtype=torch.float64)
    x, g, do = (a.to("cuda")[:, ::step] for a in (x, g, do))
    x, g, do = x.to(getattr(torch, od)), g.to(getattr(torch, gd)), do.to(getattr(torch, dd))
    o = hc.fused_recurrent_hgrn(x, g)[0][:, :]  # row-major
    if layout == "time_stride":  # o read through a strided view as well
        o = torch.repeat_interleave(o, 3, dim=1)[:, ::3]
    if fw == "cupy":
        g, o, do = _to_cupy(g), _to_cupy(o), _to_cupy(do)
    fresh_plans.clear()  # the forward above made one
    ref = hc.naive_recurrent_hgrn_bwd(to_numpy(g), to_numpy(o), to_numpy(do))
    tol = max(TOL[od], TOL[gd], TOL[dd])
    checked = hc.hgrn_backward(g, o, do, None, None, None, np.bool_(False), engine=engine)  # never planned
    assert not fresh_plans
    for _ in range(3):
        dx, dg, dh0 = hc.hgrn_backward(g, o, do, engine=engine)
        assert dh0 is None and type(dx) is type(o)
        assert rel_err(dx, ref[0]) <= tol and rel_err(dg, ref[1]) <= tol
        for a, b in zip((dx, dg), checked[:2]):
            assert bool((a == b).all())
    assert len(fresh_plans) == 1


BACKWARD_STATE_CASES = {  # (dht present, h0 dtype or None, h0 a strided view)
    "dht": (True, None, False),
    "h0_f32": (False, "float32", False),
    "both_h0_bf16": (True, "bfloat16", False),
    "both_h0_strided": (True, "float32", True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["fused_recurrent", "chunk"])
@pytest.mark.parametrize("fw", ["cupy", "torch"])
@pytest.mark.parametrize("case", list(BACKWARD_STATE_CASES))
def test_planned_backward_states_gpu(fw, case, engine, fresh_plans):
    """Backward calls with states (dht, an initial state in float32, in bfloat16 and as a strided view):
    the first makes the plan, the others use it; each against the reference, dh0 in the initial state's
    dtype, and the planned results equal the checked path's."""
    torch = pytest.importorskip("torch")
    with_dht, h0_dtype, strided = BACKWARD_STATE_CASES[case]
    B, T, D = 2, 500, 72
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, D, generator=gen, dtype=torch.float64))
    do = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    dht = torch.randn(B, D, generator=gen, dtype=torch.float64).to("cuda", torch.float32) if with_dht else None
    h0 = None
    if h0_dtype:
        h0 = torch.randn(B, 2 * D, generator=gen, dtype=torch.float64).to("cuda", getattr(torch, h0_dtype))
        h0 = h0[:, ::2] if strided else h0[:, :D].contiguous()
    x, g, do = (a.to("cuda", torch.bfloat16) for a in (x, g, do))
    o = hc.hgrn(x, g, h0)[0]
    if fw == "cupy":
        g, o, do = _to_cupy(g), _to_cupy(o), _to_cupy(do)
        dht, h0 = (None if a is None else _to_cupy(a) for a in (dht, h0))
    fresh_plans.clear()  # the forward above made one
    ref = hc.naive_recurrent_hgrn_bwd(to_numpy(g), to_numpy(o), to_numpy(do), None if dht is None else to_numpy(dht),
                                      None if h0 is None else to_numpy(h0))
    tol = max(TOL["bfloat16"], TOL[h0_dtype or "float32"])
    checked = hc.hgrn_backward(g, o, do, dht, h0, None, np.bool_(False), engine=engine)  # never planned
    assert not fresh_plans
    for _ in range(3):
        got = hc.hgrn_backward(g, o, do, dht, h0, engine=engine)
        assert type(got[0]) is type(o) and (got[2] is None) == (h0 is None)
        for k in range(3 if h0 is not None else 2):
            assert rel_err(got[k], ref[k]) <= tol, k
            assert bool((got[k] == checked[k]).all()), k
        if h0 is not None:
            assert got[2].dtype == h0.dtype and tuple(got[2].shape) == (B, D)
    assert len(fresh_plans) == 1


def test_backward_plans_cpu(fresh_plans):
    """Backward calls are planned by key: g, o, do, and the layouts of the states where there are states;
    a call whose do or state does not fit is still rejected, and a state of another type is not planned."""
    rng = np.random.default_rng(3)
    x, g, _ = _arrays("numpy", rng)
    o = hc.hgrn(x, g)[0]
    do = rng.standard_normal(o.shape).astype(np.float32)
    fresh_plans.clear()
    first = hc.hgrn_backward(g, o, do)
    again = hc.hgrn_backward(g, o, do)
    assert len(fresh_plans) == 1 and first[2] is None
    for a, b in zip(first[:2], again[:2]):
        assert np.array_equal(a, b)
    ref = hc.naive_recurrent_hgrn_bwd(g, o, do)
    assert rel_err(again[0], ref[0]) <= TOL["float32"] and rel_err(again[1], ref[1]) <= TOL["float32"]
    with pytest.raises(ValueError):
        hc.hgrn_backward(g, o, do[:, :-1])
    N, D = x.shape[0], x.shape[2]
    dht = rng.standard_normal((N, D)).astype(np.float32)
    h0 = rng.standard_normal((N, D))  # float64: dh0 comes back in float64
    for n, (d, h) in enumerate(((dht, None), (None, h0), (dht, h0)), start=2):
        got = [hc.hgrn_backward(g, o, do, d, h) for _ in range(2)]
        assert len(fresh_plans) == n
        ref = hc.naive_recurrent_hgrn_bwd(g, o, do, d, h)
        for k in range(3):
            if h is None and k == 2:
                assert got[0][2] is None and got[1][2] is None
                continue
            assert np.array_equal(got[0][k], got[1][k]) and rel_err(got[1][k], ref[k]) <= TOL["float32"]
        if h is not None:
            assert got[1][2].dtype == np.float64
    with pytest.raises(ValueError):  # a state that does not fit: a new key, and the checks say why
        hc.hgrn_backward(g, o, do, dht[:, :-1], h0)
    torch = pytest.importorskip("torch")  # a state of another type: not planned, rejected by the checks
    with pytest.raises((TypeError, ValueError)):
        hc.hgrn_backward(g, o, do, torch.from_numpy(dht), h0)
    assert len(fresh_plans) == 4


CHUNK_FWD_ARGS = ("x", "g", "o", "sxb", "sxt", "sgb", "sgt", "sob", "sot", "h0", "ht", "cu", "cu64", "N", "T", "D",
                  "reverse", "hdr", "slots", "capacity", "ntiles", "nchunks", "l2_ahead", "peek", "stagger")
CHUNK_BWD_ARGS = ("g", "o", "do", "dx", "dg", "sgb", "sgt", "sob", "sot", "sdob", "sdot", "sdxb", "sdxt", "sdgb",
                  "sdgt", "h0", "dht", "dh0", "cu", "cu64", "N", "T", "D", "reverse", "hdr", "slots", "capacity",
                  "ntiles", "nchunks", "l2_ahead", "peek", "stagger")


@pytest.mark.parametrize("kept", [True, False], ids=["kept", "fresh"])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_planned_chunk_launch_matches_checked_launch(offset, kept, fake_cuda, monkeypatch):
    """CPU: the chunk engine's planned launches, forward and backward, hand the kernel what the checked
    path hands it (arguments read back from the packed parameters), with 16-byte accesses only where the
    call's pointers allow them.  Kept scratch: one buffer, filled once when it is made; fresh scratch:
    filled before each launch."""
    torch = pytest.importorskip("torch")
    cupy = pytest.importorskip("cupy")
    from hgrn_cupy import chunk

    monkeypatch.setattr(ops.config, "keep_workspaces", kept)
    monkeypatch.setattr(ops, "_capturing", lambda stream_ptr: False)
    monkeypatch.setattr(ops, "_kept", {})
    calls = []
    monkeypatch.setattr(chunk, "get_function", fake_cuda.get_function)
    monkeypatch.setattr(chunk, "blocks_at_once", lambda fn, threads, device: 8)
    monkeypatch.setattr(cupy.cuda.runtime, "memsetAsync", lambda p, v, n, s: calls.append(("fill", p, v, n, s)))

    def launch_kernel(fn_ptr, gx, gy, gz, bx, by, bz, shmem, stream, params, extra):
        (key,) = [k for k, f in fake_cuda.functions.items() if f.ptr == fn_ptr]
        names = CHUNK_FWD_ARGS if key[1] == 0 else CHUNK_BWD_ARGS
        slots = (ctypes.c_void_p * len(names)).from_address(params)
        args = dict(zip(names, (ctypes.c_int64.from_address(p).value for p in slots)))
        calls.append(("kernel", key, (gx, gy, gz, bx, by, bz), stream, args))
    driver = pytest.importorskip("cupy_backends.cuda.api.driver")
    monkeypatch.setattr(driver, "launchKernel", launch_kernel)

    gen = torch.Generator().manual_seed(3)
    base = torch.randn(3, 300, 72, generator=gen).to(torch.bfloat16)
    x, g = base[:, :, offset:offset + 64], base.flip(0)[:, :, offset:offset + 64]
    do = torch.randn(3, 300, 64, generator=gen).to(torch.bfloat16)
    for _ in range(3):  # checked, then the plan is made, then it is used
        o = hc.chunk_hgrn(x, g)[0]
    for _ in range(3):
        hc.hgrn_backward(g, o, do, engine="chunk")
    dht, h0 = torch.randn(3, 64, generator=gen), torch.randn(3, 64, generator=gen).to(torch.bfloat16)
    for _ in range(3):  # with states: a key of its own
        assert hc.hgrn_backward(g, o, do, dht, h0, engine="chunk")[2].dtype == torch.bfloat16
    assert len(ops._plans) == 3  # one forward key, two backward keys
    kernels = [c for c in calls if c[0] == "kernel"]
    fills = [c for c in calls if c[0] == "fill"]
    assert len(kernels) == 9 and len(fills) == (1 if kept else 9)
    assert all(k[4]["h0"] and k[4]["dht"] and k[4]["dh0"] for k in kernels[6:])
    assert not any(k[4]["h0"] or k[4]["dht"] or k[4]["dh0"] for k in kernels[3:6])
    pointers = ("x", "g", "o", "do", "dx", "dg", "hdr", "slots", "h0", "dht", "dh0")
    for direction, group in ((0, kernels[:3]), (1, kernels[3:6]), (1, kernels[6:])):
        first = group[0]
        assert first[1][1] == direction and first[1][7] == (1 if offset else 8)  # VEC from the pointers
        assert first[4]["stagger"] == chunk.stagger(first[2][0], 8) == 4  # grid of 9 to 30 blocks, 8 at once
        for k in group[1:]:
            assert k[1:4] == first[1:4]
            assert {n: v for n, v in k[4].items() if n not in pointers} == \
                   {n: v for n, v in first[4].items() if n not in pointers}
    if kept:  # one buffer (64 KB at least), filled with ones before the first launch, then used as it is
        (_, p, v, n, s), = fills
        assert calls[0][0] == "fill" and v == 0xFF and s == fake_cuda.stream.ptr and n == ops._KEPT_MIN_BYTES
        assert list(ops._kept.values())[0][:1] == (p,)
        for k in kernels:
            assert k[3] == s and k[4]["hdr"] == p and k[4]["slots"] + k[4]["capacity"] == p + n
    else:
        for (_, p, v, n, s), k in zip(fills, kernels):  # the whole workspace filled with ones before each launch
            assert v == 0xFF and s == k[3] == fake_cuda.stream.ptr and k[4]["hdr"] == p
            assert k[4]["slots"] > p and k[4]["slots"] + k[4]["capacity"] == p + n
        assert not ops._kept
    assert kernels[0][4]["x"] == x.data_ptr() and kernels[3][4]["do"] == do.data_ptr()


@pytest.mark.parametrize("fw", ["torch", "cupy"])
def test_kept_workspaces(fw, monkeypatch):
    """CPU: kept scratch is one buffer per (framework, device, stream, accumulation itemsize), at least
    64 KB and a power of two, made (and filled with ones, on its stream) only when none is big enough; it
    is not used while the stream captures a graph or when switched off, and release_workspaces frees it."""
    cupy = pytest.importorskip("cupy")
    fills, made = [], []
    monkeypatch.setattr(cupy.cuda.runtime, "memsetAsync", lambda p, v, n, s: fills.append((p, v, n, s)))
    monkeypatch.setattr(ops, "_kept", {})
    capturing = set()
    monkeypatch.setattr(ops, "_capturing", lambda stream_ptr: stream_ptr in capturing)
    if fw == "torch":
        torch = pytest.importorskip("torch")
        real_empty = torch.empty

        def empty(shape, dtype, device):  # host memory standing in for the device's
            made.append((shape, device))
            return real_empty(shape, dtype=dtype)
        monkeypatch.setattr(torch, "empty", empty)
        alloc = ops._workspace(bk.TORCH, types.SimpleNamespace(index=1))
    else:
        monkeypatch.setattr(cupy.cuda.runtime, "getDevice", lambda: 1)
        alloc = _cupy_alloc(monkeypatch, made)

    a = alloc(1000, 4, 5)
    assert a[2] and a[3] == 1 << 16 and fills == [(a[0], 0xFF, 1 << 16, 5)]
    assert alloc(1 << 16, 4, 5) is a and len(fills) == 1  # fits: the same buffer, no fill
    b = alloc(1000, 8, 5)  # another accumulation itemsize: its own buffer
    c = alloc(1000, 4, 6)  # another stream: its own buffer
    assert len({a[0], b[0], c[0]}) == 3 and len(fills) == 3 and len(ops._kept) == 3
    d = alloc((1 << 16) + 1, 4, 5)  # grown to the next power of two, filled
    assert d[0] != a[0] and d[3] == 1 << 17 and fills[-1] == (d[0], 0xFF, 1 << 17, 5) and len(ops._kept) == 3
    capturing.add(5)  # capturing: fresh memory of the size asked, which the launcher fills
    e = alloc(1000, 4, 5)
    assert not e[2] and e[3] == 1000 and e[0] != d[0] and len(fills) == 4
    capturing.clear()
    monkeypatch.setattr(ops.config, "keep_workspaces", False)
    assert not alloc(1000, 4, 5)[2] and len(fills) == 4
    monkeypatch.setattr(ops.config, "keep_workspaces", True)
    assert alloc(1000, 4, 5) is d
    hc.config.release_workspaces()
    assert not ops._kept
    assert alloc(1000, 4, 5)[0] != d[0] and len(fills) == 5 and len(made) == 7
    # the default stream's handles may name another stream in each thread: memory per thread there
    import threading

    for handle, per_thread in ((0, True), (2, True), (5, False)):
        mine = alloc(1000, 4, handle)
        theirs = []
        t = threading.Thread(target=lambda: theirs.append(alloc(1000, 4, handle)))
        t.start()
        t.join()
        assert (theirs[0][0] != mine[0]) == per_thread and alloc(1000, 4, handle) is mine


def _cupy_alloc(monkeypatch, made):
    """ops._workspace for CuPy with host arrays standing in for CuPy's (data.ptr their address)."""
    cupy = pytest.importorskip("cupy")

    class HostArray:
        def __init__(self, shape, dtype):
            made.append((shape, dtype))
            self.a = np.empty(shape, dtype)
            self.data = types.SimpleNamespace(ptr=self.a.ctypes.data)
    monkeypatch.setattr(cupy, "empty", HostArray)
    return ops._workspace(bk.CUPY, None)


FUSED_BWD_ARGS = ("g", "o", "do", "dx", "dg", "sgb", "sgt", "sob", "sot", "sdob", "sdot", "sdxb", "sdxt", "sdgb", "sdgt",
                  "h0", "dht", "dh0", "cu", "cu64", "T", "D", "reverse")


@pytest.mark.parametrize("shape", [(3, 300, 64), (2, 200, 4096)], ids=["walk", "block_walk"])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_planned_fused_backward_matches_checked(shape, offset, fake_cuda, monkeypatch):
    """CPU: the fused engine's planned backward launches, without and with states, hand the kernel what the
    checked path hands it (arguments read back from the packed parameters): the block walk where the layout
    and the pointers allow it, else the walk, one channel a thread where a pointer is misaligned."""
    torch = pytest.importorskip("torch")
    driver = pytest.importorskip("cupy_backends.cuda.api.driver")
    from hgrn_cupy._compile import BLOCK_BWD

    calls = []

    def launch_kernel(fn_ptr, gx, gy, gz, bx, by, bz, shmem, stream, params, extra):
        (key,) = [k for k, f in fake_cuda.functions.items() if f.ptr == fn_ptr]
        slots = (ctypes.c_void_p * len(FUSED_BWD_ARGS)).from_address(params)
        args = dict(zip(FUSED_BWD_ARGS, (ctypes.c_int64.from_address(p).value for p in slots)))
        calls.append((key, (gx, gy, gz, bx, by, bz), stream, args))
    monkeypatch.setattr(driver, "launchKernel", launch_kernel)
    B, T, D = shape
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(B, T, D + 8, generator=gen).to(torch.bfloat16)[:, :, offset:offset + D]
    o, do = (torch.randn(B, T, D, generator=gen).to(torch.bfloat16) for _ in range(2))
    dht, h0 = torch.randn(B, D, generator=gen), torch.randn(B, D, generator=gen)
    outs = []
    for states in ((None, None), (dht, h0)):
        for _ in range(3):  # checked, then the plan is made, then it is used
            outs.append(hc.hgrn_backward(g, o, do, *states, engine="fused_recurrent"))
    assert len(ops._plans) == 2 and len(calls) == 6
    block = fused_recurrent.block_walk_fits(B, T, D, "bfloat16", "bfloat16", 1) if D == 4096 and not offset else 0
    assert calls[0][0][1] == (BLOCK_BWD if block else 1) and calls[0][0][7] == (block or 1)
    pointers = ("dx", "dg", "h0", "dht", "dh0")
    for group, out in ((calls[:3], outs[:3]), (calls[3:], outs[3:])):
        first = group[0]
        for c in group:
            assert c[:3] == first[:3] and c[2] == fake_cuda.stream.ptr
            assert {n: v for n, v in c[3].items() if n not in pointers} == \
                   {n: v for n, v in first[3].items() if n not in pointers}
            assert c[3]["g"] == g.data_ptr() and c[3]["o"] == o.data_ptr() and c[3]["do"] == do.data_ptr()
        for c, (dx, dg, dh0) in zip(group, out):
            assert c[3]["dx"] == dx.data_ptr() and c[3]["dg"] == dg.data_ptr()
            assert c[3]["dh0"] == (0 if dh0 is None else dh0.data_ptr())
    assert not any(c[3]["h0"] or c[3]["dht"] for c in calls[:3])
    assert all(c[3]["h0"] == h0.data_ptr() and c[3]["dht"] == dht.data_ptr() for c in calls[3:])
