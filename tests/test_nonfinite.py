"""Non-finite values: the policy, on the CPU (NumPy front end) and on the GPU (CuPy, both engines).

- NaN in x or g at step t of a channel makes o NaN from t to the end of that sequence (the start, with
  reverse) in that channel, and that sequence's ht in that channel; every other element is exactly what
  the same call gives without the NaN.
- g = -inf at step t forgets the state: o[t] == x[t] exactly, and the recurrence goes on from there
  (the reference computes exp(-inf) = 0); the backward stays finite and matches the reference.
- g > 0 is allowed (growth): the results match the reference wherever the reference is finite, for gates
  whose product over any 128 steps stays inside float32 (the chunk engine composes that many; past it a
  later state may be inf or NaN while the exact one is finite: docs/design.md).
- +inf in x at step t gives +inf or NaN only from t on (in the time direction), in that channel.
- 16-bit inputs accumulate in float32: with T = 100000 and g close to 0 the results stay finite and
  within the 16-bit tolerances (GPU only).
- Backward: NaN in do at step t reaches dx and dg only at steps <= t (>= t with reverse) of that sequence
  and channel, and that sequence's dh0 in that channel.

Inputs are drawn from fixed seeds (in the test ids), x standard normal, g = log(sigmoid(normal)).
"""
import numpy as np
import pytest
from conftest import TOL, rel_err

import hgrn_cupy as hc

ml_dtypes = pytest.importorskip("ml_dtypes")

NP_DTYPE = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "float64": np.dtype(np.float64),
            "bfloat16": np.dtype(ml_dtypes.bfloat16)}
FORWARD = {"auto": hc.hgrn, "chunk": hc.chunk_hgrn, "fused_recurrent": hc.fused_recurrent_hgrn}

# (B, T, D, cu_seqlens): dense, and varlen with empty sequences; T long enough for several chunks on the
# GPU; D odd for the scalar paths, 64 for the vector ones.
SHAPES = {
    "cpu": {"dense": (2, 200, 5, None), "varlen": (1, 200, 5, (0, 0, 70, 70, 160, 200))},
    "gpu": {"dense": (2, 3000, 37, None), "varlen": (1, 3000, 64, (0, 0, 1100, 1100, 2600, 3000)),
            "dense64": (3, 2100, 64, None)},
}


class Front:
    """A front end: host NumPy arrays of a dtype in, host NumPy arrays (their dtype) out."""

    def __init__(self, name, engine, gpu):
        self.name, self.engine, self.gpu = name, engine, gpu

    def dev(self, a):
        if a is None or not self.gpu:
            return a
        import cupy

        if a.dtype == NP_DTYPE["bfloat16"]:
            return cupy.asarray(a.view(np.uint16)).view(ml_dtypes.bfloat16)
        return cupy.asarray(a)

    def host(self, a):
        if a is None or not self.gpu:
            return a
        import cupy

        if a.dtype == NP_DTYPE["bfloat16"]:
            return cupy.ascontiguousarray(a.view(cupy.uint16)).get().view(ml_dtypes.bfloat16)
        return a.get()

    def forward(self, x, g, h0=None, cu=None, reverse=False):
        d = self.dev
        o, ht = FORWARD[self.engine](d(x), d(g), d(h0), True, d(cu), reverse)
        return self.host(o), self.host(ht)

    def backward(self, g, o, do, dht=None, h0=None, cu=None, reverse=False):
        d = self.dev
        res = hc.hgrn_backward(d(g), d(o), d(do), d(dht), d(h0), d(cu), reverse, engine=self.engine)
        return tuple(self.host(r) for r in res)


FRONTS = [
    pytest.param(Front("numpy", "auto", False), id="numpy"),
    pytest.param(Front("cupy", "chunk", True), id="cupy-chunk", marks=pytest.mark.gpu),
    pytest.param(Front("cupy", "fused_recurrent", True), id="cupy-fused_recurrent", marks=pytest.mark.gpu),
]


