"""State-only passes: the affine map of a whole slice of time, per channel (kernels in ``hgrn_cupy/kernels/states.cu``).

    A, b = forward_states(x, g, reverse=False)     # h_end = A * h_start + b over the slice
    A, c = backward_states(g, do, reverse=False)   # dh_start = A * dh_end + c

x, g, do: ``[B, T, D]`` (batch and time strides arbitrary, channels contiguous); A, b, c: ``[B, D]`` in the
accumulation dtype (float32; float64 when an input is float64).  With the recurrence of
:mod:`hgrn_cupy.naive` and a = exp(g)::

    A = prod_t a[t]                                    (1 for T = 0)
    b = h[T-1] from h[-1] = 0                          (the forward walked from a zero state)
    c = e[0],  e[t] = a[t] * (e[t+1] + do[t]),  e[T] = 0

so that the backward's ``dh0`` with ``dht = lam`` is ``A * lam + c``; ``reverse=True`` mirrors time in
both.  Neither pass writes anything of size T: they read two tensors and are what context parallelism
exchanges between ranks (:mod:`hgrn_cupy.distributed`).

CUDA tensors (PyTorch) and CuPy arrays run the kernels on the caller's current stream, outputs from the
caller's allocator; CPU arrays (NumPy, PyTorch on CPU) take a NumPy fold.  Results come back in the
caller's array type on its device.
"""
from __future__ import annotations

import numpy as np

from . import arrays as bk
from . import checks
from .engines.layout import alignment_masks, layout_vector_width, vector_width
from .nvrtc import accumulation_dtype, bind, blocks_at_once, instantiation

__all__ = ["forward_states", "backward_states", "fold_maps"]

SOURCE = "states.cu"
WARPS = 8    # warps per block of the passes; each owns a contiguous part of its block's steps
UNROLL = 8   # steps of loads a thread keeps in flight
COMBINE_ROWS = 16  # threads sharing one channel's splits in the combine
OPTIONS = (f"-DHC_STATES_WARPS={WARPS}", f"-DHC_STATES_UNROLL={UNROLL}", f"-DHC_STATES_COMBINE_ROWS={COMBINE_ROWS}")


# ----------------------------------------------------------------------------------------------
# the math, for any array namespace (NumPy, jax.numpy, torch): the CPU path and the composition

def fold_maps(A, b, xp):
    """The composition of stacked affine maps ``[K, ...]`` applied in index order (index 0 first), as
    ``(A, b)`` of shape ``[...]``, ``(A2, b2) o (A1, b1) = (A2*A1, A2*b1 + b2)``.  K = 0 is not allowed.

    CUDA arrays (PyTorch, CuPy) of float32 or float64 take one launch of the combine kernel on the caller's
    stream (a rank composing its predecessors would otherwise queue a dozen tiny element-wise kernels);
    the rest compose pairs level by level, an odd level padded with the identity (1, 0), in ``xp``, the
    arrays' namespace (needs ``concat``, ``ones_like``, ``zeros_like``)."""
    fw = _gpu_fold_framework(A, b) if A.shape[0] > 1 else None
    if fw is not None:
        return _fold_gpu(fw, A, b)
    while A.shape[0] > 1:
        if A.shape[0] % 2:
            A = xp.concat([A, xp.ones_like(A[:1])], axis=0)
            b = xp.concat([b, xp.zeros_like(b[:1])], axis=0)
        A, b = A[1::2] * A[0::2], A[1::2] * b[0::2] + b[1::2]
    return A[0], b[0]


def _fold_time(a, v, descending, xp):
    """(A, b) of the maps (a[t], v[t]) of ``[B, T, D]`` arrays (NumPy or jax.numpy), walked up or down in
    time; T may be 0."""
    a, v = a.swapaxes(0, 1), v.swapaxes(0, 1)
    if a.shape[0] == 0:  # the identity
        shape = (1,) + tuple(a.shape[1:])
        a, v = xp.ones(shape, dtype=a.dtype), xp.zeros(shape, dtype=v.dtype)
    if descending:
        a, v = xp.flip(a, (0,)), xp.flip(v, (0,))
    return fold_maps(a, v, xp)


def _cpu(fw, v, g, reverse, backward):
    acc = accumulation_dtype(fw.dtype(v), fw.dtype(g))
    vn = fw.to_numpy(v).astype(acc)
    a = np.exp(fw.to_numpy(g).astype(acc))
    A, b = _fold_time(a, a * vn if backward else vn, bool(reverse) != backward, np)
    return fw.from_numpy(A, v, acc), fw.from_numpy(b, v, acc)


# ----------------------------------------------------------------------------------------------
# kernels: names, compilation, launch

def kernel_names(v_dtype, g_dtype):
    """Every kernel of the module of one dtype pair: both passes at VEC 1 and 16 bytes, and the combine."""
    vecs = sorted({1, vector_width(v_dtype, g_dtype)})
    passes = tuple(instantiation("states_walk", bwd, v_dtype, g_dtype, w) for bwd in (False, True) for w in vecs)
    return passes + (instantiation("states_combine", accumulation_dtype(v_dtype, g_dtype)),)


def get_function(name, v_dtype, g_dtype, device):
    """Kernel ``name`` (one of ``kernel_names(v_dtype, g_dtype)``) loaded on ``device``; compiles on first use."""
    from . import nvrtc

    return nvrtc.get_function(SOURCE, kernel_names(v_dtype, g_dtype), name, device, OPTIONS)


