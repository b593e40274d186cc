"""The command line and the run: arguments, the plan, the children started first (Triton precompile,
fpscan's build), then the sections in run order and the tables at the end.

    python -m benchmarks --out DIR [--quick] [--only ...] [--dtypes ...] [--impls ...] [--dry-run]
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

# JAX would otherwise take 75% of the GPU's memory when it starts, leaving torch too little.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from . import plan as P  # noqa: E402
from .context import log, revision  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


# Options whose values are paths of the machine that ran: results keep only their last component, so
# that a results file names no folder of that machine.
PATH_OPTIONS = ("--out", "--fpscan-src", "--fpscan-build-dir")


def portable_argv(argv):
    """``argv`` with the values of PATH_OPTIONS cut to their last component (``--out /x/y`` -> ``--out y``,
    ``--out=/x/y`` -> ``--out=y``)."""
    out, cut = [], False
    for a in argv:
        opt, eq, value = a.partition("=")
        if cut:
            a = os.path.basename(os.path.normpath(a))
        elif eq and opt in PATH_OPTIONS:
            a = f"{opt}={os.path.basename(os.path.normpath(value))}"
        out.append(a)
        cut = not eq and a in PATH_OPTIONS
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark hgrn_cupy against fla, accelerated-scan, fpscan and PyTorch, with two floors: the "
                    "copy floor (minimal bytes / copy bandwidth) and the practical floor (torch.add of the same "
                    "traffic).",
        epilog="--only takes a comma list of passes (fwd, bwd, fwdbwd), sweep sections (headline, tsweep, channels) "
               "and the sections hoststep, decode, jax.  Passes alone run every sweep section with those passes; "
               "sweep sections alone run every pass; hoststep, decode and jax run only when named.  Without --only, "
               "everything runs.  Pieces of a full run: see benchmarks/README.md.")
    ap.add_argument("--out", help="output folder (results.md, results.json, *.png); required unless --dry-run "
                                  "(--cpu-smoke: a new temporary folder)")
    ap.add_argument("--quick", action="store_true",
                    help="headline shapes in bf16 (+ fp32 8x4096x2048 fwd/fwdbwd), host step, decode, 3-point "
                         "sweeps on the headline's T and D values without fla, JAX on a few shapes; warm-up 5 ms / "
                         "rep 25 ms, "
                         f"--budget {P.QUICK_BUDGET_S:g}; no accelerated-scan warp build")
    ap.add_argument("--only", default="", help="e.g. fwd,fwdbwd or headline,hoststep,decode (see below)")
    ap.add_argument("--dtypes", default="bfloat16,float32",
                    help="dtypes of the headline shapes (decode and host step are bfloat16), default both")
    ap.add_argument("--sweep-dtypes", default=None,
                    help="dtypes of the T and channel sweeps (default both; --quick: bfloat16)")
    ap.add_argument("--impls", default="",
                    help="comma list of implementation name prefixes to run, e.g. ours,fla (default: all of "
                         + ", ".join(P.IMPLS) + "; the host step adds ours-probe, decode ours-torch, torch-eager)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit (no torch, no GPU)")
    ap.add_argument("--render", metavar="JSON", default=None,
                    help="write DIR/results.md from a run's results.json with this tree's tables and marks, "
                         "and exit (no torch, no GPU)")
    ap.add_argument("--timer", choices=("auto", "do_bench", "events"), default="auto",
                    help="auto: triton's do_bench when triton imports, else CUDA events")
    ap.add_argument("--warmup-ms", type=float, default=None, help="default 25 (quick: 5)")
    ap.add_argument("--rep-ms", type=float, default=None, help="default 100 (quick: 25)")
    ap.add_argument("--max-gb", type=float, default=20.0,
                    help="skip a pass whose minimal traffic (3, 5 or 8 tensors) exceeds this many GB "
                         "(default %(default)g)")
    ap.add_argument("--rotate-mb", type=float, default=200.0,
                    help="rotate input sets until they exceed max(this, 4 x L2) MB (default 200)")
    ap.add_argument("--copy-mb", type=int, default=1024, help="size of the copy that measures bandwidth (MiB)")
    warp = ap.add_mutually_exclusive_group()
    warp.add_argument("--warp", dest="warp", action="store_true", default=None,
                      help="build and run accelerated-scan's CUDA warp scan (default in full mode)")
    warp.add_argument("--no-warp", dest="warp", action="store_false", help="skip it (default in --quick)")
    ap.add_argument("--warp-timeout", type=float, default=300.0, help="seconds allowed for the warp build")
    ap.add_argument("--fpscan-src", default=None,
                    help="fpscan's sdist: an unpacked folder, a folder holding it, or the .tar.gz; built at start-up "
                         "in a child process (without it, fpscan runs only if it imports)")
    ap.add_argument("--fpscan-build-dir", default=None,
                    help="where fpscan builds are kept, one per source and torch (default: ~/.cache/hgrn_cupy-bench)")
    ap.add_argument("--fpscan-timeout", type=float, default=300.0, help="seconds allowed for fpscan's build")
    ap.add_argument("--torch-loop-max-t", type=int, default=512, help="longest T for the PyTorch loop")
    ap.add_argument("--fla-fused-max-t", type=int, default=None,
                    help=f"longest T for fla-fused (0: no limit; default {P.QUICK_FLA_FUSED_MAX_T} in --quick, "
                         "else no limit)")
    ap.add_argument("--time-limit", type=float, default=0.0,
                    help="seconds after which no new shape is started (0: none); the final tables still come, "
                         "e.g. 420 for a piece that must end within 9 minutes")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds after which cells of peers not yet started are skipped and marked "
                         f"'{P.BUDGET_NOTE}'; ours still run (0: none; default {P.QUICK_BUDGET_S:g} in --quick, "
                         "else none)")
    pc = ap.add_mutually_exclusive_group()
    pc.add_argument("--precompile", dest="precompile", action="store_true", default=True,
                    help="compile fla's and accelerated-scan's Triton kernels in child processes while this "
                         "one imports, so first calls only tune (default)")
    pc.add_argument("--no-precompile", dest="precompile", action="store_false", help="compile on first use")
    ap.add_argument("--precompile-timeout", type=float, default=60.0,
                    help="seconds the run waits for the precompile children (default 60)")
    ap.add_argument("--host-steps", type=int, default=300,
                    help="training steps queued per host-time figure (fewer where a step is slow; default 300)")
    ap.add_argument("--host-pairs", type=int, default=15,
                    help="a-b-b-a rounds behind the paired host-time difference to the probe (default 15)")
    ap.add_argument("--host-cycles", type=int, default=2000,
                    help="cycles of one step each, in turn, behind the step-by-step difference to the probe "
                    "(default 2000; 0: not measured)")
    ap.add_argument("--jax-reps", type=int, default=None, help="timed calls per JAX forward+backward cell "
                    "(default 50, quick 10)")
    ap.add_argument("--decode-calls", type=int, default=2000)
    ap.add_argument("--decode-warmup", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="developer check without a GPU: tiny shapes on CPU tensors, wall-clock timer")
    args = ap.parse_args(argv)
    if not args.out and args.cpu_smoke and not args.dry_run:
        import tempfile
        args.out = tempfile.mkdtemp(prefix="hgrn_cupy-bench-smoke-")
    if not args.out and not args.dry_run:
        ap.error("--out is required (unless --dry-run)")
    if args.warp is None:
        args.warp = not args.quick
    if args.warmup_ms is None:
        args.warmup_ms = 5.0 if args.quick else 25.0
    if args.rep_ms is None:
        args.rep_ms = 25.0 if args.quick else 100.0
    if args.budget is None:
        args.budget = P.QUICK_BUDGET_S if args.quick else 0.0
    if args.fla_fused_max_t is None:
        args.fla_fused_max_t = P.QUICK_FLA_FUSED_MAX_T if args.quick else 0
    if args.jax_reps is None:
        args.jax_reps = 10 if args.quick else 50
    return args


def main(argv=None):
    from . import precompile
    from .impls import fpscan_wanted

    t_start = time.perf_counter()
    args = parse_args(argv)
    if args.render:
        return render(args.render, args.out)
    plan = P.build_plan(args)
    extras = P.extras_plan(args)
    if args.cpu_smoke:
        plan, extras = P.smoke_plan(plan, extras)
    groups = precompile.precompile_plan(args, plan, extras) if args.precompile and not args.cpu_smoke else []
    if args.dry_run:
        P.print_plan(args, plan, extras, log, groups)
        return 0
    children = precompile.start(groups) if groups else []
    build = None
    if args.fpscan_src and fpscan_wanted(args) and (plan or "hoststep" in extras):
        from .impls.fpscan import Build
        build = Build(args)
    try:
        return run_benchmark(args, plan, extras, t_start, children, build)
    finally:
        if children:  # an early exit (no CUDA, an exception) leaves no child behind
            precompile.wait(children, 0, quiet=True)
        if build is not None:
            build.stop()


def render(source, out):
    """DIR/results.md from ``source`` (a run's results.json), rendered by this tree's report (its marks,
    and its picks of the best cells and speed-ups)."""
    import json
    import types

    from .output import render_md
    from .report import summarize_row

    results = json.loads(Path(source).read_text())
    for rows in (results.get("sections") or {}).values():
        for row in rows:  # best and speed-up by this tree's rule
            summarize_row(row)
    Path(out).mkdir(parents=True, exist_ok=True)
    ctx = types.SimpleNamespace(results=results, missing=results.get("not_run") or {})
    (Path(out) / "results.md").write_text(render_md(ctx))
    log(f"wrote {Path(out) / 'results.md'} from {source}")
    return 0


def run_benchmark(args, plan, extras, t_start, children, build):
    from . import precompile
    from .context import Context, device_info
    from .decode import run_decode
    from .hoststep import run_hoststep
    from .impls import load_fpscan, load_impls
    from .impls.jax_impl import run_jax
    from .output import print_tables, save, seconds_text
    from .sections import run_case
    from .timing import Timer, measure_copy

    if args.cpu_smoke:
        args.copy_mb = min(args.copy_mb, 64)
        args.rotate_mb = min(args.rotate_mb, 1.0)
        args.host_cycles = min(args.host_cycles, 50)
    if not plan:
        args.warp = False  # decode, host step and JAX never use the warp scan: don't build it
    ctx = Context(args, t_start)
    torch = ctx.torch
    torch.manual_seed(args.seed)
    info = device_info(ctx)
    l2 = info.get("l2_mb", 0.0 if args.cpu_smoke else 50.0) * 2 ** 20
    ctx.rotate_bytes = max(args.rotate_mb * 1e6, 4 * l2)
    ctx.timer = Timer(ctx, args.timer, args.warmup_ms, args.rep_ms)
    mode = "cpu-smoke" if args.cpu_smoke else P.mode_of(args)
    ctx.results["meta"] = dict(mode=mode, device=info, versions=ctx.versions,
                               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               timer=ctx.timer.kind, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                               rotate_mb=ctx.rotate_bytes / 1e6, max_gb=args.max_gb, budget_s=args.budget,
                               time_limit_s=args.time_limit, host_steps=args.host_steps, host_cycles=args.host_cycles,
                               argv=portable_argv(sys.argv[1:]),
                               tolerances=P.TOL)
    ctx.results["meta"]["git"] = revision(REPO)
    log(f"device: {info.get('device')}; timer: {ctx.timer.kind}; versions: "
        + ", ".join(f"{k} {v}" for k, v in ctx.versions.items()))
    sections = P.run_sections(plan, extras)
    load_impls(ctx, sections)
    log(f"implementations: {', '.join(ctx.impls) or 'none'}")
    ctx.phase_done("start-up (imports, implementations)", t_start)
    if children:
        t = time.perf_counter()
        ok = precompile.wait(children, max(0.0, args.precompile_timeout - (t - t_start)))
        log(f"triton precompile: {ok} of {len(children)} child processes compiled their kernels")
        children.clear()
        ctx.phase_done("triton precompile", t)

    t = time.perf_counter()
    copy = ctx.results["copy"] = measure_copy(ctx)
    log(f"copy bandwidth: {copy['gbps']:.0f} GB/s ({copy['bytes'] >> 20} MiB in {copy['ms']:.3f} ms)")
    save(ctx)
    ctx.phase_done("copy bandwidth", t)
    if plan or "hoststep" in extras:
        t = time.perf_counter()
        load_fpscan(ctx, build)  # waits for its build, if any: nothing is timed while it compiles
        ctx.budget_offset = time.perf_counter() - t  # the wait is not the peers' cells: --budget skips it
        ctx.phase_done("fpscan build and load", t)

    skipped = []
    for section in sections:
        if ctx.broken:
            break
        t = time.perf_counter()
        if section == "hoststep":
            run_hoststep(ctx, extras["hoststep"], extras["hoststep-options"], copy["gbps"], lambda: save(ctx))
        elif section == "decode":
            ctx.results["decode"] = run_decode(ctx, copy["gbps"], extras["decode"])
        elif section == "jax":
            ctx.free()
            run_jax(ctx, extras["jax-fwdbwd"], P.JAX_FWDBWD_DTYPES[P.mode_of(args)], extras["jax-step"], copy["gbps"],
                    lambda: save(ctx))
        else:
            rows = ctx.results["sections"].setdefault(section, [])
            for case in plan[section]:
                if ctx.broken:
                    break
                if args.time_limit and ctx.elapsed() > args.time_limit:
                    skipped.append(f"{section} {case['B']}x{case['T']}x{case['D']} {case['dtype']}")
                    continue
                rows.extend(run_case(ctx, section, case, copy["gbps"]))
                save(ctx)
        save(ctx, plot=section)
        ctx.phase_done(section, t)
    for part in ("hoststep", "jax"):
        skipped += [f"{part} {s}" for s in (ctx.results.get(part) or {}).get("not_started", ())]
    if skipped:
        ctx.results["not_started"] = skipped
        log(f"--time-limit {args.time_limit:g} s reached; not started: " + "; ".join(skipped))
    ctx.results["meta"]["timer"] = ctx.timer.kind
    save(ctx)
    print_tables(ctx)
    log("\n" + seconds_text(ctx.results))
    ctx.results["wall_s"] = ctx.elapsed()
    save(ctx)
    log(f"total wall time: {ctx.results['wall_s']:.1f} s (from the script's start)")
    return 1 if ctx.broken else 0
