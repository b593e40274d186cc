"""The fused recurrent engine: prepared launches of ``kernels/fused_recurrent.cu``, for many channels,
decoding and varlen.

A thread owns one or two channels of one sequence and walks time (two from ``WALK_VEC_MIN_CHANNELS``
channels where the layout allows); from 4K-8K channels on (the float32 backward up to 64K) a block of
warps shares a group of channels of one sequence and splits each window of time between its warps (the
block walks, where the layout allows, see ``BLOCK_WALK_CHANNELS``); a single dense step (T = 1, decoding)
and its backward move 16 bytes per thread and access.  Launches check nothing: :mod:`hgrn_cupy.checks`
has validated the call.  The reasons for each number are in docs/performance.md, fused engine.
"""
from __future__ import annotations

import operator

from .. import nvrtc
from .layout import aligned, alignment_masks, layout_vector_width, vector_width

SOURCE = "fused_recurrent.cu"
BLOCK = 64        # threads per block of the walks: small blocks spread few channels over every SM
STEP_BLOCK = 128  # threads per block of the single-step kernels (VEC channels each)
STEP_KERNELS = ("fused_recurrent_step", "fused_recurrent_step_bwd")  # T = 1, dense: forward, backward
STEP_TENSORS = ((0, 1, 2), (0, 2, 3, 4))  # the tensors each reads or writes: x, g, o; g, do, dx, dg (not o)
# Channels per thread of the walks per storage size of the wider input, where there are at least
# WALK_VEC_MIN_CHANNELS (sequences x D): two 16-bit channels make a warp's access 128 bytes instead of 64,
# but below that the walk would run half the threads.
WALK_VEC = {2: 2, 4: 2, 8: 1}
WALK_VEC_MIN_CHANNELS = 1 << 16
PREFETCH_V = {2: 32, 4: 16, 8: 16}  # steps per register tile of the two-channel walks
# The block walks: BLOCK_WARPS warps share a group of channels of one sequence (8 bytes of them per lane
# forward, 4 backward: it holds three tensors' steps) and split each window of BLOCK_WARPS * BLOCK_STEPS steps
# between them (more steps spill).  One is taken where N * D lies in BLOCK_WALK_CHANNELS[storage size of the
# wider input, direction], T exceeds BLOCK_WALK_MIN_T and the layout allows the lanes; 16-bit forwards below
# BLOCK_WALK_NARROW_BELOW channels take 4-byte lanes (twice the blocks).  The lane width and the window that
# win move with the card (4-byte lanes and windows of SHORT_STEPS steps a warp won from 16K channels on an
# H200, 8-byte lanes and the longer windows on an H100: docs/performance.md, "Block-walk lanes" and
# "Block-walk window shape"), so the tuner measures those too (fused_variants); where nothing is measured, 16K
# channels take the 4-byte lanes, whose worse case is the smaller loss.  The staged forward
# (fused_recurrent_staged_fwd: the next window in shared memory, not in registers) is a variant of its own for
# 16-bit forwards with 8-byte lanes, whose wins depend on the channel count and the card (docs/performance.md,
# "Block-walk staged forward").  The bulk walk (fused_recurrent_bulk_fwd: whole windows moved by bulk tensor
# copies, o included) is a variant of its own at each lane width for dense forwards whose inputs share an
# itemsize of 2 or 4.
BLOCK_WARPS = 8
BLOCK_STEPS = 8
SHORT_STEPS = 4
BLOCK_WALK_NARROW_BELOW = 1 << 15
NEVER = 1 << 62
BLOCK_WALK_CHANNELS = {(2, 0): (1 << 13, NEVER), (4, 0): (1 << 12, NEVER), (8, 0): (NEVER, NEVER),
                       (2, 1): (1 << 13, NEVER), (4, 1): (1 << 12, 1 << 16), (8, 1): (NEVER, NEVER)}
BLOCK_WALK_MIN_T = BLOCK_WARPS * BLOCK_STEPS
STAGED_KERNEL = "fused_recurrent_staged_fwd"


