"""Fused recurrent engine launchers (kernels in ``hgrn_cupy/kernels/fused_recurrent.cu``).

A thread owns one or two channels of one sequence and walks time (two from 64K channels where the
layout allows: see ``WALK_VEC``); best with many sequences times wide D, for decode (T = 1) and for
varlen.  From 4K-8K channels on (the float32 backward up to 64K) they run as block walks where the
layout allows (see ``BLOCK_WALK_CHANNELS``): a block of warps shares a group of channels of one sequence
and splits each window of time between its warps.  Launchers check nothing: the public functions in ``ops`` validate.
"""
from __future__ import annotations

from ._compile import (BLOCK_BWD, BLOCK_FWD, ITEMSIZE, STEP, WALK_VEC, alignment_masks, bind, block_walk_width,
                       get_function, layout_vector_width)

BLOCK = 64      # small blocks spread few channels over every multiprocessor
STEP_BLOCK = 128  # threads per block of the single-step kernel (VEC channels each)
# Channels per thread of the walks (``WALK_VEC``, per storage size of the wider input) where there are at
# least WALK_VEC_MIN_CHANNELS (sequences x D) and the layout allows it; and the steps per register tile
# then.  Two 16-bit channels make a warp's access 128 bytes instead of 64: on an H100 (bf16, 32-step tiles)
# that took 16x2048x4096 from 1.59x to 1.14x of the floor forward (1.57x to 1.14x backward) and
# 32x2048x4096 from 1.31x to 1.11x (1.36x to 1.12x); float32 gained 1-3% from 64K channels on. At 16K
# channels both lost (half the threads), hence the threshold.
PREFETCH_V = {2: 32, 4: 16, 8: 16}
WALK_VEC_MIN_CHANNELS = 1 << 16
# The block walks: BLOCK_WARPS warps share a group of channels of one sequence (8 bytes of them per lane
# forward, 4 backward) and split each window of BLOCK_WARPS * BLOCK_STEPS steps between them
# (hgrn_cupy/kernels/fused_recurrent.cu).  One is taken where N * D lies in BLOCK_WALK_CHANNELS[storage size of
# the wider input, direction], T exceeds BLOCK_WALK_MIN_T and the layout allows the lanes.  H100, do_bench,
# x floor, forward / backward, block walk (thread walk; chunk engine) with the kernels' fast form and L2
# prefetch (2026-11-26 day):
#   bf16     8K: 1.25 / 1.12 (2.84 fwd; 1.49 / 1.62);  16K: 1.06-1.08 / 1.13 (chunk 1.39 / 1.56);
#           32K: 1.09 / 1.11;  64K: 1.06 / 1.10 (1.14 bwd);  128K: 1.04 / 1.09 (1.11 bwd).
#   float32  4K: 1.32 / 1.10 (2.72 / 2.75; 1.42 / 1.45);  8K: 1.06 / 1.12 (chunk 1.29 / 1.41);
#           16K: 1.06 / 1.08;  64K: 1.03 / 1.08 (1.07 bwd).
# float64 was not timed: it keeps the thread walk.  16-bit forward below BLOCK_WALK_NARROW_BELOW channels
# takes 4-byte lanes (twice the blocks): at 8K 1.25 against 1.95 with 8-byte lanes, while from 16K on the
# 8-byte lanes won (16K 1.06-1.08 against 1.11-1.13; 32K equal).  float32 lost with 4-byte lanes (16K 1.09
# -> 1.15, before the fast form).  8 steps a warp: 16 spilled (1.2-2x slower).
BLOCK_WARPS = 8
BLOCK_STEPS = 8
BLOCK_WALK_NARROW_BELOW = 1 << 14
BLOCK_WALK_CHANNELS = {(2, 0): (1 << 13, 1 << 62), (4, 0): (1 << 12, 1 << 62), (8, 0): (1 << 62, 1 << 62),
                       (2, 1): (1 << 13, 1 << 62), (4, 1): (1 << 12, 1 << 16), (8, 1): (1 << 62, 1 << 62)}
BLOCK_WALK_MIN_T = BLOCK_WARPS * BLOCK_STEPS


def options(x_dtype, g_dtype):
    """Compile options for one dtype pair: steps per register tile (two tiles in flight), with one channel
    per thread and with two.

    32-step tiles when both inputs are float32, 16 otherwise: on an H100 at 16K channels the longer
    tiles took float32 from 1.41x to 1.32x of the floor (forward) and 1.23x to 1.19x (backward),
    while bfloat16 gained nothing in the forward and lost at 128K channels.
    """
    steps = 32 if x_dtype == g_dtype == "float32" else 16
    size = max(ITEMSIZE[x_dtype], ITEMSIZE[g_dtype])
    return (f"-DHC_PREFETCH={steps}", f"-DHC_PREFETCH_V={PREFETCH_V[size]}", f"-DHC_BLOCK_WARPS={BLOCK_WARPS}",
            f"-DHC_BLOCK_STEPS={BLOCK_STEPS}")


