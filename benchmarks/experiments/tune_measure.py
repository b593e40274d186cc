#!/usr/bin/env python
"""How steady the first-use tuning's choice is: the tuner's measurement repeated on fresh decisions.

    python benchmarks/experiments/tune_measure.py [--cases bf16:8x4096x2048,...] [--trials 10] [--smoke]

For each case and direction the candidates that a first call measures (``dispatch.candidates``) are timed
``--trials`` times over, each trial as a first call would (``tuning._time_all``), under two measurements:

- "events, one call" (the tuner's measurement before ``hgrn_cupy.measure``): a warm-up call, then five
  calls, each between two CUDA events and synchronised; the median.  With the queue empty at each start
  event, the interval holds the host's time to issue the launches as well as the kernels.
- "queued behind a wait (shipped)" (``hgrn_cupy.measure.queued``): a warm-up call, then a kernel that
  waits on the GPU while the host queues five calls between the events, so the interval holds the
  kernels alone (per call: elapsed / calls).

Prints, per case, direction and measurement, how often each candidate won and its median, minimum and
maximum time across trials (us).  Inputs as ``python -m hgrn_cupy tune`` makes them (``tuning._random``).
"""
import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

CASES = ["bf16:8x4096x2048", "bf16:1x262144x256", "bf16:1x32768x1024", "bf16:32x2048x4096", "bf16:4x2048x512",
         "bf16:8x2048x1024", "f32:8x4096x2048"]


def events_one_call(cupy, calls=5):
    """The measurement the tuner used before ``hgrn_cupy.measure``: a warm-up call, then ``calls`` calls,
    each between two events on CuPy's current stream and synchronised; the median (seconds)."""
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
    p.add_argument("--smoke", action="store_true", help="one small case, two trials")
    args = p.parse_args()
    if args.smoke:
        args.cases, args.trials = [c.Case("bf16:2x256x256")], 2
    import cupy

    from hgrn_cupy import dispatch, plans, tuning
    from hgrn_cupy.measure import queued

    print(f"## Tuning measurement, {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, "
          f"commit {c.commit()}, {args.trials} trials\n")
    measures = {"events, one call": events_one_call(cupy),
                "queued behind a wait (shipped)": queued(cupy.cuda.Device().id)}
    rows = []
    rng = cupy.random.default_rng(0)
    for case in args.cases:
        B, T, D = case.B, case.T, case.D
        x, g, do = (tuning._random(cupy, (B, T, D), case.dtype, rng, gate=i == 1) for i in range(3))
        o = plans.forward("chunk", x, g, None, False, None, False)[0]
        runs = {"fwd": lambda name: plans.forward(name, x, g, None, False, None, False),
                "bwd": lambda name: plans.backward(name, g, o, do, None, None, None, False)}
        for direction, pazz in enumerate(runs):
            names = dispatch.candidates(B, T, D, (case.dtype, case.dtype), direction)
            for label, measure in measures.items():
                wins, times = Counter(), {n: [] for n in names}
                for _ in range(args.trials):
                    got, best = tuning._time_all(names, runs[pazz], measure)
                    wins[best] += 1
                    for n, t in got.items():
                        times[n].append(t * 1e6)
                cells = [f"{n}: {wins[n]} wins, {statistics.median(ts):.1f} [{min(ts):.1f}, {max(ts):.1f}]"
                         for n, ts in times.items()]
                rows.append([case.name, pazz, label, "; ".join(cells)])
        del x, g, do, o
    c.table(["case", "pass", "measurement", "per candidate: wins, median us [min, max]"], rows)


if __name__ == "__main__":
    main()
