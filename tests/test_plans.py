"""Planned calls and the engine choice (``hgrn_cupy.plans``, ``hgrn_cupy.dispatch``).

Every call runs through a plan; a call whose arrays match an earlier valid call (framework, device,
dtype, shape, strides: the key) reuses that call's plan and skips the checks and the engine choice.

CPU: a kept plan never lets a bad argument through; the engine choice (property-based): the built-in
rule, pinned engines, unknown names and what the dispatch asks the tuner; and, with a recording driver
standing in for CUDA (torch CPU tensors posing as CUDA ones, reference "kernels" reading and writing
through the packed parameters), the GPU plan body's launches compute the float64 reference, on the
stream read at each call, with the widest accesses each call's pointers allow, and with kept or fresh
scratch.  GPU-marked: planned CuPy and torch calls against the reference, on the caller's stream, and
``hgrn`` running the engine the dispatch names on both sides of the built-in crossover.
"""
import ctypes
import re
import threading
import types
import zlib

import numpy as np
import pytest
from conftest import TOL, force_block_walks, rel_err, to_numpy

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # not in the package's test extra: the property-based tests skip without it
    class _NoStrategies:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    st = _NoStrategies()

    def settings(**_):
        return lambda fn: fn

    def given(**_):
        def skipped_test(fn):
            def test():
                pytest.skip("needs hypothesis")
            test.__name__, test.__doc__ = fn.__name__, fn.__doc__
            return test
        return skipped_test

import hgrn_cupy as hc
from hgrn_cupy import arrays as ar
from hgrn_cupy import checks, dispatch, nvrtc, plans, tuning, workspace
from hgrn_cupy.engines import chunk, fused_recurrent
from hgrn_cupy.engines.layout import vector_width
from hgrn_cupy.naive import bf16_bits_to_float32, float32_to_bf16_bits
from hgrn_cupy.settings import ENGINES


@pytest.fixture
def fresh_plans(monkeypatch):
    """An empty plan cache for the test, thrown away after it."""
    monkeypatch.setattr(plans, "_plans", {})
    return plans._plans


# ----------------------------------------------------------------------------------------------
# a kept plan still rejects every bad argument (CPU; NumPy and torch arrays are planned)

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
    ("x_int32", lambda x, g, h, r: (_astype(x, "int32"), g, h, r), TypeError, r"^x has dtype int32"),
    ("g_int64", lambda x, g, h, r: (x, _astype(g, "int64"), h, r), TypeError, r"^g has dtype int64"),
    ("h0_int32", lambda x, g, h, r: (x, g, _astype(h, "int32"), r), TypeError, r"^initial_state has dtype int32"),
    ("g_fewer_steps", lambda x, g, h, r: (x, g[:, :-1], h, r), ValueError, r"^g must have shape"),
    ("x_fewer_channels", lambda x, g, h, r: (x[:, :, :-1], g, h, r), ValueError, r"^g must have shape"),
    ("x_rank2", lambda x, g, h, r: (x[0], g, h, r), ValueError, r"^x must have 3 dimensions"),
    ("x_last_axis_strided", lambda x, g, h, r: (_strided_last_axis(x), g, h, r), ValueError,
     r"^x must be contiguous along its last axis"),
    ("g_last_axis_strided", lambda x, g, h, r: (x, _strided_last_axis(g), h, r), ValueError,
     r"^g must be contiguous along its last axis"),
    ("h0_rows", lambda x, g, h, r: (x, g, h[:-1], r), ValueError, r"^initial_state must have shape"),
    ("h0_rank3", lambda x, g, h, r: (x, g, h[None], r), ValueError, r"^initial_state must have shape"),
    ("g_other_framework", lambda x, g, h, r: (x, _other(g), h, r), TypeError, r"^g is a \w+ array but x is"),
    ("h0_other_framework", lambda x, g, h, r: (x, g, _other(h), r), TypeError,
     r"^initial_state is a \w+ array but x is"),
    ("h0_list", lambda x, g, h, r: (x, g, h.tolist(), r), TypeError, r"^initial_state must be a NumPy"),
    ("reverse_int", lambda x, g, h, r: (x, g, h, 1), TypeError, r"^reverse must be a bool"),
    ("reverse_none", lambda x, g, h, r: (x, g, h, None), TypeError, r"^reverse must be a bool"),
]


@pytest.mark.parametrize("fw", ["numpy", "torch"])
@pytest.mark.parametrize("change, error, pattern", [pytest.param(*c[1:], id=c[0]) for c in CHANGES])
def test_cached_key_still_checks(fw, change, error, pattern, fresh_plans):
    rng = np.random.default_rng(0)
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
    """``reverse`` as a NumPy bool is legal; such calls are not kept (the key reads Python bools) and
    agree with the kept ones."""
    x, g, h0 = _arrays("numpy", np.random.default_rng(1))
    a = hc.hgrn(x, g, h0, True, None, True)
    assert len(fresh_plans) == 1
    b = hc.hgrn(x, g, h0, True, None, np.bool_(True))
    assert len(fresh_plans) == 1
    for u, v in zip(a, b):
        assert np.array_equal(u, v)


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
    with pytest.raises(ValueError, match=r"^do must have shape"):
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
    with pytest.raises(ValueError, match=r"^dht must have shape"):  # a new key, and the checks say why
        hc.hgrn_backward(g, o, do, dht[:, :-1], h0)
    torch = pytest.importorskip("torch")  # a state of another type: not planned, rejected by the checks
    with pytest.raises(TypeError, match=r"^dht is a torch array but \w+ is a numpy array"):
        hc.hgrn_backward(g, o, do, torch.from_numpy(dht), h0)
    assert len(fresh_plans) == 4


# ----------------------------------------------------------------------------------------------
# the engine choice (CPU, property-based)

DTYPE = st.sampled_from(nvrtc.DTYPES)
CHANNELS = st.integers(0, 1 << 12)


def _call(N, T, D, dtypes, varlen=False):
    """A checked call as ``checks`` makes them (the framework plays no part in the choice)."""
    return checks.Call(ar.NUMPY, 1 if varlen else N, T, D, N, dtypes, nvrtc.accumulation_dtype(*dtypes), varlen,
                       True)