def fronts_and_shapes(dtypes_gpu=("float32", "bfloat16")):
    """(front, shape name, dtype) combinations: the CPU ones with float32, the GPU ones with ``dtypes_gpu``."""
    out = []
    for fp in FRONTS:
        front = fp.values[0]
        kind = "gpu" if front.gpu else "cpu"
        for shape in SHAPES[kind]:
            for dtype in (dtypes_gpu if front.gpu else ("float32",)):
                out.append(pytest.param(front, shape, dtype, id=f"{fp.id}-{shape}-{dtype}", marks=fp.marks))
    return out


@pytest.fixture(autouse=True)
def _needs_cupy(request):
    spec = getattr(request.node, "callspec", None)
    front = spec.params.get("front") if spec is not None else None
    if front is not None and front.gpu:
        pytest.importorskip("cupy")


def log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


def inputs(seed, shape_kind, front, dtype):
    """x, g, h0 (fresh host arrays, in dtype; h0 float32) and cu (int32) for one of the front end's SHAPES,
    and a generator seeded ``seed + 1`` for what the test draws next."""
    B, T, D, cu = SHAPES["gpu" if front.gpu else "cpu"][shape_kind]
    rng = np.random.default_rng(seed)
    N = B if cu is None else len(cu) - 1
    x = rng.standard_normal((B, T, D)).astype(NP_DTYPE[dtype])
    g = log_sigmoid(rng.standard_normal((B, T, D))).astype(NP_DTYPE[dtype])
    h0 = rng.standard_normal((N, D)).astype(np.float32)
    return x, g, h0, (None if cu is None else np.asarray(cu, np.int32)), np.random.default_rng(seed + 1)


def segments(B, T, cu):
    """(batch row, start, end, state row) of every sequence."""
    if cu is None:
        return [(b, 0, T, b) for b in range(B)]
    return [(0, int(cu[n]), int(cu[n + 1]), n) for n in range(len(cu) - 1)]


def pick(B, T, cu, frac):
    """A (b, t, state row, start, end) at about ``frac`` of a non-empty sequence (the last one that is)."""
    segs = [s for s in segments(B, T, cu) if s[2] > s[1]]
    b, start, end, n = segs[-1] if cu is not None else segs[min(1, len(segs) - 1)]
    t = start + int(frac * (end - start - 1))
    return b, t, n, start, end


def after_mask(shape, b, t, c, start, end, reverse):
    """Steps from t to the end of the sequence in the time direction (to its start with reverse)."""
    m = np.zeros(shape, bool)
    if reverse:
        m[b, start:t + 1, c] = True
    else:
        m[b, t:end, c] = True
    return m


# Within this many steps of a poisoned step the product of the gates since it cannot underflow (inputs'
# gates are logsigmoid of standard normals), so every engine carries the NaN or inf there.  Further on,
# where that product has reached exactly zero, the chunk engine treats it as forgetting (its look-back
# stops at a chunk whose gates multiply to 0), so a step may be NaN or the clean value.
NEAR = 16


def near_mask(m, t, reverse, against_time=False):
    """The part of ``m`` (a mask from ``after_mask``) within NEAR steps of t."""
    out = np.zeros_like(m)
    lo, hi = (t - NEAR + 1, t + 1) if reverse != against_time else (t, t + NEAR)
    out[:, max(lo, 0):hi, :] = m[:, max(lo, 0):hi, :]
    return out


def nan_or_same(a, clean):
    """Each element NaN, or bitwise the clean value."""
    a, clean = f64(a), f64(clean)
    return bool(np.all(np.isnan(a) | (a == clean) | (np.isnan(clean) & np.isnan(a))))


def f64(a):
    return np.asarray(a).astype(np.float64)


def same(a, b):
    """Bitwise-equal values (float64 copies are exact for every supported dtype); NaN equals NaN."""
    return np.array_equal(f64(a), f64(b), equal_nan=True)


