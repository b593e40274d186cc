"""Host time per training step: what a step (forward, then the gradients of x and g for a cotangent
do) costs the host, against what it costs the device.

Host us per step: the wall time of ``--host-steps`` steps queued back to back (input sets in turn)
with one synchronisation at the end, divided by their number (fewer steps where a step is slow; the
median of three turns, taken in alternation across the columns).  Where the device is slower than
the host this reads the device time: the queue fills and the host waits.  Device us per step: a
CUDA graph holding one step per input set, replayed (no launch or Python cost), or the run's timer
where a step cannot be captured.  Each column is checked against the reference first.

Columns: ours-auto (hgrn_cupy.torch.hgrn + torch.autograd.grad), ours-probe (the minimal
autograd.Function over hgrn_cupy.hgrn / hgrn_backward: ours-auto should be within 5 us of it; their
difference is measured apart, in paired rounds of blocks, see ``paired_host_diff_us``, and step by step,
the two in turn, see ``interleaved_host_diff_us``),
ours-auto-direct (hgrn_cupy.hgrn then hgrn_cupy.hgrn_backward), and the peers' training steps.
The options table runs ours-auto and the probe with states in and out, packed sequences
(cu_seqlens), reverse, and all three at once, checked against a float64 loop on a channel slice."""
from __future__ import annotations

import time

from .checks import Checker, loop_hgrn, rel_err
from .context import log, one_line
from .impls.ours import option_steps
from .plan import (BUDGET_NOTE, HOSTSTEP_DTYPE, HOSTSTEP_IMPLS, HOSTSTEP_OPTIONS, OURS, TOL, min_bytes,
                   practical_scale)
from .sections import add_fns, make_sets, skip_reason
from .timing import (device_ms, host_steps_us, interleaved_host_diff_us, paired_host_diff_us,
                     rotation_count)

CHECK_CHANNELS = 8  # channels of the float64 loop that checks each option row


def _floors(ctx, B, T, D, dtype, sets, copy_gbps):
    nbytes = min_bytes(B, T, D, dtype, dtype, "fwdbwd")
    add_ms, how = device_ms(ctx, add_fns(ctx, sets))
    for s in sets:
        s.pop("o_add", None)
    return dict(B=B, T=T, D=D, dtype=dtype, min_bytes=nbytes, floor_ms=nbytes / (copy_gbps * 1e9) * 1e3,
                add_ms=add_ms, add_method=how, practical_ms=add_ms * practical_scale(B, T, D, dtype, "fwdbwd"),
                input_sets=len(sets), results={})


def _time(ctx, row, live):
    """Host and device time of the checked, warmed-up step callables in ``live``."""
    for name, fns in list(live.items()):
        try:  # a failing step is one cell's error, before the turns that time them all
            fns[0]()
            ctx.sync()
        except Exception as e:
            row["results"][name] = dict(status="error", note=one_line(e))
            del live[name]
            ctx.after_error()
    if not live or ctx.broken:
        return
    t0 = time.perf_counter()
    host = host_steps_us(ctx, live, ctx.args.host_steps)
    if "ours-auto" in live and "ours-probe" in live:
        diff, q1, q3, fastest, cpu = paired_host_diff_us(ctx, live["ours-auto"], live["ours-probe"],
                                                         min(host["ours-auto"][1], host["ours-probe"][1]),
                                                         ctx.args.host_pairs)
        row.update(autograd_minus_probe_us=diff, autograd_minus_probe_iqr_us=[q1, q3],
                   autograd_minus_probe_fastest_us=fastest, autograd_minus_probe_cpu_us=cpu)
        if ctx.args.host_cycles:
            diff, q1, q3 = interleaved_host_diff_us(ctx, live["ours-auto"], live["ours-probe"],
                                                    ctx.args.host_cycles)
            row.update(autograd_minus_probe_step_us=diff, autograd_minus_probe_step_iqr_us=[q1, q3])
    share = (time.perf_counter() - t0) / len(live)
    for name, fns in live.items():
        t1 = time.perf_counter()
        cell = row["results"][name] = dict(status="ok", host_us=host[name][0], steps=host[name][1])
        try:
            ms, how = device_ms(ctx, fns)
            cell.update(device_us=ms * 1e3, device_method=how)
        except Exception as e:
            cell["device_note"] = one_line(e)
        ctx.account(name, timing_s=share + time.perf_counter() - t1)
        if ctx.broken:
            return


def run_step_row(ctx, B, T, D, dtype, copy_gbps):
    names = [n for n in HOSTSTEP_IMPLS if n in ctx.impls]
    sets = make_sets(ctx, B, T, D, dtype, rotation_count(min_bytes(B, T, D, dtype, dtype, "fwd"), ctx.rotate_bytes),
                     with_do=True)
    row = _floors(ctx, B, T, D, dtype, sets, copy_gbps)
    checker = Checker(ctx, sets[0], dtype)
    live = {}
    for name in names:
        impl = ctx.impls[name]
        why = skip_reason(ctx, impl, "hoststep", B, T, D, dtype, "fwdbwd")
        if not why and name not in OURS and ctx.over_budget():
            why = BUDGET_NOTE
        if why:
            row["results"][name] = dict(status="skip", note=why)
            continue
        t0 = time.perf_counter()
        bad = checker.cell(impl, ("out", "grad"))
        ctx.account(name, check_s=time.perf_counter() - t0)
        if bad:
            row["results"][name] = bad
            continue
        live[name] = [impl.make_fwdbwd(s) for s in sets]
    row["reference"] = checker.ref_name
    _time(ctx, row, live)
    return row


