"""The pass tables (headline, T sweep, channel sweep): for each shape, the input sets, the two floors,
then every implementation checked and timed on each pass.

Floors of a row: the copy floor is the pass's minimal traffic over the run's copy bandwidth; the
practical floor is ``torch.add(x, g, out=o)`` (the forward's traffic) timed by the same timer on the
same rotated input sets, scaled by bytes for bwd (x5/3) and fwdbwd (x8/3)."""
from __future__ import annotations

import time

from .context import log, one_line
from .checks import Checker
from .plan import BUDGET_NOTE, OURS, min_bytes, plan_skip_reason, practical_scale
from .report import fmt_ms, summarize_row
from .timing import flush_ms, host_ms, rotating, rotation_count


def make_sets(ctx, B, T, D, dtype, count, with_do):
    """``count`` input sets {x ~ randn, g = logsigmoid(randn) (g <= 0), do ~ randn, o_add: add's output}."""
    torch = ctx.torch
    dt = getattr(torch, dtype)
    F = torch.nn.functional
    sets = []
    for _ in range(count):
        s = {"x": torch.randn(B, T, D, device=ctx.device, dtype=dt),
             "g": F.logsigmoid(torch.randn(B, T, D, device=ctx.device, dtype=dt))}
        if with_do:
            s["do"] = torch.randn(B, T, D, device=ctx.device, dtype=dt)
        sets.append(s)
    return sets


def add_fns(ctx, sets):
    """``torch.add(x, g, out=o)`` per input set: reads and writes exactly what the forward does."""
    add = ctx.torch.add
    for s in sets:
        s.setdefault("o_add", ctx.torch.empty_like(s["x"]))
    return [(lambda s=s: add(s["x"], s["g"], out=s["o_add"])) for s in sets]


def blank_row(section, case, pazz, copy_gbps):
    B, T, D, dtype = case["B"], case["T"], case["D"], case["dtype"]
    floor_bytes = min_bytes(B, T, D, dtype, dtype, pazz)
    return dict(section=section, B=B, T=T, D=D, dtype=dtype, **{"pass": pazz}, min_bytes=floor_bytes,
                floor_ms=floor_bytes / (copy_gbps * 1e9) * 1e3, practical_ms=None, results={})


def skip_reason(ctx, impl, section, B, T, D, dtype, pazz=None):
    return (plan_skip_reason(ctx.args, impl.name, section) or impl.skip_reason(B, T, D, dtype)
            or (impl.pass_skip_reason(pazz, T) if pazz else None))


def run_cell(ctx, impl, pazz, section, case, sets, checker):
    B, T, D, dtype = case["B"], case["T"], case["D"], case["dtype"]
    why = skip_reason(ctx, impl, section, B, T, D, dtype, pazz)
    if why:
        return dict(status="skip", note=why)
    if impl.name not in OURS and ctx.over_budget():
        return dict(status="skip", note=BUDGET_NOTE)
    kinds = {"fwd": ("out",), "bwd": ("grad",), "fwdbwd": ("out", "grad")}[pazz]
    t0 = time.perf_counter()
    bad = checker.cell(impl, kinds)
    errs, first = checker.errs, checker.first
    t1 = time.perf_counter()
    if bad:
        ctx.account(impl.name, check_s=t1 - t0)
        return bad
    fns = fn = host = device = None
    try:
        fns = [impl.make(pazz, s) for s in sets]
        fn = rotating(fns)
        ms = ctx.timer(fn)
        if ctx.device != "cpu":  # on the CPU every call is synchronous: its host time is its time
            host = host_ms(ctx, fn)
            # do_bench queues each call behind its L2 flush, so a host quicker than the flush is hidden; a
            # slower one can add all of its time to the cell (the GPU idles between the start event and the
            # call's kernels), also where it is quicker than the kernels.  So past half the flush's time the
            # cell timed with the host queued ahead decides (report.host_bound).
            if host >= 0.5 * flush_ms(ctx.results["copy"]["gbps"]):
                device = ctx.timer.queued(fn)
    except Exception as e:
        fns = fn = None  # the inputs' references go before after_error frees memory
        ctx.after_error()
        return dict(status="error", note=one_line(e))
    finally:
        del fns, fn
        ctx.account(impl.name, check_s=t1 - t0, timing_s=time.perf_counter() - t1)
    return dict(status="ok", ms=ms, host_ms=host, device_ms=device, err=errs, first_call_ms=first)