REVERSE = [pytest.param(False, id="forward"), pytest.param(True, id="reverse")]


# ----------------------------------------------------------------------------------------------
# NaN and +inf in the inputs of the forward


@pytest.mark.parametrize("reverse", REVERSE)
@pytest.mark.parametrize("where, value", [("x", np.nan), ("g", np.nan), ("x", np.inf)],
                         ids=["nan_x", "nan_g", "inf_x"])
@pytest.mark.parametrize("frac", [0.0, 0.4, 1.0], ids=["first", "middle", "last"])
@pytest.mark.parametrize("front, shape, dtype", fronts_and_shapes())
def test_forward_poisoned_input_stays_in_its_channel(front, shape, dtype, frac, where, value, reverse):
    seed = 101
    x, g, h0, cu, rng = inputs(seed, shape, front, dtype)
    B, T, D = x.shape
    b, t, n, start, end = pick(B, T, cu, frac)
    c = D // 2
    o_clean, ht_clean = front.forward(x, g, h0, cu, reverse)
    bad = {"x": x.copy(), "g": g.copy()}
    bad[where][b, t, c] = value
    o, ht = front.forward(bad["x"], bad["g"], h0, cu, reverse)

    m = after_mask(o.shape, b, t, c, start, end, reverse)
    near = near_mask(m, t, reverse)
    ctx = f"seed {seed}, {where}[{b}, {t}, {c}] = {value}, sequence [{start}, {end}), reverse={reverse}"
    if np.isnan(value):
        assert np.isnan(f64(o[near])).all(), f"o is not NaN right after the poisoned step; {ctx}"
    else:
        assert not np.isfinite(f64(o[near])).any(), f"o is finite right after the +inf step; {ctx}"
        assert f64(o[b, t, c]) == np.inf, f"o at the +inf step is {o[b, t, c]}; {ctx}"
    far = m & ~near
    assert nan_or_same(np.where(np.isinf(f64(o[far])), np.nan, f64(o[far])), o_clean[far]), \
        f"o further on is neither non-finite nor the clean value; {ctx}"
    assert nan_or_same(np.where(np.isinf(f64(ht[n, c])), np.nan, f64(ht[n, c])), ht_clean[n, c]), \
        f"ht[{n}, {c}] is neither non-finite nor the clean value; {ctx}"
    assert same(o[~m], o_clean[~m]), f"o changed outside the poisoned channel's remaining steps; {ctx}"
    hm = np.zeros(ht.shape, bool)
    hm[n, c] = True
    assert same(ht[~hm], ht_clean[~hm]), f"ht changed outside [{n}, {c}]; {ctx}"


# ----------------------------------------------------------------------------------------------
# g = -inf: the state is forgotten


def reference(x, g, h0, cu, reverse, do=None, dht=None):
    cu64 = None if cu is None else cu.astype(np.int64)
    o, ht = hc.naive_recurrent_hgrn(f64(x), f64(g), h0, True, cu64, reverse)
    if do is None:
        return o, ht
    return hc.naive_recurrent_hgrn_bwd(f64(g), o, f64(do), dht, h0, cu64, reverse)


