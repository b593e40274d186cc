"""Differentiable HGRN for PyTorch, with flash-linear-attention's signatures.

    from hgrn_cupy.torch import hgrn, chunk_hgrn, fused_recurrent_hgrn
    o, ht = hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False)

Shapes and math as :func:`hgrn_cupy.hgrn`.  CUDA tensors run the kernels on torch's current stream with
outputs from torch's caching allocator (so steps can be captured in CUDA graphs); CPU tensors run the
NumPy reference.  Gradients flow to x, g and initial_state (in their dtypes), from o and from ht.

Two paths compute the same thing:

- eager calls on plain tensors take a ``torch.autograd.Function`` whose forward and backward call
  :mod:`hgrn_cupy.plans` directly (or no Function at all where no gradient is recorded): the host cost of a
  training step is torch's own autograd plus the planned launches;
- everything that must see an operator (``torch.compile``, ``torch.export``, ``opcheck``, functorch
  transforms, dispatch modes, tensor subclasses) gets two ``torch.library`` custom ops with fake
  implementations::

    hgrn_cupy::fwd(x, g, initial_state?, cu_seqlens?, output_final_state, reverse, engine) -> (o, ht)
    hgrn_cupy::bwd(g, o, do, dht?, initial_state?, cu_seqlens?, reverse, engine) -> (dx, dg, dh0)

  Custom ops cannot return None: ``ht`` is an empty ``[0, D]`` tensor without ``output_final_state``
  and ``dh0`` one without an initial state; the wrappers drop them.

The backward is not differentiable (double backward raises).  Importing this module imports torch;
importing :mod:`hgrn_cupy` never does.
"""
import torch

from . import checks, plans

__all__ = ["hgrn", "chunk_hgrn", "fused_recurrent_hgrn", "use_in_fla"]


def _acc_dtype(a, b):
    return torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32


def _last_axis_dense(a):
    """The kernels read channels with stride 1; anything else (an expanded gradient such as the one
    ``o.sum()`` sends back, or a layout a compiler picked) is copied once."""
    if a is not None and a.stride(-1) != 1 and a.dim() == 3 and a.shape[2] > 1:
        return a.contiguous()
    return a


def _forward(engine, x, g, initial_state, output_final_state, cu_seqlens, reverse):
    """``(o, ht, g as the kernels read it)``: plans.forward on x and g as given, or, where the check finds
    a channel axis with a stride (an expanded tensor, a layout a compiler picked), on copies whose channels
    are dense.  Testing strides only on that failure keeps them off the path of every dense call."""
    try:
        o, ht = plans.forward(engine, x, g, initial_state, output_final_state, cu_seqlens, reverse)
    except checks.ChannelStrideError:
        x, g = _last_axis_dense(x), _last_axis_dense(g)
        o, ht = plans.forward(engine, x, g, initial_state, output_final_state, cu_seqlens, reverse)
    return o, ht, g


def _no_double_backward():
    raise RuntimeError("hgrn_cupy: the backward of HGRN is not differentiable (no double backward)")


# ----------------------------------------------------------------------------------------------
# eager: an autograd Function on the planned calls

class _Options:
    """The arguments that take no gradient, as one object: ``Function.apply`` walks its arguments as a
    pytree, and one leaf costs less host time than four."""
    __slots__ = ("cu_seqlens", "final", "reverse", "engine")

    def __init__(self, cu_seqlens, final, reverse, engine):
        self.cu_seqlens, self.final, self.reverse, self.engine = cu_seqlens, final, reverse, engine


class _Eager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, initial_state, opts):
        o, ht, g = _forward(opts.engine, x, g, initial_state, opts.final, opts.cu_seqlens, opts.reverse)
        # o holds every state the backward needs, so x is not kept; g is kept in the form the kernels read
        ctx.save_for_backward(g, o, initial_state)
        ctx.opts = opts
        ctx.set_materialize_grads(False)  # no zero tensors for outputs the loss does not use
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        g, o, initial_state = ctx.saved_tensors
        opts = ctx.opts
        if do is None:  # only the final state reaches the loss
            do = torch.zeros_like(o)
        grads = plans.backward(opts.engine, g, o, _last_axis_dense(do),
                               dht if opts.final else None, initial_state, opts.cu_seqlens, opts.reverse)
        if torch.is_grad_enabled():  # create_graph: differentiating these gradients raises when asked for
            grads = _not_twice(grads)
        return grads + (None,)


