"""Planned calls on a GPU (``hgrn_cupy.plans``, ``hgrn_cupy.dispatch``; GPU-marked).

Planned CuPy and torch calls, forward and backward, with and without states, against the reference:
the first call makes the plan and later ones use it, each with its own pointers' alignment, on the
caller's stream, and bit for bit as a plan made for one call.  ``hgrn`` (and ``hgrn_backward`` with
``engine="auto"``) runs, bit for bit, the engine the dispatch names, on both sides of the built-in
crossover, with the rule and with tuning.
"""
import zlib

import numpy as np
import pytest
from conftest import TOL, rel_err, to_numpy
from recording import CASES, _torch_case, fresh_plans  # noqa: F401  (a fixture)

import hgrn_cupy as hc
from hgrn_cupy import checks, dispatch, plans, tuning


# ----------------------------------------------------------------------------------------------
# planned calls through CuPy and torch, against the reference

GPU_CASES = ["decode_f32", "decode_bf16", "batch_mixed_f16_state", "views", "no_state", "chunks_bf16"]
CASES_GPU = dict(CASES, chunks_bf16=(2, 700, 136, "bfloat16", "bfloat16", "float32", "dense"))  # many chunks


def _to_cupy(t):
    cupy = pytest.importorskip("cupy")
    import torch

    if t.dtype == torch.bfloat16:
        ml_dtypes = pytest.importorskip("ml_dtypes")
        return cupy.from_dlpack(t.view(torch.int16)).view(ml_dtypes.bfloat16)
    return cupy.from_dlpack(t)


@pytest.mark.gpu
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("engine", ["fused_recurrent", "chunk"])
@pytest.mark.parametrize("fw", ["cupy", "torch"])
@pytest.mark.parametrize("case", GPU_CASES)
def test_planned_calls_gpu(fw, case, engine, fresh_plans):
    torch = pytest.importorskip("torch")
    seed = 7
    gen = torch.Generator().manual_seed(seed)
    x, g, h0 = _torch_case(gen, CASES_GPU[case], "cuda")
    if fw == "cupy":
        x, g, h0 = (None if a is None else _to_cupy(a) for a in (x, g, h0))
    ref = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g), None if h0 is None else to_numpy(h0), True)
    tol = max(TOL[CASES_GPU[case][3]], TOL[CASES_GPU[case][4]])
    forward = hc.chunk_hgrn if engine == "chunk" else hc.fused_recurrent_hgrn
    for _ in range(3):  # the first call makes the plan, the others use it
        o, ht = forward(x, g, h0, True)
        assert rel_err(o, ref[0]) <= tol and rel_err(ht, ref[1]) <= tol, f"seed {seed}"
        assert type(o) is type(x) and o.dtype == x.dtype
    assert len(fresh_plans) == 1


@pytest.mark.gpu
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("fw", ["cupy", "torch"])
def test_planned_chunk_call_follows_each_calls_alignment(fw, fresh_plans):
    """Two calls with one key (shape, strides, dtypes) whose pointers differ in alignment: the planned
    chunk launch takes 16-byte accesses for the first and element accesses for the second."""
    torch = pytest.importorskip("torch")
    seed = 11
    gen = torch.Generator().manual_seed(seed)
    base_x = torch.randn(2, 700, 144, generator=gen, dtype=torch.float64)
    base_g = torch.nn.functional.logsigmoid(torch.randn(2, 700, 144, generator=gen, dtype=torch.float64))
    bx, bg = base_x.to("cuda", torch.bfloat16), base_g.to("cuda", torch.bfloat16)
    for off in (0, 1, 0):  # 16-byte aligned, 2 bytes off, aligned again
        x, g = bx[:, :, off:off + 136], bg[:, :, off:off + 136]
        if fw == "cupy":
            x, g = _to_cupy(x), _to_cupy(g)
        o, ht = hc.chunk_hgrn(x, g, None, True)
        ref = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g), None, True)
        assert rel_err(o, ref[0]) <= TOL["bfloat16"] and rel_err(ht, ref[1]) <= TOL["bfloat16"], (f"seed {seed}", off)
    assert len(fresh_plans) == 1