@pytest.mark.usefixtures("poison")  # outputs checked finite: an unwritten (NaN) element fails
@pytest.mark.parametrize("reverse", REVERSE)
@pytest.mark.parametrize("front, shape, dtype", fronts_and_shapes())
def test_minus_inf_gate_resets(front, shape, dtype, reverse):
    seed = 202
    x, g, h0, cu, rng = inputs(seed, shape, front, dtype)
    B, T, D = x.shape
    resets = rng.random(g.shape) < 0.02
    for b, start, end, _ in segments(B, T, cu):  # also at every sequence's first and last step, channel 0
        if end > start:
            resets[b, start, 0] = resets[b, end - 1, 0] = True
    resets[:, :, D - 1] = True  # a channel that forgets at every step: o == x
    g[resets] = -np.inf
    o, ht = front.forward(x, g, h0, cu, reverse)
    ctx = f"seed {seed}, reverse={reverse}"
    assert same(o[resets], x[resets]), f"o != x where g = -inf; {ctx}"
    assert same(o[:, :, D - 1], x[:, :, D - 1]), f"the channel with g = -inf everywhere is not x; {ctx}"
    o_ref, ht_ref = reference(x, g, h0, cu, reverse)
    assert rel_err(o, o_ref) <= TOL[dtype], ctx
    assert rel_err(ht, ht_ref) <= TOL["float32"], ctx

    do = rng.standard_normal(o.shape).astype(o.dtype)
    dht = rng.standard_normal(ht.shape).astype(np.float32)
    dx, dg, dh0 = front.backward(g, o, do, dht, h0, cu, reverse)
    dx_ref, dg_ref, dh0_ref = hc.naive_recurrent_hgrn_bwd(f64(g), f64(o), f64(do), dht, h0,
                                                          None if cu is None else cu.astype(np.int64), reverse)
    for name, got, want, dt in (("dx", dx, dx_ref, dtype), ("dg", dg, dg_ref, dtype), ("dh0", dh0, dh0_ref, "float32")):
        assert np.isfinite(f64(got)).all(), f"{name} is not finite with g = -inf gates; {ctx}"
        assert rel_err(got, want) <= TOL[dt], f"{name}; {ctx}"
    assert (f64(dg)[resets] == 0).all(), f"dg is not 0 where g = -inf; {ctx}"


# ----------------------------------------------------------------------------------------------
# g > 0: growth


def finite_close(got, want, dtype, what):
    """Where ``want`` is finite in ``dtype``, ``got`` equals it within the tolerance of ``dtype``."""
    big = float(ml_dtypes.finfo(NP_DTYPE[dtype]).max)
    ok = np.isfinite(want) & (np.abs(want) < big * 0.99)
    got = f64(got)
    assert ok.any(), what
    assert not np.isnan(got[ok]).any(), f"{what}: NaN where the reference is finite"
    assert rel_err(got[ok], want[ok]) <= TOL[dtype], what


@pytest.mark.usefixtures("poison")  # outputs checked finite: an unwritten (NaN) element fails
@pytest.mark.parametrize("reverse", REVERSE)
@pytest.mark.parametrize("front, shape, dtype", fronts_and_shapes(("float32", "bfloat16", "float16")))
def test_positive_gates_grow(front, shape, dtype, reverse):
    seed = 303
    x, g, h0, cu, rng = inputs(seed, shape, front, dtype)
    B, T, D = x.shape
    # half the channels grow: by about exp(0.01) a step, which overflows float16 over the long GPU shapes
    g[:, :, ::2] = rng.uniform(0.0, 0.02, g[:, :, ::2].shape).astype(g.dtype)
    o, ht = front.forward(x, g, h0, cu, reverse)
    o_ref, ht_ref = reference(x, g, h0, cu, reverse)
    ctx = f"seed {seed}, reverse={reverse}"
    finite_close(o, o_ref, dtype, f"o; {ctx}")
    finite_close(ht, ht_ref, "float32", f"ht; {ctx}")
    if dtype != "float16" and np.isfinite(o_ref).all() and np.abs(o_ref).max() < 1e30:
        do = rng.standard_normal(o.shape).astype(o.dtype)
        dx, dg, _ = front.backward(g, o, do, None, None, cu, reverse)
        dx_ref, dg_ref, _ = hc.naive_recurrent_hgrn_bwd(f64(g), f64(o), f64(do), None, None,
                                                        None if cu is None else cu.astype(np.int64), reverse)
        finite_close(dx, dx_ref, dtype, f"dx; {ctx}")
        finite_close(dg, dg_ref, dtype, f"dg; {ctx}")


# ----------------------------------------------------------------------------------------------
# backward: NaN in do


