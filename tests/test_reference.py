"""The NumPy reference proven right without trusting itself: a scalar loop, finite differences,
time reversal, splitting into packed sequences and into chunks, and the bfloat16 bit helpers."""

import math

import numpy as np
import pytest
from conftest import TOL, rel_err

from hgrn_cupy.naive import (
    affine_chunk_aggregates,
    bf16_bits_to_float32,
    compose_affine,
    float32_to_bf16_bits,
    naive_recurrent_hgrn,
    naive_recurrent_hgrn_bwd,
)

REVERSE = [pytest.param(False, id="forward"), pytest.param(True, id="reverse")]
WITH_H0 = [pytest.param(False, id="no_h0"), pytest.param(True, id="h0")]


@pytest.fixture
def rng():
    seed = np.random.SeedSequence().entropy
    print(f"rng seed: {seed}")  # shown by pytest on failure, to replay a bad draw
    return np.random.default_rng(seed)


def _inputs(rng, B, T, D, dtype=np.float64):
    x = rng.standard_normal((B, T, D)).astype(dtype)
    g = np.log(rng.uniform(0.3, 1.1, (B, T, D))).astype(dtype)  # mostly forgetting, a few > 0
    return x, g


def _close(actual, expected, dtype_name="float64"):
    """``actual`` within the tolerance of ``dtype_name`` (conftest.TOL) of ``expected`` (broadcast: a scalar
    stands for every element), judged against float64 math on the same rounded inputs."""
    expected = np.broadcast_to(np.asarray(expected, np.float64), np.shape(actual))
    err = rel_err(np.asarray(actual, np.float64), expected)
    assert err <= TOL[dtype_name], f"relative error {err:.3g} > {TOL[dtype_name]} ({dtype_name})"


def _scalar_loop(x, g, h0, reverse):
    """The recurrence one (batch, channel) at a time in plain Python floats (nested lists in)."""
    B, T, D = len(x), len(x[0]), len(x[0][0])
    o = [[[0.0] * D for _ in range(T)] for _ in range(B)]
    ht = [[0.0] * D for _ in range(B)]
    steps = range(T - 1, -1, -1) if reverse else range(T)
    for b in range(B):
        for d in range(D):
            h = 0.0 if h0 is None else float(h0[b][d])
            for t in steps:
                h = math.exp(float(g[b][t][d])) * h + float(x[b][t][d])
                o[b][t][d] = h
            ht[b][d] = h
    return np.array(o), np.array(ht)


@pytest.mark.parametrize("reverse", REVERSE)
@pytest.mark.parametrize("with_h0", WITH_H0)
def test_forward_matches_scalar_loop(rng, with_h0, reverse):
    x, g = _inputs(rng, 2, 7, 3)
    h0 = rng.standard_normal((2, 3)) if with_h0 else None
    o, ht = naive_recurrent_hgrn(x, g, h0, output_final_state=True, reverse=reverse)
    o_ref, ht_ref = _scalar_loop(x.tolist(), g.tolist(), None if h0 is None else h0.tolist(),
                                 reverse)
    _close(o, o_ref)
    _close(ht, ht_ref)


def _loss(x, g, h0, do, dht, cu_seqlens, reverse):
    o, ht = naive_recurrent_hgrn(x, g, h0, True, cu_seqlens, reverse)
    return float(np.sum(o * do) + np.sum(ht * dht))


# Central differences of step 1e-6 in float64 carry about 1e-10 of rounding and O(eps^2) of truncation; the
# bounds leave room for both on these small shapes.
FD_RTOL, FD_ATOL = 1e-6, 1e-8


def _finite_difference(f, a, eps=1e-6):
    grad = np.empty_like(a)
    for i in np.ndindex(a.shape):
        plus, minus = a.copy(), a.copy()
        plus[i] += eps
        minus[i] -= eps
        grad[i] = (f(plus) - f(minus)) / (2 * eps)
    return grad


@pytest.mark.parametrize("reverse", REVERSE)
@pytest.mark.parametrize("cu_seqlens", [pytest.param(None, id="dense"),
                                        pytest.param([0, 2, 2, 3, 9], id="varlen")])
