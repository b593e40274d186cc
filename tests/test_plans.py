"""Planned calls: a kept plan still checks every argument, and the engine choice (``hgrn_cupy.plans``,
``hgrn_cupy.dispatch``; CPU).

Every call runs through a plan; a call whose arrays match an earlier valid call (framework, device,
dtype, shape, strides: the key) reuses that call's plan and skips the checks and the engine choice.
A call under a kept plan never lets a bad argument through, on NumPy and torch arrays alike, forward
and backward.  The engine choice (property-based; skipped without hypothesis): the built-in rule,
pinned engines, unknown names and what the dispatch asks the tuner.
"""
import numpy as np
import pytest
from conftest import TOL, rel_err, to_numpy
from recording import fresh_plans  # noqa: F401  (a fixture)

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # not in the package's test extra: the property-based tests skip without it
    class _NoStrategies:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    st = _NoStrategies()

    def settings(**_):
        return lambda fn: fn

    def given(**_):
        def skipped_test(fn):
            def test():
                pytest.skip("needs hypothesis")
            test.__name__, test.__doc__ = fn.__name__, fn.__doc__
            return test
        return skipped_test

import hgrn_cupy as hc
from hgrn_cupy import arrays as ar
from hgrn_cupy import checks, dispatch, engines, nvrtc, tuning
from hgrn_cupy.settings import ENGINES


# ----------------------------------------------------------------------------------------------
# a kept plan still rejects every bad argument (CPU; NumPy and torch arrays are planned)

def _arrays(fw, rng):
    x = rng.standard_normal((3, 7, 5)).astype(np.float32)
    g = -np.logaddexp(0.0, -rng.standard_normal((3, 7, 5))).astype(np.float32)
    h0 = rng.standard_normal((3, 5)).astype(np.float32)
    if fw == "torch":
        torch = pytest.importorskip("torch")
        return tuple(torch.from_numpy(a) for a in (x, g, h0))
    return x, g, h0


def _other(a):
    """``a`` in the other planned framework."""
    if isinstance(a, np.ndarray):
        return pytest.importorskip("torch").from_numpy(a.copy())
    return a.numpy().copy()


def _strided_last_axis(a):
    if isinstance(a, np.ndarray):
        return np.repeat(a, 2, axis=2)[:, :, ::2]
    return a.repeat_interleave(2, dim=2)[:, :, ::2]


def _astype(a, name):
    if isinstance(a, np.ndarray):
        return a.astype(name)
    return a.to(getattr(pytest.importorskip("torch"), name))


# (id, change to (x, g, h0, reverse), error, pattern)
CHANGES = [
    ("x_int32", lambda x, g, h, r: (_astype(x, "int32"), g, h, r), TypeError, r"^x has dtype int32"),
    ("g_int64", lambda x, g, h, r: (x, _astype(g, "int64"), h, r), TypeError, r"^g has dtype int64"),
    ("h0_int32", lambda x, g, h, r: (x, g, _astype(h, "int32"), r), TypeError, r"^initial_state has dtype int32"),
    ("g_fewer_steps", lambda x, g, h, r: (x, g[:, :-1], h, r), ValueError, r"^g must have shape"),
    ("x_fewer_channels", lambda x, g, h, r: (x[:, :, :-1], g, h, r), ValueError, r"^g must have shape"),
    ("x_rank2", lambda x, g, h, r: (x[0], g, h, r), ValueError, r"^x must have 3 dimensions"),
    ("x_last_axis_strided", lambda x, g, h, r: (_strided_last_axis(x), g, h, r), ValueError,
     r"^x must be contiguous along its last axis"),
    ("g_last_axis_strided", lambda x, g, h, r: (x, _strided_last_axis(g), h, r), ValueError,
     r"^g must be contiguous along its last axis"),
    ("h0_rows", lambda x, g, h, r: (x, g, h[:-1], r), ValueError, r"^initial_state must have shape"),
    ("h0_rank3", lambda x, g, h, r: (x, g, h[None], r), ValueError, r"^initial_state must have shape"),
    ("g_other_framework", lambda x, g, h, r: (x, _other(g), h, r), TypeError, r"^g is a \w+ array but x is"),
    ("h0_other_framework", lambda x, g, h, r: (x, g, _other(h), r), TypeError,
     r"^initial_state is a \w+ array but x is"),
    ("h0_list", lambda x, g, h, r: (x, g, h.tolist(), r), TypeError, r"^initial_state must be a NumPy"),
    ("reverse_int", lambda x, g, h, r: (x, g, h, 1), TypeError, r"^reverse must be a bool"),
    ("reverse_none", lambda x, g, h, r: (x, g, h, None), TypeError, r"^reverse must be a bool"),
]