@settings(max_examples=300, deadline=None, database=None)
@given(N=CHANNELS, T=st.one_of(st.integers(0, 2 * dispatch.FUSED_MAX_T), st.integers(0, 1 << 16)), D=CHANNELS,
       x_dtype=DTYPE, g_dtype=DTYPE, direction=st.sampled_from((0, 1)), reverse=st.booleans(),
       varlen=st.booleans())
def test_engine_choice(N, T, D, x_dtype, g_dtype, direction, reverse, varlen):
    """The built-in rule names an engine, the fused one at most FUSED_MAX_T steps; with nothing to
    measure (no device) ``auto`` is the rule; a pinned ``config.engine`` is what ``auto`` runs; an engine
    named in the call wins over ``config.engine``; the chunk engine with no steps becomes the fused one."""
    dtypes = (x_dtype, g_dtype)
    call = _call(N, T, D, dtypes, varlen)
    ruled = dispatch.rule(N, T, D, dtypes, direction)
    assert ruled in dispatch.CANDIDATES
    if T <= dispatch.FUSED_MAX_T:
        assert ruled == "fused_recurrent"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hc.config, "engine", "auto")
        assert dispatch.choose("auto", call, direction, reverse) == ruled
        for pinned in dispatch.CANDIDATES:
            expect = "fused_recurrent" if T == 0 else pinned
            assert dispatch.choose(pinned, call, direction, reverse, 0) == expect
            mp.setattr(hc.config, "engine", pinned)
            assert dispatch.choose("auto", call, direction, reverse, 0) == expect
            for other in dispatch.CANDIDATES:  # the call's own engine comes first
                assert dispatch.choose(other, call, direction, reverse) == ("fused_recurrent" if T == 0 else other)
            mp.setattr(hc.config, "engine", "auto")


@settings(max_examples=200, deadline=None, database=None)
@given(name=st.one_of(st.text(max_size=20), st.none(), st.integers(), st.sampled_from([n.upper() for n in ENGINES])))
def test_unknown_engine_is_rejected(name):
    """Any name but the engines' is a ValueError that says which names there are, on every path that
    takes one (the dispatch, the public functions on CPU arrays, and the setting)."""
    if name in ENGINES:
        return
    call = _call(2, 100, 8, ("float32", "float32"))
    with pytest.raises(ValueError, match=r"^engine must be one of \("):
        dispatch.choose(name, call, 0, False)
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match=r"^engine must be one of \("):
        hc.hgrn_backward(x, x, x, engine=name)
    with pytest.raises(ValueError, match=r"^config\.engine must be one of \("):
        hc.config.engine = name
    assert hc.config.engine in ENGINES


@settings(max_examples=300, deadline=None, database=None)
@given(N=CHANNELS, T=st.integers(0, 1 << 16), D=CHANNELS, x_dtype=DTYPE, g_dtype=DTYPE,
       direction=st.sampled_from((0, 1)), reverse=st.booleans(), varlen=st.booleans(),
       allow_timing=st.booleans(), tune=st.booleans(), with_run=st.booleans(), device=st.sampled_from((None, 0, 3)))
def test_auto_asks_the_tuner(N, T, D, x_dtype, g_dtype, direction, reverse, varlen, allow_timing, tune, with_run,
                             device):
    """``auto`` on a device past FUSED_MAX_T steps takes the tuner's decision (a fake here): it asks for
    the call's device and shape class with the rule's engine first among the candidates and as the
    default, and allows timing only where the caller does, ``config.tune`` is on and there is a launch to
    time.  Without a device, at most FUSED_MAX_T steps, or with an engine pinned, the tuner is not asked."""
    dtypes = (x_dtype, g_dtype)
    call = _call(N, T, D, dtypes, varlen)
    ruled = dispatch.rule(N, T, D, dtypes, direction)
    asked = []

    def fake_choose(device, key, candidates, run, default, allow_timing, measure=None):
        asked.append(dict(device=device, key=key, candidates=tuple(candidates), run=run, default=default,
                          allow_timing=allow_timing, measure=measure))
        return candidates[-1]  # not the rule's engine: the answer must be the tuner's

    def run(name):
        raise AssertionError("the fake tuner launches nothing")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tuning, "choose", fake_choose)
        mp.setattr(hc.config, "tune", tune)
        mp.setattr(hc.config, "engine", "auto")
        got = dispatch.choose("auto", call, direction, reverse, device, run if with_run else None, allow_timing, 5)
        if device is None or T <= dispatch.FUSED_MAX_T:
            assert not asked and got == ruled
        else:
            (a,) = asked
            assert a["candidates"][0] == ruled and sorted(a["candidates"]) == sorted(dispatch.CANDIDATES)
            assert got == a["candidates"][-1] and a["default"] == ruled and a["device"] == device
            assert a["key"] == tuning.shape_class(direction, dtypes, N, T, D, varlen, reverse)
            timing = allow_timing and tune and with_run
            assert a["allow_timing"] is timing and (a["measure"] is not None) == timing
            if with_run:
                assert a["run"] is run
        for pinned in dispatch.CANDIDATES:
            asked.clear()
            mp.setattr(hc.config, "engine", pinned)
            dispatch.choose("auto", call, direction, reverse, device, run, allow_timing, 5)
            dispatch.choose(pinned, call, direction, reverse, device, run, allow_timing, 5)
            assert not asked


# ----------------------------------------------------------------------------------------------
# the GPU plan body on a recording driver (CPU): torch CPU tensors pose as CUDA tensors

NP_STORAGE = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": np.uint16}
WALK_FWD_ARGS = ("x", "g", "o", "sxb", "sxt", "sgb", "sgt", "sob", "sot", "h0", "ht", "cu", "cu64", "T", "D",
                 "reverse")
STEP_ARGS = ("x", "g", "o", "sxb", "sgb", "sob", "h0", "ht", "N", "D")  # fused_recurrent_step (T = 1)
WALK_BWD_ARGS = ("g", "o", "do", "dx", "dg", "sgb", "sgt", "sob", "sot", "sdob", "sdot", "sdxb", "sdxt", "sdgb", "sdgt",
                 "h0", "dht", "dh0", "cu", "cu64", "T", "D", "reverse")
CHUNK_FWD_ARGS = ("x", "g", "o", "sxb", "sxt", "sgb", "sgt", "sob", "sot", "h0", "ht", "cu", "cu64", "N", "T", "D",
                  "reverse", "hdr", "slots", "capacity", "ntiles", "nchunks", "l2_ahead", "peek", "stagger")
