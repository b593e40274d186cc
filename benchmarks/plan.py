"""What a run measures: the shapes of every section, the passes and dtypes, the implementations'
names, the rules that leave a cell out before anything runs, and the plan as ``--dry-run`` prints
it.  Pure Python: the plan needs neither torch nor a GPU.

Sections, in run order:

* headline: model-like shapes [B, T, D], passes fwd / bwd / fwdbwd, bfloat16 and float32.
* hoststep: host time per training step (fwd + bwd queued back to back, one synchronisation at
  the end) and the device time of one step, at bfloat16 shapes; ours with every option.
* decode:   host time per call of one decode step, and the device time of a wide one.
* tsweep:   B=1, D=1024, T from 1 to 2^20.
* channels: T=4096, B*D channels from 256 to 2^18 with D = min(channels, 1024).
* jax:      hgrn_cupy.jax under jax.jit: forward+backward per engine, and the training step
            ``jax.jit(jax.grad(loss))``.
"""
from __future__ import annotations

PASSES = ("fwd", "bwd", "fwdbwd")
SWEEPS = ("headline", "tsweep", "channels")
EXTRAS = ("hoststep", "decode", "jax")  # sections that run only when named (or when --only is empty)
RUN_ORDER = ("headline", "hoststep", "decode", "tsweep", "channels", "jax")
ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
TOL = {"float64": 1e-6, "float32": 1e-3, "bfloat16": 2e-2, "float16": 5e-3}

HEADLINE_SHAPES = [(8, 4096, 2048), (1, 32768, 1024), (32, 2048, 4096), (1, 262144, 256), (4, 2048, 512),
                   (64, 1, 4096)]
# The quick sweeps reuse the headline's T and D values: accelerated-scan compiles per dtype and T class
# (T = 1, T % 16 = 0) and fla tunes per (D, dtype), so these points cost only their own timing.
TSWEEP = {"full": [1, 16, 256, 1024, 4096, 16384, 65536, 262144, 1048576], "quick": [16, 2048, 32768]}
TSWEEP_BD = (1, 1024)  # 1024 channels: T = 2^20 stays within --max-gb (17 GB of traffic fwd+bwd)
CHANNELS = {"full": [256 << k for k in range(11)], "quick": [256, 4096, 65536]}
CHANNELS_T = 4096
CHANNELS_MAX_D = 1024
DECODE_HOST_SHAPE = (1, 1, 1024)
DECODE_DEVICE_SHAPE = (64, 1, 4096)
# Host time per training step, bfloat16; every D here is a headline D, so nothing new is tuned.
HOSTSTEP_SHAPES = [(4, 2048, 512), (8, 2048, 1024), (4, 4096, 1024), (1, 32768, 1024), (8, 4096, 2048),
                   (1, 262144, 256)]
HOSTSTEP_OPTION_SHAPES = {"full": [(4, 2048, 512), (8, 4096, 2048)], "quick": [(4, 2048, 512)]}
HOSTSTEP_DTYPE = "bfloat16"
JAX_FWDBWD_SHAPES = {"full": [(8, 4096, 2048), (1, 32768, 1024), (32, 2048, 512)],
                     "quick": [(8, 4096, 2048), (1, 32768, 1024)]}
JAX_FWDBWD_DTYPES = {"full": ("bfloat16", "float32"), "quick": ("bfloat16",)}
JAX_STEP_SHAPES = {"full": HOSTSTEP_SHAPES, "quick": [(4, 2048, 512), (1, 32768, 1024), (8, 4096, 2048)]}

# Columns of the pass tables, in order.  ours-chunk / -fused / -auto go through hgrn_cupy.torch (and
# torch.autograd.grad for gradients); ours-auto-direct calls hgrn_cupy.hgrn then hgrn_cupy.hgrn_backward.
IMPLS = ("ours-chunk", "ours-fused", "ours-auto", "ours-auto-direct", "fla-chunk", "fla-fused", "ascan-triton",
         "ascan-triton+T", "ascan-warp", "ascan-warp+T", "fpscan", "fpscan+T", "torch-loop")
