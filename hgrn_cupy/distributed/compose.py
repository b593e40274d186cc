"""Composition of the ranks' affine maps: the math of context parallelism, shared by the front ends.

W ranks hold contiguous slices of time, rank r the r-th.  With ``reverse=True`` time runs backwards, so the
recurrence starts on the last rank: every function here takes the gathered maps in *logical* order
(``logical``), where position p = r, or p = W-1-r with ``reverse``.  A slice acts per channel as an affine
map; ``(A2, b2) o (A1, b1) = (A2*A1, A2*b1 + b2)`` (``hgrn_cupy.naive.compose_affine``).

Forward (``hgrn_cupy.states.forward_states`` gives each rank ``(A, b)``, its map from a zero state)::

    payload   (A, b); at p = 0 with an initial state, (A, A*h0 + b): h0 enters there and nowhere else
    s_p       = (map p-1) o ... o (map 0) applied to 0: the state entering position p (s_0 = h0)
    ht        = (map W-1) o ... o (map 0) applied to 0: the global final state, the same on every rank

Backward (``backward_states`` gives ``(A, c)``, so that a slice's dh0 is ``A * lam + c`` for the gradient
``lam`` reaching its final state)::

    lam_W     = dht (the global final state's gradient; None: 0)
    lam_{p+1} = (bmap p+1) o ... o (bmap W-1) applied to lam_W: the gradient at position p's final state
    dh0       = lam_0, which the slice's own backward returns at position 0

Each rank then runs the slice's existing forward from s_p and backward from (lam_{p+1}, s_p).  Products of
gates may underflow to 0, which is harmless; nothing divides.  A state entering from zero never multiplies
a map's A (A * 0 would turn an overflowed A into NaN where the walk would not).

Every function takes ``xp``, the arrays' namespace (NumPy, ``jax.numpy`` or ``torch``: ``concat``,
``ones_like``, ``zeros_like``, ``flip``, ``where``, ``arange``, ``reshape``), and counts that are Python
ints (torch: slices) or traced JAX integers (masks).
"""
from __future__ import annotations

from ..states import fold_maps

__all__ = ["position", "logical", "fold_initial_state", "incoming_state", "final_state", "outgoing_gradient"]


def position(rank, world, reverse):
    """The logical position of ``rank``: the recurrence meets position 0 first."""
    return world - 1 - rank if reverse else rank


def logical(stacked, reverse, xp):
    """Gathered per-rank arrays ``[W, ...]`` (rank order) in logical order."""
    return xp.flip(stacked, (0,)) if reverse else stacked


def fold_initial_state(A, b, h0):
    """Position 0's payload map with h0 folded in: its b becomes its final state ``A * h0 + b``."""
    return b if h0 is None else A * h0 + b


def _first(A, b, count, xp):
    """The composition of maps ``[:count]`` (in order), as (A, b); None where count is the int 0."""
    if isinstance(count, int):
        if count == 0:
            return None
        return fold_maps(A[:count], b[:count], xp)
    keep = xp.reshape(xp.arange(A.shape[0]) < count, (A.shape[0],) + (1,) * (A.ndim - 1))
    return fold_maps(xp.where(keep, A, 1.0), xp.where(keep, b, 0.0), xp)


def incoming_state(A, b, p, xp):
    """The state entering position ``p`` from the gathered payloads ``A``, ``b`` ``[W, N, D]`` (logical
    order): None at the int position 0 (the slice starts from the initial state, if any); zeros at a traced
    position 0."""
    m = _first(A, b, p, xp)
    return None if m is None else m[1]


def final_state(A, b, xp):
    """The global final state from the gathered payloads (logical order)."""
    return fold_maps(A, b, xp)[1]


def outgoing_gradient(A, c, p, lam_end, xp):
    """The gradient reaching position ``p``'s final state: the successors' backward maps ``(A, c)``
    ``[W, N, D]`` (logical order) applied, last position first, to ``lam_end`` (the global dht, or None for
    0).  None where there is nothing (int position W-1 and no dht)."""
    W = A.shape[0]
    m = _first(xp.flip(A, (0,)), xp.flip(c, (0,)), W - 1 - p, xp)
    if m is None:
        return lam_end
    return m[1] if lam_end is None else m[0] * lam_end + m[1]
