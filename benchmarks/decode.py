"""The decode section: one step (T = 1) with the state in and out, as a generation loop calls it.

* host time per call at 1x1x1024: ``--decode-calls`` calls back to back, one synchronisation at the
  end (after ``--decode-warmup`` calls), each call taking the state the previous one returned;
* device time at 64x1x4096 two ways: per call as the run's timer sees it (do_bench: L2 flushed,
  so each call pays a launch's fixed cost, shown by the empty kernel's row) and per step when steps
  run back to back on rotating inputs (CUDA events around batches), as in a decode loop.

Steps: ours-fused / ours-auto (``hgrn_cupy.fused_recurrent_hgrn`` / ``hgrn_cupy.hgrn``), ours-torch
(``hgrn_cupy.torch.fused_recurrent_hgrn``), fla-fused, torch-eager.  Floors of the device shape: the
copy floor (x, g, o and the float32 state in and out over the copy bandwidth) and the practical floor
(``torch.add(x, g, out=o)`` by the same timer, scaled by those bytes over the add's)."""
from __future__ import annotations

import time

from .checks import note_first_call, rel_err
from .context import log, one_line
from .impls.torch_loop import eager_step
from .plan import BUDGET_NOTE, DECODE_DEVICE_SHAPE, DECODE_HOST_SHAPE, ITEMSIZE, TOL, impl_selected
from .report import fmt_ms
from .sections import add_fns
from .timing import Timer, rotating, rotation_count


def decode_steps(ctx):
    steps = {}
    if ctx.hc is not None:
        hc, hct = ctx.hc, ctx.hct
        if "ours-fused" in ctx.impls:
            steps["ours-fused"] = lambda x, g, h: hc.fused_recurrent_hgrn(x, g, initial_state=h,
                                                                          output_final_state=True)
        if "ours-auto" in ctx.impls:
            steps["ours-auto"] = lambda x, g, h: hc.hgrn(x, g, initial_state=h, output_final_state=True)
        if impl_selected(ctx.args, "ours-torch"):
            steps["ours-torch"] = lambda x, g, h: hct.fused_recurrent_hgrn(x, g, initial_state=h,
                                                                           output_final_state=True)
    if ctx.fla is not None and "fla-fused" in ctx.impls:
        fla_fused = ctx.fla.fused_recurrent_hgrn
        steps["fla-fused"] = lambda x, g, h: fla_fused(x, g, initial_state=h, output_final_state=True)
    if impl_selected(ctx.args, "torch-eager"):
        steps["torch-eager"] = eager_step(ctx.torch)
    return steps


