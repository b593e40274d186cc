"""JAX bindings: the HGRN recurrence as a differentiable, jit- and vmap-able JAX operation.

    from hgrn_cupy.jax import hgrn, chunk_hgrn, fused_recurrent_hgrn
    o, ht = hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False)

The math, with shapes, is in :mod:`hgrn_cupy.naive`.  Gradients flow to ``x``, ``g`` and
``initial_state`` (and in from both ``o`` and ``ht``) through :func:`jax.custom_vjp`; the backward
reads the saved output ``o``, never ``x``.  ``cu_seqlens`` and ``reverse`` are not differentiable.

Where the work runs is decided when XLA lowers the program (:func:`jax.lax.platform_dependent`):

- CUDA: our kernels run inside the compiled program on XLA's buffers and stream
  (:mod:`hgrn_cupy.xla`).
- anything else (CPU): the NumPy reference through :func:`jax.pure_callback`.

Under ``jax.jit`` the values of ``cu_seqlens`` cannot be checked on the host: a device guard (or, on
the CPU, the callback) checks them, and every output of a call with invalid offsets is NaN.  The
engine is chosen when the program is traced: a decision cached for the device
(:mod:`hgrn_cupy.tuning`), else the built-in rule with an :class:`hgrn_cupy.UntunedWarning`; nothing is
timed under tracing, and these functions trace even when called eagerly.  To store the measured choice
first, call the top-level :func:`hgrn_cupy.hgrn` and :func:`hgrn_cupy.hgrn_backward` once on JAX arrays
of the shape (they run eagerly, through DLPack), or run ``python -m hgrn_cupy tune``.

:func:`jax.vmap` over extra leading axes folds them into the batch (or, with ``cu_seqlens``, into
more packed sequences) and runs one launch.  Forward-mode differentiation (``jax.jvp``) is not
supported, as with any ``custom_vjp`` function.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import arrays as ar
from . import checks, dispatch, xla
from .naive import naive_recurrent_hgrn, naive_recurrent_hgrn_bwd
from .xla import Spec, _acc, _nseq

__all__ = ["hgrn", "chunk_hgrn", "fused_recurrent_hgrn"]


# ----------------------------------------------------------------------------------------------
# validation (once, at the public boundary; the per-example view under vmap)

_INT32 = np.iinfo(np.int32)


def _as_jax(a, name):
    """JAX arrays (and tracers) as they are; NumPy arrays converted as ``jnp.asarray`` converts them (without
    64-bit types, float64 becomes float32), but integers past int32 refused there rather than wrapped;
    anything else refused, as the top level refuses it."""
    if a is None or isinstance(a, jax.Array):
        return a
    if isinstance(a, np.ndarray) and not isinstance(a, np.ma.MaskedArray):
        if (a.dtype.kind in "iu" and a.size and not jax.config.jax_enable_x64
                and (a.min() < _INT32.min or a.max() > _INT32.max)):
            raise ValueError(f"{name} holds values past int32, which JAX without 64-bit types (jax_enable_x64 "
                             f"off) would wrap; enable x64 or pass int32 values")
        return jnp.asarray(a)
    checks.framework(a, name)  # names masked arrays and unsupported types
    raise TypeError(f"{name} must be a JAX or NumPy array, got {type(a).__name__}")


def _check(x, g, h0, cu, output_final_state, reverse):
    """Validate the forward arguments (values of cu_seqlens only where they are concrete); returns
    whether the offsets' values were checked on the host."""
    traced = any(ar.is_jax_tracer(a) for a in (x, g, h0, cu) if a is not None)
    call = checks.check_forward(x, g, h0, cu, output_final_state, reverse, values=not traced)
    return call.values_checked


def _branches(device_fn, host_fn, spec):
    cuda = {"cuda": functools.partial(device_fn, spec)} if xla.buffer_callback() is not None else {}
    return dict(cuda, default=functools.partial(host_fn, spec))


# ----------------------------------------------------------------------------------------------
# any other platform: the NumPy reference on the host

def _bad_offsets(cu, T):
    return cu is not None and not checks.offsets_valid(np.asarray(cu), T)


def _nan(shapes):
    """NaN outputs of these shapes: the result of a call whose offsets are invalid."""
    return tuple(None if s is None else np.full(s.shape, np.nan, dtype=s.dtype) for s in shapes)


