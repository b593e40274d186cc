#!/usr/bin/env python
"""Side-by-side timing of hgrn_cupy against its peers and against the device-memory floor.

    python benchmarks/bench.py --out DIR [--quick] [--only fwd,bwd,fwdbwd,decode] [--dtypes ...] [--dry-run]

Writes DIR/results.md (Markdown tables), DIR/results.json (every number, the device, the date and
the versions) and DIR/bw_vs_T.png, DIR/bw_vs_channels.png; prints the tables at the end, the
compact headline table last.  Outputs are rewritten after every shape, so a run that is cut short
still leaves what it measured.

What is measured
----------------
Sections, in run order (``--only`` picks passes and sections, ``--dtypes`` the headline's dtypes):

* headline: fixed model-like shapes [B, T, D], float32 and bfloat16, passes fwd / bwd / fwdbwd.
* decode:   host-inclusive time per call of one decode step (B=1, T=1, D=1024, state in and out,
            2000 calls, one synchronisation at the end), and device time of a wide decode step
            (B=64, T=1, D=4096, state in and out).
* tsweep:   B=1, D=1024, T from 1 to 2^20 (fwd, bwd, fwdbwd; bfloat16 and float32, ``--sweep-dtypes``).
* channels: T=4096, B*D channels from 256 to 2^18 with D = min(channels, 1024) (the same passes and dtypes).

``--quick`` (meant to finish within 2 minutes on an H100): the headline in bfloat16 plus float32
8x4096x2048 (fwd, fwdbwd), decode, and 3-point bfloat16 sweeps (fwd, fwdbwd) whose T and D values are the
headline's (so they compile and tune nothing new), fla on the headline shapes only, shorter warm-up and repetitions, and
a time budget (``--budget``, 100 s): after it, cells of peers not yet started are skipped and marked
``skipped: time budget`` (ours keep running; they take seconds).  The log carries the time of every
section, the time spent per implementation (first calls, i.e. compile and autotuning, shown apart) and
the total wall time at the end.

Passes: fwd = ``o = hgrn(x, g)``; bwd = the gradients (dx, dg) from a saved forward; fwdbwd = both,
timed as one function.

Floor: the minimal device-memory traffic of the pass (fwd reads x, g and writes o: 3 tensors; bwd
reads g, o, do and writes dx, dg: 5; fwdbwd: 8), divided by the device-to-device copy bandwidth
measured in the same run (``dst.copy_(src)`` on 1 GiB, counting read + write).  Every time is shown
as ``median ms (ratio to floor)``.

Timing: ``triton.testing.do_bench(..., return_mode="median")`` when triton imports (it flushes L2
with a 256 MB memset before each call), otherwise CUDA events around batches of calls (``--timer
events``).  Inputs are x ~ randn, g = logsigmoid(randn) (g <= 0), do ~ randn.  Shapes whose
tensors fit in L2 are run on several input sets in turn (enough to exceed ``--rotate-mb``), so a
repeated call never finds its inputs in cache.

Correctness guard: before an implementation is timed on a shape, its output (and, for bwd/fwdbwd,
its dx and dg) are compared with the reference (ours, chunk engine; itself checked against a
float64 PyTorch loop over the first 128 steps) by ||out - ref|| / ||ref|| in float64.  Over the
tolerance (1e-3 float32, 2e-2 bfloat16) the cell reads MISMATCH and nothing is timed.

Implementations (each optional: one that does not import or fails is reported and skipped):

* ours-chunk, ours-fused, ours-auto: ``hgrn_cupy.chunk_hgrn`` / ``fused_recurrent_hgrn`` / ``hgrn`` on
  torch tensors; backward ``hgrn_cupy.hgrn_backward(g, o, do, engine=...)``.
* fla-chunk, fla-fused: ``fla.ops.hgrn.chunk_hgrn`` / ``fused_recurrent_hgrn``; backward through
  ``torch.autograd.grad``.  fla autotunes per (D, dtype) on first use, so each D is tuned on the
  first shape in run order that has it (the headline shapes run first; fla asks triton to keep the
  choice on disk where triton can, so a later run or piece on the same machine reuses it).
* ascan-triton, ascan-warp: accelerated-scan's ``scalar.scan`` (Triton) and ``warp.scan`` (CUDA
  extension compiled at import by torch's load_inline: built first in a subprocess under
  ``--warp-timeout``), on their own layout [B, D, T] with linear gates a = exp(g) prepared outside the
  timing; the ``+T`` columns time what a [B, T, D] model pays: exp, transposes in and out, the scan.
  Power-of-two T only (warp: 32 <= T <= 65536).
* torch-loop: ``for t in range(T): h = exp(g[:, t]) * h + x[:, t]`` in float32, T <= 512 only.

Triton precompile (``--precompile``, on by default): fla's autotuner compiles each of its 12 configs
before timing it, one after the other, for every (D, dtype) and kernel.  While this script imports,
child processes compile those kernels (and accelerated-scan's) into triton's on-disk cache, running
each config once on a tiny input with the timing replaced and the tuning result never stored; the
first calls here then only time the configs, on the real shapes, as before.  Nothing timed changes.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PASSES = ("fwd", "bwd", "fwdbwd")
SWEEPS = ("headline", "tsweep", "channels")
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
REF_PREFIX_STEPS = 128

IMPLS = ("ours-chunk", "ours-fused", "ours-auto", "fla-chunk", "fla-fused", "ascan-triton", "ascan-triton+T",
         "ascan-warp", "ascan-warp+T", "torch-loop")
OURS = ("ours-chunk", "ours-fused", "ours-auto")
ENGINES = ("ours-chunk", "ours-fused")  # "ours best" is the faster engine; auto is a dispatch between them
REF_ORDER = ("ours-chunk", "ours-fused", "fla-chunk", "fla-fused")
# fla's fused recurrent walk over very long T (a fraction of a microsecond per step, and 12
# autotuning configs timed on that shape) takes about a minute per dtype at T = 2^18: --quick skips it.
QUICK_FLA_FUSED_MAX_T = 65536
# --quick runs fla on the headline shapes only: its sweep cells (fla-fused walks T sequentially, 29-62
# ms a call at the long-T points) cost more than they add to the headline rows; the full run has them.
QUICK_HEADLINE_ONLY = ("fla-chunk", "fla-fused")
QUICK_BUDGET_S = 100.0
BUDGET_NOTE = "skipped: time budget"
PRECOMPILE_T = 64  # T of fla's precompile calls: its kernels do not specialise on T


def log(msg: str) -> None:
    print(msg, flush=True)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = next((ln.strip() for ln in text if ln.strip()), "")
    return f"{type(e).__name__}: {first}"[:200]


# ----------------------------------------------------------------------------------------------
# the plan (pure Python: --dry-run and --help need neither torch nor a GPU)

def min_bytes(B, T, D, x_dtype, g_dtype, pazz):
    """Minimal device-memory traffic of one pass: fwd reads x, g, writes o (x's dtype); bwd reads
    g, o, do and writes dx (o's dtype), dg (g's dtype)."""
    n, sx, sg = B * T * D, ITEMSIZE[x_dtype], ITEMSIZE[g_dtype]
    per = {"fwd": 2 * sx + sg, "bwd": 3 * sx + 2 * sg, "fwdbwd": 5 * sx + 3 * sg}[pazz]
    return n * per


def parse_only(text):
    """``--only`` tokens -> (passes, sweep sections, decode?)."""
    if not text:
        return list(PASSES), list(SWEEPS), True
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in tokens if t not in PASSES + SWEEPS + ("decode",)]
    if bad:
        raise SystemExit(f"--only: unknown token(s) {bad}; use {', '.join(PASSES + SWEEPS + ('decode',))}")
    passes = [p for p in PASSES if p in tokens]
    sections = [s for s in SWEEPS if s in tokens]
    if passes and not sections:
        sections = list(SWEEPS)
    if sections and not passes:
        passes = list(PASSES)
    return passes, sections, "decode" in tokens


def parse_dtypes(text):
    dtypes = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in dtypes if t not in ("bfloat16", "float32")]
    if bad or not dtypes:
        raise SystemExit(f"--dtypes: unknown or no dtype(s) {bad}; use bfloat16, float32")
    return dtypes


def build_plan(args):
    """Cases per sweep section: dicts with B, T, D, dtype and passes."""
    passes, sections, _ = parse_only(args.only)
    dtypes = parse_dtypes(args.dtypes)
    mode = "quick" if args.quick else "full"
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


def too_big(args, case, pazz):
    return min_bytes(case["B"], case["T"], case["D"], case["dtype"], case["dtype"], pazz) > args.max_gb * 1e9


def print_plan(args, plan, groups=()):
    _, _, decode = parse_only(args.only)
    log(f"mode: {'quick' if args.quick else 'full'}; size cap {args.max_gb:g} GB of minimal traffic per pass; "
        f"warm-up {args.warmup_ms:g} ms, rep {args.rep_ms:g} ms; budget for peers "
        + (f"{args.budget:g} s" if args.budget else "none") + "; time limit for new shapes "
        + (f"{args.time_limit:g} s" if args.time_limit else "none"))
    for section in ("headline", "decode", "tsweep", "channels"):  # the run order
        if section == "decode" and decode:
            log("[decode] host time per call at {}x{}x{}; device time at {}x{}x{}".format(*DECODE_HOST_SHAPE,
                                                                                          *DECODE_DEVICE_SHAPE))
        for i, c in enumerate(plan.get(section, ())):
            if i == 0:
                off = [n for n in IMPLS if impl_selected(args, n) and plan_skip_reason(args, n, section)]
                log(f"[{section}]" + (f" without {', '.join(off)} ({plan_skip_reason(args, off[0], section)})"
                                      if off else ""))
            parts = []
            for p in c["passes"]:
                gb = min_bytes(c["B"], c["T"], c["D"], c["dtype"], c["dtype"], p) / 1e9
                parts.append(f"{p} {gb:.3g} GB" + (" (skipped: size)" if too_big(args, c, p) else ""))
            log(f"  {c['B']}x{c['T']}x{c['D']} {c['dtype']}: " + ", ".join(parts))
    names = [n for n in IMPLS if impl_selected(args, n) and (args.warp or not n.startswith("ascan-warp"))]
    log("implementations: " + ", ".join(names) + ("" if args.warp else " (ascan-warp off: --no-warp)"))
    fla = [k for grp in groups for k in grp.get("fla", ())]
    ascan = [k for grp in groups for k in grp.get("ascan", ())]
    parts = [f"fla {len(fla)} tuning keys (" + ", ".join(f"{e} D={D} {dt}{' +state' if st else ''}"
                                                      for e, D, dt, st in fla) + ")"] if fla else []
    parts += [f"accelerated-scan {len(ascan)} compile keys (" + ", ".join(
        f"{dt} T{'=1' if T == 1 else '%16=0' if T == 16 else f'={T}'}" for dt, T in ascan) + ")"] if ascan else []
    log("triton precompile: " + ("; ".join(parts) or "off"))


def impl_selected(args, name):
    if not args.impls:
        return True
    return any(name.startswith(tok.strip()) for tok in args.impls.split(",") if tok.strip())


def plan_skip_reason(args, name, section):
    if args.quick and section != "headline" and name in QUICK_HEADLINE_ONLY:
        return "--quick: headline shapes only"
    return None


def fla_skip_reason(args, name, T):
    cap = args.fla_fused_max_t
    if name == "fla-fused" and cap and T > cap:
        return f"T > {cap} (--fla-fused-max-t: slow sequential walk plus autotuning)"
    return None


ASCAN_TRITON_BLOCK = 2048  # accelerated_scan.scalar's scan block (time steps per program iteration)


def ascan_skip_reason(variant, B, T, D, dtype):
    if T < 1 or T & (T - 1):
        return "T not a power of two"
    if variant == "warp" and not 32 <= T <= 65536:
        return "warp kernel needs 32 <= T <= 65536"
    if D > 65535:
        return "D > 65535 (grid y dimension)"
    if B * D * T >= 2 ** 31:
        return "B*D*T >= 2^31 (32-bit offsets)"
    if dtype not in ("float32", "bfloat16", "float16"):
        return f"{dtype} unsupported"
    return None


# ----------------------------------------------------------------------------------------------
# timing

def rotating(fns):
    """One callable that runs ``fns`` in turn, one per call: each call meets inputs that the
    previous calls have pushed out of L2."""
    if len(fns) == 1:
        return fns[0]
    state = [0]

    def run():
        i = state[0]
        state[0] = i + 1 if i + 1 < len(fns) else 0
        return fns[i]()
    return run


def rotation_count(set_bytes, rotate_bytes, cap=256):
    """How many input sets make the rotation's working set exceed ``rotate_bytes``."""
    if set_bytes <= 0 or set_bytes >= rotate_bytes:
        return 1
    return max(1, min(cap, math.ceil(rotate_bytes / set_bytes)))


class Timer:
    """Median milliseconds per call of ``fn``.

    do_bench: triton.testing.do_bench (L2 flushed before every call; host launch overhead hidden
      behind the flush).
    events: CUDA events around batches of calls; a ``torch.cuda._sleep`` queued ahead of each batch
      lets the host queue the whole batch first, so the batch runs back to back (device time, not
      host time); inputs are expected to rotate.
    wall: ``time.perf_counter`` with a synchronisation per call (CPU smoke runs only).
    """
    CYCLES_PER_MS = 2.0e6  # the spin is in clock cycles; a slower clock only lengthens it

    def __init__(self, ctx, kind, warmup_ms, rep_ms):
        self.ctx, self.warmup_ms, self.rep_ms = ctx, warmup_ms, rep_ms
        self.kind = kind
        if ctx.device == "cpu":
            self.kind = "wall"
        elif kind in ("auto", "do_bench"):
            try:
                import inspect

                from triton.testing import do_bench
                if "return_mode" not in inspect.signature(do_bench).parameters:
                    raise ImportError("triton.testing.do_bench has no return_mode (triton too old)")
                self._do_bench = do_bench
                self.kind = "do_bench"
            except Exception as e:
                if kind == "do_bench":
                    raise SystemExit(f"--timer do_bench: triton does not import ({one_line(e)})")
                log(f"timer: triton does not import ({one_line(e)}); using CUDA events")
                self.kind = "events"

    def __call__(self, fn):
        if self.kind == "do_bench":
            return float(self._do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        if self.kind == "events":
            return self._events(fn)
        return self._wall(fn)

    def _events(self, fn):
        torch = self.ctx.torch
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        for _ in range(3):
            fn()
        end.record()
        host_ms = (time.perf_counter() - t0) * 1e3 / 3
        torch.cuda.synchronize()
        est = max(start.elapsed_time(end) / 3, 1e-4)
        n = max(1, min(100, math.ceil(0.5 / est)))         # calls per timed batch: about 0.5 ms
        reps = max(7, min(2000, int(self.rep_ms / (est * n))))
        for _ in range(max(1, min(2000, int(self.warmup_ms / est)))):
            fn()
        sleep = getattr(torch.cuda, "_sleep", None)
        spin = int(min(host_ms * n * 1.5, 50.0) * self.CYCLES_PER_MS) if host_ms > est else 0
        events = []
        for _ in range(reps):
            if sleep is not None and spin:
                sleep(spin)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(n):
                fn()
            e.record()
            events.append((s, e))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) / n for s, e in events)

    def _wall(self, fn):
        fn()
        times, spent = [], 0.0
        while len(times) < 3 or (spent < self.rep_ms and len(times) < 1000):
            t0 = time.perf_counter()
            fn()
            dt = (time.perf_counter() - t0) * 1e3
            times.append(dt)
            spent += dt
        return statistics.median(times)