@pytest.mark.gpu
@pytest.mark.usefixtures("poison")
def test_chunk_kernels_ask_for_their_shared_memory_split(fresh_plans):
    """Every chunk kernel a call loads (forward and backward, 16-byte and element accesses) carries the
    engine's shared-memory preference, read back from the driver; the call computes the reference."""
    torch = pytest.importorskip("torch")
    from cupy_backends.cuda.api import driver

    from hgrn_cupy import nvrtc
    from hgrn_cupy.engines import chunk

    seed = 13
    gen = torch.Generator().manual_seed(seed)
    x, g, _ = _torch_case(gen, (2, 700, 144, "bfloat16", "bfloat16", None, "dense"), "cuda")
    for xs, gs in ((x[..., :136], g[..., :136]), (x[..., 1:137], g[..., 1:137])):  # 16-byte accesses, then not
        o, _ = hc.chunk_hgrn(xs, gs)
        do = torch.randn(o.shape, generator=gen).to("cuda", torch.bfloat16)
        dx, dg, _ = hc.hgrn_backward(gs, o, do, engine="chunk")
        ref = hc.naive_recurrent_hgrn_bwd(to_numpy(gs), to_numpy(o), to_numpy(do))
        assert rel_err(dx, ref[0]) <= TOL["bfloat16"] and rel_err(dg, ref[1]) <= TOL["bfloat16"], f"seed {seed}"
    # The staged forward asks for its own split (test_chunk_staged_gpu.py); other tests in this process load it.
    loaded = {key[2]: fn for key, fn in nvrtc._functions.items()
              if key[0] == chunk.SOURCE and key[2].split("<")[0] != "hc::" + chunk.STAGED_KERNEL}
    assert {n.split("<")[0] for n in loaded} == {"hc::chunk_fwd", "hc::chunk_bwd"} and len(loaded) >= 4
    attr = driver.CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
    assert {n: driver.funcGetAttribute(attr, fn.ptr) for n, fn in loaded.items()} == \
           {n: chunk.CARVEOUT for n in loaded}


@pytest.mark.gpu
@pytest.mark.usefixtures("poison")
def test_planned_torch_call_on_a_side_stream():
    """The planned launch goes on torch's current stream: the side stream first sleeps, then
    overwrites the inputs; a kernel queued on any other stream would read the old values."""
    torch = pytest.importorskip("torch")
    import hgrn_cupy.torch as htorch

    seed = 11
    gen = torch.Generator().manual_seed(seed)
    x, g, h0 = _torch_case(gen, CASES["decode_f32"], "cuda")
    new = [a + 1 for a in (x, g.exp() - 2, h0)]
    with torch.no_grad():
        htorch.fused_recurrent_hgrn(x, g, h0, True)  # the plan
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            torch.cuda._sleep(50_000_000)
            for a, b in zip((x, g, h0), new):
                a.copy_(b)
            o, ht = htorch.fused_recurrent_hgrn(x, g, h0, True)
        s.synchronize()
    ref = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g), to_numpy(h0), True)
    assert rel_err(o, ref[0]) <= TOL["float32"] and rel_err(ht, ref[1]) <= TOL["float32"], f"seed {seed}"


BACKWARD_CASES = {  # (B, T, D, o and do dtype, g dtype, do dtype, layout)
    "bf16_chunks": (2, 700, 136, "bfloat16", "bfloat16", "bfloat16", "dense"),
    "f32_do_cast": (3, 300, 40, "float32", "float32", "bfloat16", "dense"),
    "time_stride": (2, 333, 64, "float16", "float32", "float16", "time_stride"),
}


