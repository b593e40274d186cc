"""The GPU plan body on a recording driver (``hgrn_cupy.plans``; CPU).

With torch CPU tensors posing as CUDA ones and reference "kernels" reading and writing through the
packed parameters (``recording.RecordingDriver``), the GPU plan body's launches compute the float64
reference, on the stream read at each call, with the widest accesses each call's pointers allow, and
with kept or fresh scratch; poisoned outputs are filled before the launch.  Kept scratch itself:
``test_workspace.py``.
"""

import numpy as np
import pytest
from conftest import TOL, force_block_walks, rel_err, to_numpy
from recording import CASES, _torch_case, fake_cuda, fresh_plans, launch_args  # noqa: F401  (fixtures)

import hgrn_cupy as hc
from hgrn_cupy import arrays, dispatch, nvrtc, plans, workspace
from hgrn_cupy.engines import chunk, fused_recurrent, fused_variants
from hgrn_cupy.engines.layout import vector_width


# ----------------------------------------------------------------------------------------------
# the GPU plan body on a recording driver (CPU): torch CPU tensors pose as CUDA tensors

def _tol(case):
    return max(TOL[CASES[case][3]], TOL[CASES[case][4]])


@pytest.mark.parametrize("reverse", [False, True], ids=["fwdtime", "reverse"])
@pytest.mark.parametrize("final", [True, False], ids=["final", "no_final"])
@pytest.mark.parametrize("case", list(CASES))
def test_fake_cuda_forward_matches_reference(case, final, reverse, fake_cuda, fresh_plans):
    """The fused forward's GPU plan, made and kept, then called through both front doors: each call's
    launch gets that call's pointers and stream (read at each call) and the same everything else, reads
    h0 in place where it can, and computes the reference."""
    torch = pytest.importorskip("torch")
    import hgrn_cupy.torch as htorch

    gen = torch.Generator().manual_seed(1234)
    x, g, h0 = _torch_case(gen, CASES[case])
    acc = torch.float64 if torch.float64 in (x.dtype, g.dtype) else torch.float32
    ref_o, ref_ht = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g), None if h0 is None else to_numpy(h0), True,
                                            None, reverse)
    tol = _tol(case)

    # a NumPy bool: a plan made for this call alone; then one kept and used through both front doors
    runs = [hc.fused_recurrent_hgrn(x, g, h0, final, None, np.bool_(reverse))]
    assert not fresh_plans
    runs.append(hc.fused_recurrent_hgrn(x, g, h0, final, None, reverse))  # makes the plan
    assert len(fresh_plans) == 1
    fake_cuda.stream = 78  # the stream is read at every call
    runs.append(hc.fused_recurrent_hgrn(x, g, h0, final, None, reverse))
    with torch.no_grad():
        runs.append(htorch.fused_recurrent_hgrn(x, g, h0, final, None, reverse))
    assert len(fresh_plans) == 1

    launches = fake_cuda.launches
    if 0 in (x.shape[0], x.shape[2]):
        assert not launches
    else:
        assert len(launches) == len(runs)
        assert [ln["stream"] for ln in launches] == [77, 77, 78, 78]
        for ln, (o, ht) in zip(launches, runs):
            assert launch_args(ln, ("stream",)) == launch_args(launches[0], ("stream",))
            assert (ln["x"], ln["g"], ln["o"]) == (x.data_ptr(), g.data_ptr(), o.data_ptr())
            assert ln["ht"] == (ht.data_ptr() if final else 0) and (ln["h0"] != 0) == (h0 is not None)
            if h0 is not None and h0.dtype == acc and h0.is_contiguous():
                assert ln["h0"] == h0.data_ptr()  # read in place
    for o, ht in runs:
        assert o.dtype == x.dtype and o.shape == x.shape and o.is_contiguous()
        assert rel_err(o, ref_o) <= tol
        if final:
            assert ht.dtype == acc and ht.shape == (x.shape[0], x.shape[2])
            assert rel_err(ht, ref_ht) <= tol
        else:
            assert ht is None


