"""Public functions: validation at the boundary, CPU/GPU routing, engine dispatch.

The math, with shapes, is in :mod:`hgrn_cupy.naive`.  Every function here accepts NumPy, CuPy,
PyTorch (CPU or CUDA) and JAX (CPU or GPU) arrays and returns the caller's array type on the
caller's device; GPU arrays run the CUDA kernels on the caller's current stream, CPU arrays run the
NumPy reference.
"""
from __future__ import annotations

import threading

import numpy as np

from . import _backend as bk
from . import chunk as _chunk
from . import fused_recurrent as _fused
from ._compile import ITEMSIZE, accumulation_dtype
from .naive import naive_recurrent_hgrn, naive_recurrent_hgrn_bwd


class Config:
    """Library switches.

    check_cu_seqlens_values: read ``cu_seqlens`` back to the host to check that it starts at 0, never
        decreases and ends at T (one small device-to-host copy, hence a synchronisation, for GPU
        arrays).  Skipped while a CUDA graph is being captured.  The kernels clamp offsets into
        [0, T] either way, so malformed offsets can give wrong numbers but never touch memory
        outside the tensors.
    keep_workspaces: the chunk engine keeps its scratch memory (8 bytes per channel every 64 steps or
        more, 16 with float64: about N * D * T / 8 bytes at most; one buffer per device, stream,
        framework and accumulation dtype, a power of two of 64 KB or more) between calls; each
        launch leaves it ready for the next, which saves filling fresh memory at every call.  While a
        CUDA graph is being captured, and when this is False, calls take fresh memory and fill it
        (a graph then replays the fill).  ``release_workspaces()`` frees what is kept.  Kept memory
        belongs to one stream (on the default stream's handles, to one host thread as well): do not
        destroy a stream while kernels queued on it are pending and reuse its handle for another.
    """
    check_cu_seqlens_values = True
    keep_workspaces = True

    @staticmethod
    def release_workspaces():
        """Free the chunk engine's kept scratch memory (kernels already queued keep theirs alive)."""
        _kept.clear()


config = Config()
ENGINES = ("auto", "chunk", "fused_recurrent")


# ----------------------------------------------------------------------------------------------
# validation

def _fw(a, name):
    fw = bk.framework_of(a)
    if fw is bk.JAX and bk.is_jax_tracer(a):  # inside jax.jit / grad / vmap
        raise TypeError(f"{name} is a traced JAX value; inside jax.jit, grad or vmap use hgrn_cupy.jax.hgrn "
                        "(and friends), which run inside the compiled program")
    if fw is None:
        raise TypeError(f"{name} must be a NumPy, CuPy, PyTorch or JAX array, got {type(a).__name__}")
    return fw


def _same_place(a, name, fw, ref, ref_name):
    other = _fw(a, name)
    if other is not fw:
        raise TypeError(f"{name} is a {other.name} array but {ref_name} is a {fw.name} array")
    if fw.device(a) != fw.device(ref):
        raise ValueError(f"{name} is on {fw.device(a)} but {ref_name} is on {fw.device(ref)}")


def _float_dtype(a, name, fw):
    dt = fw.dtype(a)
    if dt not in bk.FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {dt}; supported: {', '.join(bk.FLOAT_DTYPES)}")
    return dt


def _check_btd(a, name, fw, shape=None):
    if len(a.shape) != 3:
        raise ValueError(f"{name} must have 3 dimensions [B, T, D], got shape {tuple(a.shape)}")
    if shape is not None and tuple(a.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} like the other inputs, got {tuple(a.shape)}")
    if a.shape[2] > 1 and min(a.shape) > 0 and fw.strides(a)[2] != 1:
        raise ValueError(f"{name} must be contiguous along its last axis (stride 1), "
                         f"got strides {fw.strides(a)}")


def _check_state(a, name, fw, ref, N, D):
    if a is None:
        return None
    _same_place(a, name, fw, ref, "x")
    _float_dtype(a, name, fw)
    if tuple(a.shape) != (N, D):
        raise ValueError(f"{name} must have shape [N, D] = {(N, D)}, got {tuple(a.shape)}")
    return a


def check_cu_seqlens_layout(shape, dtype, B):
    """The checks on cu_seqlens that need no values; returns N, the number of sequences."""
    if len(shape) != 1 or dtype not in bk.INDEX_DTYPES:
        raise ValueError(f"cu_seqlens must be a 1-D int32 or int64 array [N+1], got shape "
                         f"{tuple(shape)} and dtype {dtype}")
    if shape[0] < 1:
        raise ValueError("cu_seqlens must hold at least one offset (0)")
    if B != 1:
        raise ValueError(f"cu_seqlens packs sequences along time and needs B == 1, got B = {B}")
    return shape[0] - 1


