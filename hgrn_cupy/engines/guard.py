"""The varlen guard (``hgrn_cupy/kernels/guard.cu``): a device check of cu_seqlens, and the NaN fill of a call's outputs.

Where the values of cu_seqlens are not checked on the host (under JAX jit, during CUDA-graph capture, or
with ``config.check_cu_seqlens_values = False``), a varlen call brackets its engine's kernels::

    guard = prepare(device, cu_dtype)                       # once per (device, dtype), outside capture
    guard.check(stream_ptr, cu_ptr, N + 1, T, flag_ptr)     # before the engine's kernels
    ...                                                     # the engine's kernels
    guard.fill(stream_ptr, flag_ptr, [(o_ptr, o_nbytes), (ht_ptr, ht_nbytes)])   # after them

so that every output of a call whose cu_seqlens are invalid is NaN (all-ones bytes, a NaN in every float
dtype).  ``flag_ptr``: 4 bytes of the caller's device scratch; ``check`` writes it exactly once (no
zeroing needed) and ``fill`` reads it, so nothing else may write it between the two on that stream.
Each is one launch (``fill`` one per four non-empty buffers) queued on ``stream_ptr`` through
:func:`hgrn_cupy.nvrtc.bind`: no host sync, no allocation, so both can be captured in a CUDA graph and
replayed with new offset values.  ``prepare`` compiles and loads, and queries the device: call it before
any capture begins.
"""
from __future__ import annotations

import threading

from .. import nvrtc

__all__ = ["NAMES", "OPTIONS", "SOURCE", "Guard", "prepare"]

SOURCE = "guard.cu"
CHECK_THREADS = 1024     # the check's one block; it walks the offsets this many at a time
FILL_THREADS = 256       # threads per block of the fill
FILL_BLOCKS_PER_SM = 2   # the fill's grid: small, since the unflagged launch (the usual one) only exits
SLOTS = 4                # buffers per fill launch (the kernel's (pointer, nbytes) pairs)
OPTIONS = (f"-DHC_GUARD_CHECK_THREADS={CHECK_THREADS}", f"-DHC_GUARD_FILL_THREADS={FILL_THREADS}")

CHECK_NAMES = {dt: nvrtc.instantiation("check_offsets", dt) for dt in nvrtc.INDEX_C_TYPES}
FILL_NAME = "hc::fill_if_flagged"  # not a template
NAMES = tuple(CHECK_NAMES.values()) + (FILL_NAME,)  # every instantiation: one module


def index_dtype(cu_dtype) -> str:
    """``"int32"`` or ``"int64"`` from a dtype name, a NumPy/CuPy/JAX dtype or type, or a torch dtype."""
    try:
        import numpy as np

        name = np.dtype(cu_dtype).name
    except TypeError:
        name = str(cu_dtype).rsplit(".", 1)[-1]  # torch.int32 -> int32
    if name not in CHECK_NAMES:
        raise ValueError(f"hgrn_cupy: cu_seqlens must be int32 or int64, got {cu_dtype}")
    return name


class Guard:
    """The guard's two launches, bound for one device and one cu_seqlens dtype (made by :func:`prepare`)."""

    __slots__ = ("device", "cu_dtype", "_check", "_fill")

    def __init__(self, device: int, cu_dtype: str, check_kernel, fill_kernel):
        self.device, self.cu_dtype = device, cu_dtype
        self._check, self._fill = check_kernel, fill_kernel

    def check(self, stream_ptr: int, cu_ptr: int, n: int, T: int, flag_ptr: int) -> None:
        """Queue the check of the ``n`` (= N + 1) offsets at ``cu_ptr`` against ``T``: the int at
        ``flag_ptr`` becomes 1 when cu[0] != 0, an offset decreases, lies outside [0, T], cu[n-1] != T, or
        n < 1; 0 otherwise."""
        self._check(stream_ptr, cu_ptr, n, T, flag_ptr)

    def fill(self, stream_ptr: int, flag_ptr: int, buffers) -> None:
        """Queue the fill: when the int at ``flag_ptr`` is non-zero, 0xFF over every byte of each
        ``(ptr, nbytes)`` of ``buffers`` (any alignment, any size).  One launch per four buffers with
        bytes; none when there are none."""
        live = [(int(p), int(nb)) for p, nb in buffers if nb > 0]
        for i in range(0, len(live), SLOTS):
            group = live[i:i + SLOTS]
            group += [(0, 0)] * (SLOTS - len(group))
            self._fill(stream_ptr, flag_ptr, *(v for pair in group for v in pair))


_lock = threading.Lock()
_guards: dict = {}


def prepare(device: int, cu_dtype) -> Guard:
    """The :class:`Guard` of ``device`` for cu_seqlens of ``cu_dtype`` (int32 or int64, any spelling
    :func:`index_dtype` takes); compiles the module on first use, then cached."""
    dt = index_dtype(cu_dtype)
    key = (int(device), dt)
    guard = _guards.get(key)
    if guard is not None:
        return guard
    from cupy_backends.cuda.api import runtime

    check_fn = nvrtc.get_function(SOURCE, NAMES, CHECK_NAMES[dt], key[0], OPTIONS)
    fill_fn = nvrtc.get_function(SOURCE, NAMES, FILL_NAME, key[0], OPTIONS)
    sms = runtime.deviceGetAttribute(runtime.cudaDevAttrMultiProcessorCount, key[0])
    guard = Guard(key[0], dt, nvrtc.bind(check_fn, (1,), (CHECK_THREADS,), key[0]),
                  nvrtc.bind(fill_fn, (max(1, sms * FILL_BLOCKS_PER_SM),), (FILL_THREADS,), key[0]))
    with _lock:
        return _guards.setdefault(key, guard)
