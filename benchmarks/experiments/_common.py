"""What every experiment script shares: inputs, the timer, the floors, knob patches and the table.

Each script in this folder times hgrn_cupy on torch CUDA tensors with some of the library's knobs set
one way and another (an A/B), and prints one Markdown table that names the GPU.  The method is the one
`python -m benchmarks` uses, so the figures read alike:

- timer: ``triton.testing.do_bench`` median (L2 flushed by a 256 MB memset before every call); without
  triton, CUDA events around single calls after the same flush, median; with ``--queued``, the same
  events with the host queued ahead behind a wait (``benchmarks.timing.queued_ms``), which leaves the
  host's time out, as the benchmark's ``dev`` does;
- inputs: x ~ randn, g = logsigmoid(randn), do ~ randn, in as many sets as it takes for the working set
  to exceed ``ROTATE_MB`` (three at least); calls run on the sets in turn, so none finds its inputs in L2;
- rounds: every cell is the minimum over ``--rounds`` rounds, and in each round the variants of one
  (shape, pass) run one after the other (A B C, A B C), so that a slow spell of the machine does not
  fall on one variant alone;
- check: before a variant is timed, its outputs on the first set are compared with the first variant's;
  a relative L2 error over ``TOL`` prints ``MISMATCH`` instead of a time;
- floors: the copy floor is the pass's minimal bytes (fwd reads x, g and writes o: 3 tensors; bwd reads
  g, o, do and writes dx, dg: 5; fwd+bwd 8) over the device-to-device copy bandwidth measured at the
  start (read + write).  The practical floor is ``torch.add(x, g, out=o)``, an elementwise op with the
  forward's traffic, timed like the rest; for bwd and fwd+bwd it is the add's bandwidth applied to
  their bytes (5/3 and 8/3 of the add's time), so in units of the copy floor it reads the same in
  every row.  Cells read the ratio to the copy floor, or us where the copy floor is under 20 us.

Scripts set knobs through :func:`patched` on the modules their own ``library()`` names, so that a
rename of the library's internals is one edit at the top of each script.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
from pathlib import Path

# The checkout's hgrn_cupy is the one measured, installed or not.
REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

DEVICE = "cuda"
ROTATE_MB = 210
MIN_SETS = 3
TOL = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3, "float64": 1e-10}
DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32", "f64": "float64"}
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}
TENSORS = {"fwd": 3, "bwd": 5, "fwdbwd": 8, "states_fwd": 2, "states_bwd": 2}  # states_*: the state-only passes
SHORT = {v: k for k, v in DTYPES.items()}


class Case:
    """One shape and dtype, written ``bf16:8x4096x2048`` on the command line."""

    def __init__(self, text):
        dt, _, shape = text.partition(":")
        self.dtype = DTYPES.get(dt, dt)
        if self.dtype not in ITEMSIZE or not shape:
            raise argparse.ArgumentTypeError(f"a case reads dtype:BxTxD (dtype one of {', '.join(DTYPES)}), "
                                             f"got {text!r}")
        self.B, self.T, self.D = (int(n) for n in shape.split("x"))
        self.text = text

    @property
    def name(self):
        return f"{SHORT[self.dtype]} {self.B}x{self.T}x{self.D}"

    def nbytes(self, tensors=1):
        return tensors * self.B * self.T * self.D * ITEMSIZE[self.dtype]


def parse(doc, cases, smoke_case, extra=None, passes="fwd,bwd"):
    """The command line every script takes; ``extra(parser)`` adds a script's own options.  ``cases``
    and ``passes``: the defaults (case texts; comma-separated passes), or functions of the parsed
    arguments that return them."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=lambda s: [Case(t) for t in s.split(",")], default=None,
                   help="comma-separated dtype:BxTxD (default: the shapes the decision was taken on)")
    p.add_argument("--passes", default=None, help="comma-separated: fwd, bwd, fwdbwd")
    p.add_argument("--rounds", type=int, default=2, help="rounds per cell, the minimum is kept (default 2)")
    p.add_argument("--warmup", type=float, default=25.0, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=float, default=100.0, help="do_bench repetitions, ms")
    p.add_argument("--queued", action="store_true",
                   help="time each call with the host queued ahead (behind a spin): the kernels' time, which "
                        "do_bench reads only while the host's time to queue a call hides behind its flush")
    p.add_argument("--smoke", action="store_true",
                   help=f"one round, short repetitions, and the cases --cases names, else one small case "
                        f"({smoke_case}): checks the script runs, or feeds a profiler one case")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    if args.passes is None:
        args.passes = passes(args) if callable(passes) else passes
    args.passes = [s for s in args.passes.split(",") if s]
    if args.smoke:
        args.cases = args.cases or [Case(smoke_case)]
        args.rounds, args.warmup, args.rep = 1, 2.0, 5.0
    if args.cases is None:
        args.cases = [Case(t) for t in (cases(args) if callable(cases) else cases)]
    return args


