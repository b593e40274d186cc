"""JAX bindings: the HGRN recurrence as a differentiable, jit- and vmap-able JAX operation.

    from hgrn_cupy.jax import hgrn, chunk_hgrn, fused_recurrent_hgrn
    o, ht = hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False)

The math, with shapes, is in :mod:`hgrn_cupy.naive`.  Gradients flow to ``x``, ``g`` and
``initial_state`` (and in from both ``o`` and ``ht``) through :func:`jax.custom_vjp`; the backward
reads the saved output ``o``, never ``x``.  ``cu_seqlens`` and ``reverse`` are not differentiable.

Where the work runs is decided when XLA lowers the program (:func:`jax.lax.platform_dependent`):

- CUDA: our kernels run inside the compiled program through
  :func:`jax.experimental.buffer_callback`.  The callback receives XLA's own input and output
  buffers, reads their device pointers from DLPack, and queues the engines' prepared launches
  (:mod:`hgrn_cupy.engines`) on XLA's stream.  Every buffer is XLA's: the chunk engine's scratch
  and the offsets guard's flag are more (discarded) outputs of the call.  No host synchronisation,
  no allocation outside XLA.
- anything else (CPU): the NumPy reference through :func:`jax.pure_callback`.

Under ``jax.jit`` the values of ``cu_seqlens`` cannot be checked on the host: a device guard (or, on
the CPU, the callback) checks them, and every output of a call with invalid offsets is NaN.  The
engine is chosen when the program is traced: a decision cached for the device
(:mod:`hgrn_cupy.tuning`), else the built-in rule; nothing is timed under tracing.

:func:`jax.vmap` over extra leading axes folds them into the batch (or, with ``cu_seqlens``, into
more packed sequences) and runs one launch.  Forward-mode differentiation (``jax.jvp``) is not
supported, as with any ``custom_vjp`` function.
"""
from __future__ import annotations

import ctypes
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import arrays as ar
from . import checks, dispatch, plans
from .engines import chunk as _chunk
from .engines.layout import Arr, row_major
from .naive import naive_recurrent_hgrn, naive_recurrent_hgrn_bwd
from .nvrtc import accumulation_dtype

__all__ = ["hgrn", "chunk_hgrn", "fused_recurrent_hgrn"]


class _Spec(NamedTuple):
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


# ----------------------------------------------------------------------------------------------
# validation (once, at the public boundary; the per-example view under vmap)

def _concrete(a):
    """``a`` as a NumPy array when its values are known now (not under jit or vmap), else None."""
    try:
        return np.asarray(a)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _as_jax(a, name):
    """JAX arrays (and tracers) as they are; NumPy arrays converted; anything else refused, as the top
    level refuses it."""
    if a is None or isinstance(a, jax.Array):
        return a
    if isinstance(a, np.ndarray) and not isinstance(a, np.ma.MaskedArray):
        return jnp.asarray(a)
    checks.framework(a, name)  # names masked arrays and unsupported types
    raise TypeError(f"{name} must be a JAX or NumPy array, got {type(a).__name__}")


def _check(x, g, h0, cu, output_final_state, reverse):
    """Validate the forward arguments (values of cu_seqlens only where they are concrete); returns
    whether the offsets' values were checked on the host."""
    traced = any(ar.is_jax_tracer(a) for a in (x, g, h0, cu) if a is not None)
    call = checks.check_forward(x, g, h0, cu, output_final_state, reverse, values=not traced)
    return call.values_checked


def _call(N, T, D, dtypes, varlen):
    """A ``checks.Call`` for the engine choice inside a traced program."""
    return checks.Call(ar.JAX, 1, T, D, N, dtypes, accumulation_dtype(*dtypes), varlen, False)


# ----------------------------------------------------------------------------------------------
# CUDA: our launchers on XLA's buffers and stream, inside the compiled program

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
        if plans._poison:
            _poison(ptrs, bufs, out_names, stream)
        launch(ptrs, bufs, device, stream)


def _cu_arg(ptrs, cu_dtype):
    if "cu" not in ptrs:
        return (0, 0)
    return ptrs["cu"], int(cu_dtype == "int64")