def check_cu_seqlens_values(v, T):
    """cu_seqlens (host values) starts at 0, never decreases and ends at T."""
    if v[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(v[0])}")
    if np.any(np.diff(v) < 0):
        raise ValueError("cu_seqlens must be non-decreasing")
    if v[-1] != T:
        raise ValueError(f"cu_seqlens must end at T = {T}, got {int(v[-1])}")


def _check_cu_seqlens(cu, fw, ref, B, T):
    """Returns N, the number of sequences."""
    if cu is None:
        return B
    _same_place(cu, "cu_seqlens", fw, ref, "x")
    N = check_cu_seqlens_layout(cu.shape, fw.dtype(cu), B)
    if config.check_cu_seqlens_values and not (fw.is_gpu(cu) and fw.capturing(ref)):
        check_cu_seqlens_values(fw.index_values(cu), T)
    return N


def _check_reverse(reverse):
    if not isinstance(reverse, (bool, np.bool_)):
        raise TypeError(f"reverse must be a bool, got {type(reverse).__name__}")


def check_forward(x, g, initial_state, cu_seqlens, reverse):
    """Validate forward arguments; returns (framework, N)."""
    fw = _fw(x, "x")
    _same_place(g, "g", fw, x, "x")
    _float_dtype(x, "x", fw)
    _float_dtype(g, "g", fw)
    _check_btd(x, "x", fw)
    _check_btd(g, "g", fw, tuple(x.shape))
    _check_reverse(reverse)
    B, T, D = x.shape
    N = _check_cu_seqlens(cu_seqlens, fw, x, B, T)
    _check_state(initial_state, "initial_state", fw, x, N, D)
    return fw, N


def check_backward(g, o, do, dht, initial_state, cu_seqlens, reverse):
    """Validate backward arguments; returns (framework, N)."""
    fw = _fw(o, "o")
    for a, name in ((g, "g"), (do, "do")):
        _same_place(a, name, fw, o, "o")
    for a, name in ((g, "g"), (o, "o"), (do, "do")):
        _float_dtype(a, name, fw)
    _check_btd(o, "o", fw)
    _check_btd(g, "g", fw, tuple(o.shape))
    _check_btd(do, "do", fw, tuple(o.shape))
    _check_reverse(reverse)
    B, T, D = o.shape
    N = _check_cu_seqlens(cu_seqlens, fw, o, B, T)
    _check_state(initial_state, "initial_state", fw, o, N, D)
    _check_state(dht, "dht", fw, o, N, D)
    return fw, N


# ----------------------------------------------------------------------------------------------
# engine choice

# The chunk engine wins below this many channels (N * D), the fused engine from there on, per (bytes per
# element of the wider input, direction); measured on an H100 (benchmarks/NOTES.md, engine crossover).
# CHUNK_BELOW_BLOCK holds where the fused engine would take its block walk
# (fused_recurrent.BLOCK_WALK_CHANNELS: from 8K channels for 16-bit types, 4K for float32), CHUNK_BELOW
# where it would take the thread walk.  float64 has no block walk.
CHUNK_BELOW_BLOCK = {(2, 0): 1 << 14, (2, 1): 1 << 17, (4, 0): 1 << 13, (4, 1): 1 << 19}
CHUNK_BELOW = {(2, 0): 1 << 16, (2, 1): 1 << 15, (4, 0): 1 << 15, (4, 1): 1 << 19, (8, 0): 1 << 15, (8, 1): 1 << 14}
FUSED_MAX_T = 32  # at most this many steps, the walk is shorter than the chunk engine's look-back


def pick_engine(N, T, D, dtypes=("float32",), direction=0):
    """The faster engine for a shape: the fused recurrent walk needs many channels to fill the GPU
    (one thread each, or a block per 8 bytes of channels a lane in the forward's block walk); the chunk
    engine also parallelises over time.  ``dtypes``: the inputs' dtype names (x, g); ``direction``:
    0 forward, 1 backward."""
    if T <= FUSED_MAX_T:
        return "fused_recurrent"
    size = max(ITEMSIZE[d] for d in dtypes)
    if _fused.block_walk_fits(N, T, D, dtypes[0], dtypes[-1], direction):
        below = CHUNK_BELOW_BLOCK[size, direction]
    else:
        below = CHUNK_BELOW[size, direction]
    return "chunk" if N * D < below else "fused_recurrent"