OURS = ("ours-chunk", "ours-fused", "ours-auto", "ours-auto-direct", "ours-probe")
# "ours best" is the fastest of the engines' columns and hgrn()'s, each called through autograd as the peers
# are: hgrn() runs the tuner's launch variants, which neither engine's column does, so it can beat both.
OURS_BEST = ("ours-chunk", "ours-fused", "ours-auto")
REF_ORDER = ("ours-chunk", "ours-fused", "fla-chunk", "fla-fused")
# Columns of the host-step table: ours three ways (the probe is the plain autograd.Function that the
# library's own wrapper is judged against), then the peers' training steps.
HOSTSTEP_IMPLS = ("ours-auto", "ours-probe", "ours-auto-direct", "fla-chunk", "fla-fused", "ascan-triton",
                  "ascan-triton+T", "fpscan", "fpscan+T")
HOSTSTEP_OPTIONS = ("plain", "states", "varlen", "reverse", "all")
# fla's fused recurrent kernel walks T sequentially and times 12 autotuning configs on the shape, so
# at T = 2^18 it costs the quick run most of a minute per dtype: --quick skips it.
QUICK_FLA_FUSED_MAX_T = 65536
# --quick runs fla on the headline (and host-step) shapes only: its sweep cells (fla-fused walks T
# sequentially) cost more time than they add; the full run has them.
QUICK_HEADLINE_ONLY = ("fla-chunk", "fla-fused")
# Seconds after which --quick starts no peer cell: enough for the headline's last row, float32
# 8x4096x2048, with room to spare.
QUICK_BUDGET_S = 150.0
BUDGET_NOTE = "skipped: time budget"


def min_bytes(B, T, D, x_dtype, g_dtype, pazz):
    """Minimal device-memory traffic of one pass: fwd reads x, g, writes o (x's dtype); bwd reads
    g, o, do and writes dx (o's dtype), dg (g's dtype)."""
    n, sx, sg = B * T * D, ITEMSIZE[x_dtype], ITEMSIZE[g_dtype]
    per = {"fwd": 2 * sx + sg, "bwd": 3 * sx + 2 * sg, "fwdbwd": 5 * sx + 3 * sg}[pazz]
    return n * per


def practical_scale(B, T, D, dtype, pazz):
    """The practical floor of a pass is ``torch.add(x, g, out=o)`` (the forward's traffic) scaled by
    bytes: x1 for fwd, x5/3 for bwd, x8/3 for fwdbwd."""
    return min_bytes(B, T, D, dtype, dtype, pazz) / min_bytes(B, T, D, dtype, dtype, "fwd")


def parse_only(text):
    """``--only`` tokens -> (passes, sweep sections, extra sections).  Passes alone run every sweep
    section with those passes; sweep sections alone run every pass; hoststep, decode and jax run only
    when named.  Without --only everything runs."""
    if not text:
        return list(PASSES), list(SWEEPS), set(EXTRAS)
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    known = PASSES + SWEEPS + EXTRAS
    bad = [t for t in tokens if t not in known]
    if bad:
        raise SystemExit(f"--only: unknown token(s) {bad}; use {', '.join(known)}")
    passes = [p for p in PASSES if p in tokens]
    sections = [s for s in SWEEPS if s in tokens]
    if passes and not sections:
        sections = list(SWEEPS)
    if sections and not passes:
        passes = list(PASSES)
    return passes, sections, {t for t in tokens if t in EXTRAS}


def parse_dtypes(text):
    dtypes = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in dtypes if t not in ("bfloat16", "float32")]
    if bad or not dtypes:
        raise SystemExit(f"--dtypes: unknown or no dtype(s) {bad}; use bfloat16, float32")
    return dtypes


def mode_of(args):
    return "quick" if args.quick else "full"