def _host_forward(spec, x, g, h0, cu):
    N, D = _nseq(x, cu), x.shape[2]
    acc = _acc(x, g)
    shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype),
              jax.ShapeDtypeStruct((N, D), jnp.dtype(acc)) if spec.output_final_state else None)

    def host(x, g, h0, cu):
        if _bad_offsets(cu, x.shape[1]):
            return _nan(shapes)
        o, ht = naive_recurrent_hgrn(np.asarray(x), np.asarray(g), None if h0 is None else np.asarray(h0),
                                     spec.output_final_state, None if cu is None else np.asarray(cu),
                                     spec.reverse, compute_dtype=acc)
        return o.astype(shapes[0].dtype, copy=False), ht

    return jax.pure_callback(host, shapes, x, g, h0, cu)


def _host_backward(spec, g, o, do, dht, h0, cu):
    N, D = _nseq(o, cu), o.shape[2]
    acc = _acc(o, g)
    shapes = (jax.ShapeDtypeStruct(o.shape, o.dtype), jax.ShapeDtypeStruct(g.shape, g.dtype),
              None if h0 is None else jax.ShapeDtypeStruct((N, D), jnp.dtype(acc)))

    def host(g, o, do, dht, h0, cu):
        if _bad_offsets(cu, o.shape[1]):
            return _nan(shapes)
        opt = lambda a: None if a is None else np.asarray(a)  # noqa: E731
        dx, dg, dh0 = naive_recurrent_hgrn_bwd(np.asarray(g), np.asarray(o), np.asarray(do), opt(dht), opt(h0),
                                               opt(cu), spec.reverse, compute_dtype=acc)
        return (dx.astype(shapes[0].dtype, copy=False), dg.astype(shapes[1].dtype, copy=False),
                None if dh0 is None else dh0.astype(acc, copy=False))

    return jax.pure_callback(host, shapes, g, o, do, dht, h0, cu)


# ----------------------------------------------------------------------------------------------
# one op per direction: platform choice at lowering, vmap folded into the batch

def _fold_batch(axis_size, in_batched, arrays, cu):
    """Broadcast the unbatched arrays to the batch, then merge it into B (dense) or into packed
    sequences (varlen: time becomes V*T and the offsets of copy v are shifted by v*T).

    ``arrays``: {name: (array or None, is [B, T, D] (else [N, D]))}, in argument order, cu last in
    ``in_batched``.  Returns (folded arrays, folded cu)."""
    V = axis_size
    full = {}
    for (k, (a, _)), b in zip(arrays.items(), in_batched):
        full[k] = None if a is None else (a if b else jnp.broadcast_to(a, (V,) + a.shape))
    merge = lambda a: a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])  # noqa: E731
    if cu is None:
        folded = {k: None if a is None else merge(a) for k, a in full.items()}
    else:  # [V, 1, T, D] -> [1, V*T, D]; states [V, N, D] -> [V*N, D]
        folded = {k: None if a is None else (merge(a[:, 0])[None] if arrays[k][1] else merge(a))
                  for k, a in full.items()}
        T = next(full[k] for k, (_, btd) in arrays.items() if btd).shape[2]
        cuv = cu if in_batched[-1] else jnp.broadcast_to(cu, (V,) + cu.shape)
        starts = cuv[:, :-1] + (jnp.arange(V, dtype=cu.dtype) * T)[:, None]
        cu = jnp.concatenate([starts.reshape(-1), jnp.full((1,), V * T, cu.dtype)])
    return folded, cu


