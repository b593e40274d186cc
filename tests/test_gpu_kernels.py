"""Both CUDA engines against the NumPy reference in float64 (GPU; skipped without one).

Inputs are drawn from one generator per test, seeded from the test's id (the seed is in every assertion
message, so a failure replays); outputs are NaN-poisoned before every launch (fixture ``poison``), so an
element a kernel fails to write cannot pass.  Tolerances live in conftest.
"""
import numpy as np
import pytest

from conftest import force_block_walks

cupy = pytest.importorskip("cupy")
import hgrn_cupy as hc  # noqa: E402
from gpu_kernel_checks import (  # noqa: E402
    DTYPES, ENGINES, FORWARD, VARLEN, VECTOR_VIEWS, _rng, _seed, check_backward, check_forward, launched_kernels,
    lib_engine, make_inputs, to_dev, to_host)
from gpu_kernel_checks import seeded  # noqa: E402, F401  (an autouse fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison")]

@pytest.fixture(autouse=True)
def walk_channels(request, monkeypatch):
    """Forced launches: two channels a thread in the fused walks (``fused_recurrent_2ch``), the block walks
    (``fused_recurrent_block*``; ``_short``: SHORT_STEPS-step windows), the staged chunk forward (``chunk_staged``)."""
    spec = getattr(request.node, "callspec", None)
    engine = spec.params.get("engine") if spec is not None else None
    if engine not in ("fused_recurrent_2ch", "fused_recurrent_block", "fused_recurrent_block4",
                      "fused_recurrent_block_short", "chunk_staged"):
        yield
        return
    from hgrn_cupy import plans
    from hgrn_cupy.engines import chunk, fused_recurrent

    if engine == "fused_recurrent_2ch":
        monkeypatch.setattr(fused_recurrent, "WALK_VEC_MIN_CHANNELS", 0)
    elif engine == "chunk_staged":
        staged = chunk.prepare
        monkeypatch.setattr(chunk, "prepare", lambda *args, **kw: staged(*args, **{**kw, "staged": True}))
    else:
        force_block_walks(monkeypatch, narrow=engine.endswith("4"))
    if engine.endswith("short"):
        prepare = fused_recurrent.prepare
        monkeypatch.setattr(fused_recurrent, "prepare",
                            lambda *args, **kw: prepare(*args, **{**kw, "steps": fused_recurrent.SHORT_STEPS}))
    plans._plans.clear()  # plans made under the usual thresholds
    yield
    plans._plans.clear()


@pytest.fixture
def fresh_plans(monkeypatch):
    """An empty plan cache, so that every call of the test prepares its launches under its settings."""
    from hgrn_cupy import plans

    monkeypatch.setattr(plans, "_plans", {})
    return plans._plans


# ---------------------------------------------------------------------------------------------
# the matrix

SHAPES = [  # (B, T, D)
    (64, 1, 4096), (3, 2, 65), (2, 31, 3), (2, 1000, 65), (1, 20000, 1),
    (2, 127, 33), (1, 128, 64), (3, 129, 31), (1, 4097, 96),
    (2, 63, 24), (1, 65, 136),  # the chunk engine's backward chunks are 64 steps (forward: 128)
]


def forced_walk(engine, dtype, direction):
    """(kernel, channels a thread) that the fixture ``walk_channels`` forces for ``engine`` (None for the
    others): a dense call of T > 1 whose D divides into them launches it (T = 1 takes the step kernels)."""
    from hgrn_cupy.engines import chunk, fused_recurrent as fr
    from hgrn_cupy.nvrtc import ITEMSIZE

    if engine == "chunk_staged":  # the forward; the backward is the chunk engine's own
        return (chunk.STAGED_KERNEL, chunk.staged_width(dtype, dtype)) if direction == 0 else None
    if engine == "fused_recurrent_2ch":
        return ("fused_recurrent_fwd", "fused_recurrent_bwd")[direction], fr.WALK_VEC[ITEMSIZE[dtype]]
    if engine.startswith("fused_recurrent_block"):
        return (("fused_recurrent_block_fwd", "fused_recurrent_block_bwd")[direction],
                fr.block_walk_width(dtype, dtype, direction, narrow=engine.endswith("4")))
    return None


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reverse", [False, True], ids=["fwdtime", "reverse"])
def test_forward_backward(engine, dtype, shape, reverse, monkeypatch):
    """Values and gradients; the forced walk of the 2ch and block cases (the chunk_staged cases' staged
    forward where the dtype has one) is the kernel that ran where D divides into its lanes."""
    B, T, D = shape
    rng = _rng()
    x, g = make_inputs(B, T, D, rng=rng)
    h0 = rng.standard_normal((B, D)) if (T + D) % 2 else None
    launched = launched_kernels(monkeypatch)
    check_forward(engine, x, g, dtype, h0, reverse=reverse)
    ran = [list(launched)]
    launched.clear()
    check_backward(engine, x, g, dtype, h0, reverse=reverse, with_dht=T % 2 == 1)
    ran.append(list(launched))
    for direction in (0, 1):
        want = forced_walk(engine, dtype, direction)
        if want and want[1] and T > 1 and D % want[1] == 0:
            got = [(k[0], int(k[-1])) for k in ran[direction]]
            assert want in got, (_seed(), direction, got)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("has_h0", [True, False], ids=["h0", "no_h0"])