def start(doc, title, cases, smoke_case, note="", groups=None, passes="fwd,bwd", extra=None):
    """What every table script does first: parse the command line, measure the copy bandwidth, print
    the header.  ``groups``: ``{name: (cases, ...)}`` where the variants come in groups (``--group``,
    the first by default; the group's cases are the default cases); ``extra(parser)`` adds a script's
    own options.  Returns ``(args, timer, copy GB/s, the hgrn_cupy module)``."""
    options = extra
    if groups:
        def with_group(p):
            p.add_argument("--group", choices=list(groups), default=next(iter(groups)))
            if extra is not None:
                extra(p)
        options = with_group
        cases = lambda a: groups[a.group][0]  # noqa: E731
    args = parse(doc, cases, smoke_case, options, passes)
    import hgrn_cupy as hc

    timer = Timer(args.warmup, args.rep, args.queued)
    gbps = copy_gbps(timer)
    header(f"{title}: {args.group}" if groups else title, timer, gbps, note)
    return args, timer, gbps, hc


def torch_cuda():
    import torch

    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU that torch can see")
    return torch


def host_cpu():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or "unknown"


def commit():
    from benchmarks.context import revision

    return revision(REPO)


class Timer:
    """Median ms of one call with L2 flushed before it (see the module docstring); ``queued``: with the
    host queued ahead of the calls (``benchmarks.timing.queued_ms``), so that the host's time is not in it."""

    def __init__(self, warmup_ms, rep_ms, queued=False):
        self.torch = torch_cuda()
        self.warmup_ms, self.rep_ms, self.queued = warmup_ms, rep_ms, queued
        self._do_bench = None
        if not queued:
            try:
                from triton.testing import do_bench

                self._do_bench = do_bench
            except ImportError:
                pass
        if self._do_bench is not None:
            self.kind = "triton do_bench, median"
        else:
            self.kind = ("CUDA events after an L2 flush, host queued ahead behind a spin, median" if queued
                         else "CUDA events after an L2 flush, median")
            from benchmarks.timing import Timer as SuiteTimer

            self._flush = self.torch.empty(SuiteTimer.FLUSH_BYTES, dtype=self.torch.int8, device="cuda")

    def __call__(self, fn):
        if self._do_bench is not None:
            return float(self._do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        if self.queued:
            from benchmarks.timing import queued_ms

            for _ in range(3):  # compile, autotune and allocate before the host is timed
                fn()
            return queued_ms(self.torch, self._flush, fn, rounds=5)
        torch = self.torch
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        end.record()
        torch.cuda.synchronize()
        each = max(start.elapsed_time(end) / 5, 1e-3)
        for _ in range(max(1, int(self.warmup_ms / each))):
            fn()
        pairs = []
        for _ in range(max(5, int(self.rep_ms / each))):  # each call after a flush, between its own events
            self._flush.zero_()
            pairs.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            pairs[-1][0].record()
            fn()
            pairs[-1][1].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in pairs)


def copy_gbps(timer):
    """Device-to-device copy bandwidth, read + write bytes per second / 1e9 (1 GiB copied)."""
    torch = timer.torch
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


def header(title, timer, gbps, note=""):
    """The lines above a table: what was run, on which GPU, at which commit, timed how."""
    torch = timer.torch
    p = torch.cuda.get_device_properties(0)
    lines = [f"## {title}", "",
             f"- GPU: {p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs); copy bandwidth "
             f"{gbps:.0f} GB/s (read + write)",
             f"- command: `python {' '.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}` at commit {commit()}",
             f"- timer: {timer.kind}; inputs rotated beyond {ROTATE_MB} MB; cells: ratio to the copy floor "
             "(minimal bytes / copy bandwidth), minimum over rounds"]
    if note:
        lines.append(f"- {note}")
    print("\n".join(lines) + "\n", flush=True)


def make_sets(torch, case, count=None):
    """Input sets for one case: ``count``, by default enough that the working set exceeds ROTATE_MB,
    MIN_SETS at least."""
    if count is None:
        count = min(max(MIN_SETS, math.ceil((ROTATE_MB << 20) / max(1, case.nbytes(3)))), 64)
    dt = getattr(torch, case.dtype)
    F = torch.nn.functional
    sets = []
    for _ in range(count):
        shape = (case.B, case.T, case.D)
        sets.append({"x": torch.randn(shape, device=DEVICE, dtype=dt),
                     "g": F.logsigmoid(torch.randn(shape, device=DEVICE, dtype=torch.float32)).to(dt),
                     "do": torch.randn(shape, device=DEVICE, dtype=dt)})
    return sets