CHUNK_BWD_ARGS = ("g", "o", "do", "dx", "dg", "sgb", "sgt", "sob", "sot", "sdob", "sdot", "sdxb", "sdxt", "sdgb",
                  "sdgt", "h0", "dht", "dh0", "cu", "cu64", "N", "T", "D", "reverse", "hdr", "slots", "capacity",
                  "ntiles", "nchunks", "l2_ahead", "peek", "stagger")
KERNEL_ARGS = {"fused_recurrent_fwd": WALK_FWD_ARGS, "fused_recurrent_block_fwd": WALK_FWD_ARGS,
               "fused_recurrent_step": STEP_ARGS, "fused_recurrent_bwd": WALK_BWD_ARGS,
               "fused_recurrent_block_bwd": WALK_BWD_ARGS, "chunk_fwd": CHUNK_FWD_ARGS, "chunk_bwd": CHUNK_BWD_ARGS}
POINTERS = ("x", "g", "o", "do", "dx", "dg", "h0", "ht", "dht", "dh0", "hdr", "slots")
C_NAMES = {c: d for d, c in nvrtc.C_TYPES.items()}


def _view(ptr, shape, strides, dtype):
    """A NumPy view of device memory that is really host memory (strides in elements)."""
    st_ = NP_STORAGE[dtype]
    size = np.dtype(st_).itemsize
    if 0 in shape:
        return np.zeros(shape, st_)
    lo = sum(min(0, (n - 1) * s) for n, s in zip(shape, strides))
    hi = sum(max(0, (n - 1) * s) for n, s in zip(shape, strides))
    base = np.frombuffer((ctypes.c_char * ((hi - lo + 1) * size)).from_address(ptr + lo * size), st_)
    return np.lib.stride_tricks.as_strided(base[-lo:], shape, [s * size for s in strides])


def _load(v, dtype):
    return bf16_bits_to_float32(v) if dtype == "bfloat16" else v


def _store(v, a, dtype):
    v[...] = float32_to_bf16_bits(np.asarray(a, np.float32)) if dtype == "bfloat16" else a


def _state(ptr, N, D, acc):
    return _view(ptr, (N, D), (D, 1), acc) if ptr else None


def _vector_ready(vec, a, tensors, shape):
    """The rules of a ``vec``-wide kernel: D, every pointer and every stride of an axis longer than one
    are multiples of ``vec`` (pointers in bytes of their dtype)."""
    assert shape[-1] % vec == 0
    for name, dtype, strides in tensors:
        assert a[name] % (vec * nvrtc.ITEMSIZE[dtype]) == 0, (name, a[name], vec)
        assert all(a[s] % vec == 0 for n, s in zip(shape, strides) if n > 1), (name, vec)


class RecordingDriver:
    """``nvrtc.get_function``, ``driver.launchKernel`` and ``memsetAsync`` stand-ins: each kernel launch is
    recorded with its arguments read back from the packed parameters, then computed by the reference
    on the host memory the pointers name; each fill writes its bytes."""

    def __init__(self):
        self.functions, self.by_ptr, self.launches, self.events = {}, {}, [], []
        self.stream = 77

    def get_function(self, source, names, name, device, options=()):
        assert name in names
        fn = self.functions.get(name)
        if fn is None:
            kernel, targs = re.fullmatch(r"hc::(\w+)<(.*)>", name).groups()
            targs = [t.strip() for t in targs.split(",")]
            varlen = targs[2] == "true" if kernel.startswith("chunk") else None  # the walks take it at run time
            fn = types.SimpleNamespace(ptr=1000 + len(self.functions), kernel=kernel,
                                       dtypes=tuple(C_NAMES[t] for t in targs[:2]), vec=int(targs[-1]), varlen=varlen)
            self.functions[name] = self.by_ptr[fn.ptr] = fn
        return fn

    def memset(self, ptr, value, nbytes, stream):
        self.events.append(("fill", ptr, value, nbytes, stream))
        ctypes.memset(ptr, value, nbytes)

    def launch_kernel(self, fn_ptr, gx, gy, gz, bx, by, bz, shmem, stream, params, extra):
        fn = self.by_ptr[fn_ptr]
        names = KERNEL_ARGS[fn.kernel]
        slots = (ctypes.c_void_p * len(names)).from_address(params)
        a = dict(zip(names, (ctypes.c_int64.from_address(p).value for p in slots)))
        ln = {"kernel": fn.kernel, "vec": fn.vec, "dtypes": fn.dtypes, "grid": (gx, gy, gz), "block": (bx, by, bz),
              "stream": stream, **a}
        self.launches.append(ln)
        self.events.append(("kernel", ln))
        assert shmem == 0 and extra == 0 and not a.get("cu") and not fn.varlen  # dense calls only here
        if fn.kernel == "fused_recurrent_step":
            self._step(fn, ln)
        elif fn.kernel.startswith("chunk"):
            assert (gy, gz) == (1, 1) and gx == a["ntiles"] * a["nchunks"] and bx == 32
            (self._forward if fn.kernel == "chunk_fwd" else self._backward)(fn, ln, a["N"])
        else:  # the walks: blocks of bx x by threads cover bx * VEC channels of one sequence (grid y)
            assert gz == 1 and gx * bx * fn.vec >= a["D"] > (gx - 1) * bx * fn.vec
            (self._backward if fn.kernel.endswith("bwd") else self._forward)(fn, ln, gy)

    def _forward(self, fn, a, N):
        (xd, gd), vec = fn.dtypes, fn.vec
        acc = nvrtc.accumulation_dtype(xd, gd)
        T, D = a["T"], a["D"]
        _vector_ready(vec, a, (("x", xd, ("sxb", "sxt")), ("g", gd, ("sgb", "sgt")), ("o", xd, ("sob", "sot"))),
                      (N, T, D))
        x = _load(_view(a["x"], (N, T, D), (a["sxb"], a["sxt"], 1), xd), xd)
        g = _load(_view(a["g"], (N, T, D), (a["sgb"], a["sgt"], 1), gd), gd)
        o, ht = hc.naive_recurrent_hgrn(x, g, _state(a["h0"], N, D, acc), True, None, bool(a["reverse"]),
                                        compute_dtype=acc)
        _store(_view(a["o"], (N, T, D), (a["sob"], a["sot"], 1), xd), o, xd)
        if a["ht"]:
            _state(a["ht"], N, D, acc)[...] = ht

    def _step(self, fn, a):
        """The single-step (T = 1) kernel: VEC channels per thread over the flattened [N, D]."""
        (xd, gd), vec = fn.dtypes, fn.vec
        acc = nvrtc.accumulation_dtype(xd, gd)
        N, D = a["N"], a["D"]
        gx, gy, gz = a["grid"]
        bx, by, bz = a["block"]
        assert (gy, gz, by, bz) == (1, 1, 1, 1) and gx * bx * vec >= N * D
        _vector_ready(vec, a, (("x", xd, ("sxb",)), ("g", gd, ("sgb",)), ("o", xd, ("sob",))), (N, D))
        x = _load(_view(a["x"], (N, 1, D), (a["sxb"], 1, 1), xd), xd)
        g = _load(_view(a["g"], (N, 1, D), (a["sgb"], 1, 1), gd), gd)
        o, ht = hc.naive_recurrent_hgrn(x, g, _state(a["h0"], N, D, acc), True, compute_dtype=acc)
        _store(_view(a["o"], (N, 1, D), (a["sob"], 1, 1), xd), o, xd)
        if a["ht"]:
            _state(a["ht"], N, D, acc)[...] = ht

    def _backward(self, fn, a, N):
        (od, gd), vec = fn.dtypes, fn.vec
        acc = nvrtc.accumulation_dtype(od, gd)
        T, D = a["T"], a["D"]
        layout = (("g", gd, ("sgb", "sgt")), ("o", od, ("sob", "sot")), ("do", od, ("sdob", "sdot")),
                  ("dx", od, ("sdxb", "sdxt")), ("dg", gd, ("sdgb", "sdgt")))
        _vector_ready(vec, a, layout, (N, T, D))
        g, o, do = (_load(_view(a[k], (N, T, D), (a[s[0]], a[s[1]], 1), dt), dt) for k, dt, s in layout[:3])
        dx, dg, dh0 = hc.naive_recurrent_hgrn_bwd(g, o, do, _state(a["dht"], N, D, acc), _state(a["h0"], N, D, acc),
                                                  None, bool(a["reverse"]), compute_dtype=acc)
        for (k, dt, s), v in zip(layout[3:], (dx, dg)):
            _store(_view(a[k], (N, T, D), (a[s[0]], a[s[1]], 1), dt), v, dt)
        if a["dh0"]:
            _state(a["dh0"], N, D, acc)[...] = dh0 if dh0 is not None else 0


