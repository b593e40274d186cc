"""The engines inside a compiled JAX program on CUDA: ``jax.experimental.buffer_callback`` hands XLA's
own input and output buffers and stream to the engines' prepared launches (:mod:`hgrn_cupy.engines`).

Every buffer is XLA's: the chunk engine's scratch and the offsets guard's flag are more (discarded)
outputs of the call.  No host synchronisation, no allocation outside XLA.  Used by :mod:`hgrn_cupy.jax`.
"""
from __future__ import annotations

import ctypes
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import arrays as ar
from . import checks, dispatch
from .engines import chunk as _chunk
from .engines.layout import Arr, row_major
from .nvrtc import accumulation_dtype


class Spec(NamedTuple):
    """What is static about one call (part of the jit cache key)."""
    engine: str
    output_final_state: bool
    reverse: bool
    guard: bool  # cu_seqlens given and its values not checked on the host


def _name(dt) -> str:
    return ar._np_dtype_name(dt)


def _acc(a, b) -> str:
    return accumulation_dtype(_name(a.dtype), _name(b.dtype))


def _nseq(x, cu):
    return x.shape[0] if cu is None else cu.shape[0] - 1


def _call(N, T, D, dtypes, varlen):
    """A ``checks.Call`` for the engine choice inside a traced program."""
    return checks.Call(ar.JAX, 1, T, D, N, dtypes, accumulation_dtype(*dtypes), varlen, False)


_PyCapsule_GetPointer = ctypes.pythonapi.PyCapsule_GetPointer
_PyCapsule_GetPointer.restype = ctypes.c_void_p
_PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_PyCapsule_GetName = ctypes.pythonapi.PyCapsule_GetName
_PyCapsule_GetName.restype = ctypes.c_char_p
_PyCapsule_GetName.argtypes = [ctypes.py_object]
# Where the DLTensor starts in the capsule's struct: DLManagedTensor opens with it; the versioned one
# has its version, manager_ctx, deleter and flags first.  DLTensor: data, device, ndim, dtype, shape,
# strides, byte_offset (at 40).
_DLTENSOR_AT = {b"dltensor": 0, b"dltensor_versioned": 32}
_BYTE_OFFSET_AT = 40


def _capsule_data_ptr(capsule) -> int:
    name = _PyCapsule_GetName(capsule)
    if name not in _DLTENSOR_AT:
        raise TypeError(f"not an unconsumed DLPack capsule: {name!r}")
    tensor = _PyCapsule_GetPointer(capsule, name) + _DLTENSOR_AT[name]
    data = ctypes.c_void_p.from_address(tensor).value or 0
    return data + ctypes.c_uint64.from_address(tensor + _BYTE_OFFSET_AT).value


def _data_ptr(buf) -> int:
    """Address of the first element of an XLA FFI buffer, read from its DLPack capsule.

    DLPack describes every dtype, bfloat16 included (``__cuda_array_interface__`` does not in every
    jaxlib).  The capsule keeps its name, so its destructor frees the descriptor: nothing leaks.
    """
    return _capsule_data_ptr(buf.__dlpack__())


def _device_of(buf) -> int:
    return int(buf.__dlpack_device__()[1])


def _launch_stream(ctx):
    """XLA's stream for this call (a seam the CPU tests replace)."""
    return int(ctx.stream)


class _DeviceScope:
    """Make ``device`` current for the launch, only when it is not already."""

    def __init__(self, device):
        import cupy

        self.device, self.prev = device, cupy.cuda.runtime.getDevice()
        self.set = cupy.cuda.runtime.setDevice

    def __enter__(self):
        if self.prev != self.device:
            self.set(self.device)

    def __exit__(self, *exc):
        if self.prev != self.device:
            self.set(self.prev)


def _device_scope(device):
    return _DeviceScope(device)


def _arr(shape, dtype) -> Arr:
    """An engine's tensor description with the pointer left out (XLA buffers are dense, row-major)."""
    shape = tuple(int(n) for n in shape)
    return Arr(0, shape, row_major(shape), _name(dtype))


