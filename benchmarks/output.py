"""What a run leaves behind: DIR/results.md (the header, then every table), DIR/results.json (every
number, the device, the date, the versions and the launches the tuner stored) and the sweep plots,
rewritten after every shape so a run cut short keeps what it measured; and the tables printed at the end
of the log, the headline summary last, then where the time went."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .context import log
from .plan import CHANNELS_MAX_D, CHANNELS_T, TSWEEP_BD
from .plots import plot_sweep
from .report import (compact_table, decode_table, fmt_ms, hoststep_table, jax_fwdbwd_table, jax_step_table,
                     options_table, section_table, tuner_table, used_impls)

TITLES = {"headline": "Headline shapes", "tsweep": f"T sweep (B={TSWEEP_BD[0]}, D={TSWEEP_BD[1]})",
          "channels": f"Channel sweep (T={CHANNELS_T}, D=min(channels, {CHANNELS_MAX_D}))"}


def seconds_text(R):
    """Where the run's time went: per section, then per implementation (checks, which include the
    first calls and so compilation and autotuning, / timing), largest first."""
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in R.get("seconds", {}).items())
    by_impl = sorted(R.get("seconds_by_impl", {}).items(), key=lambda kv: -sum(kv[1].values()))
    impls = ", ".join(f"{n} {v['check']:.1f}/{v['timing']:.1f} s" for n, v in by_impl)
    return f"time by section: {parts or '-'}\ntime by implementation (checks incl. first calls/timing): {impls or '-'}"


def header_lines(ctx):
    R = ctx.results
    meta = R["meta"]
    dev = meta["device"]
    copy = R.get("copy")
    out = [f"# hgrn_cupy benchmark ({meta['mode']}) on {dev.get('device')}", ""]
    if copy:
        out.append(f"- GPU: {dev.get('device')}; copy bandwidth {copy['gbps']:.0f} GB/s (read + write; "
                   f"{copy['bytes'] >> 20} MiB device-to-device copy in {fmt_ms(copy['ms'])} ms)")
    if len(dev) > 1:
        out.append("- device: " + ", ".join(f"{k} {v}" for k, v in dev.items() if k != "device"))
    out.append(f"- date: {meta['date']}" + (f"; commit {meta['git']}" if meta.get("git") else ""))
    out.append("- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    out.append(f"- timer: {meta['timer']} (median; warmup {meta['warmup_ms']} ms, rep {meta['rep_ms']} ms); "
               f"inputs rotated until the working set exceeds {meta['rotate_mb']:.0f} MB")
    out.append("- floors: copy floor = minimal bytes / copy bandwidth (fwd: x, g, o; bwd: g, o, do, dx, dg; "
               "fwdbwd: both); practical floor = `torch.add(x, g, out=o)` timed the same way on the same inputs "
               "(x5/3 for bwd, x8/3 for fwdbwd), shown with its ratio to the copy floor; cells read "
               "`median ms (x practical floor)`")
    out.append("- ours: ours-chunk / ours-fused / ours-auto call `hgrn_cupy.torch.<fn>` (gradients through "
               "`torch.autograd.grad`, as the peers'); ours-auto-direct calls `hgrn_cupy.hgrn` then "
               "`hgrn_cupy.hgrn_backward`")
    out.append("- correctness: rel L2 error vs the reference (ours-chunk, itself checked against a float64 loop "
               "on the first 128 steps) must be under 1e-3 (float32) / 2e-2 (bfloat16), else MISMATCH, untimed")
    if ctx.missing:
        out.append("- not run: " + "; ".join(f"{n} ({why})" for n, why in ctx.missing.items()))
    out.append(f"- elapsed: {R.get('elapsed_s', 0):.0f} s; " + seconds_text(R).replace("\n", "; "))
    if R.get("not_started"):
        out.append(f"- not started (--time-limit): {'; '.join(R['not_started'])}")
    return out


def hoststep_text(hs):
    return ("Host us per step: wall time of N steps queued back to back, one synchronisation at the end, "
            f"over N (up to {hs['steps']}); device us per step: CUDA-graph replay of one step per input set "
            "(`*`: not capturable, the run's timer instead). Cells read `host (x practical) / device "
            "(x practical)`; where host is well above device, the step is host-bound. ours-probe is a plain "
            "torch.autograd.Function over hgrn_cupy.hgrn / hgrn_backward; ours-auto should stay within 5 us "
            "of it. The last column pairs the two in a-b-b-a rounds of blocks; its CPU figure is the same "
            "difference in the process's CPU time, which leaves out time the host gave to other work; \"step by "
            "step\" times single steps of the two in turn (order reversed every other cycle), whose difference "
            "drift slower than one step does not enter.")


def render_md(ctx):
    R = ctx.results
    out = header_lines(ctx)
    for section, rows in R["sections"].items():
        if rows:
            out += ["", f"## {TITLES.get(section, section)}", "", section_table(rows, used_impls(rows))]
    hs = R.get("hoststep")
    if hs and hs["rows"]:
        out += ["", f"## Host us per training step ({hs['dtype']})", "", hoststep_text(hs), "", hoststep_table(hs)]
    if hs and hs["options"]:
        out += ["", "### ours with every option (states in and out, cu_seqlens, reverse)", "",
                "Checked against a float64 loop on the first 8 channels (o, ht, dx, dg, dh0).", "",
                options_table(hs)]
    if R.get("decode"):
        out += ["", "## Decode step", "", decode_table(R["decode"])]
    jx = R.get("jax")
    if jx and jx["fwdbwd"]:
        out += ["", f"## JAX forward+backward ({jx['device']}, jax {jx['jax']})", "",
                "Wall ms per call including `block_until_ready` (host time included), median; rel err "
                "against jax-assoc-scan.", "", jax_fwdbwd_table(jx["fwdbwd"])]
    if jx and jx["step"]:
        out += ["", "## JAX training step: jax.jit(jax.grad(loss)), bfloat16", "",
                "Host us: steps queued back to back, one `block_until_ready` at the end. Device us: the "
                "step run on every input set per iteration of one jitted `lax.fori_loop`, over the steps.",
                "", jax_step_table(jx["step"])]
    tuned = R.get("tuning")
    if tuned and tuned["decisions"]:
        out += ["", "## Launches the tuner stored", "",
                f"What `hgrn()` runs on {tuned['device']} at the end of the run (`hgrn_cupy.tuning.stored`): "
                "one launch a shape class (pass, dtypes, varlen, and T and N x D by powers of two), measured "
                "by the class's first call in the run or read from the tuning cache.", "",
                tuner_table(tuned["decisions"])]
    if R["sections"].get("headline"):
        out += ["", "## Summary (headline)", "", compact_table(R["sections"]["headline"])]
    return "\n".join(out) + "\n"


def json_safe(v):
    """Plain JSON: tuples as lists, NaN and infinities as strings, anything else odd as its str."""
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def tuner_decisions(ctx):
    """``{"device": key, "decisions": [[*shape class, launch], ...]}`` of hgrn_cupy's tuner on the GPU the
    run times, or None where hgrn_cupy was not loaded or no GPU runs."""
    if ctx.hc is None or not ctx.torch.cuda.is_available():
        return None
    from hgrn_cupy import tuning

    device = ctx.torch.cuda.current_device()
    return {"device": tuning.device_key(device),
            "decisions": [list(cls) + [name] for cls, name in tuning.stored(device).items()]}


def save(ctx, plot=None):
    """Rewrite results.json and results.md; ``plot``: a sweep section whose plot to draw (once, when
    the section is done)."""
    out = Path(ctx.args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx.results["tuning"] = tuner_decisions(ctx)
    ctx.results["elapsed_s"] = ctx.elapsed()
    ctx.results["not_run"] = ctx.missing
    (out / "results.json").write_text(json.dumps(json_safe(ctx.results), indent=1))
    (out / "results.md").write_text(render_md(ctx))
    rows = ctx.results["sections"].get(plot)
    if plot == "tsweep" and rows:
        plot_sweep(ctx.results, rows, lambda r: r["T"], f"T (B={rows[0]['B']}, D={rows[0]['D']})",
                   out / "bw_vs_T.png")
    if plot == "channels" and rows:
        plot_sweep(ctx.results, rows, lambda r: r["B"] * r["D"],
                   f"channels B*D (T={rows[0]['T']}, D=min(channels, {CHANNELS_MAX_D}))", out / "bw_vs_channels.png")


def print_tables(ctx):
    R = ctx.results
    for section in ("tsweep", "channels", "headline"):
        rows = R["sections"].get(section)
        if rows:
            log(f"\n## {TITLES[section]}\n")
            log(section_table(rows, used_impls(rows)))
    if R.get("decode"):
        log("\n## decode\n")
        log(decode_table(R["decode"]))
    jx = R.get("jax")
    if jx and jx["fwdbwd"]:
        log("\n## JAX forward+backward (wall ms per call)\n")
        log(jax_fwdbwd_table(jx["fwdbwd"]))
    if jx and jx["step"]:
        log("\n## JAX training step\n")
        log(jax_step_table(jx["step"]))
    hs = R.get("hoststep")
    if hs and hs["options"]:
        log("\n## ours with every option: ours-auto vs ours-probe\n")
        log(options_table(hs))
    if hs and hs["rows"]:
        log("\n## host us per training step (host / device)\n")
        log(hoststep_table(hs))
    if ctx.missing:
        log("\nnot run: " + "; ".join(f"{n} ({why})" for n, why in ctx.missing.items()))
    meta = R["meta"]
    copy = R.get("copy") or {}
    log(f"\n{meta['device'].get('device')} | timer {meta['timer']} | copy {copy.get('gbps', 0):.0f} GB/s | "
        f"{R['elapsed_s']:.0f} s | {Path(ctx.args.out) / 'results.md'}")
    if R["sections"].get("headline"):
        log("\n## summary (headline; speed-up = best peer / ours best)\n")
        log(compact_table(R["sections"]["headline"]))