def rotating(fns):
    """One callable that runs ``fns`` in turn, one per call."""
    state = [0]

    def run():
        i = state[0]
        state[0] = (i + 1) % len(fns)
        return fns[i]()
    return run


@contextlib.contextmanager
def patched(*settings):
    """Set ``(object, attribute, value)`` for the duration; restore the old values afterwards."""
    old = [(obj, name, getattr(obj, name)) for obj, name, _ in settings]
    try:
        for obj, name, value in settings:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(old):
            setattr(obj, name, value)


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


def engine_calls(hc, engine):
    """``fwd(s)``, ``bwd(s)`` and ``fwdbwd(s)`` on an input set through the public functions, for one
    engine ("chunk", "fused_recurrent" or "auto"); bwd reads the set's saved output ``o``."""
    forward = {"chunk": hc.chunk_hgrn, "fused_recurrent": hc.fused_recurrent_hgrn, "auto": hc.hgrn}[engine]

    def fwd(s):
        return forward(s["x"], s["g"])[0]

    def bwd(s):
        return hc.hgrn_backward(s["g"], s["o"], s["do"], engine=engine)[:2]

    def fwdbwd(s):
        o = fwd(s)
        return (o,) + tuple(hc.hgrn_backward(s["g"], o, s["do"], engine=engine)[:2])
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwdbwd}


def run(args, timer, gbps, variants, calls, forget, practical=True, unchecked=()):
    """Time every (case, pass, variant) and print one table; returns ``{(case text, pass, name): ms}``.

    variants: ``{name: [(object, attribute, value), ...]}``, the first being the reference for the check;
    unchecked: names of variants that compute something else by design (a bound, timing only): not
    compared with the reference;
    calls: ``{pass: f(set)}`` (as ``engine_calls`` makes) for every variant, or ``{name: such a dict}``;
    forget: drops the library's cached plans (a plan keeps the launch settings it was made with);
    practical: add the practical floor's column (``torch.add(x, g, out=o)``, scaled to each pass's bytes).
    Cases whose copy floor is under 20 us are launch-bound: their cells are printed in us."""
    torch = timer.torch
    import hgrn_cupy as hc

    best, bad = {}, {}
    for case in args.cases:
        sets = make_sets(torch, case)
        for s in sets:
            s["o"] = hc.hgrn(s["x"], s["g"])[0]
        for rnd in range(args.rounds):
            if practical:
                outs = [torch.empty_like(s["x"]) for s in sets]
                fns = [lambda s=s, o=o: torch.add(s["x"], s["g"], out=o) for s, o in zip(sets, outs)]
                add = best[case.text, "add"] = min(best.get((case.text, "add"), math.inf), timer(rotating(fns)))
                for pazz in args.passes:
                    best[case.text, pazz, "practical floor"] = add * TENSORS[pazz] / 3
                del outs, fns
            for pazz in args.passes:
                ref = None
                for name, settings in variants.items():
                    call = (calls[name] if name in calls else calls)[pazz]
                    key = (case.text, pazz, name)
                    if key in bad:
                        continue
                    with patched(*settings):
                        forget()
                        try:
                            out = call(sets[0])
                            torch.cuda.synchronize()
                        except Exception as e:  # a variant that does not compile or launch
                            bad[key] = "FAILED"
                            why = (str(e).splitlines() or [""])[0]
                            print(f"{case.name} {pazz} {name}: {type(e).__name__}: {why}", file=sys.stderr)
                            continue
                        outs = out if isinstance(out, tuple) else (out,)
                        ref = ref or outs
                        if name not in unchecked and max(rel_err(a, b) for a, b in zip(outs, ref)) > TOL[case.dtype]:
                            bad[key] = "MISMATCH"
                            continue
                        fns = [lambda s=s: call(s) for s in sets]
                        best[key] = min(best.get(key, math.inf), timer(rotating(fns)))
                    forget()
        del sets
        torch.cuda.empty_cache()

    names = (["practical floor"] if practical else []) + list(variants)
    rows = []
    for case in args.cases:
        for pazz in args.passes:
            floor_ms = case.nbytes(TENSORS[pazz]) / (gbps * 1e9) * 1e3
            cells = [cell(best.get((case.text, pazz, n)), floor_ms, bad.get((case.text, pazz, n))) for n in names]
            rows.append([case.name, pazz] + cells)
    table(["shape", "pass"] + names, rows)
    return best


def cell(ms, floor_ms, failure=None):
    """A table cell: the ratio to the copy floor, or us where the floor is under 20 us."""
    if failure:
        return failure
    if ms is None:
        return "-"
    return f"{ms * 1e3:.1f} us" if floor_ms < 0.02 else f"{ms / floor_ms:.3f}"


def table(head, rows):
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    print(flush=True)