def _workspace_bytes(N, T, D, varlen, acc, x_dtype, g_dtype):
    """Enough for either direction and either access width (their chunk lengths and tiles differ)."""
    return _chunk.workspace_bytes(N, T, D, varlen, np.dtype(acc).itemsize, _name(x_dtype), _name(g_dtype))


def _poison(ptrs, bufs, out_names, stream):
    """Tests: fill the outputs with NaN (all-ones bytes are a NaN in every float dtype) first."""
    import cupy

    for k in out_names:
        nbytes = int(np.prod(bufs[k].shape)) * np.dtype(bufs[k].dtype).itemsize
        if k != "ws" and nbytes:
            cupy.cuda.runtime.memsetAsync(ptrs[k], 0xFF, nbytes, stream)


def _run_device_kernels(launch, in_names, out_names, ctx, outs, *ins):
    """The body every buffer callback shares: name the buffers, enter the device, launch."""
    bufs = dict(zip(in_names, ins))
    bufs.update(zip(out_names, outs))
    ptrs = {k: _data_ptr(b) for k, b in bufs.items()}
    device = _device_of(ins[0])
    with _device_scope(device):
        stream = _launch_stream(ctx)
        if ar.poison:
            _poison(ptrs, bufs, out_names, stream)
        launch(ptrs, bufs, device, stream)


def _cu_arg(ptrs, cu_dtype):
    if "cu" not in ptrs:
        return (0, 0)
    return ptrs["cu"], int(cu_dtype == "int64")


def _run(spec, direction, engine, tensors, N, cu_dtype, T, out_keys):
    """The launch body of a buffer callback: the engine's prepared launch on XLA's buffers, inside the
    offsets guard where ``spec.guard``; ``out_keys`` name the outputs the guard fills."""
    from . import engines

    varlen = cu_dtype is not None

    def launch(ptrs, bufs, device, stream):
        run = engines.prepare(engine, direction, tensors, N, spec.reverse, device, varlen)
        if run is None and not spec.guard:
            return
        names = ("x", "g", "o") if direction == 0 else ("g", "o", "do", "dx", "dg")
        states = ("h0", "ht") if direction == 0 else ("h0", "dht", "dh0")
        cu = _cu_arg(ptrs, cu_dtype)
        args = (stream, tuple(ptrs[k] for k in names), tuple(ptrs.get(k, 0) for k in states), cu,
                _workspace_fn(ptrs, bufs))
        if not spec.guard:
            run(*args)
            return
        from .engines import guard

        checker = guard.prepare(device, cu_dtype)  # no launch (no sequence): offsets against T > 0 are invalid
        checker.check(stream, cu[0], N + 1, T, ptrs["flag"])
        if run is not None:
            run(*args)
        checker.fill(stream, ptrs["flag"], [(ptrs[k], _nbytes(bufs[k])) for k in out_keys
                                            if k in ptrs and _nbytes(bufs[k])])
    return launch


def _nbytes(buf):
    return int(np.prod(buf.shape)) * np.dtype(buf.dtype).itemsize


def _workspace_fn(ptrs, bufs):
    """The chunk launchers' workspace (see ``chunk.prepare``): XLA's buffer of this call, fresh (the
    launcher fills it)."""
    def workspace(nbytes, acc_itemsize, stream_ptr):
        ws = bufs["ws"]
        assert nbytes <= ws.shape[0], (nbytes, ws.shape)  # sized from the same workspace_layout
        return ptrs["ws"], ws, False, nbytes
    return workspace


@functools.lru_cache(maxsize=None)
def buffer_callback():
    """``jax.experimental.buffer_callback.buffer_callback``, or None in a JAX without it (there the
    NumPy path runs on every platform)."""
    try:
        from jax.experimental.buffer_callback import buffer_callback
    except ImportError:  # pragma: no cover - JAX older than buffer callbacks
        return None
    return buffer_callback