def check_option(ctx, grads, inputs, dtype):
    """Max relative error over (o, ht, dx, dg, dh0) of both columns against a float64 loop on the first
    CHECK_CHANNELS channels: {name: err}."""
    torch = ctx.torch
    c = min(CHECK_CHANNELS, inputs["x"].shape[2])
    cpu = lambda t: None if t is None else t[..., :c].detach().cpu().double()  # noqa: E731
    x, g, h0 = (cpu(inputs[k]).requires_grad_(True) if inputs[k] is not None else None for k in ("x", "g", "h0"))
    cu = inputs["cu"].cpu() if inputs["cu"] is not None else None
    o, ht = loop_hgrn(torch, x, g, h0, cu, inputs["reverse"])
    wrt = (x, g) + ((h0,) if h0 is not None else ())
    final = inputs["dht"] is not None
    outs, cot = ((o, ht), (cpu(inputs["do"]), cpu(inputs["dht"]))) if final else ((o,), (cpu(inputs["do"]),))
    ref = tuple(t.detach() for t in outs) + torch.autograd.grad(outs, wrt, cot)
    errs = {}
    for name in ("ours-auto", "ours-probe"):
        got = grads(name)
        errs[name] = max(rel_err(ctx, a[..., :c].double(), b) for a, b in zip(got, ref))
    return errs


def run_option_rows(ctx, B, T, D, dtype, copy_gbps):
    rows = []
    sets = make_sets(ctx, B, T, D, dtype, rotation_count(min_bytes(B, T, D, dtype, dtype, "fwd"), ctx.rotate_bytes),
                     with_do=True)
    floors = _floors(ctx, B, T, D, dtype, sets, copy_gbps)
    for option in HOSTSTEP_OPTIONS:
        row = dict(floors, option=option, results={})
        rows.append(row)
        t0 = time.perf_counter()
        try:
            built = [option_steps(ctx, s, option) for s in sets]
            errs = check_option(ctx, built[0][1], built[0][2], dtype)
        except Exception as e:
            row["results"] = {n: dict(status="error", note=one_line(e)) for n in ("ours-auto", "ours-probe")}
            ctx.after_error()
            continue
        finally:
            ctx.account("ours-auto", check_s=time.perf_counter() - t0)
        live = {}
        for name, err in errs.items():
            if err > TOL[dtype]:
                row["results"][name] = dict(status="mismatch", err=err, note=f"rel err {err:.2e} > {TOL[dtype]:g}")
            else:
                row["results"][name] = dict(status="ok", err=err)
                live[name] = [steps[name] for steps, _, _ in built]
        _time(ctx, row, live)
        for name, err in errs.items():
            row["results"][name].setdefault("err", err)
        del built
        if ctx.broken:
            break
    return rows


def run_hoststep(ctx, shapes, option_shapes, copy_gbps, save):
    """The host-step section: one row per shape, then the options rows; ``save`` after each shape."""
    dtype = HOSTSTEP_DTYPE
    res = ctx.results["hoststep"] = {"dtype": dtype, "steps": ctx.args.host_steps, "rows": [], "options": [],
                                     "not_started": []}
    for kind, todo in (("rows", shapes), ("options", option_shapes)):
        for B, T, D in todo:
            if ctx.broken:
                return res
            label = f"{B}x{T}x{D}{' options' if kind == 'options' else ''}"
            if ctx.args.time_limit and ctx.elapsed() > ctx.args.time_limit:
                res["not_started"].append(label)
                continue
            if kind == "options" and not {"ours-auto", "ours-probe"} <= set(ctx.impls):
                continue
            new = []
            try:
                new = ([run_step_row(ctx, B, T, D, dtype, copy_gbps)] if kind == "rows"
                       else run_option_rows(ctx, B, T, D, dtype, copy_gbps))
            except Exception as e:  # allocation of the inputs and the like
                log(f"[{ctx.elapsed():6.0f}s] hoststep {label}: {one_line(e)}")
                ctx.after_error()
            finally:
                ctx.free()
            res[kind].extend(new)
            for r in new:
                log(f"[{ctx.elapsed():6.0f}s] hoststep {label}{' ' + r['option'] if 'option' in r else ''}: "
                    + step_progress(r))
            save()
    return res


def step_progress(row):
    parts = []
    for name, c in row["results"].items():
        if c.get("status") == "ok" and "host_us" in c:
            dev = f"/{c['device_us']:.1f}" if "device_us" in c else ""
            parts.append(f"{name} {c['host_us']:.1f}{dev}")
        elif c.get("status") in ("mismatch", "error"):
            parts.append(f"{name} {c['status'].upper()}")
    diff = row.get("autograd_minus_probe_us")
    return (f"practical {row['practical_ms'] * 1e3:.1f} us | host/device us: " + ", ".join(parts)
            + (f"; autograd - probe {diff:+.1f} us" if diff is not None else ""))