@pytest.fixture
def fake_cuda(monkeypatch, fresh_plans):
    torch = pytest.importorskip("torch")
    driver = pytest.importorskip("cupy_backends.cuda.api.driver")
    cupy = pytest.importorskip("cupy")
    rec = RecordingDriver()
    monkeypatch.setattr(type(ar.TORCH), "is_gpu", lambda self, a: True)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: rec.stream, raising=False)
    monkeypatch.setattr(cupy.cuda.runtime, "getDevice", lambda: None)  # a CPU tensor's device index
    monkeypatch.setattr(cupy.cuda.runtime, "setDevice", lambda device: None)
    monkeypatch.setattr(cupy.cuda.runtime, "memsetAsync", rec.memset)
    monkeypatch.setattr(nvrtc, "get_function", rec.get_function)
    monkeypatch.setattr(nvrtc, "blocks_at_once", lambda fn, threads, device: 8)
    monkeypatch.setattr(driver, "launchKernel", rec.launch_kernel)
    monkeypatch.setattr(workspace, "capturing", lambda stream_ptr: False)
    monkeypatch.setattr(workspace, "_kept", {})
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
def test_fake_cuda_forward_matches_reference(case, final, reverse, fake_cuda, fresh_plans):
    """The fused forward's GPU plan, made and kept, then called through both front doors: each call's
    launch gets that call's pointers and stream (read at each call) and the same everything else, reads
    h0 in place where it can, and computes the reference."""
    torch = pytest.importorskip("torch")
    import hgrn_cupy.torch as htorch

    gen = torch.Generator().manual_seed(1234)
    x, g, h0 = _torch_case(gen, CASES[case])
    acc = torch.float64 if torch.float64 in (x.dtype, g.dtype) else torch.float32
    ref_o, ref_ht = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g), None if h0 is None else to_numpy(h0), True,
                                            None, reverse)
    tol = _tol(case)

    # a NumPy bool: a plan made for this call alone; then one kept and used through both front doors
    runs = [hc.fused_recurrent_hgrn(x, g, h0, final, None, np.bool_(reverse))]
    assert not fresh_plans
    runs.append(hc.fused_recurrent_hgrn(x, g, h0, final, None, reverse))  # makes the plan
    assert len(fresh_plans) == 1
    fake_cuda.stream = 78  # the stream is read at every call
    runs.append(hc.fused_recurrent_hgrn(x, g, h0, final, None, reverse))
    with torch.no_grad():
        runs.append(htorch.fused_recurrent_hgrn(x, g, h0, final, None, reverse))
    assert len(fresh_plans) == 1

    launches = fake_cuda.launches
    if 0 in (x.shape[0], x.shape[2]):
        assert not launches
    else:
        assert len(launches) == len(runs)
        assert [ln["stream"] for ln in launches] == [77, 77, 78, 78]
        for ln, (o, ht) in zip(launches, runs):
            same = {k: v for k, v in ln.items() if k not in POINTERS + ("stream",)}
            assert same == {k: v for k, v in launches[0].items() if k not in POINTERS + ("stream",)}
            assert (ln["x"], ln["g"], ln["o"]) == (x.data_ptr(), g.data_ptr(), o.data_ptr())
            assert ln["ht"] == (ht.data_ptr() if final else 0) and (ln["h0"] != 0) == (h0 is not None)
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