@pytest.mark.parametrize("final", [True, False], ids=["final", "no_final"])
def test_initial_and_final_state(engine, has_h0, final):
    rng = _rng()
    x, g = make_inputs(3, 300, 70, rng=rng)
    h0 = rng.standard_normal((3, 70)) if has_h0 else None
    check_forward(engine, x, g, "float32", h0, final=final)
    check_backward(engine, x, g, "float32", h0, with_dht=final)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_past_one_grid(engine, varlen):
    """More sequences than a CUDA grid's y extent holds (65535; the fused walks launch them in parts),
    forward and backward with states; varlen with an empty sequence and time reversed."""
    rng = _rng()
    N, D = 65535 + 9, 8
    cu = None
    if varlen:
        lens = rng.integers(0, 5, N)
        lens[5] = 0
        cu = [0] + np.cumsum(lens).tolist()
    x, g = make_inputs(1, cu[-1], D, rng=rng) if varlen else make_inputs(N, 3, D, rng=rng)
    h0 = rng.standard_normal((N, D))
    check_forward(engine, x, g, "float32", h0, cu=cu, reverse=varlen)
    check_backward(engine, x, g, "float32", h0, cu=cu, reverse=varlen)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("cu", VARLEN, ids=lambda c: f"n{len(c) - 1}")
@pytest.mark.parametrize("reverse", [False, True], ids=["fwdtime", "reverse"])
@pytest.mark.parametrize("has_h0", [True, False], ids=["h0", "no_h0"])
@pytest.mark.parametrize("D", [67, 264])  # 264: the chunk engine's 16-byte path, a tile and a sliver
def test_varlen(engine, dtype, cu, reverse, has_h0, D):
    rng = _rng()
    T = cu[-1]
    x, g = make_inputs(1, T, D, rng=rng)
    h0 = rng.standard_normal((len(cu) - 1, D)) if has_h0 else None
    check_forward(engine, x, g, dtype, h0, cu=cu, reverse=reverse)
    check_backward(engine, x, g, dtype, h0, cu=cu, reverse=reverse)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("gate", ["zero", "very_negative", "neg_inf"])
def test_gate_extremes(engine, gate):
    x, g = make_inputs(2, 700, 40, gate=gate)
    h0 = _rng().standard_normal((2, 40))
    o = check_forward(engine, x, g, "float32", h0)
    assert bool(cupy.isfinite(o).all()), _seed()
    check_backward(engine, x, g, "float32", h0)