def block_walk_fits(N, T, D, x_dtype, g_dtype, direction=0):
    """Channels per lane of the block walk (0 forward, 1 backward) where N sequences of T steps and D
    channels call for it and D is a multiple of them, else 0 (strides and pointers not considered)."""
    size = max(ITEMSIZE[x_dtype], ITEMSIZE[g_dtype])
    lo, hi = BLOCK_WALK_CHANNELS[size, direction]
    vec = block_walk_width(x_dtype, g_dtype, direction, N * D < BLOCK_WALK_NARROW_BELOW)
    return vec if T > BLOCK_WALK_MIN_T and lo <= N * D < hi and D % vec == 0 else 0


def block_walk_vec(N, T, D, arrs, direction=0):
    """Channels per lane of the block walk for N sequences of T steps in this layout (``Arr`` x and g
    first, forward; o and g first, backward), or 0 where the walk of one or two channels per thread runs
    instead (pointers are the caller's to check)."""
    vec = block_walk_fits(N, T, D, arrs[0].dtype, arrs[1].dtype, direction)
    return vec if vec and layout_vector_width(D, arrs, vec) == vec else 0


def walk_vec(N, D, arrs):
    """Channels per thread of the walks for N sequences of this layout: ``WALK_VEC`` of the wider dtype
    where N * D reaches ``WALK_VEC_MIN_CHANNELS`` and D and the strides of every axis of ``arrs`` longer
    than one are multiples of it, else 1 (pointers are the caller's to check)."""
    vec = WALK_VEC[max(ITEMSIZE[arrs[0].dtype], ITEMSIZE[arrs[1].dtype])]
    if vec == 1 or N * D < WALK_VEC_MIN_CHANNELS:
        return 1
    return layout_vector_width(D, arrs, vec)


def _by_alignment(bits, fast, slow):
    """A launch ``(stream_ptr, x_ptr, g_ptr, o_ptr, h0_ptr, ht_ptr)`` that runs ``fast`` where this call's
    pointers clear ``bits`` (a mask for x and o, one for g) and ``slow`` otherwise."""
    bx, bg = bits

    def run(stream_ptr, x_ptr, g_ptr, o_ptr, h0_ptr, ht_ptr):
        if (x_ptr | o_ptr) & bx or g_ptr & bg:
            slow(stream_ptr, x_ptr, g_ptr, o_ptr, h0_ptr, ht_ptr)
        else:
            fast(stream_ptr, x_ptr, g_ptr, o_ptr, h0_ptr, ht_ptr)
    return run