@pytest.mark.gpu
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("engine", ["fused_recurrent", "chunk"])
@pytest.mark.parametrize("fw", ["cupy", "torch"])
@pytest.mark.parametrize("case", list(BACKWARD_CASES))
def test_planned_backward_gpu(fw, case, engine, fresh_plans):
    """Backward calls without states: the first makes the plan, the others use it; each against the
    reference, and the kept plan's results equal, bit for bit, those of a plan made for one call (a
    NumPy bool ``reverse`` is never kept)."""
    torch = pytest.importorskip("torch")
    B, T, D, od, gd, dd, layout = BACKWARD_CASES[case]
    seed = 13
    gen = torch.Generator().manual_seed(seed)
    step = 3 if layout == "time_stride" else 1
    x = torch.randn(B, T * step, D, generator=gen, dtype=torch.float64)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T * step, D, generator=gen, dtype=torch.float64))
    do = torch.randn(B, T * step, D, generator=gen, dtype=torch.float64)
    x, g, do = (a.to("cuda")[:, ::step] for a in (x, g, do))
    x, g, do = x.to(getattr(torch, od)), g.to(getattr(torch, gd)), do.to(getattr(torch, dd))
    o = hc.fused_recurrent_hgrn(x, g)[0]  # row-major
    if layout == "time_stride":  # o read through a strided view as well
        o = torch.repeat_interleave(o, 3, dim=1)[:, ::3]
    if fw == "cupy":
        g, o, do = _to_cupy(g), _to_cupy(o), _to_cupy(do)
    fresh_plans.clear()  # the forward above made one
    ref = hc.naive_recurrent_hgrn_bwd(to_numpy(g), to_numpy(o), to_numpy(do))
    tol = max(TOL[od], TOL[gd], TOL[dd])
    single = hc.hgrn_backward(g, o, do, None, None, None, np.bool_(False), engine=engine)  # not kept
    assert not fresh_plans
    for _ in range(3):
        dx, dg, dh0 = hc.hgrn_backward(g, o, do, engine=engine)
        assert dh0 is None and type(dx) is type(o)
        assert rel_err(dx, ref[0]) <= tol and rel_err(dg, ref[1]) <= tol, f"seed {seed}"
        for a, b in zip((dx, dg), single[:2]):
            assert bool((a == b).all()), f"seed {seed}"
    assert len(fresh_plans) == 1


BACKWARD_STATE_CASES = {  # (dht present, h0 dtype or None, h0 a strided view)
    "dht": (True, None, False),
    "h0_f32": (False, "float32", False),
    "both_h0_bf16": (True, "bfloat16", False),
    "both_h0_strided": (True, "float32", True),
}


@pytest.mark.gpu
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("engine", ["fused_recurrent", "chunk"])
@pytest.mark.parametrize("fw", ["cupy", "torch"])
@pytest.mark.parametrize("case", list(BACKWARD_STATE_CASES))
def test_planned_backward_states_gpu(fw, case, engine, fresh_plans):
    """Backward calls with states (dht, an initial state in float32, in bfloat16 and as a strided view):
    the first makes the plan, the others use it; each against the reference, dh0 in the initial state's
    dtype, and the kept plan's results equal, bit for bit, those of a plan made for one call."""
    torch = pytest.importorskip("torch")
    with_dht, h0_dtype, strided = BACKWARD_STATE_CASES[case]
    B, T, D = 2, 500, 72
    seed = 21
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, D, generator=gen, dtype=torch.float64))
    do = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    dht = torch.randn(B, D, generator=gen, dtype=torch.float64).to("cuda", torch.float32) if with_dht else None
    h0 = None
    if h0_dtype:
        h0 = torch.randn(B, 2 * D, generator=gen, dtype=torch.float64).to("cuda", getattr(torch, h0_dtype))
        h0 = h0[:, ::2] if strided else h0[:, :D].contiguous()
    x, g, do = (a.to("cuda", torch.bfloat16) for a in (x, g, do))
    o = hc.fused_recurrent_hgrn(x, g, h0)[0]
    if fw == "cupy":
        g, o, do = _to_cupy(g), _to_cupy(o), _to_cupy(do)
        dht, h0 = (None if a is None else _to_cupy(a) for a in (dht, h0))
    fresh_plans.clear()  # the forward above made one
    ref = hc.naive_recurrent_hgrn_bwd(to_numpy(g), to_numpy(o), to_numpy(do), None if dht is None else to_numpy(dht),
                                      None if h0 is None else to_numpy(h0))
    tol = max(TOL["bfloat16"], TOL[h0_dtype or "float32"])
    single = hc.hgrn_backward(g, o, do, dht, h0, None, np.bool_(False), engine=engine)  # not kept
    assert not fresh_plans
    for _ in range(3):
        got = hc.hgrn_backward(g, o, do, dht, h0, engine=engine)
        assert type(got[0]) is type(o) and (got[2] is None) == (h0 is None)
        for k in range(3 if h0 is not None else 2):
            assert rel_err(got[k], ref[k]) <= tol, (f"seed {seed}", k)
            assert bool((got[k] == single[k]).all()), (f"seed {seed}", k)
        if h0 is not None:
            assert got[2].dtype == h0.dtype and tuple(got[2].shape) == (B, D)
    assert len(fresh_plans) == 1