def device_forward(spec, x, g, h0, cu):
    """o, ht on CUDA through one buffer callback (h0 already in the accumulation dtype)."""
    B, T, D = x.shape
    N = _nseq(x, cu)
    acc = _acc(x, g)
    dtypes = (_name(x.dtype), _name(g.dtype))
    engine = _engine(spec, N, T, D, dtypes, cu is not None, 0)
    out_shapes = {"o": jax.ShapeDtypeStruct(x.shape, x.dtype)}
    if spec.output_final_state:
        out_shapes["ht"] = jax.ShapeDtypeStruct((N, D), jnp.dtype(acc))
    _extra_outputs(out_shapes, spec, engine, N, T, D, cu is not None, acc, x.dtype, g.dtype)
    ins = {k: v for k, v in (("x", x), ("g", g), ("h0", h0), ("cu", cu)) if v is not None}
    tensors = (_arr(x.shape, x.dtype), _arr(g.shape, g.dtype), _arr(x.shape, x.dtype))
    cu_dtype = None if cu is None else _name(cu.dtype)
    res = _call_device(_run(spec, 0, engine, tensors, N, cu_dtype, T, ("o", "ht")), ins, out_shapes)
    return res["o"], res.get("ht")


def _engine(spec, N, T, D, dtypes, varlen, direction):
    """The engine, chosen while tracing: cached for the current device, else the built-in rule (the CUDA
    branch is traced on every platform, so a machine without a GPU reads no cache)."""
    try:
        import cupy

        device = cupy.cuda.runtime.getDevice()
    except Exception:
        device = None
    return dispatch.choose(spec.engine, _call(N, T, D, dtypes, varlen), direction, spec.reverse, device=device,
                           traced=True)


def _extra_outputs(out_shapes, spec, engine, N, T, D, varlen, acc, x_dtype, g_dtype):
    """The scratch outputs: the chunk engine's workspace, the guard's flag."""
    if engine == "chunk":
        out_shapes["ws"] = jax.ShapeDtypeStruct((_workspace_bytes(N, T, D, varlen, acc, x_dtype, g_dtype),), jnp.uint8)
    if spec.guard:
        out_shapes["flag"] = jax.ShapeDtypeStruct((1,), jnp.int32)


def _call_device(launch, ins, out_shapes):
    """Run ``launch`` inside the compiled program on the named inputs; the named outputs, by name."""
    call = buffer_callback()(
        functools.partial(_run_device_kernels, launch, tuple(ins), tuple(out_shapes)), tuple(out_shapes.values()))
    return dict(zip(out_shapes, call(*ins.values())))


def device_backward(spec, g, o, do, dht, h0, cu):
    """dx, dg, dh0 (dh0 in the accumulation dtype) on CUDA through one buffer callback."""
    B, T, D = o.shape
    N = _nseq(o, cu)
    acc = _acc(o, g)
    engine = _engine(spec, N, T, D, (_name(o.dtype), _name(g.dtype)), cu is not None, 1)
    out_shapes = {"dx": jax.ShapeDtypeStruct(o.shape, o.dtype), "dg": jax.ShapeDtypeStruct(g.shape, g.dtype)}
    if h0 is not None:
        out_shapes["dh0"] = jax.ShapeDtypeStruct((N, D), jnp.dtype(acc))
    _extra_outputs(out_shapes, spec, engine, N, T, D, cu is not None, acc, o.dtype, g.dtype)
    ins = {k: v for k, v in (("g", g), ("o", o), ("do", do), ("dht", dht), ("h0", h0), ("cu", cu))
           if v is not None}
    ga, oa = _arr(g.shape, g.dtype), _arr(o.shape, o.dtype)
    cu_dtype = None if cu is None else _name(cu.dtype)
    res = _call_device(_run(spec, 1, engine, (ga, oa, oa, oa, ga), N, cu_dtype, T, ("dx", "dg", "dh0")), ins,
                       out_shapes)
    return res["dx"], res["dg"], res.get("dh0")