@pytest.mark.parametrize("fw", ["numpy", "torch"])
@pytest.mark.parametrize("change, error, pattern", [pytest.param(*c[1:], id=c[0]) for c in CHANGES])
def test_cached_key_still_checks(fw, change, error, pattern, fresh_plans):
    rng = np.random.default_rng(0)
    x, g, h0 = _arrays(fw, rng)
    good = hc.fused_recurrent_hgrn(x, g, h0, True)
    assert len(fresh_plans) == 1, "a valid call should leave its plan"
    again = hc.fused_recurrent_hgrn(x, g, h0, True)  # planned
    for a, b in zip(good, again):
        assert np.array_equal(to_numpy(a), to_numpy(b))
    bx, bg, bh, br = change(x, g, h0, False)
    with pytest.raises(error, match=pattern):
        hc.fused_recurrent_hgrn(bx, bg, bh, True, None, br)


def test_numpy_bool_reverse_is_checked_and_equal(fresh_plans):
    """``reverse`` as a NumPy bool is legal; such calls are not kept (the key reads Python bools) and
    agree with the kept ones."""
    x, g, h0 = _arrays("numpy", np.random.default_rng(1))
    a = hc.hgrn(x, g, h0, True, None, True)
    assert len(fresh_plans) == 1
    b = hc.hgrn(x, g, h0, True, None, np.bool_(True))
    assert len(fresh_plans) == 1
    for u, v in zip(a, b):
        assert np.array_equal(u, v)


def test_backward_plans_cpu(fresh_plans):
    """Backward calls are planned by key: g, o, do, and the layouts of the states where there are states;
    a call whose do or state does not fit is still rejected, and a state of another type is not planned."""
    rng = np.random.default_rng(3)
    x, g, _ = _arrays("numpy", rng)
    o = hc.hgrn(x, g)[0]
    do = rng.standard_normal(o.shape).astype(np.float32)
    fresh_plans.clear()
    first = hc.hgrn_backward(g, o, do)
    again = hc.hgrn_backward(g, o, do)
    assert len(fresh_plans) == 1 and first[2] is None
    for a, b in zip(first[:2], again[:2]):
        assert np.array_equal(a, b)
    ref = hc.naive_recurrent_hgrn_bwd(g, o, do)
    assert rel_err(again[0], ref[0]) <= TOL["float32"] and rel_err(again[1], ref[1]) <= TOL["float32"]
    with pytest.raises(ValueError, match=r"^do must have shape"):
        hc.hgrn_backward(g, o, do[:, :-1])
    N, D = x.shape[0], x.shape[2]
    dht = rng.standard_normal((N, D)).astype(np.float32)
    h0 = rng.standard_normal((N, D))  # float64: dh0 comes back in float64
    for n, (d, h) in enumerate(((dht, None), (None, h0), (dht, h0)), start=2):
        got = [hc.hgrn_backward(g, o, do, d, h) for _ in range(2)]
        assert len(fresh_plans) == n
        ref = hc.naive_recurrent_hgrn_bwd(g, o, do, d, h)
        for k in range(3):
            if h is None and k == 2:
                assert got[0][2] is None and got[1][2] is None
                continue
            assert np.array_equal(got[0][k], got[1][k]) and rel_err(got[1][k], ref[k]) <= TOL["float32"]
        if h is not None:
            assert got[1][2].dtype == np.float64
    with pytest.raises(ValueError, match=r"^dht must have shape"):  # a new key, and the checks say why
        hc.hgrn_backward(g, o, do, dht[:, :-1], h0)
    torch = pytest.importorskip("torch")  # a state of another type: not planned, rejected by the checks
    with pytest.raises(TypeError, match=r"^dht is a torch array but \w+ is a numpy array"):
        hc.hgrn_backward(g, o, do, torch.from_numpy(dht), h0)
    assert len(fresh_plans) == 4


