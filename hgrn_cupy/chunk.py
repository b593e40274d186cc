"""Chunk engine launchers (kernels in ``kernels_cu/chunk.cu``).

Time is split into chunks (warps x steps per thread, see ``SHAPES``) scanned in parallel; a block covers 32 channels of
one chunk, and the chunks of a tile are joined by single-pass decoupled look-back through a small
workspace (one flag, 32 affine pairs and 32 states per tile and chunk, plus a ticket counter).
Best for long T with few channels.  Launchers check nothing: the public functions validate.
"""
from __future__ import annotations

from ._compile import get_function, launch

TILE = 32
# (warps per block, steps per thread) of the forward and the backward kernel: the forward is lighter
# per step and gains from longer runs per thread; the backward holds three values per step.
SHAPES = {0: (4, 16), 1: (16, 8)}
# The kernels' shapes are fixed at compile time from these (see kernels_cu/chunk.cu).
OPTIONS = (f"-DHC_FWD_WARPS={SHAPES[0][0]}", f"-DHC_FWD_STEPS={SHAPES[0][1]}",
           f"-DHC_BWD_WARPS={SHAPES[1][0]}", f"-DHC_BWD_STEPS={SHAPES[1][1]}")


def options(x_dtype, g_dtype):
    """Compile options for one dtype pair (the same for all)."""
    return OPTIONS


def _align(n, a=256):
    return (n + a - 1) // a * a


def workspace_layout(N, T, D, varlen, acc_itemsize, direction=0):
    """(ntiles, nchunks, bytes to zero, total bytes, offset of pairs, offset of states)."""
    warps, steps = SHAPES[direction]
    ntiles = (1 if varlen else N) * ((D + TILE - 1) // TILE)
    nchunks = (T + warps * steps - 1) // (warps * steps)
    slots = ntiles * nchunks
    zero = _align(4 * (1 + slots))
    pairs = _align(slots * TILE * 2 * acc_itemsize)
    states = _align(slots * TILE * acc_itemsize)
    return ntiles, nchunks, zero, zero + pairs + states, zero, zero + pairs


def _launch(direction, tensors, states, dtypes, cu, N, T, D, reverse, device, stream, workspace):
    x_dtype, g_dtype = dtypes
    acc_itemsize = 8 if "float64" in dtypes else 4
    ntiles, nchunks, zero, total, off_pairs, off_states = workspace_layout(N, T, D, cu is not None, acc_itemsize,
                                                                           direction)
    if ntiles * nchunks == 0:
        return
    ws = workspace(total)  # (pointer, owner): the owner keeps the memory alive until we return
    base = ws[0]
    import cupy

    cupy.cuda.runtime.memsetAsync(base, 0, zero, stream.ptr)
    fn = get_function("chunk", direction, x_dtype, g_dtype, device, OPTIONS, varlen=cu is not None)
    cu_ptr, cu64 = cu if cu is not None else (0, 0)
    args = [a.ptr for a in tensors]
    for a in tensors:
        args += [a.strides[0], a.strides[1]]
    args += [p or 0 for p in states]
    args += [cu_ptr, cu64, N, T, D, int(bool(reverse)), base, base + off_pairs, base + off_states, ntiles, nchunks]
    launch(fn, (ntiles * nchunks,), (TILE, SHAPES[direction][0]), stream.ptr, args, device)
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