# ----------------------------------------------------------------------------------------------
# implementations: each turns one input set {x, g, do} into a timed callable per pass

class Unavailable(Exception):
    pass


def leaves(*ts):
    return tuple(t.detach().requires_grad_(True) for t in ts)


class Impl:
    name = ""

    def __init__(self, ctx):
        self.ctx = ctx
        self.torch = ctx.torch

    def skip_reason(self, B, T, D, dtype):
        return None

    def pass_skip_reason(self, pazz, T):
        """Why this implementation must not run this pass at this length (None: it may)."""
        return None

    def make(self, pazz, s):
        return getattr(self, "make_" + pazz)(s)

    # out(s) -> o [B, T, D];  grads(s) -> (dx, dg) [B, T, D]


class Ours(Impl):
    """hgrn_cupy on torch tensors, one engine."""

    def __init__(self, ctx, hc, engine):
        super().__init__(ctx)
        self.hc, self.engine = hc, engine
        self.fn = {"chunk": hc.chunk_hgrn, "fused_recurrent": hc.fused_recurrent_hgrn, "auto": hc.hgrn}[engine]
        self.name = {"chunk": "ours-chunk", "fused_recurrent": "ours-fused", "auto": "ours-auto"}[engine]

    def out(self, s):
        return self.fn(s["x"], s["g"])[0]

    def grads(self, s):
        o = self.fn(s["x"], s["g"])[0]
        dx, dg, _ = self.hc.hgrn_backward(s["g"], o, s["do"], engine=self.engine)
        return dx, dg

    def make_fwd(self, s):
        f, x, g = self.fn, s["x"], s["g"]
        return lambda: f(x, g)

    def make_bwd(self, s):
        bwd, e, g, do = self.hc.hgrn_backward, self.engine, s["g"], s["do"]
        o = self.fn(s["x"], g)[0]
        return lambda: bwd(g, o, do, engine=e)

    def make_fwdbwd(self, s):
        f, bwd, e, x, g, do = self.fn, self.hc.hgrn_backward, self.engine, s["x"], s["g"], s["do"]

        def run():
            o = f(x, g)[0]
            return bwd(g, o, do, engine=e)
        return run


