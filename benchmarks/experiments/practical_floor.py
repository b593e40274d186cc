#!/usr/bin/env python
"""The practical floor next to ours: an elementwise op with the forward's traffic, the chunk engine,
and ``hgrn()``, forward, backward and forward+backward.

    python benchmarks/experiments/practical_floor.py [--cases ...] [--passes fwd,bwd,fwdbwd] [--fused] [--smoke]

``torch.add(x, g, out=o)`` reads and writes what the forward does (x, g in, o out); no kernel that moves
those bytes can be expected to beat it under the same timer.  Its ratio to the copy floor is what a
target such as "1.10x of the copy floor" leaves for the recurrence itself.  The default shapes are
the headline shapes and the 100 MB-and-up shapes the open targets were set on.  ``--fused`` adds the
fused engine's column (as its rules launch it, no tuner variant).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

CASES = ["bf16:4x2048x512", "bf16:1x32768x1024", "bf16:1x16384x2048", "bf16:4x4096x1024", "bf16:8x4096x1024",
         "bf16:16x2048x1024", "bf16:8x4096x2048", "bf16:32x2048x4096", "bf16:1x262144x256", "f32:4x2048x512",
         "f32:1x32768x1024", "f32:4x4096x1024", "f32:8x4096x2048", "f32:32x2048x4096", "f32:1x262144x256"]


def library():
    """A function that drops the library's cached plans, under the current module names (re-point here
    after a rename)."""
    from hgrn_cupy import plans

    return plans._plans.clear


def main():
    forget = library()
    args, timer, gbps, hc = c.start(__doc__, "Practical floor", CASES, "bf16:1x32768x1024",
                                    "fwdbwd: the forward, then hgrn_backward on its output", passes="fwd,bwd,fwdbwd",
                                    extra=lambda p: p.add_argument("--fused", action="store_true",
                                                                   help="add the fused engine's column"))
    engines = {"chunk": "chunk", "fused": "fused_recurrent", "hgrn()": "auto"}
    calls = {n: c.engine_calls(hc, e) for n, e in engines.items() if n != "fused" or args.fused}
    c.run(args, timer, gbps, {n: [] for n in calls}, calls, forget)


if __name__ == "__main__":
    main()