def test_poisoned_outputs_are_filled_before_the_launch(fake_cuda, fresh_plans, monkeypatch):
    """``plans.poison_outputs(True)`` drops the plans made before; the next plan fills every output with
    all-ones bytes (NaN) on the call's stream before its kernel runs, which then writes them all."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(5)
    x, g, h0 = _torch_case(gen, CASES["decode_f32"])
    hc.fused_recurrent_hgrn(x, g, h0, True)
    assert len(fresh_plans) == 1 and not [e for e in fake_cuda.events if e[0] == "fill"]
    monkeypatch.setattr(arrays, "poison", False)  # the switch is put back after the test
    plans.poison_outputs(True)
    assert not fresh_plans
    fake_cuda.events.clear()
    o, ht = hc.fused_recurrent_hgrn(x, g, h0, True)
    kinds = [e[0] for e in fake_cuda.events]
    assert kinds == ["fill", "fill", "kernel"]
    assert {e[1:] for e in fake_cuda.events[:2]} == {(o.data_ptr(), 0xFF, o.nbytes, 77),
                                                     (ht.data_ptr(), 0xFF, ht.nbytes, 77)}
    ref_o, ref_ht = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g), to_numpy(h0), True)
    assert rel_err(o, ref_o) <= TOL["float32"] and rel_err(ht, ref_ht) <= TOL["float32"]


def _three_bf16_calls(gen, layout, vec, fresh_plans):
    """Three fused forward calls (plan made, then used twice) on 3 x 5 x D bfloat16 inputs against the
    reference: D = 36 ("dense": contiguous; "odd_offset": views one element off a tensor of D + vec
    columns, so the strides are multiples of ``vec`` and the pointers are checked at each call) or 35."""
    D = 35 if layout == "odd_d" else 36
    x, g, h0 = _torch_case(gen, (3, 5, D + vec, "bfloat16", "bfloat16", "float32", "dense"))
    if layout == "odd_offset":
        x, g, h0 = x[..., 1:D + 1], g[..., 1:D + 1], h0[:, 1:D + 1].contiguous()
    else:
        x, g, h0 = x[..., :D].contiguous(), g[..., :D].contiguous(), h0[:, :D].contiguous()
    ref_o, ref_ht = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g), to_numpy(h0), True)
    for _ in range(3):
        o, ht = hc.fused_recurrent_hgrn(x, g, h0, True)
        assert rel_err(o, ref_o) <= TOL["bfloat16"] and rel_err(ht, ref_ht) <= TOL["bfloat16"]
    assert len(fresh_plans) == 1


@pytest.mark.parametrize("layout", ["dense", "odd_offset", "odd_d"])
def test_two_channels_per_thread_where_the_layout_allows(layout, fake_cuda, fresh_plans, monkeypatch):
    """The fused walk takes two channels per thread from WALK_VEC_MIN_CHANNELS on (lowered to 0 here)
    where D, strides and this call's pointers allow it, and one otherwise, planned or not."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(fused_recurrent, "WALK_VEC_MIN_CHANNELS", 0)
    _three_bf16_calls(torch.Generator().manual_seed(7), layout, 2, fresh_plans)
    got = [(ln["kernel"], ln["vec"]) for ln in fake_cuda.launches]
    assert got == [("fused_recurrent_fwd", 2 if layout == "dense" else 1)] * 3


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("layout", ["dense", "odd_offset", "odd_d"])
def test_block_walk_where_the_layout_allows(layout, narrow, fake_cuda, fresh_plans, monkeypatch):
    """The fused forward runs as a block walk (32 x BLOCK_WARPS threads on 32 * VEC channels; 8-byte
    lanes, or 4-byte ones below BLOCK_WALK_NARROW_BELOW channels) where its channel band and T allow
    (opened to everything here) and D, strides and this call's pointers allow the lanes; the thread walk
    otherwise, planned or not."""
    torch = pytest.importorskip("torch")
    force_block_walks(monkeypatch, narrow)
    vec = fused_recurrent.block_walk_width("bfloat16", "bfloat16", 0, narrow)
    _three_bf16_calls(torch.Generator().manual_seed(8), layout, vec, fresh_plans)
    got = [(ln["kernel"], ln["vec"], ln["grid"], ln["block"]) for ln in fake_cuda.launches]
    if layout == "dense":
        assert got == [("fused_recurrent_block_fwd", vec, (1, 3, 1), (32, fused_recurrent.BLOCK_WARPS, 1))] * 3
    else:
        assert [k[:2] for k in got] == [("fused_recurrent_fwd", 1)] * 3