def _engine(engine, N, T, D, dtypes=("float32",), direction=0):
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "auto":
        engine = pick_engine(N, T, D, dtypes, direction)
    if engine == "chunk" and T == 0:  # nothing to split; the walk passes states through
        engine = "fused_recurrent"
    return engine


# ----------------------------------------------------------------------------------------------
# GPU plumbing shared by both directions

def _device_index(fw, a):
    return a.device.id if fw is bk.CUPY else a.device.index


def _state_in(fw, a, acc):
    """An optional [N, D] state as a contiguous array in the accumulation dtype (or None)."""
    if a is None:
        return None
    if fw.dtype(a) != acc:
        a = fw.astype(a, acc)
    return fw.contiguous(a)


def _cu_arg(fw, cu):
    if cu is None:
        return None, None
    cu = fw.contiguous(cu)
    return cu, (fw.describe(cu).ptr, int(fw.dtype(cu) == "int64"))


_kept = {}  # (torch?, device index, stream, thread, accumulation itemsize) -> (pointer, owner, True, bytes)
_KEPT_MIN_BYTES = 1 << 16
# Handles that may name a different stream in each host thread (0 under per-thread default-stream
# compilation, cudaStreamPerThread = 2): their kept memory is also per thread.
_PER_THREAD_HANDLES = (0, 2)


def _capturing(stream_ptr):
    """Whether the stream is capturing a CUDA graph (or cannot tell: the fresh path is always safe)."""
    import cupy

    try:
        return cupy.cuda.runtime.streamIsCapturing(stream_ptr) != 0
    except cupy.cuda.runtime.CUDARuntimeError:
        return True


def _workspace(fw, device):
    """Chunk-engine scratch from the caller's allocator (torch's caching allocator on ``device``, a torch
    device, or CuPy's pool on the current device), as the launchers take it: ``alloc(nbytes,
    acc_itemsize, stream_ptr) -> (pointer, owner, filled, size)``.  Kept memory (``config.keep_workspaces``)
    is filled once, when it is made; fresh memory is filled by the launcher."""
    def fresh(nbytes):
        if fw is bk.TORCH:
            import torch

            buf = torch.empty((nbytes,), dtype=torch.uint8, device=device)
            return buf.data_ptr(), buf
        import cupy

        buf = cupy.empty((nbytes,), dtype=np.uint8)
        return buf.data.ptr, buf

    def alloc(nbytes, acc_itemsize, stream_ptr):
        if not config.keep_workspaces or _capturing(stream_ptr):
            return fresh(nbytes) + (False, nbytes)
        import cupy

        thread = threading.get_ident() if stream_ptr in _PER_THREAD_HANDLES else None
        if fw is bk.TORCH:
            key = (True, device.index, stream_ptr, thread, acc_itemsize)  # a tensor's device: index set
        else:
            key = (False, cupy.cuda.runtime.getDevice(), stream_ptr, thread, acc_itemsize)
        kept = _kept.get(key)
        if kept is None or kept[3] < nbytes:
            size = max(_KEPT_MIN_BYTES, 1 << (nbytes - 1).bit_length())
            ptr, buf = fresh(size)
            cupy.cuda.runtime.memsetAsync(ptr, 0xFF, size, stream_ptr)  # the one fill
            kept = _kept[key] = (ptr, buf, True, size)
        return kept
    return alloc


class _Stream:
    """The caller's stream as the launchers need it: an object with ``ptr`` (read at each call)."""
    __slots__ = ("ptr",)

    def __init__(self, ptr):
        self.ptr = ptr


def _stream(fw, like):
    return _Stream(fw.stream(like))


def _ptr(fw, a):
    return 0 if a is None else fw.describe(a).ptr


class _DeviceScope:
    """Make ``device`` current for the launch, only when it is not already."""

    def __init__(self, device):
        import cupy

        self.device, self.prev = device, cupy.cuda.runtime.getDevice()

    def __enter__(self):
        if self.prev != self.device:
            import cupy
            cupy.cuda.runtime.setDevice(self.device)

    def __exit__(self, *exc):
        if self.prev != self.device:
            import cupy
            cupy.cuda.runtime.setDevice(self.prev)


