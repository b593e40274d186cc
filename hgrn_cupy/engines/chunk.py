"""The chunk engine: prepared launches of ``kernels/chunk.cu``, for long T.

Time is split into chunks (warps x rows x steps per thread, see ``SHAPES`` and ``block_shape``) scanned
in parallel; a block covers 32 / rows x VEC channels of one chunk, and the chunks of a tile are joined by
single-pass decoupled look-back through a workspace: a 32-byte header (ticket counter and launch count,
the extents of the last launches), then one slot per (tile, chunk, channel) that holds the chunk's
aggregate map, then its inclusive prefix, marked with the launch's parity.  Memory filled once with one
bits serves any number of launches queued on one stream: each launch leaves it ready for the next.  VEC
is the number of channels one thread moves per access: 16 bytes' worth where every tensor's pointer,
channel count and strides allow it, 1 otherwise.  Launches check nothing: :mod:`hgrn_cupy.checks` has
validated the call.
"""
from __future__ import annotations

from .. import nvrtc
from .layout import aligned, alignment_masks, layout_vector_width, vector_width

SOURCE = "chunk.cu"
KERNELS = ("chunk_fwd", "chunk_bwd")
LANES = 32
# The kernels' last parameter, ChunkGrid: workspace header and slots, slot capacity, tiles, chunks, L2
# distance, peek, stagger, each an 8-byte field.
GRID_WORDS = 8
# (warps per block, rows per warp, steps per thread) per (direction, vector kernel?).  A warp row is
# 32 / rows lanes across channels; a chunk is warps * rows * steps steps of 32 / rows * VEC channels.  The
# vector kernels hold 16 bytes per tensor and step in registers (docs/performance.md, chunk shapes).
SHAPES = {(0, False): (4, 1, 16), (1, False): (16, 1, 8), (0, True): (8, 2, 8), (1, True): (8, 2, 4)}
# The backward's 8-channel kernels (16-bit types) on grids of at most NARROW_BWD_MAX_TILES tiles of
# SHAPES' width take four-row warps instead: tiles of half the channels, so twice as many chains of
# chunks for the look-back (docs/performance.md, "Where a launch's time goes on the H200").  They are a
# module of their own, compiled with these rows.
NARROW_BWD = (8, 4, 4)
NARROW_BWD_MAX_TILES = 2
NARROW_BWD_VEC = 8


# The staged forward (chunk_fwd_staged): the forward's vector kernel with each thread's words of g in dynamic
# shared memory (copied there by cp.async) instead of registers, compiled for STAGED_BLOCKS blocks a SM, the
# split of L1 and shared memory set to hold them.  Only where g's words are 16 bytes and g is not float64
# (STAGED_ITEMSIZES; float64 accumulates in pairs of registers and was not measured).  A launch variant the
# tuner times against the shipped forward on grids of at most STAGED_MAX_TILES tiles: on the H200 it took 5%
# off bf16 on two tiles and 6% off float32 on 16, and lost 1-8% on 32 tiles and more and on one wave
# (docs/performance.md, "Gate words in shared memory").
STAGED_KERNEL = "chunk_fwd_staged"
STAGED_BLOCKS = 3
STAGED_MAX_TILES = 16
STAGED_ITEMSIZES = (2, 4)
STAGED = "chunk, staged gate words"
# The float32 forward with the L2 prefetch FAR_AHEAD tickets ahead instead of L2_AHEAD, where the grid takes the
# prefetch: on the H200 it read 2-4% faster on 4 and 16 tiles in two runs, the 16-bit forwards and the backward
# equal or slower; on an H100 the tuner read it 3-8% faster on 16 tiles, under 1% on 4 (docs/performance.md,
# "L2 prefetch for a later block").  A launch variant the tuner times.
FAR_AHEAD = 192
FAR = f"chunk, L2 prefetch {FAR_AHEAD} ahead"
FAR_DTYPES = ("float32",)
# By name (internal, stored in the tuning cache), prepare's options.
VARIANTS = {STAGED: {"staged": True}, FAR: {"ahead": FAR_AHEAD}}


