"""The recording driver: CUDA stood in for by the host, for tests of the GPU plan body on CPU.

``RecordingDriver`` replaces ``nvrtc.get_function``, ``driver.launchKernel`` and ``memsetAsync``: each
launch is recorded with its arguments read back from the packed parameters, then computed by the
float64 reference on the host memory its pointers name.  The ``fake_cuda`` fixture installs it with torch
CPU tensors posing as CUDA ones; ``fresh_plans`` gives a test an empty plan cache.  Also the torch input
cases (``CASES``, ``_torch_case``) that the CPU and GPU plan tests draw from.  Test modules import the
fixtures by name.
"""
import ctypes
import re
import types

import numpy as np
import pytest

import hgrn_cupy as hc
from hgrn_cupy import arrays as ar
from hgrn_cupy import nvrtc, plans, workspace
from hgrn_cupy.engines import fused_recurrent as fr
from hgrn_cupy.engines import guard
from hgrn_cupy.naive import bf16_bits_to_float32, float32_to_bf16_bits


@pytest.fixture
def fresh_plans(monkeypatch):
    """An empty plan cache for the test, thrown away after it."""
    monkeypatch.setattr(plans, "_plans", {})
    return plans._plans


NP_STORAGE = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": np.uint16,
              "int32": np.int32, "int64": np.int64}
WALK_FWD_ARGS = ("x", "g", "o", "sxb", "sxt", "sgb", "sgt", "sob", "sot", "h0", "ht", "cu", "cu64", "T", "D",
                 "reverse")
STEP_ARGS = ("x", "g", "o", "sxb", "sgb", "sob", "h0", "ht", "N", "D")  # fused_recurrent_step (T = 1)
STEP_BWD_ARGS = ("g", "do", "dx", "dg", "sgb", "sdob", "sdxb", "sdgb", "h0", "dht", "dh0", "N", "D")  # its backward
WALK_BWD_ARGS = ("g", "o", "do", "dx", "dg", "sgb", "sgt", "sob", "sot", "sdob", "sdot", "sdxb", "sdxt", "sdgb", "sdgt",
                 "h0", "dht", "dh0", "cu", "cu64", "T", "D", "reverse")
CHUNK_FWD_ARGS = ("x", "g", "o", "sxb", "sxt", "sgb", "sgt", "sob", "sot", "h0", "ht", "cu", "cu64", "N", "T", "D",
                  "reverse", "hdr", "slots", "capacity", "ntiles", "nchunks", "l2_ahead", "peek", "stagger")
CHUNK_BWD_ARGS = ("g", "o", "do", "dx", "dg", "sgb", "sgt", "sob", "sot", "sdob", "sdot", "sdxb", "sdxt", "sdgb",
                  "sdgt", "h0", "dht", "dh0", "cu", "cu64", "N", "T", "D", "reverse", "hdr", "slots", "capacity",
                  "ntiles", "nchunks", "l2_ahead", "peek", "stagger")
# fused_recurrent_bulk_fwd: the tensor maps of x, g, o and o's rows (r), as RecordingDriver.tensor_map writes
# them, then the states and sizes
MAP_FIELDS = ("ptr", "itemsize", "dims", "dims", "dims", "strides", "strides", "box", "box", "box")
BULK_FWD_ARGS = tuple(f"m{k}{i}" for k in "xgor" for i in range(nvrtc.TENSOR_MAP_WORDS)) + ("h0", "ht", "T", "D",
                                                                                          "reverse")
KERNEL_ARGS = {"fused_recurrent_fwd": WALK_FWD_ARGS, "fused_recurrent_block_fwd": WALK_FWD_ARGS,
               "fused_recurrent_staged_fwd": WALK_FWD_ARGS, "fused_recurrent_bulk_fwd": BULK_FWD_ARGS,
               "fused_recurrent_step": STEP_ARGS, "fused_recurrent_step_bwd": STEP_BWD_ARGS,
               "fused_recurrent_bwd": WALK_BWD_ARGS, "fused_recurrent_block_bwd": WALK_BWD_ARGS,
               "chunk_fwd": CHUNK_FWD_ARGS, "chunk_fwd_staged": CHUNK_FWD_ARGS, "chunk_bwd": CHUNK_BWD_ARGS}
POINTERS = ("x", "g", "o", "do", "dx", "dg", "h0", "ht", "dht", "dh0", "hdr", "slots")
C_NAMES = {c: d for d, c in nvrtc.C_TYPES.items()}