def build_plan(args):
    """Cases per sweep section: dicts with B, T, D, dtype and passes."""
    passes, sections, _ = parse_only(args.only)
    dtypes = parse_dtypes(args.dtypes)
    mode = mode_of(args)
    sweep_dtypes = parse_dtypes(args.sweep_dtypes or ("bfloat16" if args.quick else "bfloat16,float32"))
    sweep_passes = ("fwd", "fwdbwd") if args.quick else PASSES
    plan = {s: [] for s in sections}

    def add(section, B, T, D, dtype, allowed):
        ps = [p for p in passes if p in allowed]
        if ps and dtype in (dtypes if section == "headline" else sweep_dtypes):
            plan[section].append(dict(B=B, T=T, D=D, dtype=dtype, passes=ps))

    if "headline" in plan:
        for B, T, D in HEADLINE_SHAPES:
            add("headline", B, T, D, "bfloat16", PASSES)
        for B, T, D in HEADLINE_SHAPES:
            if args.quick:
                if (B, T, D) == HEADLINE_SHAPES[0]:
                    add("headline", B, T, D, "float32", ("fwd", "fwdbwd"))
            else:
                add("headline", B, T, D, "float32", PASSES)
    for dtype in ("bfloat16", "float32"):
        if "tsweep" in plan:
            B, D = TSWEEP_BD
            for T in TSWEEP[mode]:
                add("tsweep", B, T, D, dtype, sweep_passes)
        if "channels" in plan:
            for C in CHANNELS[mode]:
                D = min(C, CHANNELS_MAX_D)
                add("channels", C // D, CHANNELS_T, D, dtype, sweep_passes)
    return {k: v for k, v in plan.items() if v}


def extras_plan(args):
    """The shapes of the sections that are not pass tables: {section: [(B, T, D), ...]} for the
    sections that run (decode's two shapes are fixed)."""
    _, _, extras = parse_only(args.only)
    mode = mode_of(args)
    out = {}
    if "hoststep" in extras:
        out["hoststep"] = list(HOSTSTEP_SHAPES)
        out["hoststep-options"] = list(HOSTSTEP_OPTION_SHAPES[mode])
    if "decode" in extras:
        out["decode"] = [DECODE_HOST_SHAPE, DECODE_DEVICE_SHAPE]
    if "jax" in extras:
        out["jax-fwdbwd"] = list(JAX_FWDBWD_SHAPES[mode])
        out["jax-step"] = list(JAX_STEP_SHAPES[mode])
    return out


def run_sections(plan, extras):
    """The sections that run, in run order."""
    return [s for s in RUN_ORDER if s in plan or s in extras or f"{s}-step" in extras]


def smoke_plan(plan, extras):
    """--cpu-smoke: the same plan structure with tiny shapes."""
    small = {"headline": [(2, 64, 32), (1, 200, 16), (3, 1, 8)], "tsweep": [(2, 1, 16), (2, 32, 16), (2, 256, 16)],
             "channels": [(1, 64, 16), (4, 64, 16)]}
    out = {}
    for section, cases in plan.items():
        proto = cases[0]
        dtypes = list(dict.fromkeys(c["dtype"] for c in cases))
        out[section] = [dict(B=B, T=T, D=D, dtype=dt, passes=proto["passes"])
                        for dt in dtypes for B, T, D in small[section]]
    tiny = {"hoststep": [(2, 64, 16), (1, 256, 8)], "hoststep-options": [(3, 64, 16)],
            "decode": [(1, 1, 16), (4, 1, 32)], "jax-fwdbwd": [(2, 64, 16)], "jax-step": [(2, 64, 16)]}
    return out, {k: tiny[k] for k in extras}


def impl_selected(args, name):
    if not args.impls:
        return True
    return any(name.startswith(tok.strip()) for tok in args.impls.split(",") if tok.strip())


def plan_skip_reason(args, name, section):
    if args.quick and section not in ("headline", "hoststep") and name in QUICK_HEADLINE_ONLY:
        return "--quick: headline shapes only"
    return None


def fla_skip_reason(args, name, T):
    cap = args.fla_fused_max_t
    if name == "fla-fused" and cap and T > cap:
        return f"T > {cap} (--fla-fused-max-t: slow sequential walk plus autotuning)"
    return None


def shape_text(B, T, D):
    return f"{B}x{T}x{D}"


def print_plan(args, plan, extras, log, groups=()):
    """The plan as --dry-run prints it (``groups``: the Triton precompile keys)."""
    log(f"mode: {mode_of(args)}{' (cpu-smoke shapes)' if args.cpu_smoke else ''}; size cap {args.max_gb:g} GB of "
        f"minimal traffic per pass; warm-up {args.warmup_ms:g} ms, rep {args.rep_ms:g} ms; budget for peers "
        + (f"{args.budget:g} s" if args.budget else "none") + "; time limit for new shapes "
        + (f"{args.time_limit:g} s" if args.time_limit else "none"))
    for section in RUN_ORDER:
        if section == "hoststep" and section in extras:
            log(f"[hoststep] bfloat16 {', '.join(shape_text(*s) for s in extras['hoststep'])}: host us per "
                f"training step (up to {args.host_steps} steps queued, one synchronisation) and device time "
                f"(CUDA graph); columns " + ", ".join(n for n in HOSTSTEP_IMPLS if impl_selected(args, n)))
            log(f"  options ({', '.join(HOSTSTEP_OPTIONS)}), ours-auto vs ours-probe at "
                + ", ".join(shape_text(*s) for s in extras["hoststep-options"]))
        if section == "decode" and section in extras:
            log("[decode] host time per call at {}; device time at {}".format(
                *(shape_text(*s) for s in extras["decode"])))
        if section == "jax" and "jax-step" in extras:
            log(f"[jax] forward+backward at {', '.join(shape_text(*s) for s in extras['jax-fwdbwd'])} "
                f"({', '.join(JAX_FWDBWD_DTYPES[mode_of(args)])}); training step jax.jit(jax.grad(loss)) at "
                + ", ".join(shape_text(*s) for s in extras["jax-step"]) + " (bfloat16)")
        for i, c in enumerate(plan.get(section, ())):
            if i == 0:
                off = [n for n in IMPLS if impl_selected(args, n) and plan_skip_reason(args, n, section)]
                log(f"[{section}]" + (f" without {', '.join(off)} ({plan_skip_reason(args, off[0], section)})"
                                      if off else ""))
            parts = []
            for p in c["passes"]:
                gb = min_bytes(c["B"], c["T"], c["D"], c["dtype"], c["dtype"], p) / 1e9
                parts.append(f"{p} {gb:.3g} GB" + (" (skipped: size)" if gb > args.max_gb else ""))
            log(f"  {shape_text(c['B'], c['T'], c['D'])} {c['dtype']}: " + ", ".join(parts))
    names = [n for n in IMPLS if impl_selected(args, n) and (args.warp or not n.startswith("ascan-warp"))]
    log("implementations: " + ", ".join(names) + ("" if args.warp else " (ascan-warp off: --no-warp)"))
    if any(impl_selected(args, n) for n in ("fpscan", "fpscan+T")):
        log("fpscan: " + (f"built from {args.fpscan_src} in a child process (at most {args.fpscan_timeout:g} s)"
                          if args.fpscan_src else "no --fpscan-src: runs only if fpscan imports"))
    fla = [k for grp in groups for k in grp.get("fla", ())]
    ascan = [k for grp in groups for k in grp.get("ascan", ())]
    parts = [f"fla {len(fla)} tuning keys (" + ", ".join(f"{e} D={D} {dt}{' +state' if st else ''}"
                                                      for e, D, dt, st in fla) + ")"] if fla else []
    parts += [f"accelerated-scan {len(ascan)} compile keys (" + ", ".join(
        f"{dt} T{'=1' if T == 1 else '%16=0' if T == 16 else f'={T}'}" for dt, T in ascan) + ")"] if ascan else []
    log("triton precompile: " + ("; ".join(parts) or "off"))
