"""Context-parallel HGRN for PyTorch: a sequence split in time across the ranks of a process group.

    from hgrn_cupy.distributed.torch import hgrn
    o, ht = hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False, group=None)

Each rank passes its contiguous slice of time ``x[:, t0:t1]``, ``g[:, t0:t1]`` (``[B, T_r, D]``; ranks in
time order, slices may differ in length) and gets its slice of the output.  One state-only pass and one
``all_gather`` of ``2 * B * D`` accumulation-dtype numbers per rank forward, the same backward (three
``B * D`` with ``output_final_state``), then the library's own kernels on the slice; the math is in
:mod:`hgrn_cupy.distributed.compose`, the design in docs/context_parallel.md.  CUDA tensors run the
kernels (NCCL, or gloo), CPU tensors the NumPy reference (gloo).

Which rank gets what:

- ``initial_state`` ``[B, D]`` is read on the rank where the recurrence starts (rank 0; the last rank with
  ``reverse=True``); pass it there, or the same tensor on every rank: the others' are ignored and get no
  gradient.  Its gradient comes back on that rank.
- ``ht`` (``output_final_state=True``) is the global final state, returned on every rank (the same
  values).  The gradients reaching it on all ranks are added: each rank's ``ht`` is one use of the global
  state, as with any collective's output (the loss is the sum of the ranks' losses).
- Every rank must call with the same B, D, dtypes, ``output_final_state``, ``reverse`` and group: these
  are assumed, not checked (checking would cost a collective); mismatched shapes fail inside the
  collective or hang it.
- ``cu_seqlens`` is not supported (dense ``[B, T, D]`` only): a ``ValueError``.

Differentiable (``torch.autograd.Function``): saves g, o and the slice's incoming state, not x; every rank
must run the backward (it holds a collective).  Gradients come back in each input's dtype.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import checks
from .. import hgrn as _hgrn
from .. import hgrn_backward as _hgrn_backward
from ..states import backward_states, forward_states
from . import compose

__all__ = ["hgrn"]


_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
# (backend, device type) pairs whose backend rejected the single-tensor gather (it does so before any
# communication, on every rank alike): they take the list form, which every backend has.
_list_gather: set = set()


def _all_gather(parts, group):
    """``[W, len(parts), ...]``: every rank's ``parts`` (equal shapes), in rank order."""
    t = torch.stack(parts)
    world = dist.get_world_size(group)
    if world == 1:
        return t[None]
    out = t.new_empty((world * t.shape[0],) + tuple(t.shape[1:]))
    key = (str(dist.get_backend(group)), t.device.type)
    if key not in _list_gather:
        try:
            _gather_single(out, t, group=group)
            return out.view((world,) + tuple(t.shape))
        except (RuntimeError, NotImplementedError):
            _list_gather.add(key)
    stacked = out.view((world,) + tuple(t.shape))
    dist.all_gather(list(stacked.unbind(0)), t, group=group)
    return stacked


def _dense(a):
    """Channels with stride 1 (an expanded gradient such as the one ``o.sum()`` sends back is not)."""
    return a.contiguous() if a is not None and a.shape[2] > 1 and a.stride(2) != 1 else a


def _acc_dtype(x, g):
    return torch.float64 if torch.float64 in (x.dtype, g.dtype) else torch.float32


class _ContextParallelHGRN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, h0, output_final_state, reverse, group):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        p = compose.position(rank, world, reverse)
        acc = _acc_dtype(x, g)
        h0_dtype = None if h0 is None else h0.dtype
        h0 = None if p != 0 or h0 is None else h0.to(acc)
        A, b = forward_states(x, g, reverse)
        G = compose.logical(_all_gather([A, compose.fold_initial_state(A, b, h0)], group), reverse, torch)
        s = h0 if p == 0 else compose.incoming_state(G[:, 0], G[:, 1], p, torch)
        o, _ = _hgrn(x, g, initial_state=s, reverse=reverse)
        ht = compose.final_state(G[:, 0], G[:, 1], torch) if output_final_state else None
        ctx.save_for_backward(g, o, s)
        ctx.p, ctx.reverse, ctx.group, ctx.output_final_state = p, reverse, group, output_final_state
        ctx.h0_dtype = h0_dtype if p == 0 and ctx.needs_input_grad[2] else None
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        g, o, s = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else _dense(do.to(o.dtype))
        A, c = backward_states(g, do, ctx.reverse)
        parts = [A, c]
        if ctx.output_final_state:
            parts.append(torch.zeros_like(A) if dht is None else dht.to(A.dtype))
        G = compose.logical(_all_gather(parts, ctx.group), ctx.reverse, torch)
        lam_end = G[:, 2].sum(0) if ctx.output_final_state else None
        lam = compose.outgoing_gradient(G[:, 0], G[:, 1], ctx.p, lam_end, torch)
        dx, dg, dh0 = _hgrn_backward(g, o, do, dht=lam, initial_state=s, reverse=ctx.reverse)
        dh0 = None if ctx.h0_dtype is None else dh0.to(ctx.h0_dtype)
        return dx, dg, dh0, None, None, None


def _check(x, g, initial_state, output_final_state, cu_seqlens, reverse, group):
    """The front ends' one argument check (``checks.check_forward``) on the dense slices the kernels read
    (the torch front end's policy: channels with a stride are copied once), for torch tensors without
    cu_seqlens, in a process group this rank belongs to.  Returns x and g as the kernels read them."""
    if cu_seqlens is not None:
        raise ValueError("cu_seqlens is not supported by the context-parallel hgrn (dense [B, T, D] slices only)")
    for a, name in ((x, "x"), (g, "g"), (initial_state, "initial_state")):
        if a is not None and not isinstance(a, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(a).__name__}")
    try:
        checks.check_forward(x, g, initial_state, None, output_final_state, reverse)
    except checks.ChannelStrideError:
        x, g = _dense(x), _dense(g)
        checks.check_forward(x, g, initial_state, None, output_final_state, reverse)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("hgrn_cupy.distributed.torch.hgrn needs torch.distributed initialised "
                           "(torch.distributed.init_process_group)")
    if group is not None and dist.get_rank(group) < 0:
        raise ValueError("group: this process is not a member of the given process group")
    return x, g


def hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False, *, group=None):
    """:func:`hgrn_cupy.torch.hgrn` over a sequence split in time across the ranks of ``group``.

    Args:
        x, g: this rank's slice of time ``[B, T_r, D]`` (values; log-space forget gates); the ranks hold
            consecutive slices in rank order.
        initial_state: ``[B, D]`` state before the first step, read on the rank where the recurrence starts
            (rank 0, or the last rank with ``reverse``); other ranks' values are ignored.
        output_final_state: also return the global final state (on every rank).
        cu_seqlens: not supported (``ValueError``).
        reverse: run time backwards (the last rank's slice comes first).
        group: the process group of the sequence's ranks (None: the default group).

    Returns:
        ``(o, ht)``: this rank's output slice ``[B, T_r, D]`` in x's dtype; ht ``[B, D]`` in float32 (float64
        when x or g is float64), or None unless ``output_final_state``.  The module docstring says which
        rank receives which gradient.
    """
    x, g = _check(x, g, initial_state, output_final_state, cu_seqlens, reverse, group)
    o, ht = _ContextParallelHGRN.apply(x, g, initial_state, bool(output_final_state), bool(reverse), group)
    return o, ht