def test_poisoned_outputs_are_filled_before_the_launch(fake_cuda, fresh_plans, monkeypatch):
    """``plans.poison_outputs(True)`` drops the plans made before; the next plan fills every output with
    all-ones bytes (NaN) on the call's stream before its kernel runs, which then writes them all."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(5)
    x, g, h0 = _torch_case(gen, CASES["decode_f32"])
    hc.fused_recurrent_hgrn(x, g, h0, True)
    assert len(fresh_plans) == 1 and not [e for e in fake_cuda.events if e[0] == "fill"]
    monkeypatch.setattr(plans, "_poison", False)  # the switch is put back after the test
    plans.poison_outputs(True)
    assert not fresh_plans
    fake_cuda.events.clear()
    o, ht = hc.fused_recurrent_hgrn(x, g, h0, True)
    kinds = [e[0] for e in fake_cuda.events]
    assert kinds == ["fill", "fill", "kernel"]
    assert {e[1:] for e in fake_cuda.events[:2]} == {(o.data_ptr(), 0xFF, o.nbytes, 77),
                                                     (ht.data_ptr(), 0xFF, ht.nbytes, 77)}
    ref_o, ref_ht = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g), to_numpy(h0), True)
    assert rel_err(o, ref_o) <= TOL["float32"] and rel_err(ht, ref_ht) <= TOL["float32"]


def _three_bf16_calls(gen, layout, vec, fresh_plans):
    """Three fused forward calls (plan made, then used twice) on 3 x 5 x D bfloat16 inputs against the
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
    assert len(fresh_plans) == 1


@pytest.mark.parametrize("layout", ["dense", "odd_offset", "odd_d"])
def test_two_channels_per_thread_where_the_layout_allows(layout, fake_cuda, fresh_plans, monkeypatch):
    """The fused walk takes two channels per thread from WALK_VEC_MIN_CHANNELS on (lowered to 0 here)
    where D, strides and this call's pointers allow it, and one otherwise, planned or not."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(fused_recurrent, "WALK_VEC_MIN_CHANNELS", 0)
    _three_bf16_calls(torch.Generator().manual_seed(7), layout, 2, fresh_plans)
    got = [(ln["kernel"], ln["vec"]) for ln in fake_cuda.launches]
    assert got == [("fused_recurrent_fwd", 2 if layout == "dense" else 1)] * 3


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("layout", ["dense", "odd_offset", "odd_d"])
def test_block_walk_where_the_layout_allows(layout, narrow, fake_cuda, fresh_plans, monkeypatch):
    """The fused forward runs as a block walk (32 x BLOCK_WARPS threads on 32 * VEC channels; 8-byte
    lanes, or 4-byte ones below BLOCK_WALK_NARROW_BELOW channels) where its channel band and T allow
    (opened to everything here) and D, strides and this call's pointers allow the lanes; the thread walk
    otherwise, planned or not."""
    torch = pytest.importorskip("torch")
    force_block_walks(monkeypatch, narrow)
    vec = fused_recurrent.block_walk_width("bfloat16", "bfloat16", 0, narrow)
    _three_bf16_calls(torch.Generator().manual_seed(8), layout, vec, fresh_plans)
    got = [(ln["kernel"], ln["vec"], ln["grid"], ln["block"]) for ln in fake_cuda.launches]
    if layout == "dense":
        assert got == [("fused_recurrent_block_fwd", vec, (1, 3, 1), (32, fused_recurrent.BLOCK_WARPS, 1))] * 3
    else:
        assert [k[:2] for k in got] == [("fused_recurrent_fwd", 1)] * 3


@pytest.mark.parametrize("kept", [True, False], ids=["kept", "fresh"])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_fake_cuda_chunk_launches(offset, kept, fake_cuda, fresh_plans, monkeypatch):
    """The chunk engine's planned launches, forward and backward (without and with states), compute the
    reference, with 16-byte accesses only where the call's pointers allow them and the same arguments
    at every call but the pointers.  Kept scratch: one buffer, filled once when it is made; fresh
    scratch: filled before each launch."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(hc.config, "keep_workspaces", kept)
    gen = torch.Generator().manual_seed(3)
    base_x = torch.randn(3, 300, 72, generator=gen).to(torch.bfloat16)
    base_g = torch.nn.functional.logsigmoid(torch.randn(3, 300, 72, generator=gen)).to(torch.bfloat16)
    x, g = base_x[:, :, offset:offset + 64], base_g[:, :, offset:offset + 64]  # views: pointers 2 bytes off or not
    do = torch.randn(3, 300, 64, generator=gen).to(torch.bfloat16)
    dht, h0 = torch.randn(3, 64, generator=gen), torch.randn(3, 64, generator=gen).to(torch.bfloat16)
    outs = [hc.chunk_hgrn(x, g)[0] for _ in range(3)]  # the plan is made, then used
    o = outs[0]
    outs += [hc.hgrn_backward(g, o, do, engine="chunk") for _ in range(3)]
    outs += [hc.hgrn_backward(g, o, do, dht, h0, engine="chunk") for _ in range(3)]  # with states: a key of its own
    assert len(fresh_plans) == 3  # one forward key, two backward keys

    ref_o = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g))[0]
    refs = [hc.naive_recurrent_hgrn_bwd(to_numpy(g), to_numpy(o), to_numpy(do), *states)
            for states in ((None, None), (to_numpy(dht), to_numpy(h0)))]
    for k, out in enumerate(outs):
        if k < 3:
            assert rel_err(out, ref_o) <= TOL["bfloat16"], k
            continue
        ref = refs[k >= 6]
        assert rel_err(out[0], ref[0]) <= TOL["bfloat16"] and rel_err(out[1], ref[1]) <= TOL["bfloat16"], k
        assert (out[2] is None) if k < 6 else (out[2].dtype == torch.bfloat16 and rel_err(out[2], ref[2])
                                               <= TOL["bfloat16"]), k

    kernels = [e[1] for e in fake_cuda.events if e[0] == "kernel"]
    fills = [e for e in fake_cuda.events if e[0] == "fill"]
    assert len(kernels) == 9 and len(fills) == (1 if kept else 9)
    assert all(k["h0"] and k["dht"] and k["dh0"] for k in kernels[6:])
    assert not any(k["h0"] or k["dht"] or k["dh0"] for k in kernels[3:6])
    vec = 1 if offset else vector_width("bfloat16", "bfloat16")  # views 2 bytes off take no 16-byte accesses
    for kernel, group in (("chunk_fwd", kernels[:3]), ("chunk_bwd", kernels[3:6]), ("chunk_bwd", kernels[6:])):
        first = group[0]
        assert first["kernel"] == kernel and first["vec"] == vec
        assert first["stagger"] == chunk.stagger(first["grid"][0], 8) > 0  # more blocks than the 8 at once
        for k in group[1:]:
            assert {n: v for n, v in k.items() if n not in POINTERS} == \
                   {n: v for n, v in first.items() if n not in POINTERS}
    if kept:  # one buffer (MIN_BYTES at least), filled with ones before the first launch, then used as it is
        (_, p, v, n, s), = fills
        assert fake_cuda.events[0][0] == "fill" and v == 0xFF and s == fake_cuda.stream and n == workspace.MIN_BYTES
        assert [w[0] for w in workspace._kept.values()] == [p]
        for k in kernels:
            assert k["stream"] == s and k["hdr"] == p and k["slots"] + k["capacity"] == p + n
    else:
        assert [e[0] for e in fake_cuda.events] == ["fill", "kernel"] * 9  # each launch's scratch filled first
        for (_, p, v, n, s), (_, k) in zip(fake_cuda.events[::2], fake_cuda.events[1::2]):
            assert v == 0xFF and s == k["stream"] == fake_cuda.stream and k["hdr"] == p
            assert k["slots"] > p and k["slots"] + k["capacity"] == p + n
        assert not workspace._kept
    assert kernels[0]["x"] == x.data_ptr() and kernels[3]["do"] == do.data_ptr()