def test_backward_matches_finite_differences(rng, cu_seqlens, reverse):
    B, T, D = (2, 5, 3) if cu_seqlens is None else (1, 9, 3)
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    x, g = _inputs(rng, B, T, D)
    h0 = rng.standard_normal((N, D))
    do = rng.standard_normal((B, T, D))
    dht = rng.standard_normal((N, D))
    args = (do, dht, cu_seqlens, reverse)
    fd_x = _finite_difference(lambda v: _loss(v, g, h0, *args), x)
    fd_g = _finite_difference(lambda v: _loss(x, v, h0, *args), g)
    fd_h0 = _finite_difference(lambda v: _loss(x, g, v, *args), h0)

    o, _ = naive_recurrent_hgrn(x, g, h0, False, cu_seqlens, reverse)
    dx, dg, dh0 = naive_recurrent_hgrn_bwd(g, o, do, dht, h0, cu_seqlens, reverse)
    for analytic, numeric in ((dx, fd_x), (dg, fd_g), (dh0, fd_h0)):
        np.testing.assert_allclose(analytic, numeric, rtol=FD_RTOL, atol=FD_ATOL)


@pytest.mark.parametrize("reverse", REVERSE)
@pytest.mark.parametrize("with_h0", WITH_H0)
def test_varlen_equals_each_sequence_alone(rng, with_h0, reverse):
    cu_seqlens = np.array([0, 0, 1, 4, 4, 9, 10], np.int32)  # lengths 0, 1, 3, 0, 5, 1
    N, T, D = len(cu_seqlens) - 1, 10, 4
    x, g = _inputs(rng, 1, T, D)
    h0 = rng.standard_normal((N, D)) if with_h0 else None
    do = rng.standard_normal((1, T, D))
    dht = rng.standard_normal((N, D))

    o, ht = naive_recurrent_hgrn(x, g, h0, True, cu_seqlens, reverse)
    dx, dg, dh0 = naive_recurrent_hgrn_bwd(g, o, do, dht, h0, cu_seqlens, reverse)
    assert (dh0 is None) == (h0 is None)
    for n in range(N):
        seq = slice(cu_seqlens[n], cu_seqlens[n + 1])
        h0_n = None if h0 is None else h0[n:n + 1]
        o_n, ht_n = naive_recurrent_hgrn(x[:, seq], g[:, seq], h0_n, True, reverse=reverse)
        dx_n, dg_n, dh0_n = naive_recurrent_hgrn_bwd(g[:, seq], o_n, do[:, seq], dht[n:n + 1],
                                                     h0_n, reverse=reverse)
        _close(o[:, seq], o_n)
        _close(ht[n:n + 1], ht_n)
        _close(dx[:, seq], dx_n)
        _close(dg[:, seq], dg_n)
        if h0 is not None:
            _close(dh0[n:n + 1], dh0_n)
    empty = [n for n in range(N) if cu_seqlens[n] == cu_seqlens[n + 1]]
    _close(ht[empty], 0.0 if h0 is None else h0[empty])
    if h0 is not None:
        _close(dh0[empty], dht[empty])


@pytest.mark.parametrize("reverse", REVERSE)
def test_varlen_of_equal_lengths_equals_dense(rng, reverse):
    B, T, D = 3, 4, 2
    x, g = _inputs(rng, B, T, D)
    h0, dht = rng.standard_normal((B, D)), rng.standard_normal((B, D))
    do = rng.standard_normal((B, T, D))
    cu_seqlens = np.arange(B + 1, dtype=np.int64) * T
    packed = [a.reshape(1, B * T, D) for a in (x, g, do)]

    o, ht = naive_recurrent_hgrn(x, g, h0, True, reverse=reverse)
    o_p, ht_p = naive_recurrent_hgrn(packed[0], packed[1], h0, True, cu_seqlens, reverse)
    _close(o_p.reshape(B, T, D), o)
    _close(ht_p, ht)
    grads = naive_recurrent_hgrn_bwd(g, o, do, dht, h0, reverse=reverse)
    grads_p = naive_recurrent_hgrn_bwd(packed[1], o_p, packed[2], dht, h0, cu_seqlens, reverse)
    for dense, varlen in zip(grads, grads_p):
        _close(varlen.reshape(dense.shape), dense)


def test_reverse_equals_flipping_time(rng):
    B, T, D = 2, 6, 3
    x, g = _inputs(rng, B, T, D)
    h0, dht = rng.standard_normal((B, D)), rng.standard_normal((B, D))
    do = rng.standard_normal((B, T, D))
    flip = lambda a: a[:, ::-1]  # noqa: E731

    o_rev, ht_rev = naive_recurrent_hgrn(x, g, h0, True, reverse=True)
    o_flip, ht_flip = naive_recurrent_hgrn(flip(x), flip(g), h0, True)
    _close(o_rev, flip(o_flip))
    _close(ht_rev, ht_flip)

    dx_rev, dg_rev, dh0_rev = naive_recurrent_hgrn_bwd(g, o_rev, do, dht, h0, reverse=True)
    dx_flip, dg_flip, dh0_flip = naive_recurrent_hgrn_bwd(flip(g), o_flip, flip(do), dht, h0)
    _close(dx_rev, flip(dx_flip))
    _close(dg_rev, flip(dg_flip))
    _close(dh0_rev, dh0_flip)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 5, 16])