def _gpu_forward(engine, fw, x, g, h0, output_final_state, cu, N, reverse):
    B, T, D = x.shape
    xd, gd = fw.dtype(x), fw.dtype(g)
    acc = accumulation_dtype(xd, gd)
    h0 = _state_in(fw, h0, acc)
    cu, cu_arg = _cu_arg(fw, cu)
    o = fw.empty((B, T, D), xd, x)
    ht = fw.empty((N, D), acc, x) if output_final_state else None
    dev = _device_index(fw, x)
    with _DeviceScope(dev):
        stream = _stream(fw, x)
        args = (fw.describe(x), fw.describe(g), fw.describe(o), _ptr(fw, h0), _ptr(fw, ht), cu_arg, N, reverse,
                dev, stream)
        if engine == "chunk":
            _chunk.chunk_fwd(*args, _workspace(fw, x.device))
        else:
            _fused.fused_recurrent_fwd(*args)
    return o, ht


def _gpu_backward(engine, fw, g, o, do, dht, h0, cu, N, reverse):
    B, T, D = o.shape
    od, gd = fw.dtype(o), fw.dtype(g)
    acc = accumulation_dtype(od, gd)
    if fw.dtype(do) != od:
        do = fw.astype(do, od)
    h0_in = _state_in(fw, h0, acc)
    dht = _state_in(fw, dht, acc)
    cu, cu_arg = _cu_arg(fw, cu)
    dx = fw.empty((B, T, D), od, o)
    dg = fw.empty((B, T, D), gd, o)
    dh0 = fw.empty((N, D), acc, o) if h0 is not None else None
    dev = _device_index(fw, o)
    with _DeviceScope(dev):
        stream = _stream(fw, o)
        args = (fw.describe(g), fw.describe(o), fw.describe(do), fw.describe(dx), fw.describe(dg),
                _ptr(fw, h0_in), _ptr(fw, dht), _ptr(fw, dh0), cu_arg, N, reverse, dev, stream)
        if engine == "chunk":
            _chunk.chunk_bwd(*args, _workspace(fw, o.device))
        else:
            _fused.fused_recurrent_bwd(*args)
    if dh0 is not None and fw.dtype(h0) != acc:
        dh0 = fw.astype(dh0, fw.dtype(h0))
    return dx, dg, dh0


# ----------------------------------------------------------------------------------------------
# CPU path: the NumPy reference, in the caller's framework

def _np(fw, a):
    return None if a is None else fw.to_numpy(a)


def _cpu_forward(fw, x, g, h0, output_final_state, cu, reverse):
    o, ht = naive_recurrent_hgrn(_np(fw, x), _np(fw, g), _np(fw, h0), output_final_state,
                                 None if cu is None else fw.index_values(cu), reverse)
    acc = accumulation_dtype(fw.dtype(x), fw.dtype(g))
    o = fw.from_numpy(o, x, fw.dtype(x))
    ht = None if ht is None else fw.from_numpy(ht, x, acc)
    return o, ht


def _cpu_backward(fw, g, o, do, dht, h0, cu, reverse):
    gd, od = fw.dtype(g), fw.dtype(o)
    acc = accumulation_dtype(od, gd)
    do_np = _np(fw, do).astype(_np(fw, o).dtype, copy=False)
    dx, dg, dh0 = naive_recurrent_hgrn_bwd(
        _np(fw, g), _np(fw, o), do_np, _np(fw, dht), _np(fw, h0),
        None if cu is None else fw.index_values(cu), reverse,
        compute_dtype=np.float64 if acc == "float64" else np.float32)
    dx = fw.from_numpy(dx, o, od)
    dg = fw.from_numpy(dg, o, gd)
    dh0 = None if dh0 is None else fw.from_numpy(dh0, o, fw.dtype(h0))
    return dx, dg, dh0


# ----------------------------------------------------------------------------------------------
# plans: a call whose arrays match an earlier valid call in framework, device, dtype, shape and
# strides (its key) skips the checks and every per-call decision.  Decoding repeats one key at every
# step; there the checks and lookups cost more than the launch.

MAX_PLANS = 256  # keys kept before the cache starts over (shapes that keep changing, such as T)
_plans: dict = {}


