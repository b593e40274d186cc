"""Differentiable HGRN for PyTorch, with flash-linear-attention's signatures.

    from hgrn_cupy.torch import hgrn, chunk_hgrn, fused_recurrent_hgrn
    o, ht = hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False)

The math, with shapes, is in :mod:`hgrn_cupy.naive`.  CUDA tensors run the kernels on torch's
current stream with outputs from torch's caching allocator (so calls can be captured in CUDA
graphs); CPU tensors run the NumPy reference.  Gradients come back in each input's dtype.

Both directions are ``torch.library`` custom ops, so ``torch.compile`` (``fullgraph=True``),
``torch.export`` and ``torch.library.opcheck`` see two opaque operators with fake (shape-only)
implementations instead of tracing into CuPy:

    hgrn_cupy::fwd(x, g, initial_state?, cu_seqlens?, output_final_state, reverse, engine) -> (o, ht)
    hgrn_cupy::bwd(g, o, do, dht?, initial_state?, cu_seqlens?, reverse, engine) -> (dx, dg, dh0)

Custom ops cannot return None, so the optional outputs are always tensors and the Python wrappers
drop them: ``ht`` is ``[N, D]`` when ``output_final_state`` is set and an empty ``[0, D]``
otherwise; ``dh0`` is empty ``[0, D]`` without an initial state.  Both shapes follow from the
arguments alone (a bool and whether a tensor is present), which keeps the fake implementations
exact under ``torch.compile``, dynamic shapes included.

Importing this module imports torch; importing :mod:`hgrn_cupy` never does.
"""
import torch

from . import ops

__all__ = ["hgrn", "chunk_hgrn", "fused_recurrent_hgrn"]


# ----------------------------------------------------------------------------------------------
# shapes shared by the real and the fake implementations

def _acc_dtype(a, b):
    """The accumulation dtype of the states (DESIGN.md section 1)."""
    return torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32


def _num_seqs(x, cu_seqlens):
    return x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _last_axis_dense(a):
    """The kernels read channels with stride 1; anything else (an expanded gradient such as the one
    ``o.sum()`` sends back, or a layout picked by a compiler) is copied once."""
    if a is not None and a.dim() == 3 and a.shape[2] > 1 and a.stride(2) != 1:
        return a.contiguous()
    return a


def _check_shapes(x, g, initial_state, cu_seqlens):
    """What the fake implementation can check without values: enough for a compile-time error
    that names the argument.  Real calls are validated in full by :mod:`hgrn_cupy.ops`."""
    if x.dim() != 3:
        raise ValueError(f"x must have 3 dimensions [B, T, D], got shape {tuple(x.shape)}")
    if tuple(g.shape) != tuple(x.shape):
        raise ValueError(f"g must have shape {tuple(x.shape)} like x, got {tuple(g.shape)}")
    if cu_seqlens is not None and cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D [N+1], got shape {tuple(cu_seqlens.shape)}")
    N, D = _num_seqs(x, cu_seqlens), x.shape[2]
    if initial_state is not None and tuple(initial_state.shape) != (N, D):
        raise ValueError(f"initial_state must have shape [N, D] = {(N, D)}, "
                         f"got {tuple(initial_state.shape)}")


# ----------------------------------------------------------------------------------------------
# the operators

@torch.library.custom_op(
    "hgrn_cupy::fwd", mutates_args=(),
    schema="(Tensor x, Tensor g, Tensor? initial_state, Tensor? cu_seqlens, bool output_final_state, "
           "bool reverse, str engine) -> (Tensor, Tensor)")
def _fwd(x, g, initial_state, cu_seqlens, output_final_state, reverse, engine):
    x, g = _last_axis_dense(x), _last_axis_dense(g)
    o, ht = ops._forward(engine, x, g, initial_state, output_final_state, cu_seqlens, reverse)
    if ht is None:
        ht = x.new_empty((0, x.shape[2]), dtype=_acc_dtype(x, g))
    return o, ht


@_fwd.register_fake
def _fwd_fake(x, g, initial_state, cu_seqlens, output_final_state, reverse, engine):
    _check_shapes(x, g, initial_state, cu_seqlens)
    B, T, D = x.shape
    N = _num_seqs(x, cu_seqlens) if output_final_state else 0
    return x.new_empty((B, T, D)), x.new_empty((N, D), dtype=_acc_dtype(x, g))


@torch.library.custom_op(
    "hgrn_cupy::bwd", mutates_args=(),
    schema="(Tensor g, Tensor o, Tensor do, Tensor? dht, Tensor? initial_state, Tensor? cu_seqlens, "
           "bool reverse, str engine) -> (Tensor, Tensor, Tensor)")
def _bwd(g, o, do, dht, initial_state, cu_seqlens, reverse, engine):
    g, o, do = _last_axis_dense(g), _last_axis_dense(o), _last_axis_dense(do)
    dx, dg, dh0 = ops.hgrn_backward(g, o, do, dht, initial_state, cu_seqlens, reverse, engine=engine)
    if dh0 is None:
        dh0 = o.new_empty((0, o.shape[2]), dtype=_acc_dtype(o, g))
    return dx, dg, dh0


