#!/usr/bin/env python
"""The state-only passes (``hgrn_cupy.states``, what a context-parallel rank runs before its slice): how
many splits of time a launch cuts, one wave of resident blocks as shipped against fewer and more.

    python benchmarks/experiments/state_pass.py [--cases ...] [--smoke]

The default cases are the slices a rank holds in the context-parallel benchmark
(benchmarks/experiments/cp_split.py): 1x1048576x1024 and 8x131072x2048 split 2 and 8 ways.  A pass
reads two tensors (x and g forward, do and g backward) and writes O(N * D): its copy floor is those two
tensors over the copy bandwidth.  Also prints the host us per call of each pass (calls queued back to
back, one synchronisation).
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402


def library():
    """The knob's home: (the state-pass module, its split planner)."""
    from hgrn_cupy import states

    return states, states.split_plan


def waves(plan, k):
    """A split planner that aims at k waves of resident blocks instead of one."""
    return lambda ntiles, T, at_once: plan(ntiles, T, max(1, int(at_once * k)))


def main():
    states, plan = library()
    cases = ["bf16:1x131072x1024", "bf16:1x524288x1024", "bf16:8x16384x2048", "bf16:8x65536x2048"]
    args, timer, gbps, _ = c.start(__doc__, "State-only passes: splits of time per launch", cases,
                                   "bf16:1x4096x256", passes="states_fwd,states_bwd")
    variants = {"one wave (shipped)": [], "half a wave": [(states, "split_plan", waves(plan, 0.5))],
                "two waves": [(states, "split_plan", waves(plan, 2))],
                "four waves": [(states, "split_plan", waves(plan, 4))]}
    calls = {"states_fwd": lambda s: states.forward_states(s["x"], s["g"]),
             "states_bwd": lambda s: states.backward_states(s["g"], s["do"])}
    c.run(args, timer, gbps, variants, calls, lambda: None, practical=False)
    torch = timer.torch
    print("\nHost us per call, shipped (200 calls queued back to back, one synchronisation):\n")
    rows = []
    for case in args.cases:
        s = c.make_sets(torch, case)[0]
        for name, call in calls.items():
            for _ in range(20):
                call(s)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                call(s)
            torch.cuda.synchronize()
            rows.append([case.name, name, f"{(time.perf_counter() - t0) / 200 * 1e6:.1f}"])
    c.table(["shape", "pass", "host us per call"], rows)


if __name__ == "__main__":
    main()