def _lookup(engine, x, g, h0, output_final_state, cu_seqlens, reverse):
    """``(plan, key)``: the plan for this call's key (None when there is none yet) and the key (None when
    the call cannot be planned: varlen offsets must be checked at every call, JAX arrays are converted,
    and a ``reverse`` that is not a bool must be rejected).  A backward passes g, o, do for x, g, h0."""
    fw = bk.PLANNABLE.get(type(x))
    if fw is None and bk.framework_of(x) is not None:  # a type not seen before may be plannable
        fw = bk.PLANNABLE.get(type(x))
    if fw is None or cu_seqlens is not None or (reverse is not True and reverse is not False):
        return None, None
    try:
        key = fw.signature(x, g, h0, (engine, True if output_final_state else False, reverse))
        return _plans.get(key), key
    except Exception:  # an array without strides, and the like: the checks will say what is wrong
        return None, None


def _remember(key, plan):
    """Keep ``plan`` under ``key`` (the cache starts over once it holds MAX_PLANS keys); returns it."""
    if len(_plans) >= MAX_PLANS:
        _plans.clear()
    _plans[key] = plan
    return plan


def _state_key(o, a):
    """A backward key's part for one optional state: None where it is absent, its placement, dtype, shape
    and strides otherwise; False where it cannot be planned (not of o's type: the checks will say)."""
    if a is None:
        return None
    fw = bk.PLANNABLE.get(type(a))
    if fw is None or type(a) is not type(o):
        return False
    return fw.signature(a, a, None, None)


def _plan_forward(engine, fw, x, g, h0, output_final_state, N, reverse):
    """A function ``(x, g, initial_state) -> (o, ht)`` for the calls of one key, made from a call that
    has passed :func:`check_forward`; ``engine`` is resolved."""
    if not fw.is_gpu(x):
        return lambda x, g, h0: _cpu_forward(fw, x, g, h0, output_final_state, None, reverse)
    return (_torch_plan if fw is bk.TORCH else _cupy_plan)(engine, fw, x, g, h0, output_final_state, N, reverse)


def _prepared_launch(engine, fw, x, g, o_strides, N, reverse, device, workspace):
    """The forward launch of ``engine`` for x's and g's layout and o's strides, as ``launch(stream_ptr,
    x_ptr, g_ptr, o_ptr, h0_ptr, ht_ptr)``, or None when there is nothing to compute; the chunk engine
    takes its scratch from ``workspace`` (see ``_workspace``) at each call."""
    B, T, D = x.shape
    o = bk.Arr(0, (B, T, D), o_strides, fw.dtype(x))
    if engine == "fused_recurrent":
        return _fused.prepare_fwd(fw.describe(x), fw.describe(g), o, None, N, reverse, device)
    launch = _chunk.prepare_dense(0, (fw.describe(x), fw.describe(g), o), N, reverse, device)
    if launch is None:
        return None

    def with_workspace(stream_ptr, x_ptr, g_ptr, o_ptr, h0_ptr, ht_ptr):
        launch(stream_ptr, (x_ptr, g_ptr, o_ptr), (h0_ptr, ht_ptr), workspace)
    return with_workspace


def _row_major(shape):
    B, T, D = shape
    return (T * D, D, 1)


def _torch_plan(engine, fw, x, g, h0, output_final_state, N, reverse):
    """Outputs (and the chunk engine's scratch) from torch's caching allocator (``empty_like`` where the
    layout allows: it parses no arguments), the launch prepared, the current stream read at each call."""
    import cupy
    import torch

    B, T, D = x.shape
    acc = accumulation_dtype(fw.dtype(x), fw.dtype(g))
    device, dev = x.device, x.device.index
    o_like_x = x.is_contiguous()  # empty_like(x) then keeps x's strides
    launch = _prepared_launch(engine, fw, x, g, x.stride() if o_like_x else _row_major(x.shape), N, reverse, dev,
                              _workspace(fw, device))
    direct = h0 is not None and fw.dtype(h0) == acc and h0.is_contiguous()  # h0 read in place, ht like it
    shape, o_dtype, acc_dtype = (B, T, D), x.dtype, bk._torch_dtype_names()[acc]
    empty, empty_like = torch.empty, torch.empty_like
    stream = bk.torch_stream_reader(torch)
    get_device = cupy.cuda.runtime.getDevice

    def plan(x, g, h0):
        if bk.POISON_OUTPUTS:
            return _gpu_forward(engine, fw, x, g, h0, output_final_state, None, N, reverse)
        o = empty_like(x) if o_like_x else empty(shape, dtype=o_dtype, device=device)
        if direct:
            ht = empty_like(h0) if output_final_state else None
        else:
            h0 = _state_in(fw, h0, acc)
            ht = empty((N, D), dtype=acc_dtype, device=device) if output_final_state else None
        if launch is not None:
            args = (x.data_ptr(), g.data_ptr(), o.data_ptr(), 0 if h0 is None else h0.data_ptr(),
                    0 if ht is None else ht.data_ptr())
            if get_device() == dev:
                launch(stream(dev), *args)
            else:
                with _DeviceScope(dev):
                    launch(stream(dev), *args)
        return o, ht

    return plan