def _grid(N, D, vec=1):
    return ((D // vec + BLOCK - 1) // BLOCK, N), (BLOCK,)


def _block_grid(N, D, vec):
    """Grid and block of a block walk: a block of BLOCK_WARPS warps per 32 * vec channels of a sequence."""
    return ((D + 32 * vec - 1) // (32 * vec), N), (32, BLOCK_WARPS)


def prepare_fwd(x, g, o, cu, N, reverse, device):
    """The forward launch for one layout, as a function ``launch(stream_ptr, x_ptr, g_ptr, o_ptr, h0_ptr,
    ht_ptr)`` (pointer 0: state absent), or None when there is nothing to compute.  x, g, o: ``Arr``
    [B, T, D] whose shapes, strides and dtypes the launch keeps (their pointers are not read); cu:
    ``(pointer, is_int64)`` of cu_seqlens or None.  Decoding reuses one across calls."""
    B, T, D = x.shape
    if N == 0 or D == 0:
        return None
    opts = options(x.dtype, g.dtype)
    fn = get_function("fused_recurrent", 0, x.dtype, g.dtype, device, opts)
    kernel = bind(fn, *_grid(N, D), device)
    (sxb, sxt), (sgb, sgt), (sob, sot) = x.strides[:2], g.strides[:2], o.strides[:2]
    cu_ptr, cu64 = cu if cu is not None else (0, 0)
    rev = int(bool(reverse))

    def masks(vec):  # pointer bits that must be clear for VEC-wide accesses: x and o, then g
        return alignment_masks(vec, (x, g))  # o has x's dtype

    def walk_with(kern):  # a bound walk kernel with this layout's arguments
        def run(stream_ptr, x_ptr, g_ptr, o_ptr, h0_ptr, ht_ptr):
            kern(stream_ptr, x_ptr, g_ptr, o_ptr, sxb, sxt, sgb, sgt, sob, sot, h0_ptr, ht_ptr, cu_ptr, cu64, T, D,
                   rev)
        return run

    walk = walk_with(kernel)
    wvec = walk_vec(N, D, (x, g, o))
    if wvec > 1:  # VEC channels per thread where this call's pointers allow them
        fn_v = get_function("fused_recurrent", 0, x.dtype, g.dtype, device, opts, vec=wvec)
        walk = _by_alignment(masks(wvec), walk_with(bind(fn_v, *_grid(N, D, wvec), device)), walk)
    bvec = block_walk_vec(N, T, D, (x, g, o))
    if bvec:  # the block walk where this call's pointers allow its lanes
        fn_b = get_function("fused_recurrent", BLOCK_FWD, x.dtype, g.dtype, device, opts, vec=bvec)
        kernel_b = bind(fn_b, *_block_grid(N, D, bvec), device)
        walk = _by_alignment(masks(bvec), walk_with(kernel_b), walk)

    vec = layout_vector_width(D, (x, g, o))
    if T != 1 or cu is not None or vec == 1:
        return walk
    # One step (decoding): 16-byte accesses where this call's pointers allow them.
    step_fn = get_function("fused_recurrent", STEP, x.dtype, g.dtype, device, opts, vec=vec)
    threads = N * D // vec
    step = bind(step_fn, ((threads + STEP_BLOCK - 1) // STEP_BLOCK,), (STEP_BLOCK,), device)

    def launch_step(stream_ptr, x_ptr, g_ptr, o_ptr, h0_ptr, ht_ptr):
        step(stream_ptr, x_ptr, g_ptr, o_ptr, sxb, sgb, sob, h0_ptr, ht_ptr, N, D)

    return _by_alignment(masks(vec), launch_step, walk)  # h0 and ht are read element-wise


def fused_recurrent_fwd(x, g, o, h0, ht, cu, N, reverse, device, stream):
    """x, g, o: ``Arr`` [B, T, D]; h0, ht: pointers to [N, D] in the accumulation dtype (0: absent);
    cu: ``(pointer, is_int64)`` of cu_seqlens or None.  Queues the kernel on ``stream``."""
    launch_ = prepare_fwd(x, g, o, cu, N, reverse, device)
    if launch_ is not None:
        launch_(stream.ptr, x.ptr, g.ptr, o.ptr, h0 or 0, ht or 0)


def prepare_bwd(g, o, do, dx, dg, cu, N, reverse, device):
    """The backward launch for one layout, as ``launch(stream_ptr, pointers, states)`` with ``pointers`` those
    of (g, o, do, dx, dg) and ``states`` of (h0, dht, dh0) (0: absent), or None when there is nothing to
    compute.  g, o, do, dx, dg: ``Arr`` [B, T, D] whose shapes, strides and dtypes the launch keeps (their
    pointers are not read; dx has o's dtype, dg g's); cu as in ``prepare_fwd``.  Each call takes the widest
    kernel its pointers allow: the block walk, the walk of ``walk_vec`` channels a thread, or of one."""
    B, T, D = g.shape
    if N == 0 or D == 0:
        return None
    tensors = (g, o, do, dx, dg)  # the kernels' order
    arrs = (o, g, do, dx, dg)     # o's dtype first, as the width rules take them
    strides = tuple(s for a in tensors for s in a.strides[:2])
    cu_ptr, cu64 = cu if cu is not None else (0, 0)
    tail = (cu_ptr, cu64, T, D, int(bool(reverse)))
    opts = options(o.dtype, g.dtype)

    def kernel(direction, vec, grid):
        return bind(get_function("fused_recurrent", direction, o.dtype, g.dtype, device, opts, vec=vec), *grid, device)

    choices = []  # (pointer masks in the kernels' order, kernel), widest first
    bvec = block_walk_vec(N, T, D, arrs, 1)
    if bvec:
        choices.append((alignment_masks(bvec, tensors), kernel(BLOCK_BWD, bvec, _block_grid(N, D, bvec))))
    vec = walk_vec(N, D, arrs)
    if vec > 1:
        choices.append((alignment_masks(vec, tensors), kernel(1, vec, _grid(N, D, vec))))
    narrow = kernel(1, 1, _grid(N, D))

    def launch_(stream_ptr, pointers, states):
        for bits, wide in choices:
            if not any(p & b for p, b in zip(pointers, bits)):
                wide(stream_ptr, *pointers, *strides, *states, *tail)
                return
        narrow(stream_ptr, *pointers, *strides, *states, *tail)
    return launch_


def fused_recurrent_bwd(g, o, do, dx, dg, h0, dht, dh0, cu, N, reverse, device, stream):
    """g, o, do, dx, dg: ``Arr`` [B, T, D] (dx has o's dtype, dg g's); h0, dht, dh0: pointers to
    [N, D] in the accumulation dtype (0: absent)."""
    launch_ = prepare_bwd(g, o, do, dx, dg, cu, N, reverse, device)
    if launch_ is not None:
        launch_(stream.ptr, (g.ptr, o.ptr, do.ptr, dx.ptr, dg.ptr), (h0 or 0, dht or 0, dh0 or 0))