def _run(spec, direction, engine, tensors, N, cu_dtype, T, out_keys):
    """The launch body of a buffer callback: the engine's prepared launch on XLA's buffers, inside the
    offsets guard where ``spec.guard``; ``out_keys`` name the outputs the guard fills."""
    from .engines import ENGINES

    varlen = cu_dtype is not None

    def launch(ptrs, bufs, device, stream):
        run = ENGINES[engine].prepare(direction, tensors, N, spec.reverse, device, varlen)
        if run is None:
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

        checker = guard.prepare(device, cu_dtype)
        checker.check(stream, cu[0], N + 1, T, ptrs["flag"])
        run(*args)
        checker.fill(stream, ptrs["flag"], [(ptrs[k], _nbytes(bufs[k])) for k in out_keys
                                            if k in ptrs and _nbytes(bufs[k])])
    return launch


def _nbytes(buf):
    return int(np.prod(buf.shape)) * np.dtype(buf.dtype).itemsize


def _workspace_fn(ptrs, bufs):
    """The chunk launchers' workspace (see ``chunk.chunk_fwd``): XLA's buffer of this call, fresh (the
    launcher fills it)."""
    def workspace(nbytes, acc_itemsize, stream_ptr):
        ws = bufs["ws"]
        assert nbytes <= ws.shape[0], (nbytes, ws.shape)  # sized from the same workspace_layout
        return ptrs["ws"], ws, False, nbytes
    return workspace


@functools.lru_cache(maxsize=None)
def _buffer_callback():
    """``jax.experimental.buffer_callback.buffer_callback``, or None in a JAX without it (there the
    NumPy path runs on every platform)."""
    try:
        from jax.experimental.buffer_callback import buffer_callback
    except ImportError:  # pragma: no cover - JAX older than buffer callbacks
        return None
    return buffer_callback


def _branches(device_fn, host_fn, spec):
    cuda = {"cuda": functools.partial(device_fn, spec)} if _buffer_callback() is not None else {}
    return dict(cuda, default=functools.partial(host_fn, spec))


def _device_forward(spec, x, g, h0, cu):
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
    return dispatch.choose(spec.engine, _call(N, T, D, dtypes, varlen), direction, spec.reverse, device=device)


def _extra_outputs(out_shapes, spec, engine, N, T, D, varlen, acc, x_dtype, g_dtype):
    """The scratch outputs: the chunk engine's workspace, the guard's flag."""
    if engine == "chunk":
        out_shapes["ws"] = jax.ShapeDtypeStruct((_workspace_bytes(N, T, D, varlen, acc, x_dtype, g_dtype),), jnp.uint8)
    if spec.guard:
        out_shapes["flag"] = jax.ShapeDtypeStruct((1,), jnp.int32)


def _call_device(launch, ins, out_shapes):
    """Run ``launch`` inside the compiled program on the named inputs; the named outputs, by name."""
    call = _buffer_callback()(
        functools.partial(_run_device_kernels, launch, tuple(ins), tuple(out_shapes)), tuple(out_shapes.values()))
    return dict(zip(out_shapes, call(*ins.values())))


def _device_backward(spec, g, o, do, dht, h0, cu):
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


# ----------------------------------------------------------------------------------------------
# any other platform: the NumPy reference on the host

def _bad_offsets(cu, T):
    return cu is not None and not checks.offsets_valid(np.asarray(cu), T)


def _nan(shapes):
    """NaN outputs of these shapes: the result of a call whose offsets are invalid."""
    return tuple(None if s is None else np.full(s.shape, np.nan, dtype=s.dtype) for s in shapes)


def _host_forward(spec, x, g, h0, cu):
    N, D = _nseq(x, cu), x.shape[2]
    acc = _acc(x, g)
    shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype),
              jax.ShapeDtypeStruct((N, D), jnp.dtype(acc)) if spec.output_final_state else None)

    def host(x, g, h0, cu):
        if _bad_offsets(cu, x.shape[1]):
            return _nan(shapes)
        o, ht = naive_recurrent_hgrn(np.asarray(x), np.asarray(g), None if h0 is None else np.asarray(h0),
                                     spec.output_final_state, None if cu is None else np.asarray(cu),
                                     spec.reverse, compute_dtype=acc)
        return o.astype(shapes[0].dtype, copy=False), ht

    return jax.pure_callback(host, shapes, x, g, h0, cu)