STAGED_LANES = 8
STAGED_WINDOWS = 2  # windows in shared memory a block of the staged forward: the one read, the one arriving
STAGED_BLOCKS = 2  # resident blocks a SM the staged forward's shared memory is sized for (BlockWindow::MIN_BLOCKS)
# The staged forward's dynamic shared memory (BlockStage::STAGE_BYTES): its windows of x and g, a row of
# 32 lanes of STAGED_LANES bytes a step a warp.
STAGED_SHARED = STAGED_WINDOWS * BLOCK_WARPS * BLOCK_STEPS * 2 * 32 * STAGED_LANES


BULK_KERNEL = "fused_recurrent_bulk_fwd"
# Windows in shared memory a block of the bulk walk, per lane width in bytes (BulkWalk::STAGES), the counts
# that won on an H200 (docs/performance.md, "Block-walk staged forward", the tensor-map walk).
BULK_STAGES = {4: 4, 8: 3}
BULK_BLOCKS = 2  # the split of L1 and shared memory asked for, as measured (BlockWindow::MIN_BLOCKS)
BULK_MAX_T = (1 << 31) - 2 * BLOCK_WALK_MIN_T  # the copies' step coordinates are 32-bit


def bulk_shared(lane_bytes):
    """The bulk walk's dynamic shared memory (BulkWalk::SHARED_BYTES): its windows of x and g, then two
    buffers of a warp's rows of o, rows of 32 lanes of ``lane_bytes``."""
    return (2 * BULK_STAGES[lane_bytes] + 2) * BLOCK_WARPS * BLOCK_STEPS * 32 * lane_bytes


def _size(x_dtype, g_dtype):
    return max(nvrtc.ITEMSIZE[x_dtype], nvrtc.ITEMSIZE[g_dtype])