def _plain_grads(engine, g, o, do, cu_seqlens, reverse):
    dx, dg, _ = plans.backward(engine, g, o, _last_axis_dense(do), None, None, cu_seqlens, reverse)
    if torch.is_grad_enabled():  # create_graph: differentiating these gradients raises when asked for
        return _not_twice((dx, dg))
    return dx, dg


def _plain(engine, reverse, varlen):
    """The Function of the commonest training call, ``o = hgrn(x, g)`` (with cu_seqlens where ``varlen``):
    no initial state, no final state, the engine and direction fixed per class.  Its apply takes the
    tensors alone and returns one, the least host time torch's autograd allows (the general Function pays
    for a second output and an options leaf; a cu_seqlens slot that holds None, for an argument and a
    saved tensor)."""
    if varlen:
        class Plain(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, g, cu_seqlens):
                o, _, g = _forward(engine, x, g, None, False, cu_seqlens, reverse)
                ctx.save_for_backward(g, o, cu_seqlens)
                return o

            @staticmethod
            def backward(ctx, do):
                g, o, cu_seqlens = ctx.saved_tensors
                return _plain_grads(engine, g, o, do, cu_seqlens, reverse) + (None,)
    else:
        class Plain(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, g):
                o, _, g = _forward(engine, x, g, None, False, None, reverse)
                ctx.save_for_backward(g, o)
                return o

            @staticmethod
            def backward(ctx, do):
                g, o = ctx.saved_tensors
                return _plain_grads(engine, g, o, do, None, reverse)

    Plain.__name__ = Plain.__qualname__ = (f"HgrnPlain_{engine}{'_reverse' if reverse else ''}"
                                           f"{'_varlen' if varlen else ''}")
    return Plain


_PLAIN = {(engine, reverse, varlen): _plain(engine, reverse, varlen)
          for engine in ("auto", "chunk", "fused_recurrent") for reverse in (False, True) for varlen in (False, True)}


def _not_twice(grads):
    """The gradients behind a node that raises when it is differentiated (torch's delayed error)."""
    present = [t for t in grads if t is not None]
    err = torch._C._functions.DelayedError(
        b"hgrn_cupy: the backward of HGRN is not differentiable (no double backward)", len(present))
    marked = iter(err(*[t.detach().requires_grad_() for t in present]))
    return tuple(None if t is None else next(marked) for t in grads)


# ----------------------------------------------------------------------------------------------
# operators: what compilers, exporters and transforms see

@torch.library.custom_op(
    "hgrn_cupy::fwd", mutates_args=(),
    schema="(Tensor x, Tensor g, Tensor? initial_state, Tensor? cu_seqlens, bool output_final_state, "
           "bool reverse, str engine) -> (Tensor, Tensor)")
def _fwd(x, g, initial_state, cu_seqlens, output_final_state, reverse, engine):
    o, ht, _ = _forward(engine, x, g, initial_state, output_final_state, cu_seqlens, reverse)
    if ht is None:
        ht = x.new_empty((0, x.shape[2]), dtype=_acc_dtype(x, g))
    return o, ht


@_fwd.register_fake
def _fwd_fake(x, g, initial_state, cu_seqlens, output_final_state, reverse, engine):
    # the checks of the call the kernels see: channels made dense as _fwd makes them
    call = checks.check_forward(_last_axis_dense(x), _last_axis_dense(g), initial_state, cu_seqlens,
                                output_final_state, reverse, values=False)
    N = call.N if output_final_state else 0
    return x.new_empty(x.shape), x.new_empty((N, call.D), dtype=_acc_dtype(x, g))


@torch.library.custom_op(
    "hgrn_cupy::bwd", mutates_args=(),
    schema="(Tensor g, Tensor o, Tensor do, Tensor? dht, Tensor? initial_state, Tensor? cu_seqlens, "
           "bool reverse, str engine) -> (Tensor, Tensor, Tensor)")
def _bwd(g, o, do, dht, initial_state, cu_seqlens, reverse, engine):
    dx, dg, dh0 = plans.backward(engine, _last_axis_dense(g), _last_axis_dense(o), _last_axis_dense(do), dht,
                                 initial_state, cu_seqlens, reverse)
    if dh0 is None:
        dh0 = o.new_empty((0, o.shape[2]), dtype=_acc_dtype(o, g))
    return dx, dg, dh0


@_bwd.register_fake
def _bwd_fake(g, o, do, dht, initial_state, cu_seqlens, reverse, engine):
    call = checks.check_backward(_last_axis_dense(g), _last_axis_dense(o), _last_axis_dense(do), dht,
                                 initial_state, cu_seqlens, reverse, values=False)
    dh0 = (o.new_empty((0, call.D), dtype=_acc_dtype(o, g)) if initial_state is None
           else initial_state.new_empty(initial_state.shape))
    return o.new_empty(o.shape), g.new_empty(g.shape), dh0