# ----------------------------------------------------------------------------------------------
# the engine choice (CPU, property-based)

DTYPE = st.sampled_from(nvrtc.DTYPES)
CHANNELS = st.integers(0, 1 << 12)


def _call(N, T, D, dtypes, varlen=False):
    """A checked call as ``checks`` makes them (the framework plays no part in the choice)."""
    return checks.Call(ar.NUMPY, 1 if varlen else N, T, D, N, dtypes, nvrtc.accumulation_dtype(*dtypes), varlen,
                       True)


@settings(max_examples=300, deadline=None, database=None)
@given(N=CHANNELS, T=st.one_of(st.integers(0, 2 * dispatch.FUSED_MAX_T), st.integers(0, 1 << 16)), D=CHANNELS,
       x_dtype=DTYPE, g_dtype=DTYPE, direction=st.sampled_from((0, 1)), reverse=st.booleans(),
       varlen=st.booleans())
def test_engine_choice(N, T, D, x_dtype, g_dtype, direction, reverse, varlen):
    """The built-in rule names an engine, the fused one at most FUSED_MAX_T steps; with nothing to
    measure (no device) ``auto`` is the rule; a pinned ``config.engine`` is what ``auto`` runs; an engine
    named in the call wins over ``config.engine``; the chunk engine with no steps becomes the fused one."""
    dtypes = (x_dtype, g_dtype)
    call = _call(N, T, D, dtypes, varlen)
    ruled = dispatch.rule(N, T, D, dtypes, direction)
    assert ruled in dispatch.CANDIDATES
    if T <= dispatch.FUSED_MAX_T:
        assert ruled == "fused_recurrent"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hc.config, "engine", "auto")
        assert dispatch.choose("auto", call, direction, reverse) == ruled
        for pinned in dispatch.CANDIDATES:
            expect = "fused_recurrent" if T == 0 else pinned
            assert dispatch.choose(pinned, call, direction, reverse, 0) == expect
            mp.setattr(hc.config, "engine", pinned)
            assert dispatch.choose("auto", call, direction, reverse, 0) == expect
            for other in dispatch.CANDIDATES:  # the call's own engine comes first
                assert dispatch.choose(other, call, direction, reverse) == ("fused_recurrent" if T == 0 else other)
            mp.setattr(hc.config, "engine", "auto")


@settings(max_examples=300, deadline=None, database=None)
@given(N=st.integers(0, 64), T=st.integers(0, 300), D=st.integers(0, 1 << 13), x_dtype=DTYPE, g_dtype=DTYPE,
       direction=st.sampled_from((0, 1)), narrow_below=st.sampled_from((0, 1 << 12, 1 << 14, 1 << 62)))