def _host_backward(spec, g, o, do, dht, h0, cu):
    N, D = _nseq(o, cu), o.shape[2]
    acc = _acc(o, g)
    shapes = (jax.ShapeDtypeStruct(o.shape, o.dtype), jax.ShapeDtypeStruct(g.shape, g.dtype),
              None if h0 is None else jax.ShapeDtypeStruct((N, D), jnp.dtype(acc)))

    def host(g, o, do, dht, h0, cu):
        if _bad_offsets(cu, o.shape[1]):
            return _nan(shapes)
        opt = lambda a: None if a is None else np.asarray(a)  # noqa: E731
        dx, dg, dh0 = naive_recurrent_hgrn_bwd(np.asarray(g), np.asarray(o), np.asarray(do), opt(dht), opt(h0),
                                               opt(cu), spec.reverse, compute_dtype=acc)
        return (dx.astype(shapes[0].dtype, copy=False), dg.astype(shapes[1].dtype, copy=False),
                None if dh0 is None else dh0.astype(acc, copy=False))

    return jax.pure_callback(host, shapes, g, o, do, dht, h0, cu)


# ----------------------------------------------------------------------------------------------
# one op per direction: platform choice at lowering, vmap folded into the batch

def _fold_batch(axis_size, in_batched, arrays, cu):
    """Broadcast the unbatched arrays to the batch, then merge it into B (dense) or into packed
    sequences (varlen: time becomes V*T and the offsets of copy v are shifted by v*T).

    ``arrays``: {name: (array or None, is [B, T, D] (else [N, D]))}, in argument order, cu last in
    ``in_batched``.  Returns (folded arrays, folded cu)."""
    V = axis_size
    full = {}
    for (k, (a, _)), b in zip(arrays.items(), in_batched):
        full[k] = None if a is None else (a if b else jnp.broadcast_to(a, (V,) + a.shape))
    merge = lambda a: a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])  # noqa: E731
    if cu is None:
        folded = {k: None if a is None else merge(a) for k, a in full.items()}
    else:  # [V, 1, T, D] -> [1, V*T, D]; states [V, N, D] -> [V*N, D]
        folded = {k: None if a is None else (merge(a[:, 0])[None] if arrays[k][1] else merge(a))
                  for k, a in full.items()}
        T = next(full[k] for k, (_, btd) in arrays.items() if btd).shape[2]
        cuv = cu if in_batched[-1] else jnp.broadcast_to(cu, (V,) + cu.shape)
        starts = cuv[:, :-1] + (jnp.arange(V, dtype=cu.dtype) * T)[:, None]
        cu = jnp.concatenate([starts.reshape(-1), jnp.full((1,), V * T, cu.dtype)])
    return folded, cu