class Autograd(Impl):
    """Anything differentiable through torch.autograd: model(x, g) -> o [B, T, D]."""

    def model(self, x, g):
        raise NotImplementedError

    def out(self, s):
        with self.torch.no_grad():
            return self.model(s["x"], s["g"])

    def grads(self, s):
        x, g = leaves(s["x"], s["g"])
        return self.torch.autograd.grad(self.model(x, g), (x, g), s["do"])

    def make_fwd(self, s):
        m, x, g = self.model, s["x"], s["g"]
        return lambda: m(x, g)

    def make_bwd(self, s):
        grad, (x, g), do = self.torch.autograd.grad, leaves(s["x"], s["g"]), s["do"]
        o = self.model(x, g)
        return lambda: grad(o, (x, g), do, retain_graph=True)

    def make_fwdbwd(self, s):
        m, grad, (x, g), do = self.model, self.torch.autograd.grad, leaves(s["x"], s["g"]), s["do"]

        def run():
            return grad(m(x, g), (x, g), do)
        return run


class Fla(Autograd):
    def __init__(self, ctx, fn, name):
        super().__init__(ctx)
        self.fn, self.name = fn, name

    def skip_reason(self, B, T, D, dtype):
        return fla_skip_reason(self.ctx.args, self.name, T)

    def model(self, x, g):
        return self.fn(x, g)[0]


class TorchLoop(Autograd):
    name = "torch-loop"

    def skip_reason(self, B, T, D, dtype):
        if T > self.ctx.args.torch_loop_max_t:
            return f"T > {self.ctx.args.torch_loop_max_t} (python loop)"
        return None

    def model(self, x, g):
        torch = self.torch
        a, xf = torch.exp(g.float()), x.float()
        h = xf.new_zeros(x.shape[0], x.shape[2])
        outs = []
        for t in range(x.shape[1]):
            h = a[:, t] * h + xf[:, t]
            outs.append(h)
        return torch.stack(outs, 1).to(x.dtype)


class Ascan(Impl):
    """accelerated-scan: scan(gates, tokens) on [B, D, T] with linear gates.

    native: inputs already in that layout (a = exp(g), transposed) before timing; gradients are
      d/da and d/dx of the scan.  +T: exp, transposes in and out and the scan, from [B, T, D] leaves.
    """

    def __init__(self, ctx, scan, variant, transposed):
        super().__init__(ctx)
        self.scan, self.variant, self.transposed = scan, variant, transposed
        self.name = f"ascan-{variant}" + ("+T" if transposed else "")

    def skip_reason(self, B, T, D, dtype):
        return ascan_skip_reason(self.variant, B, T, D, dtype)

    def pass_skip_reason(self, pazz, T):
        # Its Triton backward loads the previous state at every lane of its 2048-step block with only a
        # t > 0 mask, so when T is not a multiple of the block the last sequence reads up to 2047 - T
        # elements past the end of the saved states (compute-sanitizer: invalid global reads; an
        # illegal-address fault at 1x256x1024 float32 on an H100 ended a sweep).
        if self.variant == "triton" and pazz != "fwd" and T % ASCAN_TRITON_BLOCK:
            return f"its backward reads past the end of its states when T is not a multiple of {ASCAN_TRITON_BLOCK}"
        return None

    def native(self, s):
        """(a, x, do) in [B, D, T], shared by both variants through the input set."""
        if "ascan_native" not in s:
            t = lambda v: v.transpose(1, 2).contiguous()  # noqa: E731
            s["ascan_native"] = (t(self.torch.exp(s["g"])), t(s["x"]), t(s["do"]) if "do" in s else None)
        return s["ascan_native"]

    def model(self, x, g):
        torch, scan = self.torch, self.scan
        h = scan(torch.exp(g).transpose(1, 2).contiguous(), x.transpose(1, 2).contiguous())
        return h.transpose(1, 2).contiguous()

    def out(self, s):
        with self.torch.no_grad():
            if self.transposed:
                return self.model(s["x"], s["g"])
            a, xt, _ = self.native(s)
            return self.scan(a, xt).transpose(1, 2)

    def grads(self, s):
        grad = self.torch.autograd.grad
        if self.transposed:
            x, g = leaves(s["x"], s["g"])
            return grad(self.model(x, g), (x, g), s["do"])
        a, xt, dot = self.native(s)
        ar, xr = leaves(a, xt)
        da, dx = grad(self.scan(ar, xr), (ar, xr), dot)
        return dx.transpose(1, 2), (da.float() * a.float()).transpose(1, 2)  # d/dg = d/da * a

    def make_fwd(self, s):
        if self.transposed:
            m, x, g = self.model, s["x"], s["g"]
            return lambda: m(x, g)
        scan, (a, xt, _) = self.scan, self.native(s)
        return lambda: scan(a, xt)

    def make_bwd(self, s):
        grad = self.torch.autograd.grad
        if self.transposed:
            (x, g), do = leaves(s["x"], s["g"]), s["do"]
            o = self.model(x, g)
            return lambda: grad(o, (x, g), do, retain_graph=True)
        a, xt, dot = self.native(s)
        ar, xr = leaves(a, xt)
        h = self.scan(ar, xr)
        return lambda: grad(h, (ar, xr), dot, retain_graph=True)

    def make_fwdbwd(self, s):
        grad = self.torch.autograd.grad
        if self.transposed:
            m, (x, g), do = self.model, leaves(s["x"], s["g"]), s["do"]
            return lambda: grad(m(x, g), (x, g), do)
        scan, (a, xt, dot) = self.scan, self.native(s)
        ar, xr = leaves(a, xt)
        return lambda: grad(scan(ar, xr), (ar, xr), dot)


# ----------------------------------------------------------------------------------------------
# loading the implementations; every failure is one line and a skipped column

def import_hgrn_cupy():
    if (REPO / "hgrn_cupy").is_dir() and str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # benchmark this checkout
    import hgrn_cupy
    return hgrn_cupy


def import_fla_hgrn():
    """``fla.ops.hgrn``.  ``fla/ops/__init__.py`` imports every op family, and some of them need
    packages that the HGRN kernels do not (einops, ...); when that import fails, load the hgrn
    subpackage alone under bare package modules for ``fla`` / ``fla.ops``."""
    try:
        return importlib.import_module("fla.ops.hgrn"), None
    except Exception as first:
        import types

        spec = importlib.util.find_spec("fla") if "fla" not in sys.modules else sys.modules["fla"].__spec__
        if spec is None or not spec.submodule_search_locations:
            raise
        root = list(spec.submodule_search_locations)[0]
        for name, path in (("fla", root), ("fla.ops", os.path.join(root, "ops"))):
            if name not in sys.modules:
                pkg = types.ModuleType(name)
                pkg.__path__ = [path]
                pkg.__package__ = name
                sys.modules[name] = pkg
        try:
            return importlib.import_module("fla.ops.hgrn"), one_line(first)
        except Exception as second:
            raise ImportError(f"{one_line(first)}; hgrn alone: {one_line(second)}") from second


def build_warp(ctx):
    """Compile accelerated_scan.warp in a child process under a time limit, then import the cached
    build here (load_inline reuses a build whose sources and flags are unchanged)."""
    limit = ctx.args.warp_timeout
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", "import accelerated_scan.warp"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(Exception):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        with contextlib.suppress(Exception):  # our killed build leaves its lock behind
            from torch.utils.cpp_extension import _get_build_directory
            lock = Path(_get_build_directory("warpscan", verbose=False)) / "lock"
            if lock.exists():
                lock.unlink()
        raise Unavailable(f"warp compile took more than {limit:g} s (--warp-timeout)")
    if proc.returncode != 0:
        lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
        errs = [ln for ln in lines if "error" in ln.lower()]
        raise Unavailable("warp build failed: " + ((errs or lines or ["?"])[-1])[:200])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import accelerated_scan.warp as warp
    log(f"accelerated_scan.warp built in {time.perf_counter() - t0:.0f} s")
    return warp.scan