def run_decode(ctx, copy_gbps, shapes=(DECODE_HOST_SHAPE, DECODE_DEVICE_SHAPE)):
    torch, args = ctx.torch, ctx.args
    dtype = "bfloat16" if ctx.device == "cuda" else "float32"
    dt = getattr(torch, dtype)
    F = torch.nn.functional
    steps = decode_steps(ctx)
    (Bh, Th, Dh), (B, T, D) = shapes
    res = {"host_shape": [Bh, Th, Dh], "device_shape": [B, T, D], "dtype": dtype, "calls": args.decode_calls,
           "impls": {}}
    n = B * T * D
    dev_bytes = 3 * n * ITEMSIZE[dtype] + 2 * B * D * 4  # x, g, o and the float32 state in and out
    res["device_min_bytes"] = dev_bytes
    res["device_floor_ms"] = dev_bytes / (copy_gbps * 1e9) * 1e3

    with torch.no_grad():
        # correctness: one step at the host shape against the float32 eager step
        x = torch.randn(Bh, Th, Dh, device=ctx.device, dtype=dt)
        g = F.logsigmoid(torch.randn(Bh, Th, Dh, device=ctx.device, dtype=dt))
        h0 = torch.randn(Bh, Dh, device=ctx.device)
        ref = eager_step(torch)(x, g, h0)
        for name, step in steps.items():
            r = res["impls"][name] = {}
            if not name.startswith("ours") and ctx.over_budget():
                r.update(status="skip", note=BUDGET_NOTE)
                continue
            try:
                t0 = time.perf_counter()
                o, ht = step(x, g, h0)
                ctx.sync()
                note_first_call(name, "out", (time.perf_counter() - t0) * 1e3)
                err = max(rel_err(ctx, o, ref[0]), rel_err(ctx, ht, ref[1]))
                r["err"] = err
                ctx.account(name, check_s=time.perf_counter() - t0)
                if err > TOL[dtype]:
                    r.update(status="mismatch", note=f"rel err {err:.2e}")
                    continue
                h = h0
                t0 = time.perf_counter()
                for _ in range(args.decode_warmup):
                    h = step(x, g, h)[1]
                ctx.sync()
                t1 = time.perf_counter()
                for _ in range(args.decode_calls):
                    h = step(x, g, h)[1]
                ctx.sync()
                r["host_us"] = (time.perf_counter() - t1) / args.decode_calls * 1e6
                r["status"] = "ok"
                ctx.account(name, timing_s=time.perf_counter() - t0)
            except Exception as e:
                r.update(status="error", note=one_line(e))
                ctx.after_error()
                if ctx.broken:
                    return res
        del x, g, h0

        # device time at the wide shape, inputs rotated
        count = rotation_count(3 * n * ITEMSIZE[dtype], ctx.rotate_bytes)
        sets = []
        for _ in range(count):
            sets.append((torch.randn(B, T, D, device=ctx.device, dtype=dt),
                         F.logsigmoid(torch.randn(B, T, D, device=ctx.device, dtype=dt)),
                         torch.randn(B, D, device=ctx.device)))
        res["device_input_sets"] = count
        adds = add_fns(ctx, [{"x": x, "g": g} for x, g, _ in sets])
        res["add_ms"] = ctx.timer(rotating(adds))
        res["practical_ms"] = res["add_ms"] * dev_bytes / (3 * n * ITEMSIZE[dtype])
        del adds
        back_to_back = None
        if ctx.device == "cuda":
            back_to_back = ctx.timer.events if ctx.timer.kind == "events" else \
                Timer(ctx, "events", ctx.timer.warmup_ms, ctx.timer.rep_ms).events
            sleep = getattr(torch.cuda, "_sleep", None)
            if sleep is not None:
                empty = res["impls"]["(empty kernel)"] = {"status": "ok"}
                empty["device_ms"] = ctx.timer(lambda: sleep(0))
                empty["b2b_ms"] = back_to_back(lambda: sleep(0))
        for name, step in steps.items():
            r = res["impls"][name]
            if r.get("status") != "ok":
                continue
            try:
                t0 = time.perf_counter()
                step(*sets[0])  # the wide shape's first call (fla tunes again for this D)
                ctx.sync()
                note_first_call(name, "out", (time.perf_counter() - t0) * 1e3)
                t1 = time.perf_counter()
                fns = [(lambda s=s, step=step: step(*s)) for s in sets]
                r["device_ms"] = ctx.timer(rotating(fns))
                if back_to_back is not None:
                    r["b2b_ms"] = back_to_back(rotating(fns))
                ctx.account(name, check_s=t1 - t0, timing_s=time.perf_counter() - t1)
            except Exception as e:
                r["device_note"] = one_line(e)
                ctx.after_error()
                if ctx.broken:
                    break
        del sets
    ctx.free()
    for name, r in res["impls"].items():
        host = f"{r['host_us']:.1f} us" if "host_us" in r else r.get("status", "?").upper()
        dev = f", device {fmt_ms(r['device_ms'])} ms" if "device_ms" in r else ""
        dev += f", back to back {fmt_ms(r['b2b_ms'])} ms" if "b2b_ms" in r else ""
        log(f"[{ctx.elapsed():6.0f}s] decode {name}: host {host}{dev}")
    return res