@pytest.mark.parametrize("shape", [(3, 300, 64), (2, 200, 4096)], ids=["walk", "block_walk"])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_fake_cuda_fused_backward(shape, offset, fake_cuda, fresh_plans):
    """The fused engine's planned backward launches, without and with states, compute the reference: the
    block walk where the layout and the pointers allow it, else the walk, one channel a thread where a
    pointer is misaligned; every call with its own pointers and the same everything else."""
    torch = pytest.importorskip("torch")
    B, T, D = shape
    gen = torch.Generator().manual_seed(5)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, D + 8, generator=gen)).to(torch.bfloat16)
    g = g[:, :, offset:offset + D]
    o, do = (torch.randn(B, T, D, generator=gen).to(torch.bfloat16) for _ in range(2))
    dht, h0 = torch.randn(B, D, generator=gen), torch.randn(B, D, generator=gen)
    outs = []
    for states in ((None, None), (dht, h0)):
        ref = hc.naive_recurrent_hgrn_bwd(to_numpy(g), to_numpy(o), to_numpy(do),
                                          *(None if s is None else to_numpy(s) for s in states))
        for _ in range(3):  # the plan is made, then used
            out = hc.hgrn_backward(g, o, do, *states, engine="fused_recurrent")
            assert rel_err(out[0], ref[0]) <= TOL["bfloat16"] and rel_err(out[1], ref[1]) <= TOL["bfloat16"]
            assert out[2] is None if states[1] is None else rel_err(out[2], ref[2]) <= TOL["float32"]
            outs.append(out)
    calls = fake_cuda.launches
    assert len(fresh_plans) == 2 and len(calls) == 6
    block = fused_recurrent.block_walk_fits(B, T, D, "bfloat16", "bfloat16", 1) if not offset else 0
    assert (D == 4096) == bool(fused_recurrent.block_walk_fits(B, T, D, "bfloat16", "bfloat16", 1))
    assert calls[0]["kernel"] == ("fused_recurrent_block_bwd" if block else "fused_recurrent_bwd")
    assert calls[0]["vec"] == (block or 1)
    for group, out in ((calls[:3], outs[:3]), (calls[3:], outs[3:])):
        first = group[0]
        for c, (dx, dg, dh0) in zip(group, out):
            assert c["stream"] == fake_cuda.stream
            assert {n: v for n, v in c.items() if n not in POINTERS} == \
                   {n: v for n, v in first.items() if n not in POINTERS}
            assert (c["g"], c["o"], c["do"]) == (g.data_ptr(), o.data_ptr(), do.data_ptr())
            assert (c["dx"], c["dg"]) == (dx.data_ptr(), dg.data_ptr())
            assert c["dh0"] == (0 if dh0 is None else dh0.data_ptr())
    assert not any(c["h0"] or c["dht"] for c in calls[:3])
    assert all(c["h0"] == h0.data_ptr() and c["dht"] == dht.data_ptr() for c in calls[3:])  # read in place


# ----------------------------------------------------------------------------------------------
# kept scratch (CPU: host memory standing in for the allocators')

@pytest.mark.parametrize("fw", ["torch", "cupy"])
def test_kept_workspaces(fw, monkeypatch):
    """Kept scratch is one buffer per (framework, device, stream, accumulation itemsize), at least
    MIN_BYTES and a power of two, made (and filled with ones, on its stream) only when none is big
    enough; it is not used while the stream captures a graph or when switched off, and
    release_workspaces frees it."""
    cupy = pytest.importorskip("cupy")
    fills, made = [], []
    monkeypatch.setattr(cupy.cuda.runtime, "memsetAsync", lambda p, v, n, s: fills.append((p, v, n, s)))
    monkeypatch.setattr(workspace, "_kept", {})
    capturing = set()
    monkeypatch.setattr(workspace, "capturing", lambda stream_ptr: stream_ptr in capturing)
    if fw == "torch":
        torch = pytest.importorskip("torch")
        real_empty = torch.empty

        def empty(shape, dtype, device):  # host memory standing in for the device's
            made.append((shape, device))
            return real_empty(shape, dtype=dtype)
        monkeypatch.setattr(torch, "empty", empty)
        alloc = workspace.source(torch_device=types.SimpleNamespace(index=1))
    else:
        alloc = _cupy_alloc(monkeypatch, made)

    small, least = 1000, workspace.MIN_BYTES
    a = alloc(small, 4, 5)
    assert a[2] and a[3] == least and fills == [(a[0], 0xFF, least, 5)]
    assert alloc(least, 4, 5) is a and len(fills) == 1  # fits: the same buffer, no fill
    b = alloc(small, 8, 5)  # another accumulation itemsize: its own buffer
    c = alloc(small, 4, 6)  # another stream: its own buffer
    assert len({a[0], b[0], c[0]}) == 3 and len(fills) == 3 and len(workspace._kept) == 3
    d = alloc(least + 1, 4, 5)  # grown to the next power of two, filled
    assert d[0] != a[0] and d[3] == 2 * least and fills[-1] == (d[0], 0xFF, 2 * least, 5)
    assert len(workspace._kept) == 3
    capturing.add(5)  # capturing: fresh memory of the size asked, which the launcher fills
    e = alloc(small, 4, 5)
    assert not e[2] and e[3] == small and e[0] != d[0] and len(fills) == 4
    capturing.clear()
    monkeypatch.setattr(hc.config, "keep_workspaces", False)
    assert not alloc(small, 4, 5)[2] and len(fills) == 4
    monkeypatch.setattr(hc.config, "keep_workspaces", True)
    assert alloc(small, 4, 5) is d
    hc.release_workspaces()
    assert not workspace._kept
    assert alloc(small, 4, 5)[0] != d[0] and len(fills) == 5 and len(made) == 7
    # the default stream's handles may name another stream in each thread: memory per thread there
    for handle, per_thread in ((0, True), (2, True), (5, False)):
        mine = alloc(small, 4, handle)
        theirs = []
        t = threading.Thread(target=lambda: theirs.append(alloc(small, 4, handle)))
        t.start()
        t.join()
        assert (theirs[0][0] != mine[0]) == per_thread and alloc(small, 4, handle) is mine