def load_impls(ctx):
    impls, missing = {}, {}

    def want(*names):
        return [n for n in names if impl_selected(ctx.args, n)]

    if want(*OURS):
        try:
            hc = import_hgrn_cupy()
            from hgrn_cupy import _backend
            if getattr(_backend, "POISON_OUTPUTS", False):
                log("WARNING: hgrn_cupy._backend.POISON_OUTPUTS is on; turning it off for timing")
                _backend.POISON_OUTPUTS = False
            ctx.versions["hgrn_cupy"] = getattr(hc, "__version__", "?")
            for engine in ("chunk", "fused_recurrent", "auto"):
                impl = Ours(ctx, hc, engine)
                if impl_selected(ctx.args, impl.name):
                    impls[impl.name] = impl
            ctx.hc = hc
        except Exception as e:
            for n in want(*OURS):
                missing[n] = one_line(e)
    if want("fla-chunk", "fla-fused"):
        try:
            mod, note = import_fla_hgrn()
            if note:
                log(f"fla: package import failed ({note}); loaded fla.ops.hgrn on its own")
            ctx.versions["fla"] = version_of("fla-core", "fla")
            if impl_selected(ctx.args, "fla-chunk"):
                impls["fla-chunk"] = Fla(ctx, mod.chunk_hgrn, "fla-chunk")
            if impl_selected(ctx.args, "fla-fused"):
                impls["fla-fused"] = Fla(ctx, mod.fused_recurrent_hgrn, "fla-fused")
            ctx.fla = mod
        except Exception as e:
            for n in want("fla-chunk", "fla-fused"):
                missing[n] = one_line(e)
    if want("ascan-triton", "ascan-triton+T"):
        try:
            from accelerated_scan import scalar
            ctx.versions["accelerated_scan"] = version_of("accelerated-scan", "accelerated_scan")
            for tr in (False, True):
                impl = Ascan(ctx, scalar.scan, "triton", tr)
                if impl_selected(ctx.args, impl.name):
                    impls[impl.name] = impl
        except Exception as e:
            for n in want("ascan-triton", "ascan-triton+T"):
                missing[n] = one_line(e)
    if want("ascan-warp", "ascan-warp+T"):
        try:
            if not ctx.args.warp:
                raise Unavailable("disabled (--no-warp; the default in --quick)")
            if ctx.device != "cuda":
                raise Unavailable("needs CUDA")
            scan = build_warp(ctx)
            ctx.versions.setdefault("accelerated_scan", version_of("accelerated-scan", "accelerated_scan"))
            for tr in (False, True):
                impl = Ascan(ctx, scan, "warp", tr)
                if impl_selected(ctx.args, impl.name):
                    impls[impl.name] = impl
        except Exception as e:
            for n in want("ascan-warp", "ascan-warp+T"):
                missing[n] = one_line(e)
    if want("torch-loop"):
        impls["torch-loop"] = TorchLoop(ctx)
    for name, why in missing.items():
        log(f"skipping {name}: {why}")
    ctx.impls = {n: impls[n] for n in IMPLS if n in impls}
    ctx.missing = missing


def version_of(dist, module):
    try:
        return importlib.metadata.version(dist)
    except Exception:
        mod = sys.modules.get(module)
        return getattr(mod, "__version__", "?") if mod else "?"


# ----------------------------------------------------------------------------------------------
# triton precompile: the peers' Triton kernels compile in child processes while this one imports

def precompile_plan(args, plan, decode):
    """Precompile groups, one per fla tuning key (engine, D, dtype, state in and out?) and one for
    accelerated-scan's compile keys (dtype, T class), from the cells the plan will run."""
    fla, ascan = [], []

    def add(keys, key):
        if key not in keys:
            keys.append(key)

    for section, cases in plan.items():
        for c in cases:
            for name, engine in (("fla-chunk", "chunk"), ("fla-fused", "fused")):
                if (impl_selected(args, name) and not plan_skip_reason(args, name, section)
                        and not fla_skip_reason(args, name, c["T"])):
                    add(fla, [engine, c["D"], c["dtype"], False])
            if (any(impl_selected(args, n) for n in ("ascan-triton", "ascan-triton+T"))
                    and not ascan_skip_reason("triton", c["B"], c["T"], c["D"], c["dtype"])):
                add(ascan, [c["dtype"], c["T"] if c["T"] == 1 or c["T"] % 16 else 16])
    if decode and impl_selected(args, "fla-fused"):
        for _, _, D in (DECODE_HOST_SHAPE, DECODE_DEVICE_SHAPE):
            add(fla, ["fused", D, "bfloat16", True])
    return [{"fla": [k]} for k in fla] + ([{"ascan": ascan}] if ascan else [])


def start_precompile(groups):
    """Start the precompile children (at most one per spare core); returns [(process, output file)]."""
    import tempfile

    have = {"fla": importlib.util.find_spec("fla"), "ascan": importlib.util.find_spec("accelerated_scan")}
    groups = [{k: v for k, v in grp.items() if have[k]} for grp in groups]
    groups = [grp for grp in groups if grp]
    n = min(len(groups), max(1, min(16, (os.cpu_count() or 4) - 2)))
    env = dict(os.environ, FLA_CACHE_RESULTS="0", TRITON_CACHE_AUTOTUNING="0")
    code = "import sys; sys.path.insert(0, sys.argv[1]); import bench; bench.precompile_worker(sys.argv[2])"
    procs = []
    for i in range(n):
        spec = {"fla": [], "ascan": []}
        for grp in groups[i::n]:
            for k, v in grp.items():
                spec[k] += v
        out = tempfile.TemporaryFile(mode="w+")
        procs.append((subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).resolve().parent),
                                        json.dumps(spec)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True), out))
    return procs


def wait_precompile(procs, timeout, quiet=False):
    """Wait for the precompile children (``timeout`` seconds in all), kill those still running; one
    line per failure: their kernels then compile on first use, as without --precompile."""
    deadline = time.perf_counter() + timeout
    failed = []
    for proc, out in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(Exception):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            failed.append(f"not done after {timeout:g} s (--precompile-timeout)")
        else:
            if proc.returncode:
                out.seek(0)
                lines = [ln.strip() for ln in out.read().splitlines() if ln.strip()]
                failed.append(f"exit {proc.returncode}: " + ((lines or ["?"])[-1])[:200])
        out.close()
    for why in dict.fromkeys([] if quiet else failed):
        log(f"triton precompile: {failed.count(why)} of {len(procs)} processes failed ({why})")
    return len(procs) - len(failed)


def compile_only_autotuners(prefix):
    """In a precompile child: every triton autotuner in the modules under ``prefix`` runs each config
    once (which compiles it) instead of timing it, and neither reads nor writes tuning results on
    disk, so the parent still tunes on its own shapes."""
    from triton.runtime.autotuner import Autotuner

    def run_once(fn, *args, quantiles=None, **kwargs):
        fn()
        return [0.0] * len(quantiles) if quantiles else 0.0

    def no_disk_cache(tuning_key, configs, bench_fn):
        bench_fn()
        return False

    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(prefix):
            continue
        for obj in list(vars(module).values()):
            while type(obj).__module__.startswith("triton"):  # Heuristics -> Autotuner -> JITFunction
                if isinstance(obj, Autotuner):
                    obj.cache_results = False
                    obj.do_bench = run_once
                    obj.check_disk_cache = no_disk_cache
                    break
                obj = getattr(obj, "fn", None)


def precompile_worker(spec_json):
    """Body of one precompile child: the fla and accelerated-scan calls of the parent's plan on tiny
    inputs (same dtypes, D, state arguments and T class), forward and backward."""
    import torch
    spec = json.loads(spec_json)
    F = torch.nn.functional

    def inputs(shape, dtype):
        dt = getattr(torch, dtype)
        x = torch.randn(shape, device="cuda", dtype=dt)
        return x, F.logsigmoid(torch.randn(shape, device="cuda", dtype=dt))

    if spec.get("fla"):
        mod, _ = import_fla_hgrn()
        compile_only_autotuners("fla.")
        for engine, D, dtype, state in spec["fla"]:
            fn = mod.chunk_hgrn if engine == "chunk" else mod.fused_recurrent_hgrn
            x, g = leaves(*inputs((1, PRECOMPILE_T, D), dtype))
            if state:
                with torch.no_grad():
                    h = torch.randn(1, D, device="cuda")
                    for _ in range(2):  # the second call takes the state in the dtype fla hands back
                        h = fn(x, g, initial_state=h, output_final_state=True)[1]
            else:
                o = fn(x, g)[0]
                torch.autograd.grad(o, (x, g), torch.randn_like(o))
    if spec.get("ascan"):
        from accelerated_scan.scalar import scan
        for dtype, T in spec["ascan"]:
            x, g = inputs((1, 4, T), dtype)
            a, x = leaves(g.exp(), x)
            h = scan(a, x)
            torch.autograd.grad(h, (a, x), torch.randn_like(h))
    torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# correctness

def rel_err(ctx, out, ref):
    """||out - ref|| / ||ref|| in float64, in slices (no full-size float64 temporaries); inf on
    a shape mismatch or a NaN."""
    torch = ctx.torch
    if tuple(out.shape) != tuple(ref.shape):
        return float("inf")
    a, b = out.reshape(-1), ref.reshape(-1)
    num = den = 0.0
    step = 1 << 25
    for i in range(0, a.numel(), step):
        ai, bi = a[i:i + step].double(), b[i:i + step].double()
        num += float(torch.sum((ai - bi) ** 2))
        den += float(torch.sum(bi ** 2))
    if math.isnan(num) or math.isnan(den):
        return float("inf")
    return math.sqrt(num) / math.sqrt(den) if den > 0 else math.sqrt(num)


