"""Chunk engine launchers (kernels in ``hgrn_cupy/kernels/chunk.cu``).

Time is split into chunks (warps x rows x steps per thread, see ``SHAPES``) scanned in parallel; a block
covers 32 / rows x VEC channels of one chunk, and the chunks of a tile are joined by single-pass decoupled
look-back through a workspace: a 32-byte header (ticket counter and launch count, the extents of the last
launches), then one slot per (tile, chunk, channel) that holds the chunk's aggregate map, then its
inclusive prefix, marked with the launch's parity.  Memory filled once with one bits serves any number of
launches queued on one stream: each launch leaves it ready for the next (see ``hgrn_cupy/kernels/chunk.cu``).
The caller either keeps such memory (``filled``: no fill at the launch) or hands fresh memory, which the
launch fills first.
VEC is the number of channels one thread moves per access: 16 bytes' worth where every tensor's pointer,
channel count and strides allow it, 1 otherwise.  Best for long T with few channels.  Launchers check
nothing: the public functions validate.
"""
from __future__ import annotations

from ._compile import (alignment_masks, bind, blocks_at_once, get_function, layout_vector_width, pointers_aligned,
                       vector_width)

LANES = 32
# (warps per block, rows per warp, steps per thread) per (direction, vector kernel?).  A warp row is
# 32 / rows lanes across channels; a chunk is warps * rows * steps steps of 32 / rows * VEC channels.  The
# scalar kernels keep the shapes tuned before vectorisation; the vector kernels hold 16 bytes per tensor
# and step in registers.
SHAPES = {(0, False): (4, 1, 16), (1, False): (16, 1, 8), (0, True): (8, 2, 8), (1, True): (8, 2, 4)}
# The kernels' shapes are fixed at compile time from these (see hgrn_cupy/kernels/chunk.cu).
OPTIONS = tuple(f"-DHC_{'FWD' if d == 0 else 'BWD'}_{what}_{'V' if v else '1'}={SHAPES[d, v][i]}"
                for (d, v) in SHAPES for i, what in enumerate(("WARPS", "ROWS", "STEPS"))
                if what != "ROWS" or v)


HEADER_BYTES = 32


# L2 prefetch (dense only): each block asks L2 for the rows of the block L2_AHEAD tickets later, where
# the grid has at least L2_MIN_BLOCKS blocks (in a grid of about one wave the later blocks are already
# running) and at least L2_MIN_TILES tiles or at most FEW_TILES.
#
# Peek: each block asks for its predecessor's slots right behind its own loads, where the grid has at
# least PEEK_MIN_TILES tiles (the predecessor started about a wave earlier and has mostly published its
# inclusive prefix by then: the look-back then costs no round trip) or at most PEEK_MAX_TILES.
#
# Measured (benchmarks/NOTES.md): with 64 to 256 tiles the peek made the forward slower, and the backward
# too at 64 to 256 (256: on H100, not on H200); with 1024 both faster.  With 16 or 32 tiles, once the
# first wave was staggered, both faster (bf16 1x16384x2048 1.229 / 1.189 -> 1.139 / 1.087 x floor).  With
# 8 tiles or fewer the prefetch alone made them slower, the prefetch with the peek faster.
L2_AHEAD = 96
L2_MIN_TILES = 16
L2_MIN_BLOCKS = 1024
PEEK_MIN_TILES = 512
PEEK_MAX_TILES = 32
FEW_TILES = 8


def l2_ahead(ntiles, nchunks, varlen):
    """The prefetch distance in tickets the kernels take (0: none)."""
    if varlen or not (ntiles >= L2_MIN_TILES or ntiles <= FEW_TILES) or ntiles * nchunks < L2_MIN_BLOCKS:
        return 0
    return L2_AHEAD


def peek(ntiles):
    """Whether the blocks peek at their predecessor's slots (1) or not (0)."""
    return int(ntiles >= PEEK_MIN_TILES or ntiles <= PEEK_MAX_TILES)


# Stagger: where the grid is larger than what the GPU holds at once, the second half of the first wave
# starts its loads only as the first half's maps come out (see stagger_start in hgrn_cupy/kernels/chunk.cu), so
# that its loads overlap the first half's look-back and stores.  Measured (benchmarks/NOTES.md): bf16
# 1x32768x1024 1.205 / 1.124 -> 1.143 / 1.094 x floor (fwd / bwd), 4x4096x1024 1.469 / 1.311 -> 1.355 /
# 1.228; within noise or better at every other shape measured, in both directions.
def stagger(total, at_once):
    """The kernels' stagger distance in blocks (0: none) for a grid of ``total`` blocks of which the GPU
    holds ``at_once``."""
    return at_once // 2 if total > at_once else 0


def options(x_dtype, g_dtype):
    """Compile options for one dtype pair (the same for all)."""
    return OPTIONS


def _align(n, a=256):
    return (n + a - 1) // a * a