@pytest.mark.parametrize("reverse", REVERSE)
@pytest.mark.parametrize("frac", [0.0, 0.5, 1.0], ids=["first", "middle", "last"])
@pytest.mark.parametrize("front, shape, dtype", fronts_and_shapes())
def test_nan_in_do_reaches_only_earlier_steps(front, shape, dtype, frac, reverse):
    seed = 404
    x, g, h0, cu, rng = inputs(seed, shape, front, dtype)
    B, T, D = x.shape
    o, ht = front.forward(x, g, h0, cu, reverse)
    do = rng.standard_normal(o.shape).astype(o.dtype)
    dht = rng.standard_normal(ht.shape).astype(np.float32)
    clean = front.backward(g, o, do, dht, h0, cu, reverse)
    b, t, n, start, end = pick(B, T, cu, frac)
    c = 1
    do_bad = do.copy()
    do_bad[b, t, c] = np.nan
    dx, dg, dh0 = front.backward(g, o, do_bad, dht, h0, cu, reverse)

    # the gradient flows against time: to steps <= t (>= t with reverse) of the same sequence
    m = after_mask(o.shape, b, t, c, start, end, not reverse)
    near = near_mask(m, t, reverse, against_time=True)
    ctx = f"seed {seed}, do[{b}, {t}, {c}] = NaN, sequence [{start}, {end}), reverse={reverse}"
    assert np.isnan(f64(dx[near])).all(), f"dx is not NaN right before the poisoned step; {ctx}"
    assert nan_or_same(dx[m & ~near], clean[0][m & ~near]), f"dx further back is neither NaN nor clean; {ctx}"
    assert nan_or_same(dh0[n, c], clean[2][n, c]), f"dh0[{n}, {c}] is neither NaN nor clean; {ctx}"
    assert same(dx[~m], clean[0][~m]), f"dx changed outside the steps the NaN reaches; {ctx}"
    assert same(dg[~m], clean[1][~m]), f"dg changed outside the steps the NaN reaches; {ctx}"
    hm = np.zeros(dh0.shape, bool)
    hm[n, c] = True
    assert same(dh0[~hm], clean[2][~hm]), f"dh0 changed outside [{n}, {c}]; {ctx}"


# ----------------------------------------------------------------------------------------------
# long sequences in 16-bit types (GPU)


@pytest.mark.usefixtures("poison")  # outputs checked finite: an unwritten (NaN) element fails
@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["chunk", "fused_recurrent"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_long_sequence_16bit_stays_accurate(engine, dtype):
    pytest.importorskip("cupy")
    front = Front("cupy", engine, True)
    seed, T, D = 505, 100_000, 64
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, T, D)).astype(NP_DTYPE[dtype])
    g = (-np.exp(rng.uniform(np.log(1e-3), np.log(1e-2), (1, T, D)))).astype(NP_DTYPE[dtype])  # a in (0.99, 0.999)
    h0 = rng.standard_normal((1, D)).astype(np.float32)
    o, ht = front.forward(x, g, h0)
    o_ref, ht_ref = reference(x, g, h0, None, False)
    ctx = f"seed {seed}, T={T}, {dtype}, {engine}"
    assert np.isfinite(f64(o)).all() and np.isfinite(f64(ht)).all(), ctx
    assert rel_err(o, o_ref) <= TOL[dtype], ctx
    assert rel_err(ht, ht_ref) <= TOL["float32"], ctx
    do = rng.standard_normal(o.shape).astype(o.dtype)
    dx, dg, dh0 = front.backward(g, o, do, None, h0)
    dx_ref, dg_ref, dh0_ref = hc.naive_recurrent_hgrn_bwd(f64(g), f64(o), f64(do), None, h0)
    for name, got, want, dt in (("dx", dx, dx_ref, dtype), ("dg", dg, dg_ref, dtype), ("dh0", dh0, dh0_ref, "float32")):
        assert np.isfinite(f64(got)).all(), f"{name}; {ctx}"
        assert rel_err(got, want) <= TOL[dt], f"{name}; {ctx}"