def _cupy_plan(engine, fw, x, g, h0, output_final_state, N, reverse):
    """Outputs (and the chunk engine's scratch) from CuPy's pool on x's device, the launch prepared, the
    current stream read at each call."""
    import cupy

    B, T, D = x.shape
    acc = accumulation_dtype(fw.dtype(x), fw.dtype(g))
    dev = x.data.device_id
    # scratch on x's device: the plan makes it current around the launch
    launch = _prepared_launch(engine, fw, x, g, _row_major(x.shape), N, reverse, dev, _workspace(fw, dev))
    direct = h0 is not None and fw.dtype(h0) == acc and h0.flags.c_contiguous
    shape, o_dtype, acc_dtype = (B, T, D), fw._np_dtype(fw.dtype(x)), fw._np_dtype(acc)
    empty, current_stream = cupy.empty, cupy.cuda.get_current_stream
    get_device, set_device = cupy.cuda.runtime.getDevice, cupy.cuda.runtime.setDevice

    def plan(x, g, h0):
        if bk.POISON_OUTPUTS:
            return _gpu_forward(engine, fw, x, g, h0, output_final_state, None, N, reverse)
        prev = get_device()
        if prev != dev:
            set_device(dev)
        try:
            o = empty(shape, o_dtype)
            ht = empty((N, D), acc_dtype) if output_final_state else None
            if not direct:
                h0 = _state_in(fw, h0, acc)
            if launch is not None:
                launch(current_stream(dev).ptr, x.data.ptr, g.data.ptr, o.data.ptr,
                       0 if h0 is None else h0.data.ptr, 0 if ht is None else ht.data.ptr)
        finally:
            if prev != dev:
                set_device(prev)
        return o, ht

    return plan


def _prepared_backward(engine, fw, arrs, N, reverse, device, like):
    """The dense backward launch of ``engine`` for the layout of ``arrs`` (``Arr`` g, o, do, dx, dg), as
    ``launch(stream_ptr, pointers, states)``, or None when there is nothing to compute; the chunk engine
    takes its scratch on ``like``'s device (see ``_workspace``) at each call."""
    if engine == "fused_recurrent":
        return _fused.prepare_bwd(*arrs, None, N, reverse, device)
    launch = _chunk.prepare_dense(1, tuple(arrs), N, reverse, device)
    if launch is None:
        return None
    workspace = _workspace(fw, like)

    def with_workspace(stream_ptr, pointers, states):
        launch(stream_ptr, pointers, states, workspace)
    return with_workspace