# ----------------------------------------------------------------------------------------------
# ``hgrn`` runs the engine the dispatch names, on both sides of the built-in crossover

def _shape_where_rule_says(engine, dtype, direction):
    """The (B, T, D) with the fewest channels (B * D) among a spread of shapes, T past FUSED_MAX_T, on
    which the built-in rule names ``engine``."""
    T = 4 * dispatch.FUSED_MAX_T
    shapes = sorted(((B, T, D) for B in (1, 2, 4, 8, 16, 32) for D in (64, 256, 1024, 4096, 16384, 65536)),
                    key=lambda s: (s[0] * s[2], s[0]))
    for B, T, D in shapes:
        if dispatch.rule(B, T, D, (dtype, dtype), direction) == engine:
            return B, T, D
    pytest.fail(f"the rule names {engine} for none of {shapes} ({dtype}, direction {direction})")


@pytest.mark.gpu
@pytest.mark.parametrize("tune", [False, True], ids=["rule", "tuned"])
@pytest.mark.parametrize("side", dispatch.CANDIDATES)
@pytest.mark.parametrize("direction", [0, 1], ids=["forward", "backward"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_auto_runs_the_engine_dispatch_chooses(dtype, direction, side, tune, fresh_plans, monkeypatch, tmp_path,
                                               request):
    """``hgrn`` (and ``hgrn_backward(engine="auto")``) gives, bit for bit, the result of the engine (or
    launch variant) that ``dispatch.choose`` names for the call, on a shape where the built-in rule says ``side``: with
    ``config.tune`` off that engine is the rule's (so both engines run here), with it on the measured
    one, kept for the next call (decisions in a fresh cache folder)."""
    cupy = pytest.importorskip("cupy")
    monkeypatch.setenv("HGRN_CUPY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hc.config, "engine", "auto")
    monkeypatch.setattr(hc.config, "tune", tune)
    tuning.forget()  # no decision from an earlier test
    request.addfinalizer(tuning.forget)
    B, T, D = _shape_where_rule_says(side, dtype, direction)
    seed = zlib.crc32(request.node.nodeid.encode())
    rng = cupy.random.default_rng(seed)
    x, g, do = (tuning._random(cupy, (B, T, D), dtype, rng, gate=k == 1) for k in range(3))
    what = f"seed {seed}, shape {(B, T, D)}"
    if direction == 0:
        auto = hc.hgrn(x, g, None, True)
        call = checks.check_forward(x, g, None, None, True, False)
    else:
        o = hc.fused_recurrent_hgrn(x, g)[0]
        auto = hc.hgrn_backward(g, o, do)
        call = checks.check_backward(g, o, do, None, None, None, False)
    name = dispatch.choose("auto", call, direction, False, x.data.device_id)
    if not tune:
        assert name == side, what
    if direction == 0:  # the tuner's choice may be a launch variant, which only the internal interface names
        pinned = plans.forward(name, x, g, None, True, None, False)
    else:
        pinned = plans.backward(name, g, o, do, None, None, None, False)
    assert len(auto) == len(pinned)
    for k, (a, b) in enumerate(zip(auto, pinned)):
        if a is None:
            assert b is None, (what, k)
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, (what, k)
        assert bool(cupy.array_equal(a.view(cupy.uint8), b.view(cupy.uint8))), (what, name, k)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [(0, "bfloat16", (4, 129, 4096)), (0, "float16", (3, 65, 4096)),
                                  (0, "bfloat16", (2, 1000, 6144)), (0, "float32", (2, 100, 8192)),
                                  (1, "bfloat16", (4, 129, 4096)), (1, "float32", (3, 65, 4096))],
                         ids=lambda c: f"{('fwd', 'bwd')[c[0]]}-{c[1]}-{'x'.join(map(str, c[2]))}")
def test_tuned_variants(case, fresh_plans, poison, monkeypatch, tmp_path, request):
    """Where a call's tuning measures launch variants of the fused engine (block walks of the other lane
    width, windows of SHORT_STEPS steps, the staged forward, the bulk walk), each one stored as the decision
    is what ``hgrn`` (or ``hgrn_backward``) then runs: its block walk (or the staged or bulk one) at that
    width, from the module of that window, with the states in and out, within tolerance of the float64
    reference (outputs poisoned); the decision is kept."""
    cupy = pytest.importorskip("cupy")
    from gpu_kernel_checks import launched_kernels

    from hgrn_cupy import nvrtc
    from hgrn_cupy.engines import fused_recurrent as fr
    from hgrn_cupy.engines import fused_variants

    direction, dtype, (B, T, D) = case
    seed = zlib.crc32(request.node.nodeid.encode())
    rng = cupy.random.default_rng(seed)
    x, g, do = (tuning._random(cupy, (B, T, D), dtype, rng, gate=k == 1) for k in range(3))
    h0, dht = (tuning._random(cupy, (B, D), "float32", rng) for _ in range(2))
    f64 = [cupy.asnumpy(a).astype(np.float64) for a in (x, g, h0)]
    if direction == 0:
        refs = hc.naive_recurrent_hgrn(*f64, True)
    else:
        o = hc.fused_recurrent_hgrn(x, g, h0)[0]
        refs = hc.naive_recurrent_hgrn_bwd(f64[1], cupy.asnumpy(o).astype(np.float64),
                                           cupy.asnumpy(do).astype(np.float64), cupy.asnumpy(dht), f64[2])
    names = dispatch.candidates(B, T, D, (dtype, dtype), direction)
    assert set(names[2:]) <= set(fused_variants.VARIANTS)
    assert f"fused_recurrent, {fr.SHORT_STEPS}-step windows" in names
    monkeypatch.setenv("HGRN_CUPY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hc.config, "engine", "auto")
    monkeypatch.setattr(hc.config, "tune", True)
    monkeypatch.setattr(tuning.settings, "on_disk", False)
    request.addfinalizer(tuning.forget)
    key = tuning.shape_class(direction, (dtype, dtype), B, T, D, False)
    requested, get = [], nvrtc.get_function  # (kernel, compile options) of each function a plan asks for
    monkeypatch.setattr(nvrtc, "get_function",
                        lambda source, names, name, device, options=(): (requested.append((name, options)),
                                                                         get(source, names, name, device, options))[1])
    launched = launched_kernels(monkeypatch)
    for name in (n for n in names if n != "chunk"):  # the engine as its rules say, then each variant
        tuning.forget()
        fresh_plans.clear()
        requested.clear()
        launched.clear()
        # the decision this call's measurement would store, stored ahead of it
        assert tuning._store(tuning.device_key(x.data.device_id), repr(key), name, keep=()) == name
        options = fused_variants.VARIANTS.get(name, {"lanes": None, "steps": None})
        steps = options["steps"] or fr.BLOCK_STEPS
        what = f"seed {seed}, {case}, {name}"
        if direction == 0:
            outs = hc.hgrn(x, g, h0, True)
            nbytes = options["lanes"] or (4 if dtype != "float32" and B * D < fr.BLOCK_WALK_NARROW_BELOW else 8)
        else:
            outs, nbytes = hc.hgrn_backward(g, o, do, dht, h0), 4
            call = checks.check_backward(g, o, do, dht, h0, None, False)
        forward = (fr.STAGED_KERNEL if options.get("staged") else fr.BULK_KERNEL if options.get("bulk")
                   else "fused_recurrent_block_fwd")
        kernel = (forward, "fused_recurrent_block_bwd")[direction]
        assert [k[0] for k in launched] == [kernel], (what, launched)
        assert launched[0][-1] == str(max(1, nbytes // nvrtc.ITEMSIZE[dtype])), (what, launched)
        # the bulk walk's plan also holds the block walk, for pointers its maps cannot take
        windows = [opts[-1] for kname, opts in requested if any(k in kname for k in ("_block_", "_staged_", "_bulk_"))]
        assert windows == [f"-DHC_BLOCK_STEPS={steps}"] * (2 if options.get("bulk") else 1), (what, requested)
        for k, (a, ref) in enumerate(zip(outs, refs)):
            assert rel_err(a, ref) <= TOL[dtype], (what, k)
        if direction == 0:
            call = checks.check_forward(x, g, h0, None, True, False)
        assert dispatch.choose("auto", call, direction, False, x.data.device_id) == name, what