@pytest.mark.parametrize("narrow", [False, True], ids=["rule 8 bytes", "rule 4 bytes"])
@pytest.mark.parametrize("name", sorted(fused_variants.VARIANTS))
def test_variant_launches(name, narrow, fake_cuda, fresh_plans, monkeypatch):
    """A launch variant the tuner may store (``engines.VARIANTS``) runs the block walks with its own lane
    width (forward; else the rule's) and window (the SHORT_STEPS module, else the engine's), the staged
    and bulk ones their own forward kernels with their shared memory (the bulk walk's maps checked by the
    recording driver), computes the reference both ways, and keeps plans of its own."""
    torch = pytest.importorskip("torch")
    force_block_walks(monkeypatch, narrow)
    gen = torch.Generator().manual_seed(9)
    x, g, h0 = _torch_case(gen, (3, 70, 64, "bfloat16", "bfloat16", "float32", "dense"))
    do, dht = torch.randn(3, 70, 64, generator=gen).to(torch.bfloat16), torch.randn(3, 64, generator=gen)
    ref_o, ref_ht = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g), to_numpy(h0), True)
    for _ in range(2):
        o, ht = plans.forward(name, x, g, h0, True, None, False)
        assert rel_err(o, ref_o) <= TOL["bfloat16"] and rel_err(ht, ref_ht) <= TOL["bfloat16"]
    refs = hc.naive_recurrent_hgrn_bwd(*(to_numpy(a) for a in (g, o, do, dht, h0)))
    got = plans.backward(name, g, o, do, dht, h0, None, False)
    for a, ref in zip(got, refs):
        assert rel_err(a, ref) <= TOL["bfloat16"]
    hc.fused_recurrent_hgrn(x, g, h0, True)
    assert len(fresh_plans) == 3
    options = fused_variants.VARIANTS[name]
    lanes, steps = options["lanes"], options["steps"]
    vec = lanes // 2 if lanes else fused_recurrent.block_walk_width("bfloat16", "bfloat16", 0, narrow)
    window = f"-DHC_BLOCK_STEPS={steps or fused_recurrent.BLOCK_STEPS}"
    shipped = f"-DHC_BLOCK_STEPS={fused_recurrent.BLOCK_STEPS}"
    rule_vec = fused_recurrent.block_walk_width("bfloat16", "bfloat16", 0, narrow)
    bwd_vec = fused_recurrent.block_walk_width("bfloat16", "bfloat16", 1)
    staged, bulk = options.get("staged", False), options.get("bulk", False)
    forward = (fused_recurrent.STAGED_KERNEL if staged else fused_recurrent.BULK_KERNEL if bulk
               else "fused_recurrent_block_fwd")
    launched = [(ln["kernel"], ln["vec"], ln["grid"]) for ln in fake_cuda.launches]
    assert launched == [(forward, vec, (-(-64 // (32 * vec)), 3, 1))] * 2 + [
        ("fused_recurrent_block_bwd", bwd_vec, (-(-64 // (32 * bwd_vec)), 3, 1)),
        ("fused_recurrent_block_fwd", rule_vec, (-(-64 // (32 * rule_vec)), 3, 1))]
    windows = [next(o for o in ln["options"] if o.startswith("-DHC_BLOCK_STEPS=")) for ln in fake_cuda.launches]
    assert windows == [window] * 3 + [shipped]
    # the staged and bulk forwards ask for the shared memory of two blocks a SM; the other walks for none
    stage = 2 * fused_recurrent.BLOCK_WARPS * fused_recurrent.BLOCK_STEPS * 2 * 32 * 8
    shared = stage if staged else fused_recurrent.bulk_shared(lanes) if bulk else 0
    assert [(ln["carveout"], ln["shared"]) for ln in fake_cuda.launches] == (
        [(("blocks", 2), shared)] * 2 if shared else [(None, 0)] * 2) + [(None, 0)] * 2


@pytest.mark.parametrize("kept", [True, False], ids=["kept", "fresh"])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_fake_cuda_chunk_launches(offset, kept, fake_cuda, fresh_plans, monkeypatch):
    """The chunk engine's planned launches, forward and backward (without and with states), compute the
    reference, with 16-byte accesses only where the call's pointers allow them and the same arguments
    at every call but the pointers.  Kept scratch: one buffer, filled once when it is made; fresh
    scratch: filled before each launch."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(hc.config, "keep_workspaces", kept)
    gen = torch.Generator().manual_seed(3)
    base_x = torch.randn(3, 300, 72, generator=gen).to(torch.bfloat16)
    base_g = torch.nn.functional.logsigmoid(torch.randn(3, 300, 72, generator=gen)).to(torch.bfloat16)
    x, g = base_x[:, :, offset:offset + 64], base_g[:, :, offset:offset + 64]  # views: pointers 2 bytes off or not
    do = torch.randn(3, 300, 64, generator=gen).to(torch.bfloat16)
    dht, h0 = torch.randn(3, 64, generator=gen), torch.randn(3, 64, generator=gen).to(torch.bfloat16)
    outs = [hc.chunk_hgrn(x, g)[0] for _ in range(3)]  # the plan is made, then used
    o = outs[0]
    outs += [hc.hgrn_backward(g, o, do, engine="chunk") for _ in range(3)]
    outs += [hc.hgrn_backward(g, o, do, dht, h0, engine="chunk") for _ in range(3)]  # with states: a key of its own
    assert len(fresh_plans) == 3  # one forward key, two backward keys

    ref_o = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g))[0]
    refs = [hc.naive_recurrent_hgrn_bwd(to_numpy(g), to_numpy(o), to_numpy(do), *states)
            for states in ((None, None), (to_numpy(dht), to_numpy(h0)))]
    for k, out in enumerate(outs):
        if k < 3:
            assert rel_err(out, ref_o) <= TOL["bfloat16"], k
            continue
        ref = refs[k >= 6]
        assert rel_err(out[0], ref[0]) <= TOL["bfloat16"] and rel_err(out[1], ref[1]) <= TOL["bfloat16"], k
        assert (out[2] is None) if k < 6 else (out[2].dtype == torch.bfloat16 and rel_err(out[2], ref[2])
                                               <= TOL["bfloat16"]), k

    kernels = [e[1] for e in fake_cuda.events if e[0] == "kernel"]
    fills = [e for e in fake_cuda.events if e[0] == "fill"]
    assert len(kernels) == 9 and len(fills) == (1 if kept else 9)
    assert all(k["h0"] and k["dht"] and k["dh0"] for k in kernels[6:])
    assert not any(k["h0"] or k["dht"] or k["dh0"] for k in kernels[3:6])
    vec = 1 if offset else vector_width("bfloat16", "bfloat16")  # views 2 bytes off take no 16-byte accesses
    for kernel, group in (("chunk_fwd", kernels[:3]), ("chunk_bwd", kernels[3:6]), ("chunk_bwd", kernels[6:])):
        first = group[0]
        assert first["kernel"] == kernel and first["vec"] == vec
        assert first["stagger"] == chunk.stagger(first["grid"][0], 8) > 0  # more blocks than the 8 at once
        # the shared-memory split is asked for before the occupancy query that sets the stagger
        assert first["carveout"] == first["carveout_seen"] == chunk.CARVEOUT
        for k in group[1:]:
            assert launch_args(k) == launch_args(first)
    if kept:  # one buffer (MIN_BYTES at least), filled with ones before the first launch, then used as it is
        (_, p, v, n, s), = fills
        assert fake_cuda.events[0][0] == "fill" and v == 0xFF and s == fake_cuda.stream and n == workspace.MIN_BYTES
        assert [w[0] for w in workspace._kept.values()] == [p]
        for k in kernels:
            assert k["stream"] == s and k["hdr"] == p and k["slots"] + k["capacity"] == p + n
    else:
        assert [e[0] for e in fake_cuda.events] == ["fill", "kernel"] * 9  # each launch's scratch filled first
        for (_, p, v, n, s), (_, k) in zip(fake_cuda.events[::2], fake_cuda.events[1::2]):
            assert v == 0xFF and s == k["stream"] == fake_cuda.stream and k["hdr"] == p
            assert k["slots"] > p and k["slots"] + k["capacity"] == p + n
        assert not workspace._kept
    assert kernels[0]["x"] == x.data_ptr() and kernels[3]["do"] == do.data_ptr()


@pytest.mark.parametrize("shape", [(3, 300, 64), (2, 200, 4096), (3, 1, 64)], ids=["walk", "block_walk", "step"])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_fake_cuda_fused_backward(shape, offset, fake_cuda, fresh_plans):
    """The fused engine's planned backward launches, without and with states, compute the reference: the
    single step at T = 1 and the block walk where the layout and the pointers allow them, else the walk,
    one channel a thread where a pointer is misaligned; every call with its own pointers and the same
    everything else."""
    torch = pytest.importorskip("torch")
    B, T, D = shape
    gen = torch.Generator().manual_seed(5)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, D + 8, generator=gen)).to(torch.bfloat16)
    g = g[:, :, offset:offset + D]
    o, do = (torch.randn(B, T, D, generator=gen).to(torch.bfloat16) for _ in range(2))
    dht, h0 = torch.randn(B, D, generator=gen), torch.randn(B, D, generator=gen)
    outs = []
    for states in ((None, None), (dht, h0)):
        ref = hc.naive_recurrent_hgrn_bwd(to_numpy(g), to_numpy(o), to_numpy(do),
                                          *(None if s is None else to_numpy(s) for s in states))
        for _ in range(3):  # the plan is made, then used
            out = hc.hgrn_backward(g, o, do, *states, engine="fused_recurrent")
            assert rel_err(out[0], ref[0]) <= TOL["bfloat16"] and rel_err(out[1], ref[1]) <= TOL["bfloat16"]
            assert out[2] is None if states[1] is None else rel_err(out[2], ref[2]) <= TOL["float32"]
            outs.append(out)
    calls = fake_cuda.launches
    assert len(fresh_plans) == 2 and len(calls) == 6
    block = fused_recurrent.block_walk_fits(B, T, D, "bfloat16", "bfloat16", 1) if not offset else 0
    assert (D == 4096) == bool(fused_recurrent.block_walk_fits(B, T, D, "bfloat16", "bfloat16", 1))
    step = T == 1 and not offset
    assert calls[0]["kernel"] == ("fused_recurrent_step_bwd" if step else
                                  "fused_recurrent_block_bwd" if block else "fused_recurrent_bwd")
    assert calls[0]["vec"] == (8 if step else block or 1)
    for group, out in ((calls[:3], outs[:3]), (calls[3:], outs[3:])):
        first = group[0]
        for c, (dx, dg, dh0) in zip(group, out):
            assert c["stream"] == fake_cuda.stream
            assert launch_args(c) == launch_args(first)
            assert (c["g"], c.get("o", o.data_ptr()), c["do"]) == (g.data_ptr(), o.data_ptr(), do.data_ptr())
            assert ("o" in c) != step  # the step reads no o
            assert (c["dx"], c["dg"]) == (dx.data_ptr(), dg.data_ptr())
            assert c["dh0"] == (0 if dh0 is None else dh0.data_ptr())
    assert not any(c["h0"] or c["dht"] for c in calls[:3])
    assert all(c["h0"] == h0.data_ptr() and c["dht"] == dht.data_ptr() for c in calls[3:])  # read in place


@pytest.mark.parametrize("reverse", [False, True], ids=["fwdtime", "reverse"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_fake_cuda_fused_past_one_grid(varlen, reverse, fake_cuda, fresh_plans, monkeypatch):
    """More sequences than a grid's y extent holds (MAX_GRID_Y, 7 here): the walks run in launches of 7
    and of the rest, each with its first sequence's pointers (tensors by batch rows, or cu_seqlens by
    entries; states by rows), and the whole computes the reference forward and backward with states
    (varlen with an empty sequence; the recording driver refuses a grid past the bound)."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(fused_recurrent, "MAX_GRID_Y", 7)
    gen = torch.Generator().manual_seed(31)
    N, T, D = 17, 9, 5
    lens = torch.randint(0, 6, (N,), generator=gen).tolist()
    lens[3] = 0
    cu = torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int32) if varlen else None
    shape = (1, int(sum(lens)), D) if varlen else (N, T, D)
    x, do = (torch.randn(*shape, generator=gen) for _ in range(2))
    g = torch.nn.functional.logsigmoid(torch.randn(*shape, generator=gen))
    h0, dht = torch.randn(N, D, generator=gen), torch.randn(N, D, generator=gen)
    cur = None if cu is None else cu.numpy()
    ref_o, ref_ht = hc.naive_recurrent_hgrn(*map(to_numpy, (x, g, h0)), True, cur, reverse)
    o, ht = hc.fused_recurrent_hgrn(x, g, h0, True, cu, reverse)
    ref = hc.naive_recurrent_hgrn_bwd(to_numpy(g), to_numpy(o), to_numpy(do), to_numpy(dht), to_numpy(h0), cur,
                                      reverse)
    grads = hc.hgrn_backward(g, o, do, dht, h0, cu, reverse, engine="fused_recurrent")
    for got, want in zip((o, ht, *grads), (ref_o, ref_ht, *ref)):
        assert rel_err(got, want) <= TOL["float32"]
    calls = fake_cuda.launches
    assert [c["grid"][1] for c in calls] == [7, 7, 3] * 2
    state_rows = 7 * D * 4
    for k, c in enumerate(calls):
        n0 = 7 * (k % 3)
        if varlen:
            assert c["cu"] == cu.data_ptr() + 4 * n0 and c["x" if k < 3 else "g"] == (x if k < 3 else g).data_ptr()
        else:
            assert c["x" if k < 3 else "g"] == (x if k < 3 else g).data_ptr() + n0 * T * D * 4
        assert c["h0"] == h0.data_ptr() + (k % 3) * state_rows


def test_fake_cuda_narrow_backward(fake_cuda, fresh_plans, monkeypatch):
    """The 16-bit backward on a grid of at most NARROW_BWD_MAX_TILES two-row tiles launches four-row warps
    from the narrow module (compiled with those rows), over the tiles and chunks of that shape, and
    computes the reference; with one tile more it launches SHAPES' two-row warps from the usual module."""
    torch = pytest.importorskip("torch")
    asked = []
    real = nvrtc.get_function
    monkeypatch.setattr(nvrtc, "get_function", lambda source, names, name, device, options=():
                        asked.append((name, options)) or real(source, names, name, device, options))
    gen = torch.Generator().manual_seed(5)
    T = 300
    for B, narrow in ((1, True), (chunk.NARROW_BWD_MAX_TILES + 1, False)):
        x = torch.randn(B, T, 64, generator=gen).to(torch.bfloat16)
        g = torch.nn.functional.logsigmoid(torch.randn(B, T, 64, generator=gen)).to(torch.bfloat16)
        do = torch.randn(B, T, 64, generator=gen).to(torch.bfloat16)
        o = hc.chunk_hgrn(x, g)[0]
        dx, dg, _ = hc.hgrn_backward(g, o, do, engine="chunk")
        rdx, rdg, _ = hc.naive_recurrent_hgrn_bwd(to_numpy(g), to_numpy(o), to_numpy(do))
        assert rel_err(dx, rdx) <= TOL["bfloat16"] and rel_err(dg, rdg) <= TOL["bfloat16"]
        warps, rows, steps = chunk.NARROW_BWD if narrow else chunk.SHAPES[1, True]
        launch = fake_cuda.launches[-1]
        assert launch["kernel"] == "chunk_bwd" and launch["vec"] == 8 and launch["block"] == (32, warps, 1)
        tile, length = 32 // rows * 8, warps * rows * steps
        assert (launch["ntiles"], launch["nchunks"]) == (B * -(-64 // tile), -(-T // length))
        options = asked[-1][1]
        assert (options == chunk.NARROW_BWD_OPTIONS) == narrow and f"-DHC_BWD_ROWS_V={rows}" in options


def test_fake_cuda_far_prefetch(fake_cuda, fresh_plans, monkeypatch):
    """The far-prefetch variant (``chunk.FAR``), a candidate of the float32 forwards whose grid takes the L2
    prefetch, launches the forward's vector kernel with the prefetch FAR_AHEAD tickets ahead where the
    engine's rule asks L2_AHEAD, and computes the reference; its backward is the engine's own."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(chunk, "L2_MIN_BLOCKS", 2)  # a grid of one tile and three chunks takes the prefetch
    gen = torch.Generator().manual_seed(11)
    x, g, do = torch.randn(3, 1, 300, 64, generator=gen)
    g = torch.nn.functional.logsigmoid(g)
    assert chunk.FAR in dispatch.candidates(1, 300, 64, ("float32", "float32"), 0)
    assert chunk.FAR not in dispatch.candidates(1, 300, 64, ("float32", "float32"), 1)
    assert chunk.FAR not in dispatch.candidates(1, 300, 64, ("bfloat16", "bfloat16"), 0)
    ref_o = hc.naive_recurrent_hgrn(to_numpy(x), to_numpy(g))[0]
    refs = hc.naive_recurrent_hgrn_bwd(to_numpy(g), ref_o, to_numpy(do))
    for name in ("chunk", chunk.FAR):
        o = plans.forward(name, x, g, None, False, None, False)[0]
        dx, dg, _ = plans.backward(name, g, o, do, None, None, None, False)
        assert rel_err(o, ref_o) <= TOL["float32"], name
        assert rel_err(dx, refs[0]) <= TOL["float32"] and rel_err(dg, refs[1]) <= TOL["float32"], name
    got = [(ln["kernel"], ln["vec"], ln["l2_ahead"]) for ln in fake_cuda.launches]
    assert got == [("chunk_fwd", 4, chunk.L2_AHEAD), ("chunk_bwd", 4, chunk.L2_AHEAD),
                   ("chunk_fwd", 4, chunk.FAR_AHEAD), ("chunk_bwd", 4, chunk.L2_AHEAD)], got
    assert chunk.FAR_AHEAD != chunk.L2_AHEAD