def too_big(args, case, pazz):
    return min_bytes(case["B"], case["T"], case["D"], case["dtype"], case["dtype"], pazz) > args.max_gb * 1e9


def run_case(ctx, section, case, copy_gbps):
    B, T, D, dtype = case["B"], case["T"], case["D"], case["dtype"]
    rows = {}
    live = []
    for p in case["passes"]:
        row = rows[p] = blank_row(section, case, p, copy_gbps)
        if too_big(ctx.args, case, p):
            for name in ctx.impls:
                row["results"][name] = dict(status="skip", note=f"over --max-gb {ctx.args.max_gb:g}")
        else:
            live.append(p)
    if live and ctx.impls:
        count = rotation_count(min_bytes(B, T, D, dtype, dtype, "fwd"), ctx.rotate_bytes)
        sets = checker = None
        try:
            sets = make_sets(ctx, B, T, D, dtype, count, with_do=any(p != "fwd" for p in live))
            t0 = time.perf_counter()
            add_ms = ctx.timer(rotating(add_fns(ctx, sets)))
            ctx.account("(practical floor: torch.add)", timing_s=time.perf_counter() - t0)
            for s in sets:
                del s["o_add"]
            checker = Checker(ctx, sets[0], dtype)
            for p in live:
                row = rows[p]
                row["input_sets"] = count
                row["add_ms"] = add_ms
                row["practical_ms"] = add_ms * practical_scale(B, T, D, dtype, p)
                for name, impl in list(ctx.impls.items()):
                    if ctx.broken:
                        break
                    if name == "ours-probe":
                        continue  # the host-step table's column only
                    row["results"][name] = run_cell(ctx, impl, p, section, case, sets, checker)
                row["reference"] = checker.ref_name
                row["reference_prefix_err"] = checker.ref_prefix_err
                summarize_row(row)
                log(f"[{ctx.elapsed():6.0f}s] {section} {B}x{T}x{D} {dtype} {p}: " + progress_text(row))
        except Exception as e:  # allocation of the inputs (out of memory) and the like
            log(f"[{ctx.elapsed():6.0f}s] {section} {B}x{T}x{D} {dtype}: {one_line(e)}")
            for p in live:
                for name in ctx.impls:
                    rows[p]["results"].setdefault(name, dict(status="error", note=one_line(e)))
            ctx.after_error()
        finally:
            sets = checker = None
            ctx.free()
    out = [rows[p] for p in case["passes"]]
    for row in out:
        if "ours_best" not in row:
            summarize_row(row)
    return out


def progress_text(row):
    parts = []
    for name, c in row["results"].items():
        if c["status"] == "ok":
            parts.append(f"{name} {fmt_ms(c['ms'])}")
        elif c["status"] in ("mismatch", "error"):
            parts.append(f"{name} {c['status'].upper()}")
        elif c.get("note") == BUDGET_NOTE:
            parts.append(f"{name} {BUDGET_NOTE}")
    sp = f"; x{row['speedup']:.2f} vs {row['peer_best']}" if row.get("speedup") else ""
    return (f"copy floor {fmt_ms(row['floor_ms'])}, practical {fmt_ms(row['practical_ms'])} | " + ", ".join(parts)
            + sp)


def measure_add(ctx, B, T, D, dtype):
    """ms of ``torch.add(x, g, out=o)`` at one shape by the run's timer on rotated input sets: the
    practical floor of a forward there (sections without their own torch inputs use this)."""
    sets = make_sets(ctx, B, T, D, dtype, rotation_count(min_bytes(B, T, D, dtype, dtype, "fwd"), ctx.rotate_bytes),
                     with_do=False)
    try:
        return ctx.timer(rotating(add_fns(ctx, sets)))
    finally:
        del sets
        ctx.free()
