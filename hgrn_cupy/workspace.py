"""The chunk engine's scratch memory: kept between calls per (framework, device, stream, thread,
accumulation size), or fresh while a CUDA graph is captured and when ``config.keep_workspaces`` is off.

Kept memory is filled with ones once, when it is made; each chunk launch leaves it ready for the next
launch queued on the same stream.  Fresh memory is filled by the launch.
"""
from __future__ import annotations

import threading

from .settings import config

_kept: dict = {}  # key -> (pointer, owner, True, bytes)
_lock = threading.Lock()
MIN_BYTES = 1 << 16
# Handles that may name a different stream in each host thread (0 under per-thread default-stream
# compilation, cudaStreamPerThread = 2): their kept memory is also per thread.
PER_THREAD_HANDLES = (0, 2)


def release():
    """Free the kept memory (kernels already queued keep theirs alive: the allocators are stream-ordered)."""
    with _lock:
        _kept.clear()


def capturing(stream_ptr):
    """Whether the stream is capturing a CUDA graph (or cannot tell: the fresh path is always safe)."""
    import cupy

    try:
        return cupy.cuda.runtime.streamIsCapturing(stream_ptr) != 0
    except cupy.cuda.runtime.CUDARuntimeError:
        return True


def source(torch_device=None, cupy_device=None):
    """Scratch from the caller's allocator (torch's caching allocator on ``torch_device``, or CuPy's pool
    on device ``cupy_device``), as the engines take it: ``alloc(nbytes, acc_itemsize, stream_ptr) ->
    (pointer, owner, filled, size)``."""
    import cupy

    memset = cupy.cuda.runtime.memsetAsync
    if torch_device is not None:
        import torch

        def fresh(nbytes):
            buf = torch.empty((nbytes,), dtype=torch.uint8, device=torch_device)
            return buf.data_ptr(), buf
        head = (True, torch_device.index)
    else:
        def fresh(nbytes):
            with cupy.cuda.Device(cupy_device):
                buf = cupy.empty((nbytes,), dtype=cupy.uint8)
            return buf.data.ptr, buf
        head = (False, cupy_device)

    def alloc(nbytes, acc_itemsize, stream_ptr):
        if not config.keep_workspaces or capturing(stream_ptr):
            return fresh(nbytes) + (False, nbytes)
        thread = threading.get_ident() if stream_ptr in PER_THREAD_HANDLES else None
        key = head + (stream_ptr, thread, acc_itemsize)
        kept = _kept.get(key)
        if kept is None or kept[3] < nbytes:
            size = max(MIN_BYTES, 1 << (nbytes - 1).bit_length())
            ptr, buf = fresh(size)
            memset(ptr, 0xFF, size, stream_ptr)  # the one fill
            kept = (ptr, buf, True, size)
            with _lock:
                _kept[key] = kept
        return kept
    return alloc