def _options(shapes):
    """The compile options that give the kernels the block shapes ``shapes`` (as SHAPES)."""
    return tuple(f"-DHC_{'FWD' if d == 0 else 'BWD'}_{what}_{'V' if v else '1'}={shapes[d, v][i]}"
                 for (d, v) in shapes for i, what in enumerate(("WARPS", "ROWS", "STEPS"))
                 if what != "ROWS" or v) + (f"-DHC_STAGED_BLOCKS={STAGED_BLOCKS}",)


# The kernels take their shapes at compile time from these.
OPTIONS = _options(SHAPES)
NARROW_BWD_OPTIONS = _options({**SHAPES, (1, True): NARROW_BWD})
HEADER_BYTES = 32

# L2 prefetch (dense only): each block asks L2 for the rows of the block L2_AHEAD tickets later, where
# the grid has at least L2_MIN_BLOCKS blocks (in a grid of about one wave the later blocks are already
# running) and at least L2_MIN_TILES tiles or at most FEW_TILES.
# Peek: each block asks for its predecessor's slots right behind its own loads, where the grid has at
# least PEEK_MIN_TILES tiles (the predecessor started about a wave earlier and has mostly published its
# inclusive prefix by then) or at most PEEK_MAX_TILES (docs/performance.md, look-back peek).
L2_AHEAD = 96
L2_MIN_TILES = 16
L2_MIN_BLOCKS = 1024
PEEK_MIN_TILES = 512
PEEK_MAX_TILES = 32
FEW_TILES = 8
# The share of each multiprocessor's unified L1 / shared memory the kernels ask to be shared memory: 28% is
# 64 KB on sm_90.  Without a preference they run under the split the kernels before them left, which after
# a kernel that takes most of the shared memory (a GEMM) is 100%: slower on many tiles, a little faster for
# float32 on few, so a call's speed would follow its neighbours (docs/performance.md, shared memory carveout).
CARVEOUT = 28


def staged_width(x_dtype, g_dtype):
    """The VEC of the staged forward of one dtype pair (its vector kernels' width), or None where it has none:
    g's words narrower than 16 bytes, or g float64."""
    vec = vector_width(x_dtype, g_dtype)
    size = nvrtc.ITEMSIZE[g_dtype]
    return vec if vec > 1 and vec * size == 16 and size in STAGED_ITEMSIZES else None


def names(x_dtype, g_dtype):
    """Every kernel of the module of one dtype pair: both directions, dense and varlen, VEC 1 and wide, and
    the staged forward where the pair has one."""
    vecs = sorted({1, vector_width(x_dtype, g_dtype)})
    staged = staged_width(x_dtype, g_dtype)
    return (tuple(nvrtc.instantiation(k, x_dtype, g_dtype, v, w) for k in KERNELS for v in (False, True) for w in vecs)
            + (tuple(nvrtc.instantiation(STAGED_KERNEL, x_dtype, g_dtype, v, staged) for v in (False, True))
               if staged else ()))


def variants(N, T, D, x_dtype, g_dtype, direction):
    """The names (of VARIANTS) of the chunk launches a call's tuning measures besides the engines, for a
    forward only: the staged forward, where the pair has one and the grid has at most STAGED_MAX_TILES
    tiles of more than one chunk; the far prefetch, where x and g are in FAR_DTYPES and the dense grid of
    the vector kernels takes the prefetch."""
    vec = vector_width(x_dtype, g_dtype)
    if direction != 0 or vec == 1:
        return ()
    acc_itemsize = nvrtc.ITEMSIZE[nvrtc.accumulation_dtype(x_dtype, g_dtype)]
    ntiles, nchunks = workspace_layout(N, T, D, False, acc_itemsize, direction, vec)[:2]
    staged = staged_width(x_dtype, g_dtype) and 0 < ntiles <= STAGED_MAX_TILES and nchunks > 1
    far = x_dtype in FAR_DTYPES and g_dtype in FAR_DTYPES and l2_ahead(ntiles, nchunks, False) > 0
    return (STAGED,) * bool(staged) + (FAR,) * far


