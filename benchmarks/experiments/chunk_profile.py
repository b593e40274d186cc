#!/usr/bin/env python
"""A few launches of one chunk-engine variant (or of the practical floor's add) for Nsight Compute.

    ncu --kernel-name regex:'chunk_fwd|chunk_bwd|add' --launch-skip 3 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section MemoryWorkloadAnalysis --section WarpStateStats \\
        python benchmarks/experiments/chunk_profile.py --case bf16:8x4096x2048 [--variant NAME] [--pass bwd]
    python benchmarks/experiments/chunk_profile.py --case bf16:8x4096x2048 --what add

Runs the forward (or the backward) of the chunk engine four times on one input set, synchronised, so
that a profiler that skips three launches of the kernel sees a warm fourth; ``--what add`` runs
``torch.add(x, g, out=o)`` instead, the practical floor, for the same comparison.  Variants are those of
``chunk_lookback.py`` (the bounds patch the kernel source: "no look-back (bound)", "loads and stores
alone (bound)", ...); the default is the library as shipped.  Prints nothing but what it ran: the
numbers are the profiler's.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
import chunk_lookback as lb  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", type=c.Case, default=c.Case("bf16:8x4096x2048"))
    p.add_argument("--variant", default="as shipped", choices=["as shipped"] + list(lb.PATCHES))
    p.add_argument("--pass", dest="pazz", default="fwd", choices=["fwd", "bwd"])
    p.add_argument("--what", default="chunk", choices=["chunk", "add"])
    args = p.parse_args()
    torch = c.torch_cuda()
    import hgrn_cupy as hc

    nvrtc, chunk, forget = lb.library()
    (s,) = c.make_sets(torch, args.case, count=1)
    s["o"] = hc.chunk_hgrn(s["x"], s["g"])[0]  # pinned: no tuning under the profiler
    settings = [] if args.variant == "as shipped" else lb.patched_source(nvrtc, chunk, args.variant)
    if args.what == "add":
        out = torch.empty_like(s["x"])
        call = lambda: torch.add(s["x"], s["g"], out=out)  # noqa: E731
    else:
        call = lambda: c.engine_calls(hc, "chunk")[args.pazz](s)  # noqa: E731
    with c.patched(*settings):
        forget()
        for _ in range(4):
            call()
            torch.cuda.synchronize()
    print(f"ran 4 x {args.what} {args.pazz if args.what == 'chunk' else ''} {args.variant} on {args.case.name}")


if __name__ == "__main__":
    main()