def block_walk_width(x_dtype, g_dtype, direction=0, narrow=False):
    """Channels per lane of the block walks: 8 bytes of the wider storage type forward (4 for 16-bit
    types where ``narrow``), 4 backward, at least one channel."""
    nbytes = 4 if direction == 1 or (narrow and _size(x_dtype, g_dtype) == 2) else 8
    return max(1, nbytes // _size(x_dtype, g_dtype))


def options(x_dtype, g_dtype, block_steps=BLOCK_STEPS):
    """Compile options for one dtype pair: steps per register tile of the walks (two tiles in flight;
    32 where both inputs are float32, 16 otherwise) and the block walks' shape (``block_steps`` steps a
    warp in a window)."""
    steps = 32 if x_dtype == g_dtype == "float32" else 16
    return (f"-DHC_PREFETCH={steps}", f"-DHC_PREFETCH_V={PREFETCH_V[_size(x_dtype, g_dtype)]}",
            f"-DHC_BLOCK_STAGES={STAGED_WINDOWS}", f"-DHC_BULK_STAGES_4={BULK_STAGES[4]}",
            f"-DHC_BULK_STAGES_8={BULK_STAGES[8]}", f"-DHC_BLOCK_WARPS={BLOCK_WARPS}", f"-DHC_BLOCK_STEPS={block_steps}")


def _block_walks(x_dtype, g_dtype, launched_only=False):
    """The block walks of one dtype pair, both directions, at each lane width; ``launched_only``: only
    the directions whose channel band is not empty (none for float64)."""
    size, inst = _size(x_dtype, g_dtype), nvrtc.instantiation
    out = ()
    for d, k in enumerate(("fused_recurrent_block_fwd", "fused_recurrent_block_bwd")):
        if not launched_only or BLOCK_WALK_CHANNELS[size, d][0] < NEVER:
            widths = sorted({block_walk_width(x_dtype, g_dtype, d, narrow) for narrow in (False, True)})
            out += tuple(inst(k, x_dtype, g_dtype, v) for v in widths)
    return out


def staged_width(x_dtype, g_dtype):
    """Channels per lane of the staged forward for one dtype pair, or 0: it serves 16-bit pairs only."""
    return STAGED_LANES // 2 if _size(x_dtype, g_dtype) == 2 else 0


def bulk_widths(x_dtype, g_dtype):
    """Channels per lane of the bulk walk at each lane width (4 and 8 bytes) for one dtype pair, or ():
    it serves inputs of one itemsize, 2 or 4."""
    size = nvrtc.ITEMSIZE[x_dtype]
    return tuple(lanes // size for lanes in sorted(BULK_STAGES)) if size == nvrtc.ITEMSIZE[g_dtype] in (2, 4) else ()


def bulk_fits(N, T, D, x_dtype, g_dtype, lanes):
    """Channels per lane of the bulk walk with ``lanes`` bytes a lane where its dtypes allow it, N * D lies
    in the forward block walks' band, T exceeds BLOCK_WALK_MIN_T (and stays below BULK_MAX_T), N fits one
    grid (MAX_GRID_Y: the maps' sequence is the block's) and D is a multiple of them, else 0 (strides and
    pointers not considered)."""
    if not bulk_widths(x_dtype, g_dtype):
        return 0
    size = nvrtc.ITEMSIZE[x_dtype]
    lo, hi = BLOCK_WALK_CHANNELS[size, 0]
    vec = lanes // size
    fits = BLOCK_WALK_MIN_T < T < BULK_MAX_T and N <= MAX_GRID_Y and lo <= N * D < hi and D % vec == 0
    return vec if fits else 0


def short_window_names(x_dtype, g_dtype):
    """The kernels of the module with windows of SHORT_STEPS steps: the block walks of one dtype pair
    that can be launched, at each lane width (none where neither direction has one)."""
    return _block_walks(x_dtype, g_dtype, launched_only=True)


def names(x_dtype, g_dtype):
    """Every kernel of the module of one dtype pair: the walks at one channel and WALK_VEC, the step, the
    staged and bulk forwards where they serve the pair, the block walks at each lane width."""
    inst = nvrtc.instantiation
    walks = sorted({1, WALK_VEC[_size(x_dtype, g_dtype)]})
    out = tuple(inst(k, x_dtype, g_dtype, v) for k in ("fused_recurrent_fwd", "fused_recurrent_bwd") for v in walks)
    out += tuple(inst(k, x_dtype, g_dtype, vector_width(x_dtype, g_dtype)) for k in STEP_KERNELS)
    staged = staged_width(x_dtype, g_dtype)
    out += ((inst(STAGED_KERNEL, x_dtype, g_dtype, staged),) if staged else ())
    out += tuple(inst(BULK_KERNEL, x_dtype, g_dtype, v) for v in bulk_widths(x_dtype, g_dtype))
    return out + _block_walks(x_dtype, g_dtype)


def block_walk_fits(N, T, D, x_dtype, g_dtype, direction=0, lanes=None):
    """Channels per lane of the block walk (0 forward, 1 backward) where N sequences of T steps and D
    channels call for it and D is a multiple of them, else 0 (strides and pointers not considered).
    ``lanes``: 4 or 8 bytes a lane for a 16-bit forward in place of the rule's width (None: the rule)."""
    lo, hi = BLOCK_WALK_CHANNELS[_size(x_dtype, g_dtype), direction]
    narrow = N * D < BLOCK_WALK_NARROW_BELOW if lanes is None else lanes == 4
    vec = block_walk_width(x_dtype, g_dtype, direction, narrow)
    return vec if T > BLOCK_WALK_MIN_T and lo <= N * D < hi and D % vec == 0 else 0


def _kernel(name, dtypes, vec, grid, block, device, block_steps=BLOCK_STEPS):
    if block_steps == BLOCK_STEPS:
        module = names(*dtypes)
    else:  # a block walk with windows of its own: a module of the block walks alone
        module = short_window_names(*dtypes)
    fn = nvrtc.get_function(SOURCE, module, nvrtc.instantiation(name, *dtypes, vec), device,
                            options(*dtypes, block_steps))
    shared, blocks, head = 0, 0, 1
    if name == STAGED_KERNEL:
        shared, blocks = STAGED_SHARED, STAGED_BLOCKS
    elif name == BULK_KERNEL:  # its first parameter: the maps of x, g, o and o's rows
        shared, blocks, head = bulk_shared(vec * _size(*dtypes)), BULK_BLOCKS, 4 * nvrtc.TENSOR_MAP_WORDS
    if shared:
        nvrtc.hold_shared(fn, shared, blocks, device)
    return nvrtc.bind(fn, grid, block, device, shared=shared, head_words=head)


def _bulk(tensors, N, T, D, dtypes, lanes, device):
    """The bulk walk of a dense forward as ``(pointer masks, launch)`` taking the block walk's arguments,
    or None where the layout does not allow it: its maps need every stride of x, g and o a multiple of 16
    bytes and at least the extent of the axis inside it (rows and sequences that neither overlap nor run
    backwards; that of an axis of length one is not read: the map gets a valid stand-in), and its pointers
    16-byte aligned (the masks).  The maps are encoded at a launch and kept for the pointers
    (the last MAX_MAPS triples)."""
    vec = bulk_fits(N, T, D, *dtypes, lanes)
    if not vec:
        return None
    size, strides = nvrtc.ITEMSIZE[dtypes[0]], []
    for a in tensors[:3]:
        sb, st = a.strides[0] * size, a.strides[1] * size
        sb = sb if N > 1 else T * st
        if st % 16 or sb % 16 or st < D * size or sb < T * st:  # rows and sequences apart, in order
            return None
        strides.append((st, sb))
    dims, C = (D, T, N), 32 * vec
    boxes = ((C, BLOCK_WARPS * BLOCK_STEPS, 1),) * 2 + ((C, BLOCK_STEPS, 1), (C, 1, 1))
    kernel = _kernel(BULK_KERNEL, dtypes, vec, *_block_grid(N, D, vec), device)
    maps = {}

    def launch(stream_ptr, x, g, o, sxb, sxt, sgb, sgt, sob, sot, h0, ht, cu, cu64, T_, D_, reverse):
        words = maps.get((x, g, o))
        if words is None:
            if len(maps) >= MAX_MAPS:
                maps.clear()
            words = maps[x, g, o] = sum((nvrtc.tensor_map(p, size, dims, st, box)
                                         for p, st, box in zip((x, g, o, o), strides + strides[2:], boxes)), ())
        kernel(stream_ptr, *words, h0, ht, T, D, reverse)
    return (15, 15, 15), launch


def _walk_grid(N, D, vec=1):
    return ((D // vec + BLOCK - 1) // BLOCK, N), (BLOCK,)


def _block_grid(N, D, vec):
    return ((D + 32 * vec - 1) // (32 * vec), N), (32, BLOCK_WARPS)


MAX_MAPS = 64  # pointer triples whose maps a prepared bulk launch keeps
MAX_GRID_Y = 65535  # CUDA's bound on a grid's y extent, the walks' sequences a launch


def _sliced(walks, tensors, N, varlen, state_size):
    """The walk of N > MAX_GRID_Y sequences as launches of MAX_GRID_Y sequences and one of the rest
    (``walks``: the walk for each count): each launch's pointers moved to its first sequence, those of the
    tensors by their batch stride (dense; varlen rows stay where the offsets put them), of the states by
    rows of D and of cu_seqlens by entries."""
    D = tensors[0].shape[2]
    rows = tuple(0 if varlen else a.strides[0] * nvrtc.ITEMSIZE[a.dtype] for a in tensors)

    def walk(stream_ptr, pointers, states, cu, workspace=None):
        entry = 8 if cu[1] else 4  # cu: (pointer or 0, whether int64)
        for n0 in range(0, N, MAX_GRID_Y):
            walks[min(MAX_GRID_Y, N - n0)](stream_ptr, tuple(p + n0 * r for p, r in zip(pointers, rows)),
                                           tuple(p + n0 * D * state_size if p else 0 for p in states),
                                           (cu[0] + n0 * entry if cu[0] else 0, cu[1]))
    return walk


def prepare(direction, tensors, N, reverse, device, varlen=False, lanes=None, steps=None, staged=False, bulk=False):
    """The launch of one direction for one layout, as ``launch(stream_ptr, pointers, states, cu,
    workspace)`` (the workspace is not used), or None when there is nothing to compute; arguments as
    ``chunk.prepare``; ``lanes`` as ``block_walk_fits``, ``steps`` a warp in a block walk's window (None:
    BLOCK_STEPS); ``staged``: a 16-bit forward's block walk of STAGED_LANES-byte lanes is the staged one (like
    ``lanes``, the option changes nothing where it does not apply: backward, other dtypes, other widths);
    ``bulk``: a dense forward the bulk walk serves takes it at ``lanes`` bytes a lane, where the layout
    allows.  Each call takes the widest kernel its pointers allow: the bulk walk, the block walk, the walk
    of ``WALK_VEC`` channels a thread, or of one; without cu_seqlens at T = 1, the single step (either
    direction)."""
    B, T, D = tensors[0].shape
    if N == 0 or D == 0:
        return None
    # the width rules read the dtype of x (forward) or o (backward) first
    arrs = tensors if direction == 0 else (tensors[1], tensors[0]) + tuple(tensors[2:])
    dtypes = (arrs[0].dtype, arrs[1].dtype)
    size = _size(*dtypes)
    strides = tuple(s for a in tensors for s in a.strides[:2])
    tail = (T, D, int(bool(reverse)))
    walk_names = ("fused_recurrent_fwd", "fused_recurrent_bwd")
    block_names = ("fused_recurrent_block_fwd", "fused_recurrent_block_bwd")

    def walks(count):
        """The walk of ``count`` sequences a launch (the grid's y extent); kernels chosen for all N."""
        choices = []  # (pointer masks in the kernels' order, kernel), widest first
        wide = _bulk(tensors, N, T, D, dtypes, lanes, device) if bulk and direction == 0 and not varlen else None
        if wide:
            choices.append(wide)
        bvec = block_walk_fits(N, T, D, *dtypes, direction, lanes)
        if bvec and layout_vector_width(D, arrs, bvec) == bvec:
            block = (STAGED_KERNEL if staged and direction == 0 and bvec == staged_width(*dtypes)
                     else block_names[direction])
            choices.append((alignment_masks(bvec, tensors),
                            _kernel(block, dtypes, bvec, *_block_grid(count, D, bvec), device, steps or BLOCK_STEPS)))
        wvec = WALK_VEC[size] if N * D >= WALK_VEC_MIN_CHANNELS else 1
        if wvec > 1 and layout_vector_width(D, arrs, wvec) == wvec:
            choices.append((alignment_masks(wvec, tensors),
                            _kernel(walk_names[direction], dtypes, wvec, *_walk_grid(count, D, wvec), device)))
        narrow = _kernel(walk_names[direction], dtypes, 1, *_walk_grid(count, D), device)

        def walk(stream_ptr, pointers, states, cu, workspace=None):
            for masks, wide in choices:
                if aligned(pointers, masks):
                    wide(stream_ptr, *pointers, *strides, *states, *cu, *tail)
                    return
            narrow(stream_ptr, *pointers, *strides, *states, *cu, *tail)
        return walk

    if N <= MAX_GRID_Y:
        walk = walks(N)
    else:
        walk = _sliced({n: walks(n) for n in {MAX_GRID_Y, N % MAX_GRID_Y} - {0}}, tensors, N, varlen,
                       nvrtc.ITEMSIZE[nvrtc.accumulation_dtype(*dtypes)])

    # One step (decoding) and its backward: 16-byte accesses where this call's pointers allow them, states
    # element-wise.  The backward's step reads g and do and writes dx and dg, not o (h[-1] is h0).
    used = STEP_TENSORS[direction]
    vec = layout_vector_width(D, [tensors[i] for i in used])
    if T != 1 or varlen or vec == 1:
        return walk
    threads = N * D // vec
    step = _kernel(STEP_KERNELS[direction], dtypes, vec, ((threads + STEP_BLOCK - 1) // STEP_BLOCK,),
                   (STEP_BLOCK,), device)
    step_strides = tuple(tensors[i].strides[0] for i in used)
    masks = alignment_masks(vec, [tensors[i] for i in used])
    pick = operator.itemgetter(*used)  # a tuple of the used pointers, in C: this runs on every decode step

    def launch(stream_ptr, pointers, states, cu, workspace=None):
        picked = pick(pointers)
        if aligned(picked, masks):
            step(stream_ptr, *picked, *step_strides, *states, N, D)
        else:
            walk(stream_ptr, pointers, states, cu)
    return launch
