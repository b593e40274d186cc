#!/usr/bin/env python
"""Decode: device time of one step (T = 1) with the state in and out, against what a launch costs.

    python benchmarks/experiments/decode_step.py [--shape 64x1x4096] [--dtype bf16] [--smoke]

Rows: an empty kernel (``torch.cuda._sleep(0)``), a copy with the step's traffic (x, g, o and the
float32 states in and out), the library's single-step kernel (16-byte accesses over the flattened
[N, D], as shipped), and the time walk with one channel a thread that a step took before the step
kernel existed.  Two views: per call as ``do_bench`` sees it (L2 flushed before each call, so each call
also pays the fixed cost of a launch between two events: the empty kernel's row), and per step when
steps run back to back on rotating inputs queued behind a spin kernel (host time hidden), as in a
decode loop.
"""
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

SETS = 64
BACK_TO_BACK = 256


def library():
    """(settings that make a T = 1 forward take the time walk instead of the step kernel, a function
    that drops cached plans), under the current module names.  Re-point here after a rename."""
    from hgrn_cupy import plans
    from hgrn_cupy.engines import fused_recurrent

    one = [(fused_recurrent, "layout_vector_width", lambda D, arrs, vec=None: 1)]  # no wide access: no step kernel
    return one, plans._plans.clear


def back_to_back(torch, fns):
    """Device ms per call of BACK_TO_BACK calls queued behind a spin (median of 5 batches)."""
    per = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(50_000_000)  # the host queues the batch while this spins
        start.record()
        for i in range(BACK_TO_BACK):
            fns[i % len(fns)]()
        end.record()
        torch.cuda.synchronize()
        per.append(start.elapsed_time(end) / BACK_TO_BACK)
    return statistics.median(per)


def main():
    walk, forget = library()
    args = c.parse(__doc__, [], "bf16:64x1x4096", lambda p: (p.add_argument("--shape", default="64x1x4096"),
                                                           p.add_argument("--dtype", default="bf16")))
    case = c.Case(f"{args.dtype}:{args.shape}") if not args.smoke else args.cases[0]
    import hgrn_cupy as hc

    timer = c.Timer(args.warmup, args.rep)
    torch = timer.torch
    gbps = c.copy_gbps(timer)
    c.header(f"Decode step, {case.name}, float32 state in and out", timer, gbps)
    dt = getattr(torch, case.dtype)
    N, D = case.B, case.D
    sets = [(torch.randn(N, 1, D, device="cuda", dtype=dt),
             torch.nn.functional.logsigmoid(torch.randn(N, 1, D, device="cuda")).to(dt),
             torch.randn(N, D, device="cuda")) for _ in range(SETS)]
    nbytes = case.nbytes(3) + 2 * N * D * 4
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)

    def step(s):
        return lambda: hc.fused_recurrent_hgrn(s[0], s[1], initial_state=s[2], output_final_state=True)
    rows = {"empty kernel": ([lambda: torch.cuda._sleep(0)], []),
            f"copy of {nbytes / 2 ** 20:.2f} MiB of traffic": ([lambda: dst.copy_(src)], []),
            "step kernel (as shipped)": ([step(s) for s in sets], []),
            "time walk, one channel a thread": ([step(s) for s in sets], walk)}
    floor_ms = nbytes / (gbps * 1e9) * 1e3
    out = []
    for name, (fns, settings) in rows.items():
        with c.patched(*settings):
            forget()
            fns[0]()
            per_call = min(timer(c.rotating(fns)) for _ in range(args.rounds))
            per_step = min(back_to_back(torch, fns) for _ in range(args.rounds))
        forget()
        out.append([name, f"{per_call * 1e3:.2f} ({per_call / floor_ms:.2f}x)",
                    f"{per_step * 1e3:.2f} ({per_step / floor_ms:.2f}x)"])
    c.table(["call", "us per call, do_bench (x copy floor)", "us per step, back to back (x copy floor)"], out)


if __name__ == "__main__":
    main()