@_bwd.register_fake
def _bwd_fake(g, o, do, dht, initial_state, cu_seqlens, reverse, engine):
    _check_shapes(o, g, initial_state, cu_seqlens)
    D = o.shape[2]
    dh0 = (o.new_empty((0, D), dtype=_acc_dtype(o, g)) if initial_state is None
           else initial_state.new_empty(initial_state.shape))
    return o.new_empty(o.shape), g.new_empty(g.shape), dh0


def _setup_context(ctx, inputs, output):
    x, g, initial_state, cu_seqlens, output_final_state, reverse, engine = inputs
    # o holds every state the backward needs, so x is not kept (DESIGN.md section 1).
    ctx.save_for_backward(g, output[0], initial_state, cu_seqlens)
    ctx.output_final_state, ctx.reverse, ctx.engine = output_final_state, reverse, engine
    ctx.set_materialize_grads(False)  # no zero tensors for outputs the loss does not use


def _backward(ctx, do, dht):
    g, o, initial_state, cu_seqlens = ctx.saved_tensors
    if do is None:  # only the final state reaches the loss
        do = torch.zeros_like(o)
    if not ctx.output_final_state:
        dht = None  # the [0, D] placeholder
    dx, dg, dh0 = _bwd(g, o, do, dht, initial_state, cu_seqlens, ctx.reverse, ctx.engine)
    return dx, dg, (dh0 if initial_state is not None else None), None, None, None, None


def _no_double_backward(ctx, ddx, ddg, ddh0):
    raise RuntimeError("hgrn_cupy: the backward of HGRN is not differentiable (no double backward)")


_fwd.register_autograd(_backward, setup_context=_setup_context)
_bwd.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)

# The OpOverload itself: calling it skips CustomOpDef's Python wrapper.
_fwd_op = torch.ops.hgrn_cupy.fwd.default


# ----------------------------------------------------------------------------------------------
# public functions

_Tensor = torch.Tensor
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def _plain_eager(x, g, initial_state):
    """True when nothing needs to see an operator: no compiler or tracer, no dispatch mode or
    functorch transform, plain tensors, no gradient to record.  Such calls (decoding, above all)
    go straight to :mod:`hgrn_cupy.ops`, skipping the dispatcher and the custom-op Python layers
    that would compute the same thing (about 25 us a call on an H100 host, more than the launch
    itself costs).  ``is_compiling`` comes first, so dynamo folds the
    test to False and records the operator without looking further."""
    return (not torch.compiler.is_compiling()
            and type(x) is _Tensor and type(g) is _Tensor
            and not (torch.is_grad_enabled() and (x.requires_grad or g.requires_grad or (
                initial_state is not None and initial_state.requires_grad)))
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._get_tracing_state()
            and not _functorch_active())


def _apply(engine, x, g, initial_state, output_final_state, cu_seqlens, reverse):
    if _plain_eager(x, g, initial_state):
        plan, _ = ops._lookup(engine, x, g, initial_state, output_final_state, cu_seqlens, reverse)
        if plan is not None:  # a layout that passed before: its last axes are dense already
            return plan(x, g, initial_state)
        return ops._forward(engine, _last_axis_dense(x), _last_axis_dense(g), initial_state,
                            output_final_state, cu_seqlens, reverse)
    o, ht = _fwd_op(x, g, initial_state, cu_seqlens, output_final_state, reverse, engine)
    return o, (ht if output_final_state else None)


def hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False):
    """Differentiable :func:`hgrn_cupy.hgrn` for torch tensors, on the faster engine for the shape.

    Args:
        x: values ``[B, T, D]``.
        g: forget gates in log space ``[B, T, D]`` (normally ``<= 0``).
        initial_state: ``[N, D]`` state before the first step, or None (zeros).
        output_final_state: also return the state after the last step.
        cu_seqlens: ``[N+1]`` int32/int64 offsets of sequences packed along time (B == 1).
        reverse: run time backwards.

    Returns:
        ``(o, ht)``: o ``[B, T, D]`` in x's dtype; ht ``[N, D]`` in float32 (float64 when x or g
        is float64), or None unless ``output_final_state``.  Gradients flow to x, g and
        initial_state (in their dtypes), from o and from ht.
    """
    return _apply("auto", x, g, initial_state, output_final_state, cu_seqlens, reverse)


def chunk_hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False):
    """:func:`hgrn` on the chunk engine (time scanned in parallel chunks; for long T)."""
    return _apply("chunk", x, g, initial_state, output_final_state, cu_seqlens, reverse)


def fused_recurrent_hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None,
                         reverse=False):
    """:func:`hgrn` on the fused recurrent engine (each thread walks time for one or two channels;
    for many channels, decoding with T = 1 and varlen)."""
    return _apply("fused_recurrent", x, g, initial_state, output_final_state, cu_seqlens, reverse)