def test_tuning_candidates(N, T, D, x_dtype, g_dtype, direction, narrow_below):
    """The tuner measures the rule's engine first, then the other engine, then, where the rule's block
    walk applies (the 16-bit and float32 bands opened to every count from 4K channels here; float64 has
    none), the block walk with short windows, and for a 16-bit forward whose D divides into the lane
    width the rule does not take, that width with either window, and where D divides into 8-byte lanes,
    the staged forward; for a forward whose inputs share an itemsize of 2 or 4, the bulk walk at each lane
    width (4 and 8 bytes) D divides into; for a forward whose gate is the wider input, 16 or 32 bits,
    on a grid of one to 16 chunk tiles and more than one chunk, the chunk engine's staged forward; and for a
    float32 forward whose chunk grid takes the L2 prefetch, the chunk engine with the prefetch further ahead."""
    from hgrn_cupy.engines import fused_recurrent as fr

    dtypes = (x_dtype, g_dtype)
    bands = {**fr.BLOCK_WALK_CHANNELS, **{(s, d): (1 << 12, fr.NEVER) for s in (2, 4) for d in (0, 1)}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fr, "BLOCK_WALK_CHANNELS", bands)
        mp.setattr(fr, "BLOCK_WALK_NARROW_BELOW", narrow_below)
        got = dispatch.candidates(N, T, D, dtypes, direction)
        ruled = dispatch.rule(N, T, D, dtypes, direction)
        assert got[:2] == (ruled, ({"chunk", "fused_recurrent"} - {ruled}).pop())
        wide = max(nvrtc.ITEMSIZE[x_dtype], nvrtc.ITEMSIZE[g_dtype])
        sixteen_bit_fwd = direction == 0 and wide == 2
        rule_bytes = (4 if N * D < narrow_below else 8) if sixteen_bit_fwd else 8 - 4 * direction
        other = 12 - rule_bytes
        rule_vec = max(1, rule_bytes // wide)
        walks = wide < 8 and N * D >= 1 << 12 and T > fr.BLOCK_WALK_MIN_T and D % rule_vec == 0
        lanes = walks and sixteen_bit_fwd and D % (other // 2) == 0
        staged = walks and sixteen_bit_fwd and D % 4 == 0
        short = f", {fr.SHORT_STEPS}-step windows"
        expect = ((f"fused_recurrent{short}",) if walks else ()) + (
            (f"fused_recurrent, {other}-byte lanes", f"fused_recurrent, {other}-byte lanes{short}") if lanes else ())
        expect += ("fused_recurrent, staged, 8-byte lanes",) if staged else ()
        one_size = nvrtc.ITEMSIZE[x_dtype] == nvrtc.ITEMSIZE[g_dtype] == wide
        expect += tuple(f"fused_recurrent, bulk copies, {n}-byte lanes" for n in (4, 8)
                        if walks and direction == 0 and one_size and D % (n // wide) == 0)
        gsize = nvrtc.ITEMSIZE[g_dtype]
        tiles = N * -(-D // (256 // gsize))  # a chunk tile: 16 lanes of 16 bytes of g
        if direction == 0 and gsize == wide and gsize < 8 and T > 128 and 0 < tiles <= 16:
            expect += ("chunk, staged gate words",)
        ftiles, fchunks = N * -(-D // 64), -(-T // 128)  # float32: tiles of 64 channels, chunks of 128 steps
        if direction == 0 and dtypes == ("float32",) * 2 and ftiles * fchunks >= 1024 and not 8 < ftiles < 16:
            expect += ("chunk, L2 prefetch 192 ahead",)
        assert sorted(got[2:]) == sorted(expect)
        for name in got[2:]:
            engine, options = engines.VARIANTS[name]
            if engine == "chunk":
                assert options == ({"ahead": 192} if name.endswith("192 ahead") else {"staged": True})
                continue
            assert engine == "fused_recurrent" and options["steps"] in (None, fr.SHORT_STEPS)
            assert options.get("staged", False) == name.startswith("fused_recurrent, staged")
            assert options.get("bulk", False) == name.startswith("fused_recurrent, bulk")
            if options.get("bulk"):
                assert fr.bulk_fits(N, T, D, x_dtype, g_dtype, options["lanes"]) == options["lanes"] // wide
            else:
                assert fr.block_walk_fits(N, T, D, x_dtype, g_dtype, direction, options["lanes"]) == (
                    options["lanes"] // wide if options["lanes"] else rule_vec)


@settings(max_examples=200, deadline=None, database=None)
@given(name=st.one_of(st.text(max_size=20), st.none(), st.integers(), st.sampled_from([n.upper() for n in ENGINES])))
def test_unknown_engine_is_rejected(name):
    """Any name but the engines' is an error that says which names there are (ValueError; TypeError for
    what is not a str), on every path that takes one (the dispatch, the public functions on CPU arrays,
    and the setting)."""
    if name in ENGINES:
        return
    error, says = ((ValueError, r"must be one of \(") if isinstance(name, str)
                   else (TypeError, r"must be a str, one of \("))
    call = _call(2, 100, 8, ("float32", "float32"))
    with pytest.raises(error, match=rf"^engine {says}"):
        dispatch.choose(name, call, 0, False)
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(error, match=rf"^engine {says}"):
        hc.hgrn_backward(x, x, x, engine=name)
    with pytest.raises(error, match=rf"^config\.engine {says}"):
        hc.config.engine = name
    assert hc.config.engine in ENGINES


def test_config_values():
    """The switches take Python and NumPy bools (stored as bool) and nothing else, the engine a str (an
    array holding one is refused at once, not at the next call), and no setting can be deleted."""
    before = hc.config.tune
    try:
        hc.config.tune = np.bool_(False)
        assert hc.config.tune is False
        for bad in (1, "no", None, np.array([True])):
            with pytest.raises(TypeError, match=r"^config\.tune must be a bool"):
                hc.config.tune = bad
        with pytest.raises(TypeError, match=r"^config\.engine must be a str"):
            hc.config.engine = np.array(["chunk"])
        with pytest.raises(AttributeError, match="cannot be deleted"):
            del hc.config.engine
        with pytest.raises(AttributeError, match="no setting 'engines'"):
            hc.config.engines = "chunk"
        assert hc.config.engine in ENGINES
    finally:
        hc.config.tune = before


def test_variant_names_are_internal():
    """The tuner's launch variants are not values of the public ``engine`` argument or setting; the
    internal interface runs them as named."""
    x = np.ones((2, 3, 4), np.float32)
    call = _call(2, 3, 4, ("float32", "float32"))
    assert engines.VARIANTS
    for variant in engines.VARIANTS:
        with pytest.raises(ValueError, match=r"^engine must be one of \("):
            hc.hgrn_backward(x, x, x, engine=variant)
        with pytest.raises(ValueError, match=r"^config\.engine must be one of \("):
            hc.config.engine = variant
        assert dispatch.choose(variant, call, 0, False) == variant


@settings(max_examples=300, deadline=None, database=None)
@given(N=CHANNELS, T=st.integers(0, 1 << 16), D=CHANNELS, x_dtype=DTYPE, g_dtype=DTYPE,
       direction=st.sampled_from((0, 1)), reverse=st.booleans(), varlen=st.booleans(),
       allow_timing=st.booleans(), tune=st.booleans(), with_run=st.booleans(), device=st.sampled_from((None, 0, 3)))
def test_auto_asks_the_tuner(N, T, D, x_dtype, g_dtype, direction, reverse, varlen, allow_timing, tune, with_run,
                             device):
    """``auto`` on a device past FUSED_MAX_T steps takes the tuner's decision (a fake here): it asks for
    the call's device, stream and shape class with the rule's engine first among the candidates and as
    the default, and allows timing only where the caller does, ``config.tune`` is on and there is a launch
    to time, with the untuned warning to raise where it answers the default while ``config.tune`` is on.
    Without a device, at most FUSED_MAX_T steps, or with an engine pinned, the tuner is not asked."""
    dtypes = (x_dtype, g_dtype)
    call = _call(N, T, D, dtypes, varlen)
    ruled = dispatch.rule(N, T, D, dtypes, direction)
    asked = []

    def fake_choose(device, key, candidates, run, default, allow_timing, measure=None, stream_ptr=None,
                    on_default=None):
        asked.append(dict(device=device, key=key, candidates=tuple(candidates), run=run, default=default,
                          allow_timing=allow_timing, measure=measure, stream_ptr=stream_ptr, on_default=on_default))
        return candidates[-1]  # not the rule's engine: the answer must be the tuner's

    def run(name):
        raise AssertionError("the fake tuner launches nothing")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tuning, "choose", fake_choose)
        mp.setattr(hc.config, "tune", tune)
        mp.setattr(hc.config, "engine", "auto")
        got = dispatch.choose("auto", call, direction, reverse, device, run if with_run else None, allow_timing, 5)
        if device is None or T <= dispatch.FUSED_MAX_T:
            assert not asked and got == ruled
        else:
            (a,) = asked
            assert a["candidates"] == dispatch.candidates(N, T, D, dtypes, direction)
            assert got == a["candidates"][-1] and a["default"] == ruled and a["device"] == device
            assert a["key"] == tuning.shape_class(direction, dtypes, N, T, D, varlen, reverse)
            timing = allow_timing and tune and with_run
            # the tuner times on the call's stream with its default measurement
            assert a["allow_timing"] is timing and a["measure"] is None and a["stream_ptr"] == 5
            assert (a["on_default"] is not None) == tune  # the untuned warning, unless tuning is off
            if with_run:
                assert a["run"] is run
        for pinned in dispatch.CANDIDATES:
            asked.clear()
            mp.setattr(hc.config, "engine", pinned)
            dispatch.choose("auto", call, direction, reverse, device, run, allow_timing, 5)
            dispatch.choose(pinned, call, direction, reverse, device, run, allow_timing, 5)
            assert not asked