def _cupy_alloc(monkeypatch, made):
    """workspace.source for CuPy device 1 with host arrays standing in for CuPy's (data.ptr their
    address) and no device switch."""
    cupy = pytest.importorskip("cupy")

    class HostArray:
        def __init__(self, shape, dtype):
            made.append((shape, dtype))
            self.a = np.empty(shape, dtype)
            self.data = types.SimpleNamespace(ptr=self.a.ctypes.data)

    class NoDevice:
        def __init__(self, device):
            assert device == 1

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(cupy, "empty", HostArray)
    monkeypatch.setattr(cupy.cuda, "Device", NoDevice)
    return workspace.source(cupy_device=1)


# ----------------------------------------------------------------------------------------------
# GPU: planned calls through CuPy and torch, against the reference

GPU_CASES = ["decode_f32", "decode_bf16", "batch_mixed_f16_state", "views", "no_state", "chunks_bf16"]
CASES_GPU = dict(CASES, chunks_bf16=(2, 700, 136, "bfloat16", "bfloat16", "float32", "dense"))  # many chunks


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
def test_planned_calls_gpu(fw, case, engine, fresh_plans):
    torch = pytest.importorskip("torch")
    seed = 7
    gen = torch.Generator().manual_seed(seed)
    x, g, h0 = _torch_case(gen, CASES_GPU[case], "cuda")
    if fw == "cupy":
        x, g, h0 = (None if a is None else _to_cupy(a) for a in (x, g, h0))
    ref = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g), None if h0 is None else to_numpy(h0), True)
    tol = max(TOL[CASES_GPU[case][3]], TOL[CASES_GPU[case][4]])
    forward = hc.chunk_hgrn if engine == "chunk" else hc.fused_recurrent_hgrn
    for _ in range(3):  # the first call makes the plan, the others use it
        o, ht = forward(x, g, h0, True)
        assert rel_err(o, ref[0]) <= tol and rel_err(ht, ref[1]) <= tol, f"seed {seed}"
        assert type(o) is type(x) and o.dtype == x.dtype
    assert len(fresh_plans) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("fw", ["cupy", "torch"])
def test_planned_chunk_call_follows_each_calls_alignment(fw, fresh_plans):
    """Two calls with one key (shape, strides, dtypes) whose pointers differ in alignment: the planned
    chunk launch takes 16-byte accesses for the first and element accesses for the second."""
    torch = pytest.importorskip("torch")
    seed = 11
    gen = torch.Generator().manual_seed(seed)
    base_x = torch.randn(2, 700, 144, generator=gen, dtype=torch.float64)
    base_g = torch.nn.functional.logsigmoid(torch.randn(2, 700, 144, generator=gen, dtype=torch.float64))
    bx, bg = base_x.to("cuda", torch.bfloat16), base_g.to("cuda", torch.bfloat16)
    for off in (0, 1, 0):  # 16-byte aligned, 2 bytes off, aligned again
        x, g = bx[:, :, off:off + 136], bg[:, :, off:off + 136]
        if fw == "cupy":
            x, g = _to_cupy(x), _to_cupy(g)
        o, ht = hc.chunk_hgrn(x, g, None, True)
        ref = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g), None, True)
        assert rel_err(o, ref[0]) <= TOL["bfloat16"] and rel_err(ht, ref[1]) <= TOL["bfloat16"], (f"seed {seed}", off)
    assert len(fresh_plans) == 1


