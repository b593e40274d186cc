"""Chunk engine launchers (kernels in ``kernels_cu/chunk.cu``).

Time is split into chunks of ``CHUNK_LEN`` steps scanned in parallel; a block covers 32 channels of
one chunk, and the chunks of a tile are joined by single-pass decoupled look-back through a small
workspace (one flag, 32 affine pairs and 32 states per tile and chunk, plus a ticket counter).
Best for long T with few channels.  Launchers check nothing: the public functions validate.
"""
from __future__ import annotations

import numpy as np

from ._compile import get_function

WARPS = 16
STEPS = 8
CHUNK_LEN = WARPS * STEPS
TILE = 32
# The kernel's shape is fixed at compile time from these (see kernels_cu/chunk.cu).
OPTIONS = (f"-DHC_CHUNK_WARPS={WARPS}", f"-DHC_CHUNK_STEPS={STEPS}")


def _i64(v):
    return np.int64(v)


def _ptr(v):
    return np.uint64(v or 0)


def _align(n, a=256):
    return (n + a - 1) // a * a


def workspace_layout(N, T, D, varlen, acc_itemsize):
    """(ntiles, nchunks, bytes to zero, total bytes, offset of pairs, offset of states)."""
    ntiles = (1 if varlen else N) * ((D + TILE - 1) // TILE)
    nchunks = (T + CHUNK_LEN - 1) // CHUNK_LEN
    slots = ntiles * nchunks
    zero = _align(4 * (1 + slots))
    pairs = _align(slots * TILE * 2 * acc_itemsize)
    states = _align(slots * TILE * acc_itemsize)
    return ntiles, nchunks, zero, zero + pairs + states, zero, zero + pairs


def _launch(direction, tensors, states, dtypes, cu, N, T, D, reverse, device, stream, workspace):
    x_dtype, g_dtype = dtypes
    acc_itemsize = 8 if "float64" in dtypes else 4
    ntiles, nchunks, zero, total, off_pairs, off_states = workspace_layout(N, T, D, cu is not None, acc_itemsize)
    if ntiles * nchunks == 0:
        return
    ws = workspace(total)  # (pointer, owner): the owner keeps the memory alive until we return
    base = ws[0]
    import cupy

    cupy.cuda.runtime.memsetAsync(base, 0, zero, stream.ptr)
    fn = get_function("chunk", direction, x_dtype, g_dtype, device, OPTIONS, varlen=cu is not None)
    cu_ptr, cu64 = cu if cu is not None else (0, 0)
    args = []
    for a in tensors:
        args.append(_ptr(a.ptr))
    for a in tensors:
        args += [_i64(a.strides[0]), _i64(a.strides[1])]
    args += [_ptr(p) for p in states]
    args += [_ptr(cu_ptr), np.int32(cu64), _i64(N), _i64(T), _i64(D), np.int32(bool(reverse)),
             _ptr(base), _ptr(base + off_pairs), _ptr(base + off_states), _i64(ntiles), _i64(nchunks)]
    fn((ntiles * nchunks,), (TILE, WARPS), tuple(args), stream=stream)
    return ws


def chunk_fwd(x, g, o, h0, ht, cu, N, reverse, device, stream, workspace):
    """As ``fused_recurrent_fwd``; ``workspace(nbytes)`` returns ``(pointer, owner)`` of device memory
    that stays valid until the queued kernel has run (a caching allocator's block)."""
    B, T, D = x.shape
    return _launch(0, (x, g, o), (h0, ht), (x.dtype, g.dtype), cu, N, T, D, reverse, device, stream, workspace)


def chunk_bwd(g, o, do, dx, dg, h0, dht, dh0, cu, N, reverse, device, stream, workspace):
    """As ``fused_recurrent_bwd``, with a workspace as in ``chunk_fwd``."""
    B, T, D = g.shape
    return _launch(1, (g, o, do, dx, dg), (h0, dht, dh0), (o.dtype, g.dtype), cu, N, T, D, reverse, device,
                   stream, workspace)