VIEWS = {
    "time_stride": lambda a: a[:, ::2],                    # every other step: time stride 2*D
    "batch_slice": lambda a: a[1:],                        # offset base pointer
    "odd_offset": lambda a: a[:, :, 1:],                   # base pointer misaligned for vectors
    "channel_slice": lambda a: a[:, 3:, 5:-2],             # sliced D: batch/time strides != D
    "reversed_time": lambda a: a[:, ::-1],                 # negative time stride
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("view", list(VIEWS), ids=list(VIEWS))
def test_strided_views(engine, dtype, view):
    x, g = make_inputs(3, 301, 37)
    check_forward(engine, x, g, dtype, views=VIEWS[view])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_h0,final", [(True, True), (True, False), (False, True)], ids=["h0-ht", "h0", "ht"])
@pytest.mark.parametrize("view", ["dense", "batch_slice", "channel_slice", "odd_offset", "odd_batch_stride"])
def test_decode_step(dtype, has_h0, final, view):
    """T = 1 (decoding): the single-step kernel where 16-byte accesses are possible, the walk otherwise."""
    fn = {"dense": lambda a: a, "batch_slice": lambda a: a[1:], "channel_slice": lambda a: a[:, :, 8:-16],
          "odd_offset": lambda a: a[:, :, 1:-7], "odd_batch_stride": lambda a: a[:, :, :-1]}[view]
    rng = _rng()
    x, g = make_inputs(9, 1, 4128, rng=rng)
    B, D = fn(np.empty((9, 1, 4128)))[:, 0].shape
    h0 = rng.standard_normal((B, D)) if has_h0 else None
    check_forward("fused_recurrent", x, g, dtype, h0, final=final, views=fn)
    check_forward("fused_recurrent", x, g, dtype, h0, final=final, views=fn, gdtype="float32")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_h0,with_dht", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["h0-dht", "h0", "dht", "none"])
def test_decode_step_backward(dtype, has_h0, with_dht, monkeypatch):
    """T = 1 backward, dense and aligned: the single-step kernel, and it is the kernel that ran."""
    rng = _rng()
    x, g = make_inputs(9, 1, 4128, rng=rng)
    h0 = rng.standard_normal((9, 4128)) if has_h0 else None
    launched = launched_kernels(monkeypatch)
    check_backward("fused_recurrent", x, g, dtype, h0, with_dht=with_dht)
    assert [k[0] for k in launched] == ["fused_recurrent_step_bwd"], (_seed(), launched)


@pytest.mark.parametrize("engine", ENGINES)
def test_mixed_dtypes(engine):
    x, g = make_inputs(2, 500, 48)
    check_forward(engine, x, g, "bfloat16", gdtype="float32")
    check_forward(engine, x, g, "float32", gdtype="float16")


@pytest.mark.parametrize("dtype,D", [("float32", 5), ("bfloat16", 16)], ids=["f32-scalar", "bf16-vector"])
def test_long_sequence_chunk(dtype, D):
    """T >= 2**20 with few channels: many chunks joined by look-back (both access widths)."""
    rng = _rng()
    T = 1 << 20
    x, g = make_inputs(1, T, D, rng=rng)
    h0 = rng.standard_normal((1, D))
    check_forward("chunk", x, g, dtype, h0)
    check_backward("chunk", x, g, dtype, h0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", ["dense", "time_stride", "batch_slice", "channel_slice_aligned", "reversed_time",
                                  "odd_offset"])
def test_chunk_access_width(dtype, view, fresh_plans, monkeypatch):
    """The chunk engine reads 16 bytes per access where pointers, D and strides allow, one element
    otherwise; both paths, across tile boundaries (D = 264 + 16 + 8 before slicing): the layout rule
    agrees with the table, and the kernel launched is the one of that width."""
    from hgrn_cupy import arrays
    from hgrn_cupy.engines import layout

    fn, vector = VECTOR_VIEWS[view]
    rng = _rng()
    x, g = make_inputs(3, 700, 288, rng=rng)
    xv = fn(to_dev(x, dtype))
    expect = layout.vector_width(dtype, dtype) if vector else 1
    arrs = [arrays.CUPY.describe(a) for a in (xv, fn(to_dev(g, dtype)))]
    vec = layout.layout_vector_width(xv.shape[2], arrs)
    fits = layout.aligned([a.ptr for a in arrs], layout.alignment_masks(vec, arrs))
    assert (vec if fits else 1) == expect
    h0 = rng.standard_normal((xv.shape[0], xv.shape[2]))
    launched = launched_kernels(monkeypatch)
    check_forward("chunk", x, g, dtype, h0, views=fn, reverse=view == "dense")
    assert [k[0] for k in launched] == ["chunk_fwd"] and launched[0][-1] == str(expect), (_seed(), launched)
    xs, gs = to_host(fn(to_dev(x, dtype))), to_host(fn(to_dev(g, dtype)))
    check_backward("chunk", xs, gs, dtype, h0, reverse=view == "batch_slice")