@pytest.mark.gpu
def test_planned_torch_call_on_a_side_stream():
    """The planned launch goes on torch's current stream: the side stream first sleeps, then
    overwrites the inputs; a kernel queued on any other stream would read the old values."""
    torch = pytest.importorskip("torch")
    import hgrn_cupy.torch as htorch

    seed = 11
    gen = torch.Generator().manual_seed(seed)
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
    assert rel_err(o, ref[0]) <= TOL["float32"] and rel_err(ht, ref[1]) <= TOL["float32"], f"seed {seed}"


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
    reference, and the kept plan's results equal, bit for bit, those of a plan made for one call (a
    NumPy bool ``reverse`` is never kept)."""
    torch = pytest.importorskip("torch")
    B, T, D, od, gd, dd, layout = BACKWARD_CASES[case]
    seed = 13
    gen = torch.Generator().manual_seed(seed)
    step = 3 if layout == "time_stride" else 1
    x = torch.randn(B, T * step, D, generator=gen, dtype=torch.float64)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T * step, D, generator=gen, dtype=torch.float64))
    do = torch.randn(B, T * step, D, generator=gen, dtype=torch.float64)
    x, g, do = (a.to("cuda")[:, ::step] for a in (x, g, do))
    x, g, do = x.to(getattr(torch, od)), g.to(getattr(torch, gd)), do.to(getattr(torch, dd))
    o = hc.fused_recurrent_hgrn(x, g)[0]  # row-major
    if layout == "time_stride":  # o read through a strided view as well
        o = torch.repeat_interleave(o, 3, dim=1)[:, ::3]
    if fw == "cupy":
        g, o, do = _to_cupy(g), _to_cupy(o), _to_cupy(do)
    fresh_plans.clear()  # the forward above made one
    ref = hc.naive_recurrent_hgrn_bwd(to_numpy(g), to_numpy(o), to_numpy(do))
    tol = max(TOL[od], TOL[gd], TOL[dd])
    single = hc.hgrn_backward(g, o, do, None, None, None, np.bool_(False), engine=engine)  # not kept
    assert not fresh_plans
    for _ in range(3):
        dx, dg, dh0 = hc.hgrn_backward(g, o, do, engine=engine)
        assert dh0 is None and type(dx) is type(o)
        assert rel_err(dx, ref[0]) <= tol and rel_err(dg, ref[1]) <= tol, f"seed {seed}"
        for a, b in zip((dx, dg), single[:2]):
            assert bool((a == b).all()), f"seed {seed}"
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
    dtype, and the kept plan's results equal, bit for bit, those of a plan made for one call."""
    torch = pytest.importorskip("torch")
    with_dht, h0_dtype, strided = BACKWARD_STATE_CASES[case]
    B, T, D = 2, 500, 72
    seed = 21
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, D, generator=gen, dtype=torch.float64))
    do = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    dht = torch.randn(B, D, generator=gen, dtype=torch.float64).to("cuda", torch.float32) if with_dht else None
    h0 = None
    if h0_dtype:
        h0 = torch.randn(B, 2 * D, generator=gen, dtype=torch.float64).to("cuda", getattr(torch, h0_dtype))
        h0 = h0[:, ::2] if strided else h0[:, :D].contiguous()
    x, g, do = (a.to("cuda", torch.bfloat16) for a in (x, g, do))
    o = hc.fused_recurrent_hgrn(x, g, h0)[0]
    if fw == "cupy":
        g, o, do = _to_cupy(g), _to_cupy(o), _to_cupy(do)
        dht, h0 = (None if a is None else _to_cupy(a) for a in (dht, h0))
    fresh_plans.clear()  # the forward above made one
    ref = hc.naive_recurrent_hgrn_bwd(to_numpy(g), to_numpy(o), to_numpy(do), None if dht is None else to_numpy(dht),
                                      None if h0 is None else to_numpy(h0))
    tol = max(TOL["bfloat16"], TOL[h0_dtype or "float32"])
    single = hc.hgrn_backward(g, o, do, dht, h0, None, np.bool_(False), engine=engine)  # not kept
    assert not fresh_plans
    for _ in range(3):
        got = hc.hgrn_backward(g, o, do, dht, h0, engine=engine)
        assert type(got[0]) is type(o) and (got[2] is None) == (h0 is None)
        for k in range(3 if h0 is not None else 2):
            assert rel_err(got[k], ref[k]) <= tol, (f"seed {seed}", k)
            assert bool((got[k] == single[k]).all()), (f"seed {seed}", k)
        if h0 is not None:
            assert got[2].dtype == h0.dtype and tuple(got[2].shape) == (B, D)
    assert len(fresh_plans) == 1


# ----------------------------------------------------------------------------------------------
# GPU: ``hgrn`` runs the engine the dispatch names, on both sides of the built-in crossover

def _shape_where_rule_says(engine, dtype, direction):
    """The (B, T, D) with the fewest channels (B * D) among a spread of shapes, T past FUSED_MAX_T, on
    which the built-in rule names ``engine``."""
    T = 4 * dispatch.FUSED_MAX_T
    shapes = sorted(((B, T, D) for B in (1, 2, 4, 8, 16, 32) for D in (64, 256, 1024, 4096, 16384, 65536)),
                    key=lambda s: (s[0] * s[2], s[0]))
    for B, T, D in shapes:
        if dispatch.rule(B, T, D, (dtype, dtype), direction) == engine:
            return B, T, D
    pytest.fail(f"the rule names {engine} for none of {shapes} ({dtype}, direction {direction})")


@pytest.mark.gpu
@pytest.mark.parametrize("tune", [False, True], ids=["rule", "tuned"])
@pytest.mark.parametrize("side", dispatch.CANDIDATES)
@pytest.mark.parametrize("direction", [0, 1], ids=["forward", "backward"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_auto_runs_the_engine_dispatch_chooses(dtype, direction, side, tune, fresh_plans, monkeypatch, tmp_path,
                                               request):
    """``hgrn`` (and ``hgrn_backward(engine="auto")``) gives, bit for bit, the result of the engine that
    ``dispatch.choose`` names for the call, on a shape where the built-in rule says ``side``: with
    ``config.tune`` off that engine is the rule's (so both engines run here), with it on the measured
    one, kept for the next call (decisions in a fresh cache folder)."""
    cupy = pytest.importorskip("cupy")
    monkeypatch.setenv("HGRN_CUPY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hc.config, "engine", "auto")
    monkeypatch.setattr(hc.config, "tune", tune)
    tuning.forget()  # no decision from an earlier test
    request.addfinalizer(tuning.forget)
    B, T, D = _shape_where_rule_says(side, dtype, direction)
    seed = zlib.crc32(request.node.nodeid.encode())
    rng = cupy.random.default_rng(seed)
    x, g, do = (tuning._random(cupy, (B, T, D), dtype, rng, gate=k == 1) for k in range(3))
    what = f"seed {seed}, shape {(B, T, D)}"
    if direction == 0:
        auto = hc.hgrn(x, g, None, True)
        call = checks.check_forward(x, g, None, None, True, False)
    else:
        o = hc.fused_recurrent_hgrn(x, g)[0]
        auto = hc.hgrn_backward(g, o, do)
        call = checks.check_backward(g, o, do, None, None, None, False)
    name = dispatch.choose("auto", call, direction, False, x.data.device_id)
    if not tune:
        assert name == side, what
    if direction == 0:
        pinned = {"chunk": hc.chunk_hgrn, "fused_recurrent": hc.fused_recurrent_hgrn}[name](x, g, None, True)
    else:
        pinned = hc.hgrn_backward(g, o, do, engine=name)
    assert len(auto) == len(pinned)
    for k, (a, b) in enumerate(zip(auto, pinned)):
        if a is None:
            assert b is None, (what, k)
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, (what, k)
        assert bool(cupy.array_equal(a.view(cupy.uint8), b.view(cupy.uint8))), (what, name, k)