def test_chunk_composition_equals_sequential_loop(rng, chunk_size):
    B, T, D = 2, 13, 3
    x, g = _inputs(rng, B, T, D)
    h0 = rng.standard_normal((B, D))
    o, ht = naive_recurrent_hgrn(x, g, h0, True)
    A, b = affine_chunk_aggregates(x, g, chunk_size)
    assert A.shape == b.shape == (B, -(-T // chunk_size), D)

    # Left to right, as a sequential carry across chunks: each prefix lands on o at chunk end.
    state = (np.ones((B, D)), h0)
    for c in range(A.shape[1]):
        state = compose_affine((A[:, c], b[:, c]), state)
        _close(state[1], o[:, min((c + 1) * chunk_size, T) - 1])
    _close(state[1], ht)

    # As a balanced tree, as a parallel scan would: associativity gives the same whole.
    pairs = [(A[:, c], b[:, c]) for c in range(A.shape[1])]
    while len(pairs) > 1:
        pairs = [compose_affine(pairs[i + 1], pairs[i]) if i + 1 < len(pairs) else pairs[i]
                 for i in range(0, len(pairs), 2)]
    _close(compose_affine(pairs[0], (np.ones((B, D)), h0))[1], ht)


DTYPE_CASES = [
    pytest.param(np.float32, np.float32, np.float32, id="f32"),
    pytest.param(np.float16, np.float16, np.float16, id="f16"),
    pytest.param(np.float64, np.float64, np.float64, id="f64"),
    pytest.param(np.float16, np.float32, np.float16, id="x_f16-g_f32-h0_f16"),
    pytest.param(np.float32, np.float16, np.float64, id="x_f32-g_f16-h0_f64"),
]


@pytest.mark.parametrize("x_dtype, g_dtype, h0_dtype", DTYPE_CASES)
def test_output_dtypes_and_values(rng, x_dtype, g_dtype, h0_dtype):
    B, T, D = 2, 9, 5
    x, g = _inputs(rng, B, T, D)
    x, g = x.astype(x_dtype), g.astype(g_dtype)
    h0 = rng.standard_normal((B, D)).astype(h0_dtype)
    do = rng.standard_normal((B, T, D)).astype(x_dtype)
    dht = rng.standard_normal((B, D)).astype(np.float32)
    acc = np.float64 if np.float64 in (x_dtype, g_dtype, h0_dtype) else np.float32

    o, ht = naive_recurrent_hgrn(x, g, h0, True)
    dx, dg, dh0 = naive_recurrent_hgrn_bwd(g, o, do, dht, h0)
    assert (o.dtype, ht.dtype) == (x_dtype, acc)
    assert (dx.dtype, dg.dtype, dh0.dtype) == (x_dtype, g_dtype, h0_dtype)

    up = lambda a: a.astype(np.float64)  # noqa: E731
    o64, ht64 = naive_recurrent_hgrn(up(x), up(g), up(h0), True)
    grads64 = naive_recurrent_hgrn_bwd(up(g), up(o), up(do), up(dht), up(h0))
    _close(o, o64, np.dtype(x_dtype).name)
    _close(ht, ht64, np.dtype(acc).name)
    for grad, grad64 in zip((dx, dg, dh0), grads64):
        _close(grad, grad64, np.dtype(grad.dtype).name)


def test_compute_dtype_float64_overrides_float32_inputs(rng):
    x, g = _inputs(rng, 1, 4, 2, np.float32)
    o, ht = naive_recurrent_hgrn(x, g, output_final_state=True, compute_dtype=np.float64)
    assert (o.dtype, ht.dtype) == (np.float32, np.float64)
    _, ht32 = naive_recurrent_hgrn(x, g, output_final_state=True, compute_dtype=np.float32)
    assert ht32.dtype == np.float32
    _, ht64 = naive_recurrent_hgrn(x.astype(np.float64), g.astype(np.float64), None, True,
                                   compute_dtype=np.float32)
    assert ht64.dtype == np.float32


def test_bfloat16_via_ml_dtypes(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    B, T, D = 2, 7, 4
    x, g = _inputs(rng, B, T, D)
    x, g = x.astype(bf16), g.astype(bf16)
    h0 = rng.standard_normal((B, D)).astype(bf16)
    do = rng.standard_normal((B, T, D)).astype(bf16)

    o, ht = naive_recurrent_hgrn(x, g, h0, True)
    dx, dg, dh0 = naive_recurrent_hgrn_bwd(g, o, do, None, h0)
    assert (o.dtype, ht.dtype, dx.dtype, dg.dtype, dh0.dtype) == (bf16, np.float32, bf16, bf16, bf16)

    up = lambda a: a.astype(np.float64)  # noqa: E731
    o64, ht64 = naive_recurrent_hgrn(up(x), up(g), up(h0), True)
    _close(o, o64, "bfloat16")
    _close(ht, ht64, "float32")
    for grad, grad64 in zip((dx, dg, dh0), naive_recurrent_hgrn_bwd(up(g), up(o), up(do), None,
                                                                    up(h0))):
        _close(grad, grad64, "bfloat16")

    # The bit helpers agree with ml_dtypes' own rounding on values that exercise every bit.
    f = rng.standard_normal(4096).astype(np.float32) * np.float32(2.0) ** rng.integers(-130, 120, 4096)
    np.testing.assert_array_equal(float32_to_bf16_bits(f), f.astype(bf16).view(np.uint16))


# float32 bits -> the bfloat16 bits of round-to-nearest-even, one case a line: id, float32 hex, bfloat16 hex.
ROUNDING = """
one_exact 3F800000 3F80;  below_half_rounds_down 3F807FFF 3F80;  tie_to_even_down 3F808000 3F80
tie_to_even_up 3F818000 3F82;  above_half_rounds_up 3F808001 3F81;  negative_rounds_magnitude BF80FFFF BF81
carry_into_exponent 3FFFFFFF 4000;  max_float_rounds_to_inf 7F7FFFFF 7F80;  subnormal_tie_up 00018000 0002
negative_zero 80000000 8000;  inf 7F800000 7F80;  minus_inf FF800000 FF80;  quiet_nan 7FC00000 7FC0
"""


def _rounding_cases():
    cases = (c.split() for line in ROUNDING.strip().splitlines() for c in line.split(";"))
    return [pytest.param(int(f, 16), int(b, 16), id=name) for name, f, b in cases]


@pytest.mark.parametrize("f32_bits, bf16_bits", _rounding_cases())
def test_float32_to_bf16_bits_rounds_to_nearest_even(f32_bits, bf16_bits):
    f = np.array([f32_bits], np.uint32).view(np.float32)
    assert float32_to_bf16_bits(f)[0] == bf16_bits


@pytest.mark.parametrize("f32_bits", [0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7FFFFFFF],
                         ids=["snan_low_payload", "neg_snan", "snan_high_payload", "max_nan"])
def test_float32_to_bf16_bits_nan_stays_nan(f32_bits):
    f = np.array([f32_bits], np.uint32).view(np.float32)
    bits = float32_to_bf16_bits(f)
    assert bits.dtype == np.uint16
    assert np.isnan(bf16_bits_to_float32(bits))[0]
    assert bits[0] & 0x0040  # quiet
    assert (bits[0] >> 15) == (f32_bits >> 31)  # sign kept


def test_bf16_bits_round_trip_every_pattern():
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    f = bf16_bits_to_float32(every)
    assert f.dtype == np.float32
    np.testing.assert_array_equal(f.view(np.uint32), every.astype(np.uint32) << 16)
    back = float32_to_bf16_bits(f)
    nan = np.isnan(f)
    np.testing.assert_array_equal(back[~nan], every[~nan])
    assert np.isnan(bf16_bits_to_float32(back[nan])).all()


@pytest.mark.parametrize("reverse", REVERSE)
def test_gate_minus_inf_restarts_from_x(rng, reverse):
    B, T, D, t0 = 2, 8, 3, 3
    x, g = _inputs(rng, B, T, D)
    h0 = rng.standard_normal((B, D))
    do = rng.standard_normal((B, T, D))
    g_all = np.full_like(g, -np.inf)
    o, ht = naive_recurrent_hgrn(x, g_all, h0, True, reverse=reverse)
    np.testing.assert_array_equal(o, x)
    np.testing.assert_array_equal(ht, x[:, 0 if reverse else -1])
    dx, dg, dh0 = naive_recurrent_hgrn_bwd(g_all, o, do, None, h0, reverse=reverse)
    np.testing.assert_array_equal(dx, do)
    np.testing.assert_array_equal(dg, np.zeros_like(dg))
    np.testing.assert_array_equal(dh0, np.zeros_like(dh0))

    # One -inf gate at t0 cuts the sequence: from t0 on (toward the end the scan runs to), the
    # output is that of a fresh run with no initial state.
    g_cut = g.copy()
    g_cut[:, t0] = -np.inf
    o, ht = naive_recurrent_hgrn(x, g_cut, h0, True, reverse=reverse)
    dx, dg, dh0 = naive_recurrent_hgrn_bwd(g_cut, o, do, None, h0, reverse=reverse)
    for grad in (o, ht, dx, dg, dh0):
        assert np.isfinite(grad).all()
    after = slice(0, t0 + 1) if reverse else slice(t0, T)
    o_fresh, ht_fresh = naive_recurrent_hgrn(x[:, after], g_cut[:, after], None, True,
                                             reverse=reverse)
    _close(o[:, after], o_fresh)
    _close(ht, ht_fresh)
    _close(dg[:, t0], 0.0)
    # Gradients reaching h0 stop at the cut too: only the steps before it (in scan order) count.
    before = slice(t0 + 1, T) if reverse else slice(0, t0)
    o_pre, _ = naive_recurrent_hgrn(x[:, before], g_cut[:, before], h0, reverse=reverse)
    _, _, dh0_pre = naive_recurrent_hgrn_bwd(g_cut[:, before], o_pre, do[:, before], None, h0,
                                             reverse=reverse)
    _close(dh0, dh0_pre)


@pytest.mark.parametrize("reverse", REVERSE)
def test_gate_zero_gives_cumsum(rng, reverse):
    B, T, D = 2, 6, 3
    x = rng.standard_normal((B, T, D))
    h0, dht = rng.standard_normal((B, D)), rng.standard_normal((B, D))
    do = rng.standard_normal((B, T, D))
    zero = np.zeros_like(x)
    flip = (lambda a: a[:, ::-1]) if reverse else (lambda a: a)  # noqa: E731
    o, ht = naive_recurrent_hgrn(x, zero, h0, True, reverse=reverse)
    _close(o, flip(h0[:, None] + np.cumsum(flip(x), axis=1)))
    _close(ht, h0 + x.sum(axis=1))
    dx, dg, dh0 = naive_recurrent_hgrn_bwd(zero, o, do, dht, h0, reverse=reverse)
    dh = flip(dht[:, None] + np.cumsum(flip(do)[:, ::-1], axis=1)[:, ::-1])
    _close(dx, dh)
    _close(dh0, dh[:, -1 if reverse else 0])
    h_prev = flip(np.concatenate([h0[:, None], flip(o)[:, :-1]], axis=1))
    _close(dg, dh * h_prev)


@pytest.mark.parametrize("cu_seqlens", [pytest.param(None, id="dense"),
                                        pytest.param(np.array([0, 3, 3, 8]), id="varlen")])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: d.__name__)
def test_inputs_are_not_modified(rng, dtype, cu_seqlens):
    B, T, D = (2, 8, 3) if cu_seqlens is None else (1, 8, 3)
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    x, g = _inputs(rng, B, T, D, dtype)
    # Strided views, so that no path can quietly hand back (or write into) the caller's memory.
    x, g = np.repeat(x, 2, axis=1)[:, ::2], np.repeat(g, 2, axis=1)[:, ::2]
    h0 = rng.standard_normal((N, D)).astype(dtype)
    do = rng.standard_normal((B, T, D)).astype(dtype)
    dht = rng.standard_normal((N, D)).astype(dtype)
    for reverse in (False, True):
        inputs = (x, g, h0, do, dht, cu_seqlens)
        saved = [None if a is None else a.copy() for a in inputs]
        o, ht = naive_recurrent_hgrn(x, g, h0, True, cu_seqlens, reverse)
        o_saved = o.copy()
        grads = naive_recurrent_hgrn_bwd(g, o, do, dht, h0, cu_seqlens, reverse)
        for a, before in zip(inputs + (o,), saved + [o_saved]):
            if a is not None:
                np.testing.assert_array_equal(a, before)
        for out in (o, ht) + grads:
            for a in (x, g, h0, do, dht):
                assert not np.shares_memory(out, a)