def _plan_backward(engine, fw, g, o, do, dht, h0, N, reverse):
    """A function ``(g, o, do, dht, h0) -> (dx, dg, dh0)`` for the backward calls of one key, made from a
    call that has passed :func:`check_backward`; ``engine`` is resolved.  The key fixes which states are
    present and their layouts (``dht``, ``h0``: this call's, or None).  The launch is prepared; outputs are
    row-major and states are taken in and given back as on the checked path."""
    if not fw.is_gpu(o):
        return lambda g, o, do, dht, h0: _cpu_backward(fw, g, o, do, dht, h0, None, reverse)
    B, T, D = o.shape
    od, gd = fw.dtype(o), fw.dtype(g)
    acc = accumulation_dtype(od, gd)
    cast_do = fw.dtype(do) != od
    with_h0 = h0 is not None
    cast_dh0 = with_h0 and fw.dtype(h0) != acc  # dh0 comes back in h0's dtype
    # states the key fixes as contiguous in the accumulation dtype are read in place
    h0_direct = with_h0 and not cast_dh0 and fw.contiguous(h0) is h0
    dht_direct = dht is not None and fw.dtype(dht) == acc and fw.contiguous(dht) is dht

    def states_in(h0, dht):
        return (h0 if h0_direct else _state_in(fw, h0, acc)), (dht if dht_direct else _state_in(fw, dht, acc))

    def checked(g, o, do, dht, h0):
        return _gpu_backward(engine, fw, g, o, do, dht, h0, None, N, reverse)
    row = _row_major((B, T, D))
    arrs = [bk.Arr(0, (B, T, D), fw.strides(a), fw.dtype(a)) for a in (g, o, do)]
    if cast_do:
        arrs[2] = bk.Arr(0, (B, T, D), row, od)
    arrs += [bk.Arr(0, (B, T, D), row, od), bk.Arr(0, (B, T, D), row, gd)]
    launch = _prepared_backward(engine, fw, arrs, N, reverse, _device_index(fw, o),
                                o.device if fw is bk.TORCH else o.data.device_id)
    if fw is bk.TORCH:
        import cupy
        import torch

        device, dev = o.device, o.device.index
        dt = bk._torch_dtype_names()
        o_dtype, g_dtype, acc_dtype, empty = dt[od], dt[gd], dt[acc], torch.empty
        h0_dtype = h0.dtype if with_h0 else None
        stream = bk.torch_stream_reader(torch)
        get_device = cupy.cuda.runtime.getDevice

        def plan(g, o, do, dht, h0):
            if bk.POISON_OUTPUTS:
                return checked(g, o, do, dht, h0)
            if cast_do:  # as the checked path, then row-major as the launch was prepared for
                do = do.to(o_dtype).contiguous()
            dx, dg = empty((B, T, D), dtype=o_dtype, device=device), empty((B, T, D), dtype=g_dtype, device=device)
            dh0 = empty((N, D), dtype=acc_dtype, device=device) if with_h0 else None
            if launch is not None:
                h0_in, dht_in = states_in(h0, dht)
                states = (0 if h0_in is None else h0_in.data_ptr(), 0 if dht_in is None else dht_in.data_ptr(),
                          0 if dh0 is None else dh0.data_ptr())
                args = ((g.data_ptr(), o.data_ptr(), do.data_ptr(), dx.data_ptr(), dg.data_ptr()), states)
                if get_device() == dev:
                    launch(stream(dev), *args)
                else:
                    with _DeviceScope(dev):
                        launch(stream(dev), *args)
            if cast_dh0:
                dh0 = dh0.to(h0_dtype)
            return dx, dg, dh0
        return plan

    import cupy

    dev = o.data.device_id
    o_dtype, g_dtype, acc_np = fw._np_dtype(od), fw._np_dtype(gd), fw._np_dtype(acc)
    h0_dtype = fw.dtype(h0) if with_h0 else None
    empty, current_stream = cupy.empty, cupy.cuda.get_current_stream
    get_device, set_device = cupy.cuda.runtime.getDevice, cupy.cuda.runtime.setDevice

    def cupy_plan(g, o, do, dht, h0):
        if bk.POISON_OUTPUTS:
            return checked(g, o, do, dht, h0)
        prev = get_device()
        if prev != dev:
            set_device(dev)
        try:
            if cast_do:
                do = cupy.ascontiguousarray(fw.astype(do, od))
            dx, dg = empty((B, T, D), o_dtype), empty((B, T, D), g_dtype)
            dh0 = empty((N, D), acc_np) if with_h0 else None
            if launch is not None:
                h0_in, dht_in = states_in(h0, dht)
                launch(current_stream(dev).ptr, (g.data.ptr, o.data.ptr, do.data.ptr, dx.data.ptr, dg.data.ptr),
                       (0 if h0_in is None else h0_in.data.ptr, 0 if dht_in is None else dht_in.data.ptr,
                        0 if dh0 is None else dh0.data.ptr))
            if cast_dh0:
                dh0 = fw.astype(dh0, h0_dtype)
        finally:
            if prev != dev:
                set_device(prev)
        return dx, dg, dh0
    return cupy_plan


# ----------------------------------------------------------------------------------------------
# the public functions

def _forward(engine, x, g, initial_state, output_final_state, cu_seqlens, reverse):
    plan, key = _lookup(engine, x, g, initial_state, output_final_state, cu_seqlens, reverse)
    if plan is not None:
        return plan(x, g, initial_state)
    fw, N = check_forward(x, g, initial_state, cu_seqlens, reverse)
    B, T, D = x.shape
    engine = _engine(engine, N, T, D, (fw.dtype(x), fw.dtype(g)), 0)
    if key is not None:
        plan = _remember(key, _plan_forward(engine, fw, x, g, initial_state, output_final_state, N, reverse))
        return plan(x, g, initial_state)
    if not fw.is_gpu(x):
        return _cpu_forward(fw, x, g, initial_state, output_final_state, cu_seqlens, reverse)
    if fw is bk.JAX:
        c = bk.JAX.to_cupy
        o, ht = _gpu_forward(engine, bk.CUPY, c(x), c(g), None if initial_state is None else c(initial_state),
                             output_final_state, None if cu_seqlens is None else c(cu_seqlens), N, reverse)
        return bk.JAX.from_cupy(o), None if ht is None else bk.JAX.from_cupy(ht)
    return _gpu_forward(engine, fw, x, g, initial_state, output_final_state, cu_seqlens, N, reverse)


def hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False):
    """HGRN recurrence ``h[t] = exp(g[t]) * h[t-1] + x[t]`` with the faster engine for the shape.

    Args:
        x: values ``[B, T, D]``.
        g: forget gates in log space ``[B, T, D]`` (normally ``<= 0``); may differ from x in dtype.
        initial_state: ``[N, D]`` state before the first step (zeros when None); N = B, or the number
            of sequences with ``cu_seqlens``.
        output_final_state: also return the state after the last step.
        cu_seqlens: ``[N+1]`` int32/int64 offsets of packed sequences along time (needs B == 1).
        reverse: run time backwards.

    Returns:
        ``(o, ht)``: o ``[B, T, D]`` in x's dtype; ht ``[N, D]`` in float32 (float64 when an input
        is float64), or None unless ``output_final_state``.

    The math is in :mod:`hgrn_cupy.naive`.  Arrays may be NumPy, CuPy, PyTorch or JAX; the result is
    of the same kind on the same device, computed on the caller's current stream.
    """
    return _forward("auto", x, g, initial_state, output_final_state, cu_seqlens, reverse)


def chunk_hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False):
    """:func:`hgrn` on the chunk engine (time split into chunks scanned in parallel; for long T)."""
    return _forward("chunk", x, g, initial_state, output_final_state, cu_seqlens, reverse)


def fused_recurrent_hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False):
    """:func:`hgrn` on the fused recurrent engine (each thread walks time for one or two channels, or,
    from 4K-8K channels with T > 64, a block of warps shares a group of channels and splits each window
    of time between them; for many channels, decoding and varlen)."""
    return _forward("fused_recurrent", x, g, initial_state, output_final_state, cu_seqlens, reverse)


def hgrn_backward(g, o, do, dht=None, initial_state=None, cu_seqlens=None, reverse=False, engine="auto"):
    """Gradients of :func:`hgrn` from its output.

    Args:
        g: the forward's gates ``[B, T, D]``.
        o: the forward's output ``[B, T, D]`` (it holds every state the gradient needs).
        do: gradient of the loss with respect to o ``[B, T, D]``.
        dht: gradient with respect to the final state ``[N, D]``, or None.
        initial_state, cu_seqlens, reverse: as given to the forward.
        engine: ``"auto"``, ``"chunk"`` or ``"fused_recurrent"``.

    Returns:
        ``(dx, dg, dh0)``: dx ``[B, T, D]`` in o's dtype, dg in g's dtype, dh0 ``[N, D]`` in
        initial_state's dtype (None without an initial state).
    """
    head = ("backward", engine)  # the key: g, o, do, and the states' layouts where there are states
    if dht is not None or initial_state is not None:
        states = (_state_key(o, dht), _state_key(o, initial_state))
        head = None if False in states else head + states
    plan, key = _lookup(head, g, o, do, False, cu_seqlens, reverse) if head is not None else (None, None)
    if plan is not None:
        return plan(g, o, do, dht, initial_state)
    fw, N = check_backward(g, o, do, dht, initial_state, cu_seqlens, reverse)
    B, T, D = o.shape
    engine = _engine(engine, N, T, D, (fw.dtype(o), fw.dtype(g)), 1)
    if key is not None:
        plan = _remember(key, _plan_backward(engine, fw, g, o, do, dht, initial_state, N, reverse))
        return plan(g, o, do, dht, initial_state)
    if not fw.is_gpu(o):
        return _cpu_backward(fw, g, o, do, dht, initial_state, cu_seqlens, reverse)
    if fw is bk.JAX:
        c = bk.JAX.to_cupy
        opt = lambda a: None if a is None else c(a)  # noqa: E731
        res = _gpu_backward(engine, bk.CUPY, c(g), c(o), c(do), opt(dht), opt(initial_state), opt(cu_seqlens),
                            N, reverse)
        return tuple(None if r is None else bk.JAX.from_cupy(r) for r in res)
    return _gpu_backward(engine, fw, g, o, do, dht, initial_state, cu_seqlens, N, reverse)
