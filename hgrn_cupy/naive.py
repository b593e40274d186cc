"""NumPy reference for the HGRN recurrence: the one place where the math lives.

Shapes: ``x``, ``g`` are ``[B, T, D]``; states (``initial_state`` = h0, ``ht``, ``dht``, ``dh0``)
are ``[N, D]`` with ``N = B``, or ``N = len(cu_seqlens) - 1`` for packed sequences.
``g`` is the forget gate in log space (normally ``g <= 0``; ``g = -inf`` forgets everything).

Forward::

    h[-1] = h0                          (zeros when initial_state is None)
    h[t]  = exp(g[t]) * h[t-1] + x[t]
    o[t]  = h[t]                        [B, T, D], x's dtype
    ht    = h[T-1]                      [N, D], float32 (float64 when computing in float64)

Backward, from ``do = dL/do`` and optionally ``dht = dL/dht``::

    dh[T-1] = do[T-1] + dht
    dh[t]   = do[t] + exp(g[t+1]) * dh[t+1]
    dx[t]   = dh[t]                               o's dtype
    dg[t]   = dh[t] * exp(g[t]) * h[t-1]          g's dtype; h[t-1] = o[t-1], h[-1] = h0 (or 0)
    dh0     = exp(g[0]) * dh[0]                   initial_state's dtype (None without one)

``reverse=True`` mirrors time: ``h[t] = exp(g[t]) * h[t+1] + x[t]`` with ``h[T] = h0``, ``ht = h[0]``,
and the backward is mirrored likewise.

``cu_seqlens`` (``[N+1]`` ints, 0 = c[0] <= ... <= c[N] = T, with ``B == 1``) packs N independent
sequences along time: sequence n is ``x[0, c[n]:c[n+1]]``, starts from ``h0[n]`` and yields ``ht[n]``.
An empty sequence is legal: its ht is its h0 (or 0) and its dh0 is its dht (or 0).

Accumulation is float64 when ``compute_dtype`` is float64, or when it is None and any floating input
is float64; otherwise float32. Inputs may be float16, float32, float64 or ``ml_dtypes.bfloat16``;
raw bfloat16 bits held in uint16 go through ``bf16_bits_to_float32`` / ``float32_to_bf16_bits`` first.

The time loop multiplies by ``exp(g)`` step by step and never forms ``exp(-cumsum(g))``, which
overflows. The affine pair ``(A, b)`` of a stretch of time (``h_end = A * h_start + b``) composes
associatively, ``(A2, b2) o (A1, b1) = (A2*A1, A2*b1 + b2)``; ``affine_chunk_aggregates`` and
``compose_affine`` spell that out so tests can check that splitting time reproduces the loop.

Nothing here validates arguments (the public boundary does) and nothing modifies its inputs.
"""

import numpy as np

__all__ = [
    "naive_recurrent_hgrn",
    "naive_recurrent_hgrn_bwd",
    "affine_chunk_aggregates",
    "compose_affine",
    "bf16_bits_to_float32",
    "float32_to_bf16_bits",
]


def _compute_dtype(arrays, compute_dtype):
    if compute_dtype is not None:
        return np.dtype(np.float64 if np.dtype(compute_dtype) == np.float64 else np.float32)
    if any(a is not None and np.dtype(a.dtype) == np.float64 for a in arrays):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def _to(a, dtype):
    # astype copies, so the caller's array is never written; ml_dtypes.bfloat16 converts exactly.
    return np.asarray(a).astype(dtype)


def _segments(arrays, cu_seqlens, reverse):
    """Yield (state index, time-major views of `arrays` ([B, T, D] each)), one per independent run.

    Dense: one run, views [T, B, D], state index selects all N = B rows.
    Varlen: one run per sequence, views [L, D], state index n. Views write through to the arrays.
    """
    step = -1 if reverse else 1
    if cu_seqlens is None:
        yield slice(None), [a.swapaxes(0, 1)[::step] for a in arrays]
        return
    bounds = np.asarray(cu_seqlens).astype(np.int64)
    for n in range(len(bounds) - 1):
        bos, eos = int(bounds[n]), int(bounds[n + 1])
        yield n, [a[0, bos:eos][::step] for a in arrays]


