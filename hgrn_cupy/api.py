"""The public functions: ``hgrn``, ``chunk_hgrn``, ``fused_recurrent_hgrn`` and ``hgrn_backward``.

Each hands its arguments to :mod:`hgrn_cupy.plans` (check, plan, run).  Torch tensors that need a
gradient (grad mode on and an input that requires grad) go to :mod:`hgrn_cupy.torch`, so that the result
carries the gradient a torch user expects.
"""
from __future__ import annotations

import sys

from . import dispatch, plans


def _torch_grad(*arrays):
    """Whether torch would record a gradient through these arrays (torch imported, grad mode on, and one
    of them a tensor that requires grad)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.is_grad_enabled():
        return False
    tensor = torch.Tensor
    for a in arrays:  # a loop: on every call, cheaper than any() of a generator
        if isinstance(a, tensor) and a.requires_grad:
            return True
    return False


def _forward(engine, x, g, initial_state, output_final_state, cu_seqlens, reverse):
    if _torch_grad(x, g, initial_state):
        from . import torch as differentiable

        return differentiable.apply(engine, x, g, initial_state, output_final_state, cu_seqlens, reverse)
    return plans.forward(engine, x, g, initial_state, output_final_state, cu_seqlens, reverse)


def hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False):
    """HGRN recurrence ``h[t] = exp(g[t]) * h[t-1] + x[t]``, ``o[t] = h[t]``, on the engine chosen for the
    shape and device (``hgrn_cupy.config``).

    Args:
        x: values ``[B, T, D]``, channels (the last axis) with stride 1; batch and time strides are free
            (views are read in place), other layouts raise ``ValueError`` (``checks.ChannelStrideError``).
        g: forget gates in log space ``[B, T, D]`` (normally ``<= 0``), laid out as x may be; may differ
            from x in dtype.
        initial_state: ``[N, D]`` state before the first step (zeros when None); N = B, or the number
            of sequences with ``cu_seqlens``.
        output_final_state: also return the state after the last step (a bool).
        cu_seqlens: ``[N+1]`` int32/int64 offsets of packed sequences along time (needs B == 1).
        reverse: run time backwards (a bool).

    Returns:
        ``(o, ht)``: o ``[B, T, D]`` in x's dtype; ht ``[N, D]`` in float32 (float64 when x or g is
        float64: the accumulation dtype, to which initial_state is cast), or None unless
        ``output_final_state``.

    Arrays may be NumPy (and subclasses such as ``np.memmap``), CuPy, PyTorch or JAX; the result is of
    the same kind on the same device, computed on the caller's current stream (CPU arrays: the NumPy
    reference of :mod:`hgrn_cupy.naive`, which also holds the math).  Torch tensors that require grad
    (with grad mode on) go through :mod:`hgrn_cupy.torch`, and gradients flow.
    """
    return _forward("auto", x, g, initial_state, output_final_state, cu_seqlens, reverse)


def chunk_hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False):
    """:func:`hgrn` on the chunk engine (time split into chunks scanned in parallel; for long T)."""
    return _forward("chunk", x, g, initial_state, output_final_state, cu_seqlens, reverse)


def fused_recurrent_hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False):
    """:func:`hgrn` on the fused recurrent engine (threads or blocks of warps walk time for groups of
    channels; for many channels, decoding and varlen)."""
    return _forward("fused_recurrent", x, g, initial_state, output_final_state, cu_seqlens, reverse)


def hgrn_backward(g, o, do, dht=None, initial_state=None, cu_seqlens=None, reverse=False, engine="auto"):
    """Gradients of :func:`hgrn` from its output.

    Args:
        g: the forward's gates ``[B, T, D]``.
        o: the forward's output ``[B, T, D]`` (it holds every state the gradient needs).
        do: gradient of the loss with respect to o ``[B, T, D]`` (any float dtype; taken in o's).
        dht: gradient with respect to the final state ``[N, D]``, or None.
        initial_state, cu_seqlens, reverse: as given to the forward.
        engine: ``"auto"``, ``"chunk"`` or ``"fused_recurrent"``.

    Returns:
        ``(dx, dg, dh0)``: dx ``[B, T, D]`` in o's dtype, dg in g's dtype, dh0 ``[N, D]`` in
        initial_state's dtype (None without an initial state).

    Not differentiable: torch tensors that require grad with grad mode on are refused (RuntimeError)
    rather than returned without a graph.
    """
    if _torch_grad(g, o, do, dht, initial_state):
        raise RuntimeError("hgrn_backward is not differentiable: call it under torch.no_grad() or on detached "
                           "tensors (hgrn_cupy.torch.hgrn records the gradient of hgrn itself)")
    dispatch.check_engine(engine)  # the internal interface also runs the tuner's variants
    return plans.backward(engine, g, o, do, dht, initial_state, cu_seqlens, reverse)