def _setup_context(ctx, inputs, output):
    x, g, initial_state, cu_seqlens, output_final_state, reverse, engine = inputs
    ctx.save_for_backward(g, output[0], initial_state, cu_seqlens)
    ctx.output_final_state, ctx.reverse, ctx.engine = output_final_state, reverse, engine
    ctx.set_materialize_grads(False)


def _backward_by(bwd):
    """The forward operator's backward, computed by ``bwd`` (arguments as ``hgrn_cupy::bwd``)."""
    def backward(ctx, do, dht):
        g, o, initial_state, cu_seqlens = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        dx, dg, dh0 = bwd(g, o, do, dht if ctx.output_final_state else None, initial_state, cu_seqlens,
                          ctx.reverse, ctx.engine)
        return dx, dg, (dh0 if initial_state is not None else None), None, None, None, None
    return backward


_fwd.register_autograd(_backward_by(_bwd), setup_context=_setup_context)
_bwd.register_autograd(lambda ctx, ddx, ddg, ddh0: _no_double_backward(),
                       setup_context=lambda ctx, inputs, output: None)


def _batched(info, in_dims, tensors, run):
    """An operator under ``torch.vmap``: its tensor arguments ``tensors`` (cu_seqlens last) carry the mapped
    dimension at ``in_dims`` (None: shared by every example).  Without cu_seqlens the examples fold into the
    batch, one launch for all (shared arguments are expanded); with it (B == 1 an example) each example is
    a call.  ``run(*tensors)`` -> outputs whose first axis is the batch (or empty)."""
    V = info.batch_size
    if tensors[-1] is not None:
        outs = [run(*(a if d is None else a.select(d, v) for a, d in zip(tensors, in_dims))) for v in range(V)]
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])

    def fold(a, d):
        if a is None:
            return None
        a = a.expand(V, *a.shape) if d is None else a.movedim(d, 0)
        return a.reshape(V * a.shape[1], *a.shape[2:])
    outs = run(*(fold(a, d) for a, d in zip(tensors, in_dims)))
    return tuple(o.reshape(V, o.shape[0] // V, *o.shape[1:]) for o in outs), (0,) * len(outs)


@_fwd.register_vmap
def _fwd_vmap(info, in_dims, x, g, initial_state, cu_seqlens, output_final_state, reverse, engine):
    return _batched(info, in_dims[:4], (x, g, initial_state, cu_seqlens),
                    lambda *t: _fwd_op(*t, output_final_state, reverse, engine))


@_bwd.register_vmap
def _bwd_vmap(info, in_dims, g, o, do, dht, initial_state, cu_seqlens, reverse, engine):
    return _batched(info, in_dims[:6], (g, o, do, dht, initial_state, cu_seqlens),
                    lambda *t: _bwd_op(*t, reverse, engine))


# Under functorch transforms (torch.func.grad, vjp, jacrev, vmap) the operators' own autograd registrations
# fail: the transforms need Functions with setup_context and a vmap rule.  These two wrap the operators as
# such Functions, with the operators' context and backward.

class _TransformableBackward(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(g, o, do, dht, initial_state, cu_seqlens, reverse, engine):
        return _bwd_op(g, o, do, dht, initial_state, cu_seqlens, reverse, engine)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, ddx, ddg, ddh0):
        _no_double_backward()


class _Transformable(torch.autograd.Function):
    generate_vmap_rule = True
    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward_by(_TransformableBackward.apply))

    @staticmethod
    def forward(x, g, initial_state, cu_seqlens, output_final_state, reverse, engine):
        return _fwd_op(x, g, initial_state, cu_seqlens, output_final_state, reverse, engine)


# The OpOverloads: calling them skips CustomOpDef's Python layer.
_fwd_op, _bwd_op = torch.ops.hgrn_cupy.fwd.default, torch.ops.hgrn_cupy.bwd.default


# ----------------------------------------------------------------------------------------------
# routing and the public functions

_Tensor = torch.Tensor
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def apply(engine, x, g, initial_state, output_final_state, cu_seqlens, reverse):
    """The differentiable call behind every function here and behind ``hgrn_cupy.hgrn`` on tensors that
    require grad.  Eager calls take the Functions when nothing needs to see an operator: no compiler or
    tracer, no dispatch mode or functorch transform, plain tensors (``is_compiling`` comes first, so dynamo
    folds the test to False)."""
    if (not torch.compiler.is_compiling()
            and type(x) is _Tensor and type(g) is _Tensor
            and (initial_state is None or type(initial_state) is _Tensor)
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._get_tracing_state()
            and not _functorch_active()):
        if torch.is_grad_enabled() and (x.requires_grad or g.requires_grad or (
                initial_state is not None and initial_state.requires_grad)):
            # the flags are checked by plans.forward, which plans only calls whose flags are bools
            if initial_state is None and output_final_state is False and type(reverse) is bool:
                if cu_seqlens is None:
                    return _PLAIN[engine, reverse, False].apply(x, g), None
                return _PLAIN[engine, reverse, True].apply(x, g, cu_seqlens), None
            return _Eager.apply(x, g, initial_state, _Options(cu_seqlens, output_final_state, reverse, engine))
        return _forward(engine, x, g, initial_state, output_final_state, cu_seqlens, reverse)[:2]
    compiling = torch.compiler.is_compiling()
    if not compiling:
        for a, name in ((x, "x"), (g, "g"), (initial_state, "initial_state"), (cu_seqlens, "cu_seqlens")):
            if a is not None and not isinstance(a, _Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(a).__name__}")
    # the flags are Python values a compiler specializes on: checked (and made plain bools) either way
    output_final_state = checks.flag(output_final_state, "output_final_state")
    reverse = checks.flag(reverse, "reverse")
    if not compiling and _functorch_active():
        o, ht = _Transformable.apply(x, g, initial_state, cu_seqlens, output_final_state, reverse, engine)
    else:
        o, ht = _fwd_op(x, g, initial_state, cu_seqlens, output_final_state, reverse, engine)
    return o, (ht if output_final_state else None)


def hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False):
    """Differentiable :func:`hgrn_cupy.hgrn` for torch tensors, on the engine chosen for the shape.

    Args:
        x: values ``[B, T, D]``.
        g: forget gates in log space ``[B, T, D]`` (normally ``<= 0``).
        initial_state: ``[N, D]`` state before the first step, or None (zeros).
        output_final_state: also return the state after the last step.
        cu_seqlens: ``[N+1]`` int32/int64 offsets of sequences packed along time (B == 1).
        reverse: run time backwards.

    Returns:
        ``(o, ht)``: o ``[B, T, D]`` in x's dtype; ht ``[N, D]`` in float32 (float64 when x or g is
        float64), or None unless ``output_final_state``.
    """
    return apply("auto", x, g, initial_state, output_final_state, cu_seqlens, reverse)