@pytest.mark.parametrize("engine", ENGINES)
def test_deterministic(engine):
    """A moving error is a race: repeated runs must agree bit for bit."""
    x, g = make_inputs(1, 70000, 64)
    xd, gd = to_dev(x, "float32"), to_dev(g, "float32")
    runs = [FORWARD[engine](xd, gd, output_final_state=True) for _ in range(5)]
    for o, ht in runs[1:]:
        assert bool((o == runs[0][0]).all()) and bool((ht == runs[0][1]).all()), _seed()
    do = to_dev(_rng().standard_normal(x.shape), "float32")
    grads = [hc.hgrn_backward(gd, runs[0][0], do, engine=lib_engine(engine)) for _ in range(3)]
    for dx, dg, _ in grads[1:]:
        assert bool((dx == grads[0][0]).all()) and bool((dg == grads[0][1]).all()), _seed()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
@pytest.mark.parametrize("leftover", ["earlier_launch", "random_bytes"])
def test_chunk_workspace_leftovers(dtype, leftover, fresh_plans, monkeypatch):
    """Fresh scratch is filled before each launch: slots left in the same memory by an earlier launch of
    the same shape (other inputs), or any other bytes, must not pass for slots of the running launch."""
    from hgrn_cupy import workspace

    held = {"taken": 0}
    rng = _rng()

    def alloc(nbytes, acc_itemsize, stream_ptr):  # one buffer for every launch of this test
        buf = held.get("buf")
        if buf is None or buf.nbytes < nbytes:
            buf = held["buf"] = cupy.empty((nbytes,), cupy.uint8)
        if leftover == "random_bytes":
            buf[...] = cupy.asarray(rng.integers(0, 256, buf.shape, dtype=np.uint8))
        held["taken"] += 1
        return buf.data.ptr, buf, False, buf.nbytes

    monkeypatch.setattr(workspace, "source", lambda torch_device=None, cupy_device=None: alloc)
    for _ in range(3):
        x, g = make_inputs(2, 3001, 136, rng=rng)
        h0 = rng.standard_normal((2, 136))
        check_forward("chunk", x, g, dtype, h0)
        check_backward("chunk", x, g, dtype, h0)
    assert held["taken"] == 6, _seed()  # every launch took this memory


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_chunk_kept_workspace(dtype, fresh_plans, monkeypatch):
    """Kept scratch: one buffer per stream and accumulation dtype serves every launch, whatever their
    sizes, each launch leaving it ready for the next.  A launch smaller than the one before must leave
    what it did not use unpublished, else the next larger launch of the same parity (forward calls alone
    alternate parity: big, small, big) reads the slots of two launches ago.  Varlen, reverse, T = 1 and
    backward launches in between; every result against the reference."""
    from hgrn_cupy import workspace

    seen = []
    real = workspace.source

    def spy(torch_device=None, cupy_device=None):
        alloc = real(torch_device=torch_device, cupy_device=cupy_device)

        def take(nbytes, acc_itemsize, stream_ptr):
            ws = alloc(nbytes, acc_itemsize, stream_ptr)
            seen.append((ws[0], ws[2], nbytes, ws[3]))
            return ws
        return take
    monkeypatch.setattr(hc.config, "keep_workspaces", True)
    monkeypatch.setattr(workspace, "_kept", {})
    monkeypatch.setattr(workspace, "source", spy)
    rng = _rng()
    calls = [((2, 3001, 136), {}), ((1, 300, 40), {}), ((2, 3001, 136), {}), ((1, 700, 136), {"reverse": True}),
             ((3, 4000, 72), {}), ((1, 1, 8), {}), ((3, 4000, 72), {}), ((1, 5000, 72), {"cu": [0, 1200, 1200, 5000]}),
             ((1, 300, 40), {}), ((3, 4000, 72), {"backward": True}), ((1, 300, 40), {"backward": True}),
             ((3, 4000, 72), {}), ((3, 4000, 72), {"backward": True})]
    for (B, T, D), how in calls:
        x, g = make_inputs(B, T, D, rng=rng)
        h0 = rng.standard_normal((B if "cu" not in how else len(how["cu"]) - 1, D))
        check = check_backward if how.get("backward") else check_forward
        check("chunk", x, g, dtype, h0, cu=how.get("cu"), reverse=how.get("reverse", False))
    assert len(seen) == len(calls) and all(s[1] for s in seen) and len(workspace._kept) == 1, (_seed(), seen)
    for before, now in zip(seen, seen[1:]):  # a new buffer only where the old one was too small
        assert (now[0] != before[0]) == (now[2] > before[3]), (_seed(), seen)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
