#!/usr/bin/env python
"""Engine crossover: the chunk engine against the fused engine, and what ``hgrn()`` picks.

    python benchmarks/experiments/crossover.py [--cases ...] [--passes fwd,bwd] [--smoke]

Times ``chunk_hgrn`` / ``fused_recurrent_hgrn`` (forward) and ``hgrn_backward(engine=...)`` (backward)
at each shape (the fused engine takes its block walk or thread walk as it ships), then prints a
second table: the faster engine, the engine the library's rule picks, and what the pick costs where
it is the slower one.  The default shapes are those the shipped thresholds were set on (T 1024-8192,
2K-512K channels) plus two short-T shapes for the T <= 32 rule.  The rule is per device in principle
(a tuner measures it); this script is the manual check.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

CASES = ["bf16:4x4096x1024", "bf16:8x4096x1024", "bf16:8x2048x1024", "bf16:4x4096x2048", "bf16:2x8192x4096",
         "bf16:16x4096x1024", "bf16:16x2048x1024", "bf16:16x1024x1024", "bf16:32x2048x1024", "bf16:32x2048x2048",
         "bf16:16x4096x4096", "bf16:64x1024x4096", "bf16:128x1024x4096", "bf16:128x64x4096", "bf16:512x32x4096",
         "f32:2x4096x1024", "f32:4x4096x1024", "f32:8x4096x1024", "f32:8x2048x1024", "f32:4x4096x2048",
         "f32:16x4096x1024", "f32:16x2048x1024", "f32:32x2048x1024", "f32:64x2048x1024", "f32:16x4096x4096",
         "f32:32x2048x4096", "f32:64x1024x4096"]


def library():
    """(the library's engine rule ``pick(N, T, D, dtypes, direction) -> engine name``, a function that
    drops cached plans), under the current module names.  Re-point here after a rename."""
    from hgrn_cupy import dispatch, plans

    return dispatch.rule, plans._plans.clear


def main():
    pick, forget = library()
    args, timer, gbps, hc = c.start(__doc__, "Engine crossover", CASES, "bf16:8x4096x2048",
                                    "engines forced through the public functions; `hgrn()` is the library's pick")
    names = {"chunk": "chunk", "fused_recurrent": "fused", "auto": "hgrn()"}
    calls = {names[e]: c.engine_calls(hc, e) for e in names}
    best = c.run(args, timer, gbps, {n: [] for n in calls}, calls, forget, practical=False)

    rows = []
    for case in args.cases:
        for pazz in args.passes:
            t = {e: best.get((case.text, pazz, names[e])) for e in ("chunk", "fused_recurrent")}
            if None in t.values():
                continue
            faster = min(t, key=t.get)
            picked = pick(case.B, case.T, case.D, (case.dtype, case.dtype), 0 if pazz == "fwd" else 1)
            cost = t[picked] / t[faster] - 1
            rows.append([case.name, pazz, case.B * case.D, names[faster], names[picked],
                         "yes" if picked == faster else f"no: {cost:+.1%}"])
    c.table(["shape", "pass", "channels", "faster", "picked", "pick is the faster"], rows)


if __name__ == "__main__":
    main()