def loop_prefix(ctx, x, g, steps):
    """float64 PyTorch loop over the first ``steps`` steps: an independent check of the reference."""
    torch = ctx.torch
    a, xv = torch.exp(g[:, :steps].double()), x[:, :steps].double()
    h = torch.zeros_like(xv[:, 0])
    outs = []
    for t in range(xv.shape[1]):
        h = a[:, t] * h + xv[:, t]
        outs.append(h)
    return torch.stack(outs, 1)


def note_first_call(name, kind, ms):
    """Log first calls that compile or autotune for long, so the log shows where a run's time goes."""
    if ms > 2000:
        log(f"  {name}: first {'forward' if kind == 'out' else 'forward+backward'} call {ms / 1e3:.1f} s "
            "(compile, autotuning)")


class Checker:
    """Compares each implementation's forward output and gradients on input set 0 with the
    reference: the first of REF_ORDER that runs and agrees with a float64 loop over the first steps."""

    def __init__(self, ctx, s, dtype):
        self.ctx, self.s, self.tol = ctx, s, TOL[dtype]
        self.ref_name = self._out = self._grads = None
        self.results = {}  # (impl, "out" | "grad") -> dict(ok, err, first_ms, note)
        self.ref_prefix_err = None

    def _reference(self):
        if self.ref_name is not None or self._out is False:
            return
        steps = min(self.s["x"].shape[1], REF_PREFIX_STEPS)
        prefix = None
        for name in REF_ORDER:
            impl = self.ctx.impls.get(name)
            if impl is None:
                continue
            try:
                t0 = time.perf_counter()
                o = impl.out(self.s)
                self.ctx.sync()
                first = (time.perf_counter() - t0) * 1e3
                if prefix is None:
                    prefix = loop_prefix(self.ctx, self.s["x"], self.s["g"], steps)
                err = rel_err(self.ctx, o[:, :steps], prefix)
            except Exception as e:
                self.results[(name, "out")] = dict(ok=False, error=one_line(e))
                self.ctx.after_error()
                continue
            note_first_call(name, "out", first)
            if err <= self.tol:
                self.ref_name, self._out, self.ref_prefix_err = name, o, err
                self.results[(name, "out")] = dict(ok=True, err=err, first_ms=first, note="reference")
                return
            self.results[(name, "out")] = dict(ok=False, err=err, first_ms=first,
                                               note=f"first {steps} steps differ from a float64 loop")
            log(f"  WARNING: {name} disagrees with a float64 loop on the first {steps} steps (rel {err:.2e})")
        self._out = False

    def check(self, impl, kind):
        key = (impl.name, kind)
        if key in self.results:
            return self.results[key]
        self._reference()
        if self.ref_name is None:
            res = dict(ok=False, error="no reference implementation agreed with the float64 loop")
            self.results[key] = res
            return res
        ref_impl = self.ctx.impls[self.ref_name]
        if kind == "grad" and self._grads is None and ref_impl is not impl:
            try:
                self._grads = tuple(ref_impl.grads(self.s))
            except Exception as e:
                res = dict(ok=False, error=f"reference {self.ref_name} gradients failed: {one_line(e)}")
                self.results[key] = res
                self.ctx.after_error()
                return res
        try:
            self.ctx.sync()
            t0 = time.perf_counter()
            if kind == "out":
                got = (impl.out(self.s),)
                ref = (self._out,)
            else:
                got = tuple(impl.grads(self.s))
                if self._grads is None:  # impl is the reference
                    self._grads = got
                ref = self._grads
            self.ctx.sync()
            first = (time.perf_counter() - t0) * 1e3
            note_first_call(impl.name, kind, first)
            err = max(rel_err(self.ctx, a, b) for a, b in zip(got, ref))
            del got
            res = dict(ok=err <= self.tol, err=err, first_ms=first)
        except Exception as e:
            res = dict(ok=False, error=one_line(e))
            self.ctx.after_error()
        self.results[key] = res
        return res


# ----------------------------------------------------------------------------------------------
# running

class Context:
    def __init__(self, args, t0):
        self.args = args
        self.t0 = t0
        self.versions = {"python": platform.python_version()}
        self.results = {"sections": {}, "decode": None, "seconds": {}, "seconds_by_impl": {}}
        self.impls, self.missing = {}, {}
        self.hc = self.fla = None
        self.broken = False
        self.budget_spent = False
        import numpy
        self.versions["numpy"] = numpy.__version__
        try:
            import torch
        except Exception as e:
            raise SystemExit(f"torch does not import ({one_line(e)}); nothing to benchmark")
        self.torch = torch
        self.versions["torch"] = torch.__version__
        if args.cpu_smoke:
            self.device = "cpu"
        else:
            if not torch.cuda.is_available():
                raise SystemExit("no CUDA device visible to torch (use --dry-run to see the plan)")
            self.device = "cuda"
        for mod in ("cupy", "triton"):
            with contextlib.suppress(Exception):
                self.versions[mod] = importlib.import_module(mod).__version__

    def elapsed(self):
        return time.perf_counter() - self.t0

    def phase_done(self, name, since):
        """Record and log the seconds of one section of the run (``since``: its perf_counter start)."""
        dt = time.perf_counter() - since
        self.results["seconds"][name] = self.results["seconds"].get(name, 0.0) + dt
        log(f"[{self.elapsed():6.0f}s] {name}: {dt:.1f} s")

    def account(self, name, check_s=0.0, timing_s=0.0):
        """Seconds spent per implementation: checks (first calls, so compile and autotuning,
        included) and timing."""
        acc = self.results["seconds_by_impl"].setdefault(name, {"check": 0.0, "timing": 0.0})
        acc["check"] += check_s
        acc["timing"] += timing_s

    def over_budget(self):
        """True once --budget seconds have passed: peer cells not yet started are skipped."""
        if not self.args.budget or self.elapsed() <= self.args.budget:
            return False
        if not self.budget_spent:
            self.budget_spent = True
            log(f"[{self.elapsed():6.0f}s] --budget {self.args.budget:g} s spent: peer cells not started yet are "
                f"skipped ({BUDGET_NOTE})")
        return True

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def after_error(self):
        """After a failure: free what we can and make sure the CUDA context still works."""
        gc.collect()
        if self.device != "cuda":
            return
        try:
            self.torch.cuda.synchronize()
            (self.torch.ones(1, device="cuda") + 1).item()
            self.torch.cuda.empty_cache()
        except Exception as e:
            log(f"CUDA context is unusable after an error ({one_line(e)}); stopping, results so far are saved")
            self.broken = True

    def free(self):
        gc.collect()
        if self.device == "cuda":
            with contextlib.suppress(Exception):
                self.torch.cuda.empty_cache()
        if self.hc is not None and "cupy" in sys.modules:
            with contextlib.suppress(Exception):
                sys.modules["cupy"].get_default_memory_pool().free_all_blocks()