@pytest.mark.parametrize("peek", [False, True], ids=["no_peek", "peek"])
@pytest.mark.parametrize("prefetch", [False, True], ids=["no_prefetch", "prefetch"])
def test_chunk_peek_and_prefetch(dtype, peek, prefetch, fresh_plans, monkeypatch):
    """The chunk engine with and without the early read of the predecessor's slots and the L2 prefetch,
    whatever the grid (the library picks them by tile count): many chunks and tiles, both directions."""
    from hgrn_cupy.engines import chunk

    monkeypatch.setattr(chunk, "PEEK_MIN_TILES", 0 if peek else 1 << 40)
    monkeypatch.setattr(chunk, "PEEK_MAX_TILES", -1)
    monkeypatch.setattr(chunk, "FEW_TILES", -1)
    monkeypatch.setattr(chunk, "L2_MIN_TILES", 0 if prefetch else 1 << 40)
    monkeypatch.setattr(chunk, "L2_MIN_BLOCKS", 0)
    rng = _rng()
    x, g = make_inputs(3, 2001, 520, rng=rng)
    h0 = rng.standard_normal((3, 520))
    check_forward("chunk", x, g, dtype, h0)
    check_backward("chunk", x, g, dtype, h0, reverse=True)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("B,D,narrow", [(1, 256, True), (2, 128, True), (1, 264, False), (3, 128, False)],
                         ids=["1x256", "2x128", "1x264", "3x128"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwdtime", "reverse"])
def test_chunk_narrow_backward(dtype, B, D, narrow, reverse):
    """The 16-bit backward takes four-row warps on grids of at most NARROW_BWD_MAX_TILES two-row tiles and
    two-row warps beyond: both sides against the reference, with h0 and dht over many chunks; in one
    row, also packed with cu_seqlens (an empty sequence first)."""
    from hgrn_cupy.engines import chunk

    assert (chunk.block_shape(1, 8, B, D, False) == chunk.NARROW_BWD) == narrow
    rng = _rng()
    x, g = make_inputs(B, 1500, D, rng=rng)
    check_backward("chunk", x, g, dtype, rng.standard_normal((B, D)), reverse=reverse)
    if B == 1:
        check_backward("chunk", x, g, dtype, rng.standard_normal((3, D)), cu=[0, 0, 400, 1500], reverse=reverse)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
@pytest.mark.parametrize("at_once", [2, 7, 64])
def test_chunk_stagger(dtype, at_once, fresh_plans, monkeypatch):
    """The first wave's stagger (block k waits for block k - stagger's map before its loads) on grids far
    larger than the wave it is told of, so that most blocks of the first wave wait, in both directions:
    dense, reversed, and varlen with an empty sequence."""
    from hgrn_cupy import nvrtc
    from hgrn_cupy.engines import chunk

    monkeypatch.setattr(nvrtc, "blocks_at_once", lambda fn, threads, device, dynamic=0: at_once)
    assert chunk.stagger(at_once + 1, at_once) == at_once // 2 > 0
    rng = _rng()
    x, g = make_inputs(3, 2001, 264, rng=rng)
    h0 = rng.standard_normal((3, 264))
    check_forward("chunk", x, g, dtype, h0)
    check_backward("chunk", x, g, dtype, h0, reverse=True)
    cu = [0, 700, 700, 3 * 2001]
    xs, gs = x.reshape(1, -1, 264), g.reshape(1, -1, 264)
    check_forward("chunk", xs, gs, dtype, h0, cu=cu, reverse=True)
    check_backward("chunk", xs, gs, dtype, h0, cu=cu)


@pytest.mark.parametrize("engine", ENGINES)
def test_empty_time(engine):
    x = cupy.ones((2, 0, 8), cupy.float32)
    h0 = cupy.asarray(_rng().standard_normal((2, 8)).astype(np.float32))
    o, ht = FORWARD[engine](x, x, initial_state=h0, output_final_state=True)
    assert o.shape == (2, 0, 8)
    assert bool((ht == h0).all()), _seed()
