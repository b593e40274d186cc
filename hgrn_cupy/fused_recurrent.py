"""Fused recurrent engine launchers (kernels in ``kernels_cu/fused_recurrent.cu``).

One thread owns one (sequence, channel) and walks time; best with many sequences times wide D, for
decode (T = 1) and for varlen.  Launchers check nothing: the public functions in ``ops`` validate.
"""
from __future__ import annotations

import numpy as np

from ._compile import get_function

BLOCK = 64      # small blocks spread few channels over every multiprocessor
PREFETCH = 16   # steps per register tile (kernels_cu/fused_recurrent.cu)
OPTIONS = (f"-DHC_PREFETCH={PREFETCH}",)


def _i64(v):
    return np.int64(v)


def _ptr(v):
    return np.uint64(v or 0)


def _grid(N, D):
    return ((D + BLOCK - 1) // BLOCK, N), (BLOCK,)


def fused_recurrent_fwd(x, g, o, h0, ht, cu, N, reverse, device, stream):
    """x, g, o: ``Arr`` [B, T, D]; h0, ht: pointers to [N, D] in the accumulation dtype (0: absent);
    cu: ``(pointer, is_int64)`` of cu_seqlens or None.  Queues the kernel on ``stream``."""
    B, T, D = x.shape
    if N == 0 or D == 0:
        return
    fn = get_function("fused_recurrent", 0, x.dtype, g.dtype, device, OPTIONS)
    grid, block = _grid(N, D)
    cu_ptr, cu64 = cu if cu is not None else (0, 0)
    fn(grid, block, (
        _ptr(x.ptr), _ptr(g.ptr), _ptr(o.ptr),
        _i64(x.strides[0]), _i64(x.strides[1]), _i64(g.strides[0]), _i64(g.strides[1]),
        _i64(o.strides[0]), _i64(o.strides[1]),
        _ptr(h0), _ptr(ht), _ptr(cu_ptr), np.int32(cu64), _i64(T), _i64(D), np.int32(bool(reverse)),
    ), stream=stream)


def fused_recurrent_bwd(g, o, do, dx, dg, h0, dht, dh0, cu, N, reverse, device, stream):
    """g, o, do, dx, dg: ``Arr`` [B, T, D] (dx has o's dtype, dg g's); h0, dht, dh0: pointers to
    [N, D] in the accumulation dtype (0: absent)."""
    B, T, D = g.shape
    if N == 0 or D == 0:
        return
    fn = get_function("fused_recurrent", 1, o.dtype, g.dtype, device, OPTIONS)
    grid, block = _grid(N, D)
    cu_ptr, cu64 = cu if cu is not None else (0, 0)
    fn(grid, block, (
        _ptr(g.ptr), _ptr(o.ptr), _ptr(do.ptr), _ptr(dx.ptr), _ptr(dg.ptr),
        _i64(g.strides[0]), _i64(g.strides[1]), _i64(o.strides[0]), _i64(o.strides[1]),
        _i64(do.strides[0]), _i64(do.strides[1]), _i64(dx.strides[0]), _i64(dx.strides[1]),
        _i64(dg.strides[0]), _i64(dg.strides[1]),
        _ptr(h0), _ptr(dht), _ptr(dh0), _ptr(cu_ptr), np.int32(cu64), _i64(T), _i64(D),
        np.int32(bool(reverse)),
    ), stream=stream)