def split_plan(ntiles, T, at_once):
    """(nsplit, span): time cut into nsplit splits of span logical steps (a multiple of WARPS * UNROLL),
    so that ntiles * nsplit blocks make about one wave of the ``at_once`` blocks the GPU holds."""
    if T == 0:
        return 0, 0
    quantum = WARPS * UNROLL
    want = max(1, min(at_once // max(ntiles, 1), -(-T // quantum)))
    span = -(-(-(-T // want)) // quantum) * quantum
    return -(-T // span), span


def _device_index(fw, a):
    """The CUDA device ordinal of a torch tensor or CuPy array."""
    return a.device.index if fw is bk.TORCH else a.device.id


def _gpu_fold_framework(A, b):
    """The framework of A and b where the combine kernel can fold them (CUDA arrays of one device, float32 or
    float64, the same shape), else None."""
    fw = bk.framework_of(A)
    fits = (fw in (bk.TORCH, bk.CUPY) and bk.framework_of(b) is fw and fw.is_gpu(A) and fw.is_gpu(b)
            and fw.device(A) == fw.device(b) and fw.dtype(A) == fw.dtype(b) in ("float32", "float64")
            and tuple(A.shape) == tuple(b.shape))
    return fw if fits else None


def _fold_gpu(fw, A, b):
    acc = fw.dtype(A)
    K, rest = A.shape[0], tuple(A.shape[1:])
    A, b = fw.contiguous(A), fw.contiguous(b)
    out_a, out_b = fw.empty(rest, acc, A), fw.empty(rest, acc, A)
    nd = int(np.prod(rest))
    if nd:
        import cupy

        dev = _device_index(fw, A)
        with cupy.cuda.Device(dev):
            _combine(fw, dev, fw.stream(A), acc, acc, fw.describe(A).ptr, fw.describe(b).ptr, nd, K, out_a, out_b)
    return out_a, out_b


def _combine(fw, dev, stream, vd, gd, pa, pb, nd, nsplit, A, b):
    """Queue states_combine (of the (vd, gd) module): the nsplit maps [nsplit, nd] at pa, pb composed
    into A, b [nd] (nsplit = 0: the identity; pa, pb unread)."""
    fn = get_function(kernel_names(vd, gd)[-1], vd, gd, dev)
    bind(fn, (-(-nd // 32),), (32, COMBINE_ROWS), dev)(stream, pa, pb, nd, nsplit, fw.describe(A).ptr,
                                                       fw.describe(b).ptr)


def _launch(v, g, fw, reverse, backward):
    """Queue one pass on the caller's stream; returns (A, b) ``[B, D]`` in the accumulation dtype."""
    B, T, D = v.shape
    vd, gd = fw.dtype(v), fw.dtype(g)
    acc = accumulation_dtype(vd, gd)
    dev = _device_index(fw, v)
    A, b = fw.empty((B, D), acc, v), fw.empty((B, D), acc, v)
    if B * D == 0:
        return A, b
    import cupy

    arrs = (fw.describe(v), fw.describe(g))
    vec = layout_vector_width(D, arrs, vector_width(vd, gd))
    if any(a.ptr & m for a, m in zip(arrs, alignment_masks(vec, arrs))):
        vec = 1
    with cupy.cuda.Device(dev):
        stream = fw.stream(v)
        nsplit, span, ws = 0, 0, None
        if T > 0:
            fn = get_function(instantiation("states_walk", backward, vd, gd, vec), vd, gd, dev)
            ntiles = B * (-(-D // (32 * vec)))
            nsplit, span = split_plan(ntiles, T, blocks_at_once(fn, 32 * WARPS, dev))
            if nsplit > 1:
                ws = fw.empty((2, nsplit, B, D), acc, v)
            outs = (A, b) if ws is None else (ws[0], ws[1])
            bind(fn, (ntiles, nsplit), (32, WARPS), dev)(
                stream, arrs[0].ptr, arrs[1].ptr, *arrs[0].strides[:2], *arrs[1].strides[:2], B, T, D,
                int(bool(reverse)), span, *(fw.describe(o).ptr for o in outs))
        if nsplit != 1:  # several splits to compose, or T = 0: the identity
            ptrs = (0, 0) if ws is None else (fw.describe(ws[0]).ptr, fw.describe(ws[1]).ptr)
            _combine(fw, dev, stream, vd, gd, *ptrs, B * D, nsplit, A, b)
    return A, b


# ----------------------------------------------------------------------------------------------
# public functions

def _dense_last_axis(fw, a):
    """The kernels read channels with stride 1; anything else is copied once."""
    if a.shape[2] > 1 and min(a.shape) > 0 and fw.strides(a)[2] != 1:
        return fw.contiguous(a)
    return a


def _run(v, g, reverse, backward, v_name):
    fw = checks.check_states(v, g, reverse, v_name)
    if not fw.is_gpu(v):
        return _cpu(fw, v, g, reverse, backward)
    return _launch(_dense_last_axis(fw, v), _dense_last_axis(fw, g), fw, reverse, backward)


def forward_states(x, g, reverse=False):
    """``(A, b)`` ``[B, D]`` of the forward recurrence over x, g ``[B, T, D]`` (see the module docstring):
    ``h_end = A * h_start + b``."""
    return _run(x, g, reverse, False, "x")


def backward_states(g, do, reverse=False):
    """``(A, c)`` ``[B, D]`` of the backward recurrence over g and do ``[B, T, D]`` (see the module
    docstring): the gradient at the start state is ``A * dht + c``."""
    return _run(do, g, reverse, True, "do")