def device_info(ctx):
    torch = ctx.torch
    info = {"device": "cpu" if ctx.device == "cpu" else torch.cuda.get_device_name()}
    if ctx.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(sm_count=p.multi_processor_count, memory_gb=round(p.total_memory / 2 ** 30, 1),
                    l2_mb=round(getattr(p, "L2_cache_size", 50 << 20) / 2 ** 20, 1),
                    capability=f"{p.major}.{p.minor}", torch_cuda=torch.version.cuda)
        with contextlib.suppress(Exception):
            import cupy
            info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
            info["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
            info["nvrtc"] = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
    return info


def measure_copy(ctx):
    """Device-to-device copy bandwidth (read + write bytes per second), the floor's yardstick."""
    nbytes = ctx.args.copy_mb << 20
    buffers = [ctx.torch.randn(nbytes // 4, device=ctx.device)]
    buffers.append(ctx.torch.empty_like(buffers[0]))
    ms = ctx.timer(lambda: buffers[1].copy_(buffers[0]))
    buffers.clear()
    ctx.free()
    return dict(bytes=nbytes, ms=ms, gbps=2 * nbytes / (ms * 1e-3) / 1e9)


def make_sets(ctx, B, T, D, dtype, count, with_do):
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


def blank_row(section, case, pazz, floor_bytes, copy_gbps):
    return dict(section=section, B=case["B"], T=case["T"], D=case["D"], dtype=case["dtype"], **{"pass": pazz},
                min_bytes=floor_bytes, floor_ms=floor_bytes / (copy_gbps * 1e9) * 1e3, results={})


def summarize_row(row):
    """Best of ours, best peer, and the speed-up of one over the other."""
    ok = {n: c["ms"] for n, c in row["results"].items() if c.get("status") == "ok"}
    ours = {n: ms for n, ms in ok.items() if n in ENGINES}
    peers = {n: ms for n, ms in ok.items() if n not in OURS}
    row["ours_best"] = min(ours, key=ours.get) if ours else None
    row["peer_best"] = min(peers, key=peers.get) if peers else None
    row["speedup"] = (peers[row["peer_best"]] / ours[row["ours_best"]]) if ours and peers else None


def run_cell(ctx, impl, pazz, section, case, sets, checker):
    B, T, D, dtype = case["B"], case["T"], case["D"], case["dtype"]
    why = (plan_skip_reason(ctx.args, impl.name, section) or impl.skip_reason(B, T, D, dtype)
           or impl.pass_skip_reason(pazz, T))
    if why:
        return dict(status="skip", note=why)
    if impl.name not in OURS and ctx.over_budget():
        return dict(status="skip", note=BUDGET_NOTE)
    kinds = {"fwd": ("out",), "bwd": ("grad",), "fwdbwd": ("out", "grad")}[pazz]
    errs, first = {}, None
    t0 = time.perf_counter()
    for kind in kinds:
        chk = checker.check(impl, kind)
        if "error" in chk:
            ctx.account(impl.name, check_s=time.perf_counter() - t0)
            return dict(status="error", note=chk["error"])
        errs[kind] = chk["err"]
        first = chk.get("first_ms") if first is None else first
        if not chk["ok"]:
            ctx.account(impl.name, check_s=time.perf_counter() - t0)
            return dict(status="mismatch", err=errs, note=chk.get("note") or
                        f"{'output' if kind == 'out' else 'gradients'} rel err {chk['err']:.2e} > {checker.tol:g}")
    t1 = time.perf_counter()
    fns = None
    try:
        fns = [impl.make(pazz, s) for s in sets]
        ms = ctx.timer(rotating(fns))
    except Exception as e:
        fns = None
        ctx.after_error()
        return dict(status="error", note=one_line(e))
    finally:
        del fns
        ctx.account(impl.name, check_s=t1 - t0, timing_s=time.perf_counter() - t1)
    return dict(status="ok", ms=ms, err=errs, first_call_ms=first)


def run_case(ctx, section, case, copy_gbps):
    B, T, D, dtype = case["B"], case["T"], case["D"], case["dtype"]
    rows = {}
    live = []
    for p in case["passes"]:
        row = blank_row(section, case, p, min_bytes(B, T, D, dtype, dtype, p), copy_gbps)
        rows[p] = row
        if too_big(ctx.args, case, p):
            for name in ctx.impls:
                row["results"][name] = dict(status="skip", note=f"over --max-gb {ctx.args.max_gb:g}")
        else:
            live.append(p)
    if live and ctx.impls:
        fwd_bytes = min_bytes(B, T, D, dtype, dtype, "fwd")
        count = rotation_count(fwd_bytes, ctx.rotate_bytes)
        sets = checker = None
        try:
            sets = make_sets(ctx, B, T, D, dtype, count, with_do=any(p != "fwd" for p in live))
            checker = Checker(ctx, sets[0], dtype)
            for p in live:
                row = rows[p]
                row["input_sets"] = count
                for name, impl in ctx.impls.items():
                    if ctx.broken:
                        break
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
    return f"floor {fmt_ms(row['floor_ms'])} | " + ", ".join(parts) + sp


# ----------------------------------------------------------------------------------------------
# decode

def run_decode(ctx, copy_gbps):
    torch, args = ctx.torch, ctx.args
    dt = torch.bfloat16 if ctx.device == "cuda" else torch.float32
    dtype = "bfloat16" if ctx.device == "cuda" else "float32"
    F = torch.nn.functional

    def eager(x, g, h):
        hn = torch.exp(g[:, 0].float()) * h.float() + x[:, 0].float()
        return hn.to(x.dtype).unsqueeze(1), hn

    steps = {}
    if ctx.hc is not None:
        hc = ctx.hc
        if "ours-fused" in ctx.impls:
            steps["ours-fused"] = lambda x, g, h: hc.fused_recurrent_hgrn(x, g, initial_state=h,
                                                                          output_final_state=True)
        if "ours-auto" in ctx.impls:
            steps["ours-auto"] = lambda x, g, h: hc.hgrn(x, g, initial_state=h, output_final_state=True)
        if impl_selected(args, "ours-torch"):
            try:
                hct = importlib.import_module("hgrn_cupy.torch")
                steps["ours-torch"] = lambda x, g, h: hct.fused_recurrent_hgrn(x, g, initial_state=h,
                                                                               output_final_state=True)
            except Exception as e:
                log(f"decode: skipping ours-torch (hgrn_cupy.torch): {one_line(e)}")
    if ctx.fla is not None and "fla-fused" in ctx.impls:
        fla_fused = ctx.fla.fused_recurrent_hgrn
        steps["fla-fused"] = lambda x, g, h: fla_fused(x, g, initial_state=h, output_final_state=True)
    if impl_selected(args, "torch-eager"):
        steps["torch-eager"] = eager

    res = {"host_shape": list(DECODE_HOST_SHAPE), "device_shape": list(DECODE_DEVICE_SHAPE), "dtype": dtype,
           "calls": args.decode_calls, "impls": {}}
    B, T, D = DECODE_DEVICE_SHAPE
    n = B * T * D
    dev_bytes = 3 * n * ITEMSIZE[dtype] + 2 * B * D * 4  # x, g, o and the float32 state in and out
    res["device_min_bytes"] = dev_bytes
    res["device_floor_ms"] = dev_bytes / (copy_gbps * 1e9) * 1e3

    with torch.no_grad():
        # correctness: one step at the host shape against the float32 eager step
        Bh, Th, Dh = DECODE_HOST_SHAPE
        x = torch.randn(Bh, Th, Dh, device=ctx.device, dtype=dt)
        g = F.logsigmoid(torch.randn(Bh, Th, Dh, device=ctx.device, dtype=dt))
        h0 = torch.randn(Bh, Dh, device=ctx.device)
        ref = eager(x, g, h0)
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
        # Two views of device time: per call as the timer sees it (do_bench: L2 flushed, so each call pays
        # the fixed cost of a launch between two events, shown by the empty kernel's row), and per step
        # when steps run back to back on rotating inputs, as in a decode loop (events around batches).
        back_to_back = None
        if ctx.device == "cuda":
            back_to_back = ctx.timer._events if ctx.timer.kind == "events" else \
                Timer(ctx, "events", ctx.timer.warmup_ms, ctx.timer.rep_ms)._events
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


# ----------------------------------------------------------------------------------------------
# output

def fmt_ms(ms):
    if ms is None:
        return "-"
    return f"{ms:.3g}" if ms < 0.1 else f"{ms:.3f}" if ms < 100 else f"{ms:.1f}"


def cell_text(c, floor_ms):
    st = c.get("status")
    if st == "ok":
        return f"{fmt_ms(c['ms'])} ({c['ms'] / floor_ms:.2f}x)"
    return {"mismatch": "MISMATCH", "error": "ERROR"}.get(st, "n/a")


def md_table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def shape_text(row):
    return f"{row['B']}x{row['T']}x{row['D']}"


def speedup_text(row):
    if not row.get("speedup"):
        return "-"
    return f"{row['speedup']:.2f}x ({row['ours_best'][5:]} vs {row['peer_best']})"


def section_table(rows, impl_names):
    headers = ["shape", "dtype", "pass", "floor ms"] + list(impl_names) + ["ours best vs best peer"]
    body = []
    for r in rows:
        cells = [shape_text(r), r["dtype"], r["pass"], fmt_ms(r["floor_ms"])]
        cells += [cell_text(r["results"].get(n, {}), r["floor_ms"]) for n in impl_names]
        cells.append(speedup_text(r))
        body.append(cells)
    notes = {}
    for r in rows:
        for n in impl_names:
            c = r["results"].get(n, {})
            if c.get("status") in ("skip", "mismatch", "error") and c.get("note"):
                key = (n, c["status"], c["note"] if c["status"] != "mismatch" else "")
                notes.setdefault(key, []).append(f"{shape_text(r)} {r['dtype']} {r['pass']}"
                                                 + (f" ({c['note']})" if c["status"] == "mismatch" else ""))
    lines = []
    for (n, st, note), where in notes.items():
        where_txt = "; ".join(where[:4]) + (f"; +{len(where) - 4} more" if len(where) > 4 else "")
        lines.append(f"- {n} {st}" + (f": {note}" if note else "") + f" [{where_txt}]")
    return md_table(headers, body) + ("\n\n" + "\n".join(lines) if lines else "")


def compact_table(rows):
    headers = ["shape", "dtype", "pass", "floor ms", "ours best (x floor)", "engine", "auto (x best)",
               "best peer (x floor)", "peer", "speed-up"]
    body = []
    for r in rows:
        res, fl = r["results"], r["floor_ms"]
        ob, pb = r.get("ours_best"), r.get("peer_best")
        ob_ms = res[ob]["ms"] if ob else None
        auto = res.get("ours-auto", {})
        auto_txt = (f"{fmt_ms(auto['ms'])} ({auto['ms'] / ob_ms:.2f}x)" if auto.get("status") == "ok" and ob_ms
                    else cell_text(auto, fl) if auto else "-")
        body.append([shape_text(r), r["dtype"], r["pass"], fmt_ms(fl),
                     f"{fmt_ms(ob_ms)} ({ob_ms / fl:.2f}x)" if ob else "-", ob[5:] if ob else "-", auto_txt,
                     f"{fmt_ms(res[pb]['ms'])} ({res[pb]['ms'] / fl:.2f}x)" if pb else "-", pb or "-",
                     f"{r['speedup']:.2f}x" if r.get("speedup") else "-"])
    return md_table(headers, body)


def decode_table(dec):
    dshape = 'x'.join(map(str, dec['device_shape']))
    headers = ["impl", f"host us/call ({'x'.join(map(str, dec['host_shape']))}, state in+out)",
               f"device ms per call ({dshape}, state in+out)", f"device ms per step, back to back ({dshape})"]
    body = []
    fl = dec["device_floor_ms"]
    b2b = any("b2b_ms" in r for r in dec["impls"].values())
    for name, r in dec["impls"].items():
        host = (f"{r['host_us']:.1f}" if "host_us" in r else "-" if name.startswith("(") else
                r.get("status", "?").upper() + (f" ({r['note'][:60]})" if r.get("note") else ""))
        dev = (f"{fmt_ms(r['device_ms'])} ({r['device_ms'] / fl:.2f}x)" if "device_ms" in r
               else "ERROR" if "device_note" in r else "-")
        row = [name, host, dev]
        if b2b:
            row.append(f"{fmt_ms(r['b2b_ms'])} ({r['b2b_ms'] / fl:.2f}x)" if "b2b_ms" in r else "-")
        body.append(row)
    if not b2b:
        headers = headers[:3]
    note = (f"\n\nDevice floor {fmt_ms(fl)} ms ({dec['device_min_bytes'] / 1e6:.2f} MB: x, g, o in {dec['dtype']} "
            f"+ float32 state in and out); {dec['calls']} calls per host figure, synchronised once at the end.")
    if b2b:
        note += (" Per call: the timer's median with L2 flushed before each call, which includes a fixed cost "
                 "per launch (the empty kernel's row, `torch.cuda._sleep(0)`). Back to back: CUDA events around "
                 "batches of calls on rotating inputs, queued behind a spin so they run without host gaps, as "
                 "in a decode loop.")
    return md_table(headers, body) + note


def used_impls(rows):
    seen = set()
    for r in rows:
        seen.update(r["results"])
    return [n for n in IMPLS if n in seen]


def render_md(ctx):
    R = ctx.results
    meta = R["meta"]
    out = [f"# hgrn_cupy benchmark ({meta['mode']})", ""]
    out.append(f"- device: {meta['device'].get('device')} "
               + ", ".join(f"{k} {v}" for k, v in meta["device"].items() if k != "device"))
    out.append(f"- date: {meta['date']}")
    out.append("- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    out.append(f"- timer: {meta['timer']} (median; warmup {meta['warmup_ms']} ms, rep {meta['rep_ms']} ms); "
               f"inputs rotated until the working set exceeds {meta['rotate_mb']:.0f} MB")
    if R.get("copy"):
        c = R["copy"]
        out.append(f"- copy bandwidth: {c['gbps']:.0f} GB/s (read + write; {c['bytes'] >> 20} MiB copy in "
                   f"{fmt_ms(c['ms'])} ms)")
    out.append("- floor = minimal bytes / copy bandwidth (fwd: x, g, o; bwd: g, o, do, dx, dg; fwdbwd: both); "
               "cells read `median ms (x floor)`")
    out.append("- correctness: rel L2 error vs the reference (ours-chunk, itself checked against a float64 loop "
               "on the first 128 steps) must be under 1e-3 (float32) / 2e-2 (bfloat16), else MISMATCH, untimed")
    if ctx.missing:
        out.append("- not run: " + "; ".join(f"{n} ({why})" for n, why in ctx.missing.items()))
    out.append(f"- elapsed: {R.get('elapsed_s', 0):.0f} s; " + seconds_text(R).replace("\n", "; "))
    if R.get("not_started"):
        out.append(f"- not started (--time-limit): {'; '.join(R['not_started'])}")
    titles = {"headline": "Headline shapes", "tsweep": f"T sweep (B={TSWEEP_BD[0]}, D={TSWEEP_BD[1]})",
              "channels": f"Channel sweep (T={CHANNELS_T}, D=min(channels, {CHANNELS_MAX_D}))"}
    for section, rows in R["sections"].items():
        if rows:
            out += ["", f"## {titles.get(section, section)}", "", section_table(rows, used_impls(rows))]
    if R.get("decode"):
        out += ["", "## Decode step", "", decode_table(R["decode"])]
    if R["sections"].get("headline"):
        out += ["", "## Summary (headline)", "", compact_table(R["sections"]["headline"])]
    return "\n".join(out) + "\n"


def plot_sweep(ctx, rows, xkey, xlabel, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        log(f"no plot {path.name}: {one_line(e)}")
        return
    passes = [p for p in PASSES if any(r["pass"] == p for r in rows)]
    dtypes = [d for d in ("bfloat16", "float32") if any(r["dtype"] == d for r in rows)]
    if not passes:
        return
    fig, axes = plt.subplots(len(dtypes), len(passes), figsize=(6.5 * len(passes), 4.8 * len(dtypes)),
                             squeeze=False)
    copy_bw = ctx.results.get("copy", {}).get("gbps")
    panels = [(axes[i][j], p, d) for i, d in enumerate(dtypes) for j, p in enumerate(passes)]
    for ax, p, d in panels:
        prow = [r for r in rows if r["pass"] == p and r["dtype"] == d]
        if not prow:
            ax.set_visible(False)
            continue
        for name in used_impls(prow):
            pts = sorted((xkey(r), r["min_bytes"] / (r["results"][name]["ms"] * 1e-3) / 1e9) for r in prow
                         if r["results"].get(name, {}).get("status") == "ok")
            if pts:
                style = "-o" if name in OURS else "--s" if name.startswith("fla") else ":^"
                ax.plot([a for a, _ in pts], [b for _, b in pts], style, label=name, markersize=4)
        if copy_bw:
            ax.axhline(copy_bw, color="black", linewidth=1, label=f"copy {copy_bw:.0f} GB/s")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("achieved bandwidth, minimal bytes / time (GB/s)")
        r0 = prow[0]
        ax.set_title(f"{p} ({r0['dtype']})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{ctx.results['meta']['device'].get('device')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def save(ctx, plot=None):
    """Rewrite results.json and results.md; ``plot``: a sweep section whose plot to draw (once, when
    the section is done)."""
    out = Path(ctx.args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx.results["elapsed_s"] = ctx.elapsed()
    ctx.results["not_run"] = ctx.missing
    (out / "results.json").write_text(json.dumps(json_safe(ctx.results), indent=1))
    (out / "results.md").write_text(render_md(ctx))
    rows = ctx.results["sections"].get(plot)
    if plot == "tsweep" and rows:
        plot_sweep(ctx, rows, lambda r: r["T"], f"T (B={rows[0]['B']}, D={rows[0]['D']})", out / "bw_vs_T.png")
    if plot == "channels" and rows:
        plot_sweep(ctx, rows, lambda r: r["B"] * r["D"],
                   f"channels B*D (T={rows[0]['T']}, D=min(channels, {CHANNELS_MAX_D}))", out / "bw_vs_channels.png")


def print_tables(ctx):
    R = ctx.results
    titles = {"tsweep": "T sweep", "channels": "channel sweep", "headline": "headline"}
    for section in ("tsweep", "channels", "headline"):
        rows = R["sections"].get(section)
        if rows:
            log(f"\n## {titles[section]}\n")
            log(section_table(rows, used_impls(rows)))
    if R.get("decode"):
        log("\n## decode\n")
        log(decode_table(R["decode"]))
    if ctx.missing:
        log("\nnot run: " + "; ".join(f"{n} ({why})" for n, why in ctx.missing.items()))
    meta = R["meta"]
    copy = R.get("copy") or {}
    log(f"\n{meta['device'].get('device')} | timer {meta['timer']} | copy {copy.get('gbps', 0):.0f} GB/s | "
        f"{R['elapsed_s']:.0f} s | {Path(ctx.args.out) / 'results.md'}")
    if R["sections"].get("headline"):
        log("\n## summary (headline; speed-up = best peer / ours best)\n")
        log(compact_table(R["sections"]["headline"]))


def seconds_text(R):
    """Where the run's time went: per section, then per implementation (checks, which include the
    first calls and so compilation and autotuning, / timing), largest first."""
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in R.get("seconds", {}).items())
    by_impl = sorted(R.get("seconds_by_impl", {}).items(), key=lambda kv: -sum(kv[1].values()))
    impls = ", ".join(f"{n} {v['check']:.1f}/{v['timing']:.1f} s" for n, v in by_impl)
    return f"time by section: {parts or '-'}\ntime by implementation (checks incl. first calls/timing): {impls or '-'}"


# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Benchmark hgrn_cupy against fla, accelerated-scan and a PyTorch loop, with the "
                    "device-memory floor (copy bandwidth) as the yardstick.",
        epilog="--only takes a comma list of passes (fwd, bwd, fwdbwd), sweep sections (headline, tsweep, "
               "channels) and 'decode'.  Passes alone run every sweep section with those passes; sections alone "
               "run every pass; decode runs only when named.  Without --only, everything runs.  Pieces of a full "
               "run (each under 9 minutes on an H100): see benchmarks/README.md.")
    ap.add_argument("--out", required=True, help="output folder (results.md, results.json, *.png)")
    ap.add_argument("--quick", action="store_true",
                    help="headline shapes in bf16 (+ fp32 8x4096x2048 fwd/fwdbwd), decode, 3-point sweeps on the "
                         "headline's T and D values without fla, warm-up 5 ms / rep 25 ms, --budget "
                         f"{QUICK_BUDGET_S:g}; no accelerated-scan warp build")
    ap.add_argument("--only", default="", help="e.g. fwd,fwdbwd or headline,decode (see below)")
    ap.add_argument("--dtypes", default="bfloat16,float32",
                    help="dtypes of the headline shapes (decode is bfloat16), default both")
    ap.add_argument("--sweep-dtypes", default=None,
                    help="dtypes of the T and channel sweeps (default both; --quick: bfloat16)")
    ap.add_argument("--impls", default="",
                    help="comma list of implementation name prefixes to run, e.g. ours,fla (default: all of "
                         + ", ".join(IMPLS) + "; decode adds ours-torch, torch-eager)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit (no torch, no GPU)")
    ap.add_argument("--timer", choices=("auto", "do_bench", "events"), default="auto",
                    help="auto: triton's do_bench when triton imports, else CUDA events")
    ap.add_argument("--warmup-ms", type=float, default=None, help="default 25 (quick: 5)")
    ap.add_argument("--rep-ms", type=float, default=None, help="default 100 (quick: 25)")
    ap.add_argument("--max-gb", type=float, default=20.0,
                    help="skip a pass whose minimal traffic (3, 5 or 8 tensors) exceeds this many GB (default %(default)g)")
    ap.add_argument("--rotate-mb", type=float, default=200.0,
                    help="rotate input sets until they exceed max(this, 4 x L2) MB (default 200)")
    ap.add_argument("--copy-mb", type=int, default=1024, help="size of the copy that measures bandwidth (MiB)")
    warp = ap.add_mutually_exclusive_group()
    warp.add_argument("--warp", dest="warp", action="store_true", default=None,
                      help="build and run accelerated-scan's CUDA warp scan (default in full mode)")
    warp.add_argument("--no-warp", dest="warp", action="store_false", help="skip it (default in --quick)")
    ap.add_argument("--warp-timeout", type=float, default=300.0, help="seconds allowed for the warp build")
    ap.add_argument("--torch-loop-max-t", type=int, default=512, help="longest T for the PyTorch loop")
    ap.add_argument("--fla-fused-max-t", type=int, default=None,
                    help=f"longest T for fla-fused (0: no limit; default {QUICK_FLA_FUSED_MAX_T} in --quick, "
                         "else no limit)")
    ap.add_argument("--time-limit", type=float, default=0.0,
                    help="seconds after which no new shape is started (0: none); decode and the final "
                         "tables still run, e.g. 420 for a piece that must end within 9 minutes")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds after which cells of peers not yet started are skipped and marked "
                         f"'{BUDGET_NOTE}'; ours still run (0: none; default {QUICK_BUDGET_S:g} in --quick, "
                         "else none)")
    pc = ap.add_mutually_exclusive_group()
    pc.add_argument("--precompile", dest="precompile", action="store_true", default=True,
                     help="compile fla's and accelerated-scan's Triton kernels in child processes while this "
                          "one imports, so first calls only tune (default)")
    pc.add_argument("--no-precompile", dest="precompile", action="store_false", help="compile on first use")
    ap.add_argument("--precompile-timeout", type=float, default=60.0,
                    help="seconds the run waits for the precompile children (default 60)")
    ap.add_argument("--decode-calls", type=int, default=2000)
    ap.add_argument("--decode-warmup", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="developer check without a GPU: tiny shapes on CPU tensors, wall-clock timer")
    args = ap.parse_args(argv)
    if args.warp is None:
        args.warp = not args.quick
    if args.warmup_ms is None:
        args.warmup_ms = 5.0 if args.quick else 25.0
    if args.rep_ms is None:
        args.rep_ms = 25.0 if args.quick else 100.0
    if args.budget is None:
        args.budget = QUICK_BUDGET_S if args.quick else 0.0
    if args.fla_fused_max_t is None:
        args.fla_fused_max_t = QUICK_FLA_FUSED_MAX_T if args.quick else 0
    return args


def smoke_plan(plan):
    """--cpu-smoke: the same plan structure with tiny shapes."""
    small = {"headline": [(2, 64, 32), (1, 200, 16), (3, 1, 8)], "tsweep": [(2, 1, 16), (2, 32, 16), (2, 256, 16)],
             "channels": [(1, 64, 16), (4, 64, 16)]}
    out = {}
    for section, cases in plan.items():
        proto = cases[0]
        dtypes = list(dict.fromkeys(c["dtype"] for c in cases))
        out[section] = [dict(B=B, T=T, D=D, dtype=dt, passes=proto["passes"])
                        for dt in dtypes for B, T, D in small[section]]
    return out


def main(argv=None):
    t_start = time.perf_counter()
    args = parse_args(argv)
    plan = build_plan(args)
    _, _, decode = parse_only(args.only)
    groups = precompile_plan(args, plan, decode) if args.precompile and not args.cpu_smoke else []
    if args.dry_run:
        print_plan(args, smoke_plan(plan) if args.cpu_smoke else plan, groups)
        return 0
    children = start_precompile(groups) if groups else []
    try:
        return run_benchmark(args, plan, decode, t_start, children)
    finally:
        if children:  # an early exit (no CUDA, an exception) leaves no child behind
            wait_precompile(children, 0, quiet=True)


def run_benchmark(args, plan, decode, t_start, children):
    if args.cpu_smoke:
        plan = smoke_plan(plan)
        args.copy_mb = min(args.copy_mb, 64)
        args.rotate_mb = min(args.rotate_mb, 1.0)
    if not plan:
        args.warp = False  # decode alone never uses the warp scan: don't build it
    ctx = Context(args, t_start)
    torch = ctx.torch
    torch.manual_seed(args.seed)
    info = device_info(ctx)
    l2 = info.get("l2_mb", 0.0 if args.cpu_smoke else 50.0) * 2 ** 20
    ctx.rotate_bytes = max(args.rotate_mb * 1e6, 4 * l2)
    ctx.timer = Timer(ctx, args.timer, args.warmup_ms, args.rep_ms)
    ctx.results["meta"] = dict(mode="quick" if args.quick else ("cpu-smoke" if args.cpu_smoke else "full"),
                               device=info, versions=ctx.versions,
                               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               timer=ctx.timer.kind, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                               rotate_mb=ctx.rotate_bytes / 1e6, max_gb=args.max_gb, budget_s=args.budget,
                               time_limit_s=args.time_limit, argv=sys.argv[1:], tolerances=TOL)
    with contextlib.suppress(Exception):
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if rev.returncode == 0:
            ctx.results["meta"]["git"] = rev.stdout.strip()
    log(f"device: {info.get('device')}; timer: {ctx.timer.kind}; versions: "
        + ", ".join(f"{k} {v}" for k, v in ctx.versions.items()))
    load_impls(ctx)
    ctx.results["meta"]["timer"] = ctx.timer.kind
    log(f"implementations: {', '.join(ctx.impls) or 'none'}")
    ctx.phase_done("start-up (imports, implementations)", t_start)
    if children:
        t = time.perf_counter()
        ok = wait_precompile(children, max(0.0, args.precompile_timeout - (t - t_start)))
        log(f"triton precompile: {ok} of {len(children)} child processes compiled their kernels")
        children.clear()
        ctx.phase_done("triton precompile", t)

    t = time.perf_counter()
    copy = ctx.results["copy"] = measure_copy(ctx)
    log(f"copy bandwidth: {copy['gbps']:.0f} GB/s ({copy['bytes'] >> 20} MiB in {fmt_ms(copy['ms'])} ms)")
    save(ctx)
    ctx.phase_done("copy bandwidth", t)

    skipped = []
    order = [s for s in ("headline",) if s in plan] + (["decode"] if decode else []) + \
        [s for s in ("tsweep", "channels") if s in plan]
    for section in order:
        if ctx.broken:
            break
        t = time.perf_counter()
        if section == "decode":
            ctx.results["decode"] = run_decode(ctx, copy["gbps"])
            save(ctx)
            ctx.phase_done("decode", t)
            continue
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


if __name__ == "__main__":
    sys.exit(main())