def chunk_hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False):
    """:func:`hgrn` on the chunk engine (time scanned in parallel chunks; for long T)."""
    return apply("chunk", x, g, initial_state, output_final_state, cu_seqlens, reverse)


def fused_recurrent_hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False):
    """:func:`hgrn` on the fused recurrent engine (for many channels, decoding and varlen)."""
    return apply("fused_recurrent", x, g, initial_state, output_final_state, cu_seqlens, reverse)


def use_in_fla(enable=True, engine="auto"):
    """Run flash-linear-attention's HGRN layer (``fla.layers.hgrn.HGRNAttention``, and so fla's HGRN
    models) on these kernels: the layer's ``chunk_hgrn`` and ``fused_recurrent_hgrn`` become this
    module's functions, which take the same arguments.  ``engine="auto"``: both become :func:`hgrn`, the
    engine the device measured fastest for each call (the layer's mode then only says which of fla's
    names it calls); ``engine="named"``: each becomes its namesake (:func:`chunk_hgrn`,
    :func:`fused_recurrent_hgrn`).  ``use_in_fla(False)`` puts fla's own back.  Returns the patched
    module.  Needs fla installed (``ImportError`` otherwise)."""
    import importlib

    if engine not in ("auto", "named"):
        raise ValueError(f'engine must be "auto" or "named", got {engine!r}')
    layer = importlib.import_module("fla.layers.hgrn")
    if not hasattr(layer, "_hgrn_cupy_saved"):
        layer._hgrn_cupy_saved = (layer.chunk_hgrn, layer.fused_recurrent_hgrn)
    if enable:
        layer.chunk_hgrn, layer.fused_recurrent_hgrn = ((hgrn, hgrn) if engine == "auto"
                                                        else (chunk_hgrn, fused_recurrent_hgrn))
    else:
        layer.chunk_hgrn, layer.fused_recurrent_hgrn = layer._hgrn_cupy_saved
    return layer