def launch_args(ln, leave_out=()):
    """A recorded launch without the tensors' addresses (POINTERS) nor the keys in ``leave_out``: what two
    launches of the same plan share."""
    return {k: v for k, v in ln.items() if k not in POINTERS and k not in leave_out}


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


def _offsets(a, N):
    """(the offsets a launch reads, or None where it packs no sequences; the batch rows of its tensors)."""
    if not a["cu"]:
        return None, N
    return _view(a["cu"], (N + 1,), (1,), "int64" if a["cu64"] else "int32").copy(), 1


def _rows(cu):
    """The steps a launch writes: every one, or (packed sequences) those of its offsets, which a launch of
    part of the sequences holds alone."""
    return slice(None) if cu is None else slice(int(cu[0]), int(cu[-1]))


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
        fn = self.functions.get((name, options))
        if fn is None:
            kernel, targs = re.fullmatch(r"hc::(\w+)<(.*)>", name).groups()
            targs = [t.strip() for t in targs.split(",")]
            varlen = targs[2] == "true" if kernel.startswith("chunk") else None  # the walks take it at run time
            fn = types.SimpleNamespace(ptr=1000 + len(self.functions), kernel=kernel,
                                       dtypes=tuple(C_NAMES[t] for t in targs[:2]), vec=int(targs[-1]), varlen=varlen,
                                       options=options, carveout=None, carveout_seen=None, dynamic=0)
            self.functions[name, options] = self.by_ptr[fn.ptr] = fn
        return fn

    def prefer_shared(self, fn, percent):
        fn.carveout = percent

    def hold_shared(self, fn, dynamic, blocks, device):
        """Keeps the dynamic shared memory a launch may take and the blocks it is sized for (as carveout)."""
        fn.dynamic, fn.carveout = dynamic, ("blocks", blocks)

    def blocks_at_once(self, fn, threads, device, dynamic=0):
        """8 blocks at once; keeps the shared-memory preference the occupancy query saw, which must count the
        dynamic shared memory the kernel was let take."""
        assert dynamic == fn.dynamic
        fn.carveout_seen = fn.carveout
        return 8

    def prepare_guard(self, device, cu_dtype):
        """The device guard of varlen plans, loaded by each (as on a GPU); its runs are recorded, not
        computed (its own tests are on the GPU)."""
        self.events.append(("guard", cu_dtype))
        return types.SimpleNamespace(check=lambda *args: self.events.append(("guard check",) + args[1:]),
                                     fill=lambda *args: self.events.append(("guard fill",) + args[1:]))

    def tensor_map(self, ptr, itemsize, dims, strides, box):
        """A stand-in map that keeps what the launch will need to read back (pointer, itemsize, dims,
        strides, box), after the driver's rules: 16-byte pointer and strides, boxes of at most 256 elements
        a dimension whose innermost bytes are a multiple of 16."""
        assert ptr % 16 == 0 and all(s % 16 == 0 and s > 0 for s in strides), (ptr, strides)
        assert len(dims) == len(box) == len(strides) + 1 == 3 and all(0 < b <= 256 for b in box)
        assert box[0] * itemsize % 16 == 0, box
        words = (ptr, itemsize, *dims, *strides, *box)
        return words + (0,) * (nvrtc.TENSOR_MAP_WORDS - len(words))

    def _bulk_args(self, fn, a, N):
        """A bulk walk's arguments as a walk's: pointers and strides (elements) from its maps, no offsets;
        the maps' dims and boxes checked against the launch."""
        out, maps = dict(a, cu=0, cu64=0), {}
        for k in "xgor":
            m = maps[k] = {}
            for f, v in zip(MAP_FIELDS, (a[f"m{k}{i}"] for i in range(len(MAP_FIELDS)))):
                m.setdefault(f, []).append(v)
            (ptr,), (size,), (st, sb) = m["ptr"], m["itemsize"], m["strides"]
            rows = {"o": fr.BLOCK_STEPS, "r": 1}.get(k, fr.BLOCK_WARPS * fr.BLOCK_STEPS)
            assert m["dims"] == [a["D"], a["T"], N] and m["box"] == [32 * fn.vec, rows, 1], (k, m)
            assert size == nvrtc.ITEMSIZE[fn.dtypes[0]] and st % size == 0 and sb % size == 0
            if k != "r":
                out.update({k: ptr, f"s{k}t": st // size, f"s{k}b": sb // size})
        assert {f: maps["r"][f] for f in ("ptr", "strides")} == {f: maps["o"][f] for f in ("ptr", "strides")}
        return out

    def memset(self, ptr, value, nbytes, stream):
        self.events.append(("fill", ptr, value, nbytes, stream))
        ctypes.memset(ptr, value, nbytes)

    def launch_kernel(self, fn_ptr, gx, gy, gz, bx, by, bz, shmem, stream, params, extra):
        fn = self.by_ptr[fn_ptr]
        names = KERNEL_ARGS[fn.kernel]
        # every argument word lies in one buffer, in order, from the first parameter's address on
        first = ctypes.c_void_p.from_address(params).value
        a = dict(zip(names, (ctypes.c_int64 * len(names)).from_address(first)))
        if fn.kernel == "fused_recurrent_bulk_fwd":
            a = self._bulk_args(fn, a, gy)
        ln = {"kernel": fn.kernel, "vec": fn.vec, "dtypes": fn.dtypes, "grid": (gx, gy, gz), "block": (bx, by, bz),
              "stream": stream, "options": fn.options,
              "carveout": fn.carveout, "carveout_seen": fn.carveout_seen, "shared": shmem, **a}
        self.launches.append(ln)
        self.events.append(("kernel", ln))
        assert shmem <= fn.dynamic and extra == 0
        assert fn.varlen is None or fn.varlen == bool(a["cu"])  # the chunk kernels are compiled for one of them
        if fn.kernel == "fused_recurrent_step":
            self._step(fn, ln)
        elif fn.kernel == "fused_recurrent_step_bwd":
            self._step_bwd(fn, ln)
        elif fn.kernel.startswith("chunk"):
            assert (gy, gz) == (1, 1) and gx == a["ntiles"] * a["nchunks"] and bx == 32
            (self._backward if fn.kernel == "chunk_bwd" else self._forward)(fn, ln, a["N"])
        else:  # the walks: blocks of bx x by threads cover bx * VEC channels of one sequence (grid y)
            # gy within CUDA's bound (fr.MAX_GRID_Y, read at the launch: a test may set a smaller one)
            assert gz == 1 and gx * bx * fn.vec >= a["D"] > (gx - 1) * bx * fn.vec and gy <= fr.MAX_GRID_Y
            (self._backward if fn.kernel.endswith("bwd") else self._forward)(fn, ln, gy)

    def _forward(self, fn, a, N):
        (xd, gd), vec = fn.dtypes, fn.vec
        acc = nvrtc.accumulation_dtype(xd, gd)
        T, D = a["T"], a["D"]
        cu, B = _offsets(a, N)
        _vector_ready(vec, a, (("x", xd, ("sxb", "sxt")), ("g", gd, ("sgb", "sgt")), ("o", xd, ("sob", "sot"))),
                      (B, T, D))
        x = _load(_view(a["x"], (B, T, D), (a["sxb"], a["sxt"], 1), xd), xd)
        g = _load(_view(a["g"], (B, T, D), (a["sgb"], a["sgt"], 1), gd), gd)
        o, ht = hc.naive_recurrent_hgrn(x, g, _state(a["h0"], N, D, acc), True, cu, bool(a["reverse"]),
                                        compute_dtype=acc)
        rows = _rows(cu)
        _store(_view(a["o"], (B, T, D), (a["sob"], a["sot"], 1), xd)[:, rows], o[:, rows], xd)
        if a["ht"]:
            _state(a["ht"], N, D, acc)[...] = ht

    @staticmethod
    def _flat(fn, a):
        """``(N, D, accumulation dtype)`` of a single-step kernel's launch, whose one-dimensional grid
        covers the flattened [N, D] with VEC channels a thread."""
        gx, gy, gz = a["grid"]
        bx, by, bz = a["block"]
        assert (gy, gz, by, bz) == (1, 1, 1, 1) and gx * bx * fn.vec >= a["N"] * a["D"]
        return a["N"], a["D"], nvrtc.accumulation_dtype(*fn.dtypes)

    def _step(self, fn, a):
        """The single-step (T = 1) kernel: VEC channels per thread over the flattened [N, D]."""
        (xd, gd), vec = fn.dtypes, fn.vec
        N, D, acc = self._flat(fn, a)
        _vector_ready(vec, a, (("x", xd, ("sxb",)), ("g", gd, ("sgb",)), ("o", xd, ("sob",))), (N, D))
        x = _load(_view(a["x"], (N, 1, D), (a["sxb"], 1, 1), xd), xd)
        g = _load(_view(a["g"], (N, 1, D), (a["sgb"], 1, 1), gd), gd)
        o, ht = hc.naive_recurrent_hgrn(x, g, _state(a["h0"], N, D, acc), True, compute_dtype=acc)
        _store(_view(a["o"], (N, 1, D), (a["sob"], 1, 1), xd), o, xd)
        if a["ht"]:
            _state(a["ht"], N, D, acc)[...] = ht

    def _step_bwd(self, fn, a):
        """The single-step backward (T = 1): VEC channels per thread over the flattened [N, D]; o unread."""
        (od, gd), vec = fn.dtypes, fn.vec
        N, D, acc = self._flat(fn, a)
        layout = (("g", gd, ("sgb",)), ("do", od, ("sdob",)), ("dx", od, ("sdxb",)), ("dg", gd, ("sdgb",)))
        _vector_ready(vec, a, layout, (N, D))
        g, do = (_load(_view(a[k], (N, 1, D), (a[s[0]], 1, 1), dt), dt) for k, dt, s in layout[:2])
        o = np.full((N, 1, D), np.nan)  # h[-1] is h0: the reference must not read o either
        dx, dg, dh0 = hc.naive_recurrent_hgrn_bwd(g, o, do, _state(a["dht"], N, D, acc), _state(a["h0"], N, D, acc),
                                                  compute_dtype=acc)
        for (k, dt, s), v in zip(layout[2:], (dx, dg)):
            _store(_view(a[k], (N, 1, D), (a[s[0]], 1, 1), dt), v, dt)
        if a["dh0"]:
            _state(a["dh0"], N, D, acc)[...] = dh0 if dh0 is not None else 0

    def _backward(self, fn, a, N):
        (od, gd), vec = fn.dtypes, fn.vec
        acc = nvrtc.accumulation_dtype(od, gd)
        T, D = a["T"], a["D"]
        cu, B = _offsets(a, N)
        layout = (("g", gd, ("sgb", "sgt")), ("o", od, ("sob", "sot")), ("do", od, ("sdob", "sdot")),
                  ("dx", od, ("sdxb", "sdxt")), ("dg", gd, ("sdgb", "sdgt")))
        _vector_ready(vec, a, layout, (B, T, D))
        g, o, do = (_load(_view(a[k], (B, T, D), (a[s[0]], a[s[1]], 1), dt), dt) for k, dt, s in layout[:3])
        dx, dg, dh0 = hc.naive_recurrent_hgrn_bwd(g, o, do, _state(a["dht"], N, D, acc), _state(a["h0"], N, D, acc),
                                                  cu, bool(a["reverse"]), compute_dtype=acc)
        rows = _rows(cu)
        for (k, dt, s), v in zip(layout[3:], (dx, dg)):
            _store(_view(a[k], (B, T, D), (a[s[0]], a[s[1]], 1), dt)[:, rows], v[:, rows], dt)
        if a["dh0"]:
            _state(a["dh0"], N, D, acc)[...] = dh0 if dh0 is not None else 0


@pytest.fixture
def fake_cuda(monkeypatch, fresh_plans):
    torch = pytest.importorskip("torch")
    driver = pytest.importorskip("cupy_backends.cuda.api.driver")
    cupy = pytest.importorskip("cupy")
    rec = RecordingDriver()
    monkeypatch.setattr(type(ar.TORCH), "is_gpu", lambda self, a: True)
    monkeypatch.setattr(type(ar.TORCH), "capturing", lambda self, like: False)
    monkeypatch.setattr(guard, "prepare", rec.prepare_guard)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: rec.stream, raising=False)
    monkeypatch.setattr(cupy.cuda.runtime, "getDevice", lambda: None)  # a CPU tensor's device index
    monkeypatch.setattr(cupy.cuda.runtime, "setDevice", lambda device: None)
    monkeypatch.setattr(cupy.cuda.runtime, "memsetAsync", rec.memset)
    monkeypatch.setattr(nvrtc, "get_function", rec.get_function)
    monkeypatch.setattr(nvrtc, "prefer_shared", rec.prefer_shared)
    monkeypatch.setattr(nvrtc, "hold_shared", rec.hold_shared)
    monkeypatch.setattr(nvrtc, "blocks_at_once", rec.blocks_at_once)
    monkeypatch.setattr(nvrtc, "tensor_map", rec.tensor_map)
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