def staged_bytes(threads):
    """The staged forward's dynamic shared memory: a 16-byte word of g per thread and step."""
    return SHAPES[0, True][2] * threads * 16


def narrow_bwd_names(x_dtype, g_dtype):
    """The kernels of the four-row backward module of one dtype pair (dense and varlen), or () where the
    pair's vector kernels are not 8 channels wide."""
    if vector_width(x_dtype, g_dtype) != NARROW_BWD_VEC:
        return ()
    return tuple(nvrtc.instantiation(KERNELS[1], x_dtype, g_dtype, v, NARROW_BWD_VEC) for v in (False, True))


def block_shape(direction, vec, N, D, varlen):
    """(warps, rows, steps) of the launch of one direction and access width for N rows of D channels."""
    shape = SHAPES[direction, vec > 1]
    if direction == 1 and vec == NARROW_BWD_VEC:
        tiles = (1 if varlen else N) * -(-D // (LANES // shape[1] * vec))
        if tiles <= NARROW_BWD_MAX_TILES:
            return NARROW_BWD
    return shape


def l2_ahead(ntiles, nchunks, varlen, ahead=L2_AHEAD):
    """The prefetch distance in tickets the kernels take (0: none): ``ahead`` where the grid takes it."""
    if varlen or not (ntiles >= L2_MIN_TILES or ntiles <= FEW_TILES) or ntiles * nchunks < L2_MIN_BLOCKS:
        return 0
    return ahead


def peek(ntiles):
    """Whether the blocks peek at their predecessor's slots (1) or not (0)."""
    return int(ntiles >= PEEK_MIN_TILES or ntiles <= PEEK_MAX_TILES)


def stagger(total, at_once):
    """The stagger distance in blocks (0: none) for a grid of ``total`` blocks of which the GPU holds
    ``at_once``: where the grid is larger than one wave, the second half of the first wave starts its loads
    only as the first half's maps come out, so that its loads overlap the first half's look-back and
    stores (docs/performance.md, staggered first wave)."""
    return at_once // 2 if total > at_once else 0


def _align(n, a=256):
    return (n + a - 1) // a * a


def workspace_layout(N, T, D, varlen, acc_itemsize, direction=0, vec=1):
    """(ntiles, nchunks, header bytes, total bytes, offset of the slots): a 32-byte header, then one slot
    per (tile, chunk, channel): the published map, 8 bytes (float accumulation) or 16 (float64).  Memory
    is ready for a launch when every byte of it was filled with ones, or when it was so filled once and
    then used only by launches of the same accumulation dtype, in stream order."""
    warps, rows, steps = block_shape(direction, vec, N, D, varlen)
    tile = LANES // rows * vec
    ntiles = (1 if varlen else N) * ((D + tile - 1) // tile)
    nchunks = (T + warps * rows * steps - 1) // (warps * rows * steps)
    slots = ntiles * nchunks * tile * 2 * acc_itemsize
    return ntiles, nchunks, HEADER_BYTES, _align(HEADER_BYTES) + _align(slots), _align(HEADER_BYTES)


def workspace_bytes(N, T, D, varlen, acc_itemsize, x_dtype, g_dtype):
    """The most either direction asks for, whichever VEC the pointers allow."""
    vecs = {1, vector_width(x_dtype, g_dtype)}
    return max(workspace_layout(N, T, D, varlen, acc_itemsize, d, v)[3] for d in (0, 1) for v in vecs)


def _prepare_width(direction, tensors, dtypes, varlen, N, T, D, reverse, device, vec, staged=False, ahead=L2_AHEAD):
    """One kernel's launch for one layout and access width, as ``run(stream_ptr, pointers, states, cu,
    workspace)``; None when there is nothing to compute.  ``staged``: the staged forward, where it applies;
    ``ahead``: the prefetch distance where the grid takes one."""
    acc_itemsize = nvrtc.ITEMSIZE[nvrtc.accumulation_dtype(*dtypes)]
    ntiles, nchunks, _, total, off_slots = workspace_layout(N, T, D, varlen, acc_itemsize, direction, vec)
    if ntiles * nchunks == 0:
        return None
    import cupy

    shape = block_shape(direction, vec, N, D, varlen)
    module = ((narrow_bwd_names(*dtypes), NARROW_BWD_OPTIONS) if shape is NARROW_BWD
              else (names(*dtypes), OPTIONS))
    staged = staged and direction == 0 and vec == staged_width(*dtypes)
    name = STAGED_KERNEL if staged else KERNELS[direction]
    fn = nvrtc.get_function(SOURCE, module[0], nvrtc.instantiation(name, *dtypes, varlen, vec), device, module[1])
    threads = LANES * shape[0]
    dynamic = staged_bytes(threads) if staged else 0
    if staged:
        nvrtc.hold_shared(fn, dynamic, STAGED_BLOCKS, device)
    else:
        nvrtc.prefer_shared(fn, CARVEOUT)
    kernel = nvrtc.bind(fn, (ntiles * nchunks,), (LANES, threads // LANES), device, tail_words=GRID_WORDS,
                        shared=dynamic)
    strides = tuple(s for a in tensors for s in a.strides[:2])
    shape = (N, T, D, int(bool(reverse)))
    grid = (ntiles, nchunks, l2_ahead(ntiles, nchunks, varlen, ahead), peek(ntiles),
            stagger(ntiles * nchunks, nvrtc.blocks_at_once(fn, threads, device, dynamic)))
    memset = cupy.cuda.runtime.memsetAsync

    def run(stream_ptr, pointers, states, cu, workspace):
        ws = workspace(total, acc_itemsize, stream_ptr)  # (pointer, owner, filled, size); owner keeps it alive
        base, size = ws[0], ws[3]
        if not ws[2]:
            memset(base, 0xFF, size, stream_ptr)  # counter at -1, every slot unpublished
        kernel(stream_ptr, *pointers, *strides, *states, *cu, *shape, base, base + off_slots, size - off_slots,
               *grid)
        return ws
    return run


def prepare(direction, tensors, N, reverse, device, varlen=False, staged=False, ahead=L2_AHEAD):
    """The launch of one direction for one layout, as ``launch(stream_ptr, pointers, states, cu,
    workspace)``, or None when there is nothing to compute.

    ``tensors``: ``layout.Arr`` [B, T, D] in the kernel's order (forward x, g, o; backward g, o, do, dx,
    dg) whose shapes, strides and dtypes the launch keeps.  At each call: ``pointers`` theirs, ``states``
    the state pointers (forward h0, ht; backward h0, dht, dh0; 0: absent), ``cu`` ``(pointer, is_int64)``
    of cu_seqlens or ``(0, 0)``, ``workspace(nbytes, acc_itemsize, stream_ptr) -> (pointer, owner,
    filled, size)``: device memory valid until the kernel has run, ``filled`` where it is ready for a
    launch (fresh memory is filled here first).  Each call takes VEC-wide accesses where its pointers
    allow them.  ``staged``: the forward's vector kernel is the staged one, where the pair has one (the
    option changes nothing elsewhere: backward, VEC = 1); ``ahead``: the forward's vector kernel's L2
    prefetch distance, where the grid takes the prefetch (likewise)."""
    B, T, D = tensors[0].shape
    if N == 0:  # no sequence (varlen offsets of one entry): steps of T > 0 belong to none
        return None
    dtypes = (tensors[0].dtype, tensors[1].dtype) if direction == 0 else (tensors[1].dtype, tensors[0].dtype)
    narrow = _prepare_width(direction, tensors, dtypes, varlen, N, T, D, reverse, device, 1)
    if narrow is None:
        return None
    vec = layout_vector_width(D, tensors)
    if vec == 1:
        return narrow
    wide = _prepare_width(direction, tensors, dtypes, varlen, N, T, D, reverse, device, vec, staged,
                          ahead if direction == 0 else L2_AHEAD)
    masks = alignment_masks(vec, tensors)

    def launch(stream_ptr, pointers, states, cu, workspace):
        return (wide if aligned(pointers, masks) else narrow)(stream_ptr, pointers, states, cu, workspace)
    return launch