def workspace_layout(N, T, D, varlen, acc_itemsize, direction=0, vec=1):
    """(ntiles, nchunks, header bytes, total bytes, offset of the slots): a 32-byte header, then one slot
    per (tile, chunk, channel): the published map, 8 bytes (float accumulation) or 16 (float64).  Memory
    is ready for a launch when every byte of it was filled with ones, or when it was so filled once and
    then used only by launches of the same accumulation dtype, in stream order."""
    warps, rows, steps = SHAPES[direction, vec > 1]
    tile = LANES // rows * vec
    ntiles = (1 if varlen else N) * ((D + tile - 1) // tile)
    nchunks = (T + warps * rows * steps - 1) // (warps * rows * steps)
    header = HEADER_BYTES
    slots = ntiles * nchunks * tile * 2 * acc_itemsize
    return ntiles, nchunks, header, _align(header) + _align(slots), _align(header)


def max_workspace_bytes(N, T, D, varlen, acc_itemsize, x_dtype, g_dtype):
    """The largest workspace either direction can ask for, whichever VEC the pointers allow."""
    vecs = {1, vector_width(x_dtype, g_dtype)}
    return max(workspace_layout(N, T, D, varlen, acc_itemsize, d, v)[3] for d in (0, 1) for v in vecs)


def pick_vec(D, tensors):
    """The widest VEC every tensor allows: D, the pointers (in bytes) and the strides of the axes that
    have more than one index (in elements) must all be multiples of it."""
    vec = layout_vector_width(D, tensors)
    return vec if pointers_aligned(vec, tensors) else 1


def _prepare(direction, tensors, dtypes, varlen, N, T, D, reverse, device, vec):
    """One kernel's launch for one layout (``Arr`` tensors: shapes, strides, dtypes; pointers not read) and
    access width, as ``run(stream_ptr, pointers, states, cu_ptr, cu64, workspace)`` that takes the
    workspace (see ``chunk_fwd``), fills it where it is fresh and queues the kernel, returning the
    workspace's ``(pointer, owner, filled, size)``; None when there is nothing to compute."""
    acc_itemsize = 8 if "float64" in dtypes else 4
    ntiles, nchunks, _, total, off_slots = workspace_layout(N, T, D, varlen, acc_itemsize, direction, vec)
    if ntiles * nchunks == 0:
        return None
    import cupy

    fn = get_function("chunk", direction, dtypes[0], dtypes[1], device, OPTIONS, varlen=varlen, vec=vec)
    threads = LANES * SHAPES[direction, vec > 1][0]
    kernel = bind(fn, (ntiles * nchunks,), (LANES, threads // LANES), device)
    strides = tuple(s for a in tensors for s in a.strides[:2])
    shape = (N, T, D, int(bool(reverse)))
    grid = (ntiles, nchunks, l2_ahead(ntiles, nchunks, varlen), peek(ntiles),
            stagger(ntiles * nchunks, blocks_at_once(fn, threads, device)))
    memset = cupy.cuda.runtime.memsetAsync

    def run(stream_ptr, pointers, states, cu_ptr, cu64, workspace):
        # (pointer, owner, filled, size): the owner keeps the memory alive until we return
        ws = workspace(total, acc_itemsize, stream_ptr)
        base, size = ws[0], ws[3]
        if not ws[2]:
            memset(base, 0xFF, size, stream_ptr)  # counter at -1, every slot unpublished
        kernel(stream_ptr, *pointers, *strides, *states, cu_ptr, cu64, *shape, base, base + off_slots,
               size - off_slots, *grid)
        return ws
    return run


def _launch(direction, tensors, states, dtypes, cu, N, T, D, reverse, device, stream, workspace):
    run = _prepare(direction, tensors, dtypes, cu is not None, N, T, D, reverse, device, pick_vec(D, tensors))
    if run is None:
        return None
    cu_ptr, cu64 = cu if cu is not None else (0, 0)
    return run(stream.ptr, [a.ptr for a in tensors], [p or 0 for p in states], cu_ptr, cu64, workspace)


def prepare_dense(direction, tensors, N, reverse, device):
    """The dense launch of one direction without cu_seqlens for one layout, as ``launch(stream_ptr,
    pointers, states, workspace)``, or None when there is nothing to compute.  ``tensors``: ``Arr``
    [B, T, D] in the kernel's order (forward x, g, o; backward g, o, do, dx, dg), whose shapes, strides
    and dtypes the launch keeps; ``pointers`` theirs at each call, ``states`` the state pointers (forward
    h0, ht; backward h0, dht, dh0; 0: absent), ``workspace`` as in ``chunk_fwd``.  Each call takes
    VEC-wide accesses where its pointers allow them."""
    B, T, D = tensors[0].shape
    dtypes = (tensors[0].dtype, tensors[1].dtype) if direction == 0 else (tensors[1].dtype, tensors[0].dtype)
    narrow = _prepare(direction, tensors, dtypes, False, N, T, D, reverse, device, 1)
    if narrow is None:
        return None
    vec = layout_vector_width(D, tensors)
    wide = _prepare(direction, tensors, dtypes, False, N, T, D, reverse, device, vec) if vec > 1 else None
    masks = alignment_masks(vec, tensors)

    def launch(stream_ptr, pointers, states, workspace):
        run = wide
        if run is None or any(p & m for p, m in zip(pointers, masks)):
            run = narrow
        return run(stream_ptr, pointers, states, 0, 0, workspace)
    return launch


def chunk_fwd(x, g, o, h0, ht, cu, N, reverse, device, stream, workspace):
    """As ``fused_recurrent_fwd``; ``workspace(nbytes, acc_itemsize, stream_ptr)`` returns ``(pointer,
    owner, filled, size)``: ``size >= nbytes`` bytes of device memory that stay valid until the queued
    kernel has run (a caching allocator's block), ``filled`` where they are ready for a launch (kept for
    launches of this accumulation itemsize on this stream alone, see ``workspace_layout``); fresh memory
    (``filled`` false) is filled here before the launch."""
    B, T, D = x.shape
    return _launch(0, (x, g, o), (h0, ht), (x.dtype, g.dtype), cu, N, T, D, reverse, device, stream, workspace)


def chunk_bwd(g, o, do, dx, dg, h0, dht, dh0, cu, N, reverse, device, stream, workspace):
    """As ``fused_recurrent_bwd``, with a workspace as in ``chunk_fwd``."""
    B, T, D = g.shape
    return _launch(1, (g, o, do, dx, dg), (h0, dht, dh0), (o.dtype, g.dtype), cu, N, T, D, reverse, device,
                   stream, workspace)
