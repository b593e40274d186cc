"""Context-parallel HGRN for JAX: a sequence split in time over a named mesh axis, inside ``jax.shard_map``.

    from hgrn_cupy.distributed.jax import hgrn

    @partial(jax.shard_map, mesh=mesh, in_specs=(P(None, "sp"), P(None, "sp"), P()),
             out_specs=(P(None, "sp"), P()))
    def f(x, g, h0):
        return hgrn(x, g, h0, output_final_state=True, axis_name="sp")

Inside the mapped function x, g are this device's slice of time ``[B, T / W, D]`` (the axis' devices in
time order).  The same scheme as :mod:`hgrn_cupy.distributed.torch`: a state-only pass, one
``lax.all_gather`` of the maps, the composition of :mod:`hgrn_cupy.distributed.compose`, the slice run by
:func:`hgrn_cupy.jax.hgrn` from its incoming state; the backward (``jax.custom_vjp``) mirrors it.  jit- and
grad-compatible; the device's position comes from ``lax.axis_index``, so one program serves every device.

- The state passes are jax.numpy on every platform (a log-depth fold over time:
  :func:`hgrn_cupy.states.fold_maps`); the slice's recurrence runs the library's CUDA kernels on GPU
  (through :mod:`hgrn_cupy.jax`) and the NumPy reference elsewhere.
- ``initial_state`` ``[B, D]`` is replicated (``P()``, the same on every device); it enters where the
  recurrence starts (the first device of the axis; the last with ``reverse=True``) and its cotangent is the
  global one, on every device.
- ``ht`` is the global final state, replicated (``out_specs`` ``P()``): one extra ``psum`` of ``B * D``
  numbers makes it so under ``check_vma``.  Its cotangent is the global one: used once, not per device.
- ``check_vma=True`` (shard_map's default) is what is tested.  ``cu_seqlens`` is not supported
  (``ValueError``); the slices are equal in length (shard_map splits evenly).
"""
from __future__ import annotations

import functools
from typing import Hashable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import checks
from .. import jax as _hjax
from ..states import _fold_time
from . import compose

__all__ = ["hgrn"]


class _Spec(NamedTuple):
    output_final_state: bool
    reverse: bool
    axis_name: Hashable
    h0_dtype: str | None  # None: no initial state


def _acc(x, g):
    return jnp.float64 if jnp.float64 in (x.dtype, g.dtype) else jnp.float32


def _states(v, g, reverse, backward):
    """(A, b) of the forward pass over (x, g), or (A, c) of the backward pass over (do, g), in jnp."""
    acc = _acc(v, g)
    a = jnp.exp(g.astype(acc))
    v = v.astype(acc)
    return _fold_time(a, a * v if backward else v, reverse != backward, jnp)


def _varying(a, axis):
    """``a`` typed as varying over ``axis`` (values unchanged).  The callbacks behind :mod:`hgrn_cupy.jax` give
    their results no varying-axes type inside shard_map, although each device's differ; outputs of this
    custom VJP must say so.  JAX never transposes this cast here (the VJP is ours)."""
    cast = getattr(lax, "pcast", None)
    try:
        if cast is not None:
            return cast(a, axis, to="varying")
        return lax.pvary(a, axis) if hasattr(lax, "pvary") else a
    except ValueError:  # already varying
        return a


def _forward(spec, x, g, h0):
    axis = spec.axis_name
    W = lax.axis_size(axis)
    p = compose.position(lax.axis_index(axis), W, spec.reverse)
    first = p == 0
    acc = _acc(x, g)
    A, b = _states(x, g, spec.reverse, False)
    if h0 is not None:
        h0 = h0.astype(acc)
        b = jnp.where(first, compose.fold_initial_state(A, b, h0), b)
    G = compose.logical(lax.all_gather(jnp.stack([A, b]), axis), spec.reverse, jnp)
    s = compose.incoming_state(G[:, 0], G[:, 1], p, jnp)  # zeros at position 0
    if h0 is not None:
        s = jnp.where(first, h0, s)
    o = _varying(_hjax.hgrn(x, g, s, reverse=spec.reverse)[0], axis)
    ht = None
    if spec.output_final_state:  # replicated: the value of one position, the others add zeros
        ht = lax.psum(jnp.where(p == W - 1, compose.final_state(G[:, 0], G[:, 1], jnp), 0.0), axis)
    return (o, ht), (g, o, s)  # not x


def _shift(a, back, fill):
    """``a`` ``[B, T, D]`` moved one step in time: ``out[t] = a[t+1]``, or ``a[t-1]`` where ``back``; ``fill``
    ``[B, D]`` where that falls outside."""
    fill = fill[:, None].astype(a.dtype)
    return jnp.concatenate([fill, a[:, :-1]], 1) if back else jnp.concatenate([a[:, 1:], fill], 1)