def _unfold(a, V, btd, varlen):
    """Split the folded leading axis (or, varlen, the packed time axis) of an output back into V."""
    if a is None:
        return None
    if btd and varlen:
        return a.reshape((V, 1, a.shape[1] // V) + a.shape[2:])
    return a.reshape((V, a.shape[0] // V) + a.shape[1:])


@functools.lru_cache(maxsize=None)
def _forward_op(spec):
    @jax.custom_batching.custom_vmap
    def forward(x, g, h0, cu):
        return lax.platform_dependent(x, g, h0, cu, **_branches(_device_forward, _host_forward, spec))

    @forward.def_vmap
    def forward_vmap(axis_size, in_batched, x, g, h0, cu):
        arrays = {"x": (x, True), "g": (g, True), "h0": (h0, False)}
        f, cu_f = _fold_batch(axis_size, in_batched, arrays, cu)
        o, ht = forward(f["x"], f["g"], f["h0"], cu_f)
        out = (_unfold(o, axis_size, True, cu is not None), _unfold(ht, axis_size, False, cu is not None))
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return forward


@functools.lru_cache(maxsize=None)
def _backward_op(spec):
    @jax.custom_batching.custom_vmap
    def backward(g, o, do, dht, h0, cu):
        return lax.platform_dependent(g, o, do, dht, h0, cu, **_branches(_device_backward, _host_backward, spec))

    @backward.def_vmap
    def backward_vmap(axis_size, in_batched, g, o, do, dht, h0, cu):
        arrays = {"g": (g, True), "o": (o, True), "do": (do, True), "dht": (dht, False), "h0": (h0, False)}
        f, cu_f = _fold_batch(axis_size, in_batched, arrays, cu)
        res = backward(f["g"], f["o"], f["do"], f["dht"], f["h0"], cu_f)
        varlen = cu is not None
        out = tuple(_unfold(a, axis_size, btd, varlen) for a, btd in zip(res, (True, True, False)))
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return backward


# ----------------------------------------------------------------------------------------------
# differentiation

def _forward(spec, x, g, h0, cu):
    if h0 is not None:
        h0 = h0.astype(_acc(x, g))
    return _forward_op(spec)(x, g, h0, cu)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _hgrn(spec, x, g, h0, cu):
    return _forward(spec, x, g, h0, cu)


def _hgrn_fwd(spec, x, g, h0, cu):
    o, ht = _forward(spec, x, g, h0, cu)
    return (o, ht), (g, o, h0, cu)  # the output holds every state the backward needs; x is not kept


def _hgrn_bwd(spec, res, cts):
    g, o, h0, cu = res
    do, dht = cts
    acc = _acc(o, g)
    do = do.astype(o.dtype)
    dht = None if dht is None else dht.astype(acc)
    h0_acc = None if h0 is None else h0.astype(acc)
    dx, dg, dh0 = _backward_op(spec)(g, o, do, dht, h0_acc, cu)
    return dx, dg, None if dh0 is None else dh0.astype(h0.dtype), None


_hgrn.defvjp(_hgrn_fwd, _hgrn_bwd)
# Compiled even when called eagerly, so that the platform is that of the arguments' device.
_hgrn_jit = jax.jit(_hgrn, static_argnums=(0,))


# ----------------------------------------------------------------------------------------------
# the public functions

def _apply(engine, x, g, initial_state, output_final_state, cu_seqlens, reverse):
    x, g = _as_jax(x, "x"), _as_jax(g, "g")
    h0, cu = _as_jax(initial_state, "initial_state"), _as_jax(cu_seqlens, "cu_seqlens")
    checked = _check(x, g, h0, cu, output_final_state, reverse)
    dispatch.check_engine(engine)
    spec = _Spec(engine, bool(output_final_state), bool(reverse), cu is not None and not checked)
    o, ht = _hgrn_jit(spec, x, g, h0, cu)
    return o, ht


def hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False):
    """:func:`hgrn_cupy.hgrn` for JAX arrays, eagerly or inside ``jax.jit`` / ``grad`` / ``vmap``.

    Arguments and results as :func:`hgrn_cupy.hgrn` (``output_final_state`` and ``reverse`` are
    static).  Differentiable in reverse mode in x, g and initial_state, with the final state's
    gradient flowing back; ``jax.vmap`` folds extra leading axes into the batch.  On GPU the kernels
    run inside the compiled program (``jax.experimental.buffer_callback`` on XLA's stream); on CPU
    the NumPy reference runs through ``jax.pure_callback``.
    """
    return _apply("auto", x, g, initial_state, output_final_state, cu_seqlens, reverse)


def chunk_hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False):
    """:func:`hgrn` on the chunk engine (on CUDA; elsewhere every engine is the NumPy reference)."""
    return _apply("chunk", x, g, initial_state, output_final_state, cu_seqlens, reverse)


def fused_recurrent_hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False):
    """:func:`hgrn` on the fused recurrent engine (on CUDA; elsewhere the NumPy reference)."""
    return _apply("fused_recurrent", x, g, initial_state, output_final_state, cu_seqlens, reverse)