def naive_recurrent_hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None,
                         reverse=False, *, compute_dtype=None):
    """Forward recurrence (math in the module docstring).

    x, g: [B, T, D]; initial_state: [N, D]; cu_seqlens: [N+1] ints (then B == 1).
    Returns (o [B, T, D] in x's dtype, ht [N, D] in the compute dtype, or None).
    """
    cd = _compute_dtype((x, g, initial_state), compute_dtype)
    B, T, D = x.shape
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    xc, gc = _to(x, cd), _to(g, cd)
    h0 = np.zeros((N, D), cd) if initial_state is None else _to(initial_state, cd)
    o = np.empty((B, T, D), cd)
    ht = np.empty((N, D), cd)
    for s, (xs, gs, os_) in _segments((xc, gc, o), cu_seqlens, reverse):
        a = np.exp(gs)  # exp(-inf) = 0 and 0 * finite h = 0: a gate of -inf restarts cleanly
        h = h0[s]
        for t in range(xs.shape[0]):
            h = a[t] * h + xs[t]
            os_[t] = h
        ht[s] = h
    return o.astype(x.dtype), (ht if output_final_state else None)


def naive_recurrent_hgrn_bwd(g, o, do, dht=None, initial_state=None, cu_seqlens=None,
                             reverse=False, *, compute_dtype=None):
    """Backward recurrence (math in the module docstring); h[t] is read back from the saved o.

    g, o, do: [B, T, D]; dht, initial_state: [N, D]; cu_seqlens: [N+1] ints (then B == 1).
    Returns (dx in o's dtype, dg in g's dtype, dh0 in initial_state's dtype or None).
    """
    cd = _compute_dtype((g, o, do, dht, initial_state), compute_dtype)
    B, T, D = g.shape
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    gc, oc, doc = _to(g, cd), _to(o, cd), _to(do, cd)
    dhtc = np.zeros((N, D), cd) if dht is None else _to(dht, cd)
    h0 = np.zeros((N, D), cd) if initial_state is None else _to(initial_state, cd)
    dx = np.empty((B, T, D), cd)
    dg = np.empty((B, T, D), cd)
    dh0 = np.empty((N, D), cd)
    for s, (gs, os_, dos, dxs, dgs) in _segments((gc, oc, doc, dx, dg), cu_seqlens, reverse):
        a = np.exp(gs)
        carry = dhtc[s]  # exp(g[t+1]) * dh[t+1], and dht before the last step
        for t in range(gs.shape[0] - 1, -1, -1):
            dh = dos[t] + carry
            dxs[t] = dh
            carry = a[t] * dh
            dgs[t] = carry * (os_[t - 1] if t > 0 else h0[s])
        dh0[s] = carry
    return (dx.astype(o.dtype), dg.astype(g.dtype),
            None if initial_state is None else dh0.astype(initial_state.dtype))


def affine_chunk_aggregates(x, g, chunk_size, *, compute_dtype=None):
    """Per-chunk affine pairs of the forward recurrence, each chunk started from h = 0.

    x, g: [B, T, D]. Returns (A, b), each [B, ceil(T / chunk_size), D] in the compute dtype, where
    A = prod exp(g) over the chunk and b = h at the chunk's last step, so h_end = A * h_start + b.
    The last chunk may be short.
    """
    cd = _compute_dtype((x, g), compute_dtype)
    B, T, D = x.shape
    nchunks = -(-T // chunk_size)
    xc, gc = _to(x, cd), _to(g, cd)
    A = np.empty((B, nchunks, D), cd)
    b = np.empty((B, nchunks, D), cd)
    for c in range(nchunks):
        Ac, bc = np.ones((B, D), cd), np.zeros((B, D), cd)
        for t in range(c * chunk_size, min((c + 1) * chunk_size, T)):
            a = np.exp(gc[:, t])
            Ac, bc = a * Ac, a * bc + xc[:, t]
        A[:, c], b[:, c] = Ac, bc
    return A, b


def compose_affine(later, earlier):
    """(A2, b2) o (A1, b1) = (A2*A1, A2*b1 + b2): apply `earlier`, then `later`. Associative."""
    A2, b2 = later
    A1, b1 = earlier
    return A2 * A1, A2 * b1 + b2


def bf16_bits_to_float32(u16):
    """Raw bfloat16 bits (uint16) -> float32, exactly."""
    return (np.asarray(u16, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(f32):
    """float32 -> raw bfloat16 bits (uint16), round to nearest even; NaN stays NaN (made quiet)."""
    u = np.ascontiguousarray(f32, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # overflow past the max finite value gives inf
    quiet_nan = (u >> 16) | 0x0040  # keep sign and payload top bits; never truncate a NaN into inf
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(is_nan, quiet_nan, rounded).astype(np.uint16)