def _slice_backward(g, o, s, do, lam, reverse, axis):
    """dx, dg and the incoming state's gradient of one slice (math in :mod:`hgrn_cupy.naive`).  The backward
    recurrence dh[t] = do[t] + exp(g[t+1]) * dh[t+1] from dh = lam past the end is the forward recurrence
    over do, with the gates moved one step (a gate of 0 where lam enters), run the other way."""
    B, T, D = o.shape
    zeros = jnp.zeros((B, D), g.dtype)
    dh = _varying(_hjax.hgrn(do, _shift(g, reverse, zeros), lam, reverse=not reverse)[0], axis)
    a = jnp.exp(g.astype(lam.dtype))
    h_prev = _shift(o, not reverse, s)  # the state each step starts from
    dg = (dh.astype(lam.dtype) * a * h_prev.astype(lam.dtype)).astype(g.dtype)
    k = T - 1 if reverse else 0  # the slice's first step in the recurrence's order
    ds = a[:, k] * dh[:, k].astype(lam.dtype)
    return dh, dg, ds


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _hgrn(spec, x, g, h0):
    return _forward(spec, x, g, h0)[0]


def _hgrn_bwd(spec, res, cts):
    g, o, s = res
    do, dht = cts
    axis = spec.axis_name
    W = lax.axis_size(axis)
    p = compose.position(lax.axis_index(axis), W, spec.reverse)
    A, c = _states(do, g, spec.reverse, True)
    G = compose.logical(lax.all_gather(jnp.stack([A, c]), axis), spec.reverse, jnp)
    lam_end = None if dht is None or not spec.output_final_state else dht.astype(A.dtype)
    lam = compose.outgoing_gradient(G[:, 0], G[:, 1], p, lam_end, jnp)
    dx, dg, ds = _slice_backward(g, o, s, do.astype(o.dtype), lam, spec.reverse, axis)
    dh0 = None
    if spec.h0_dtype is not None:  # the incoming state's gradient is the initial state's at position 0
        dh0 = lax.psum(jnp.where(p == 0, ds, 0.0), axis).astype(spec.h0_dtype)
    return dx, dg, dh0


_hgrn.defvjp(_forward, _hgrn_bwd)


def _check(x, g, h0, output_final_state, cu_seqlens, reverse, axis_name):
    """The front ends' one argument check (``checks.check_forward``, values unread: inside shard_map the
    slices are traced) for JAX or NumPy arrays without cu_seqlens, inside a map over ``axis_name``.
    Returns x, g and the initial state as JAX arrays."""
    if cu_seqlens is not None:
        raise ValueError("cu_seqlens is not supported by the context-parallel hgrn (dense [B, T, D] slices only)")
    for a, name in ((x, "x"), (g, "g"), (h0, "initial_state")):
        if a is not None and not isinstance(a, (jax.Array, np.ndarray)):
            raise TypeError(f"{name} must be a JAX or NumPy array, got {type(a).__name__}")
    x, g = jnp.asarray(x), jnp.asarray(g)
    h0 = None if h0 is None else jnp.asarray(h0)
    checks.check_forward(x, g, h0, None, output_final_state, reverse, values=False)
    try:
        lax.axis_index(axis_name)
    except NameError as e:
        raise ValueError(f"axis_name {axis_name!r} is not a mesh axis here: call hgrn inside jax.shard_map over the "
                         "sequence's axis") from e
    return x, g, h0


def hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, reverse=False, *, axis_name):
    """:func:`hgrn_cupy.jax.hgrn` over a sequence split in time along the mesh axis ``axis_name`` (call it
    inside ``jax.shard_map``).

    Args:
        x, g: this device's slice of time ``[B, T / W, D]``; the axis' devices hold consecutive slices.
        initial_state: ``[B, D]``, replicated; enters where the recurrence starts.
        output_final_state: also return the global final state (replicated).
        cu_seqlens: not supported (``ValueError``).
        reverse: run time backwards (the last device's slice comes first).
        axis_name: the mesh axis along which time is split.

    Returns:
        ``(o, ht)``: this device's output slice in x's dtype; ht ``[B, D]`` in float32 (float64 when x or g
        is float64), or None unless ``output_final_state``.  Differentiable in x, g and initial_state.
    """
    x, g, h0 = _check(x, g, initial_state, output_final_state, cu_seqlens, reverse, axis_name)
    spec = _Spec(bool(output_final_state), bool(reverse), axis_name,
                 None if h0 is None else jnp.dtype(h0.dtype).name)
    return _hgrn(spec, x, g, h0)
