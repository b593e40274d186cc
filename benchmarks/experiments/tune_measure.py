#!/usr/bin/env python
"""How steady the first-use tuning's choice is, and whether it matches the benchmark's: the tuner's
measurement repeated on fresh decisions, beside the benchmark's conditions.

    python benchmarks/experiments/tune_measure.py [--cases bf16:8x4096x2048,...] [--trials 10]
        [--measurements warm,read,shipped,rotated,bench] [--smoke]

For each case and direction the candidates that a first call measures (``dispatch.candidates``) are timed
``--trials`` times over, each trial as a first call would (``tuning._time_all``), under the measurements
``--measurements`` names:

- ``events`` ("events, one call"): a warm-up call, then five calls, each between two CUDA events and
  synchronised; the median.  With the queue empty at each start event, the interval holds the host's time
  to issue the launches as well as the kernels.
- ``warm`` ("queued, inputs in L2"): a warm-up call, then a kernel that waits on the GPU while the host
  queues five calls on the same inputs between two events (per call: elapsed / calls).  The interval
  holds the kernels alone, and a call whose inputs fit in L2 finds them there.
- ``read`` ("queued, L2 read through"): as ``warm``, each call after a read of twice the L2's bytes (a
  CuPy sum over them), which leaves clean lines in L2, and between its own two events.
- ``shipped`` ("queued, L2 flushed by a write (shipped)"): ``hgrn_cupy.measure.queued``: as ``read`` with
  a write (memset) of twice the L2's bytes, which leaves dirty lines.
- ``rotated`` ("queued, inputs rotated"): calls queued behind the wait, each between its own two events,
  on input sets taken in turn from as many as exceed 210 MB, so no call finds its inputs in L2; ten calls.
- ``bench`` ("queued, rotated and flushed (benchmark)"): as ``rotated``, each call after a write of twice
  the L2's bytes: the benchmark's ``dev`` condition (``benchmarks.timing.queued_ms``).

Prints, per case, direction and measurement, how often each candidate won and its median, minimum and
maximum time across trials (us).  Inputs as ``python -m hgrn_cupy tune`` makes them (``tuning._random``).
"""
import argparse
import contextlib
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

CASES = ["bf16:8x4096x2048", "bf16:1x262144x256", "bf16:1x32768x1024", "bf16:32x2048x4096", "bf16:4x2048x512",
         "bf16:8x2048x1024", "f32:8x4096x2048"]
LABELS = {"events": "events, one call", "warm": "queued, inputs in L2", "read": "queued, L2 read through",
          "shipped": "queued, L2 flushed by a write (shipped)", "rotated": "queued, inputs rotated",
          "bench": "queued, rotated and flushed (benchmark)"}


def events_one_call(cupy, calls=5):
    """A warm-up call, then ``calls`` calls, each between two events on CuPy's current stream and
    synchronised; the median (seconds)."""
    def measure(fn):
        stream = cupy.cuda.get_current_stream()
        fn()
        stream.synchronize()
        times = []
        for _ in range(calls):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
        return statistics.median(times)
    return measure


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=lambda t: [c.Case(s) for s in t.split(",") if s],
                   default=[c.Case(s) for s in CASES])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--measurements", type=lambda t: [s for s in t.split(",") if s],
                   default=["warm", "shipped", "bench"],
                   help="comma list of " + ", ".join(LABELS))
    p.add_argument("--smoke", action="store_true", help="one small case, two trials")
    args = p.parse_args()
    if args.smoke:
        args.cases, args.trials = [c.Case("bf16:2x256x256")], 2
    unknown = set(args.measurements) - set(LABELS)
    if unknown:
        p.error(f"unknown measurements {sorted(unknown)}; choose from {', '.join(LABELS)}")
    import cupy

    from hgrn_cupy import dispatch, plans, tuning
    from hgrn_cupy.measure import behind_wait, flush_bytes, queued

    print(f"## Tuning measurement, {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, "
          f"commit {c.commit()}, {args.trials} trials\n")
    device, stream = cupy.cuda.Device().id, cupy.cuda.get_current_stream().ptr

    def mean_behind_wait(fns, calls, before=None):
        return statistics.fmean(behind_wait(device, stream, fns, calls, before))

    flush = cupy.zeros(flush_bytes(device), dtype=cupy.int8)
    befores = {"read": flush.sum, "bench": lambda: flush.fill(0)}
    rows = []
    rng = cupy.random.default_rng(0)
    for case in args.cases:
        B, T, D = case.B, case.T, case.D
        rotate = {"rotated", "bench"} & set(args.measurements)
        count = max(c.MIN_SETS, -(-c.ROTATE_MB * 2**20 // case.nbytes(5))) if rotate else 1
        sets = []
        for _ in range(count):
            x, g, do = (tuning._random(cupy, (B, T, D), case.dtype, rng, gate=i == 1) for i in range(3))
            sets.append((x, g, do, plans.forward("chunk", x, g, None, False, None, False)[0]))
        fwd = [lambda name, s=s: plans.forward(name, s[0], s[1], None, False, None, False) for s in sets]
        bwd = [lambda name, s=s: plans.backward(name, s[1], s[3], s[2], None, None, None, False) for s in sets]
        for direction, (pazz, runs) in enumerate((("fwd", fwd), ("bwd", bwd))):
            names = dispatch.candidates(B, T, D, (case.dtype, case.dtype), direction)
            for key in args.measurements:
                wins, times = Counter(), {n: [] for n in names}
                for _ in range(args.trials):
                    if key in ("rotated", "bench"):
                        got = {n: mean_behind_wait([lambda r=r, n=n: r(n) for r in runs], 10, befores.get(key))
                               for n in names}
                        best = min(names, key=lambda n: (got[n], names.index(n)))
                    else:
                        with queued(device) if key == "shipped" else contextlib.nullcontext() as shipped:
                            measure = {"events": events_one_call(cupy),
                                       "warm": lambda fn: mean_behind_wait([fn], 5),
                                       "read": lambda fn: mean_behind_wait([fn], 5, befores["read"]),
                                       "shipped": shipped}[key]
                            got, best = tuning._time_all(names, runs[0], measure)
                    wins[best] += 1
                    for n, t in got.items():
                        times[n].append(t * 1e6)
                cells = [f"{n}: {wins[n]} wins, {statistics.median(ts):.1f} [{min(ts):.1f}, {max(ts):.1f}]"
                         for n, ts in times.items()]
                rows.append([case.name, pazz, LABELS[key], "; ".join(cells)])
        del sets, fwd, bwd
    c.table(["case", "pass", "measurement", "per candidate: wins, median us [min, max]"], rows)


if __name__ == "__main__":
    main()