def _unfold(a, V, btd, varlen):
    """Split the folded leading axis (or, varlen, the packed time axis) of an output back into V."""
    if a is None:
        return None
    if btd and varlen:
        return a.reshape((V, 1, a.shape[1] // V) + a.shape[2:])
    return a.reshape((V, a.shape[0] // V) + a.shape[1:])


@functools.lru_cache(maxsize=None)
def _forward_op(spec):
    @jax.custom_batching.custom_vmap
    def forward(x, g, h0, cu):
        return lax.platform_dependent(x, g, h0, cu, **_branches(xla.device_forward, _host_forward, spec))

    @forward.def_vmap
    def forward_vmap(axis_size, in_batched, x, g, h0, cu):
        arrays = {"x": (x, True), "g": (g, True), "h0": (h0, False)}
        f, cu_f = _fold_batch(axis_size, in_batched, arrays, cu)
        o, ht = forward(f["x"], f["g"], f["h0"], cu_f)
        out = (_unfold(o, axis_size, True, cu is not None), _unfold(ht, axis_size, False, cu is not None))
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return forward


@functools.lru_cache(maxsize=None)
def _backward_op(spec):
    @jax.custom_batching.custom_vmap
    def backward(g, o, do, dht, h0, cu):
        return lax.platform_dependent(g, o, do, dht, h0, cu, **_branches(xla.device_backward, _host_backward, spec))

    @backward.def_vmap
    def backward_vmap(axis_size, in_batched, g, o, do, dht, h0, cu):
        arrays = {"g": (g, True), "o": (o, True), "do": (do, True), "dht": (dht, False), "h0": (h0, False)}
        f, cu_f = _fold_batch(axis_size, in_batched, arrays, cu)
        res = backward(f["g"], f["o"], f["do"], f["dht"], f["h0"], cu_f)
        varlen = cu is not None
        out = tuple(_unfold(a, axis_size, btd, varlen) for a, btd in zip(res, (True, True, False)))
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return backward


# ----------------------------------------------------------------------------------------------
# differentiation

def _forward(spec, x, g, h0, cu):
    if h0 is not None:
        h0 = h0.astype(_acc(x, g))
    return _forward_op(spec)(x, g, h0, cu)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _hgrn(spec, x, g, h0, cu):
    return _forward(spec, x, g, h0, cu)


def _hgrn_fwd(spec, x, g, h0, cu):
    o, ht = _forward(spec, x, g, h0, cu)
    return (o, ht), (g, o, h0, cu)  # the output holds every state the backward needs; x is not kept


def _hgrn_bwd(spec, res, cts):
    g, o, h0, cu = res
    do, dht = cts
    acc = _acc(o, g)
    do = do.astype(o.dtype)
    dht = None if dht is None else dht.astype(acc)
    h0_acc = None if h0 is None else h0.astype(acc)
    dx, dg, dh0 = _backward_op(spec)(g, o, do, dht, h0_acc, cu)
    return dx, dg, None if dh0 is None else dh0.astype(h0.dtype), None


_hgrn.defvjp(_hgrn_fwd, _hgrn_bwd)
# Compiled even when called eagerly, so that the platform is that of the arguments' device.
_hgrn_jit = jax.jit(_hgrn, static_argnums=(0,))


# ----------------------------------------------------------------------------------------------
# the public functions

def _apply(engine, x, g, initial_state, output_final_state, cu_seqlens, reverse):
    x, g = _as_jax(x, "x"), _as_jax(g, "g")
    h0, cu = _as_jax(initial_state, "initial_state"), _as_jax(cu_seqlens, "cu_seqlens")
    checked = _check(x, g, h0, cu, output_final_state, reverse)
    dispatch.check_engine(engine)
    spec = Spec(engine, bool(output_final_state), bool(reverse), cu is not None and not checked)
    o, ht = _hgrn_jit(spec, x, g, h0, cu)
    return o, ht


def hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False):
    """:func:`hgrn_cupy.hgrn` for JAX arrays, eagerly or inside ``jax.jit`` / ``grad`` / ``vmap``.

    Arguments and results as :func:`hgrn_cupy.hgrn` (``output_final_state`` and ``reverse`` are
    static).  Differentiable in reverse mode in x, g and initial_state, with the final state's
    gradient flowing back; ``jax.vmap`` folds extra leading axes into the batch.  On GPU the kernels
    run inside the compiled program (``jax.experimental.buffer_callback`` on XLA's stream); on CPU
    the NumPy reference runs through ``jax.pure_callback``.  NumPy inputs become JAX arrays as
    ``jnp.asarray`` makes them: without ``jax_enable_x64``, float64 is computed and returned as float32.
    """
    return _apply("auto", x, g, initial_state, output_final_state, cu_seqlens, reverse)


def chunk_hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False):
    """:func:`hgrn` on the chunk engine (on CUDA; elsewhere every engine is the NumPy reference)."""
    return _apply("chunk", x, g, initial_state, output_final_state, cu_seqlens, reverse)


def fused_recurrent_hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False):
    """:func:`hgrn` on the fused recurrent engine (on CUDA; elsewhere the NumPy reference)."""
    return _apply("fused_recurrent", x, g, initial_state, output_final_state, cu_seqlens, reverse)
