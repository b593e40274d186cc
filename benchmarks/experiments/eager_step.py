"""Host time of a PyTorch training step through hgrn_cupy.torch against the minimal autograd.Function
probe, interleaved rounds (the median of each), and where the difference goes (cProfile of each step).

    python benchmarks/experiments/eager_step.py [--shape 4x2048x512] [--rounds 7] [--steps 500] [--varlen]

Prints a Markdown table naming the GPU, then the top functions of each profile by own time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch

import hgrn_cupy as hc
import hgrn_cupy.torch as htorch


class Probe(torch.autograd.Function):
    """What any autograd wrapper of the two planned calls costs: forward hgrn, backward hgrn_backward."""

    @staticmethod
    def forward(ctx, x, g, cu):
        o, _ = hc.hgrn(x, g, cu_seqlens=cu)
        ctx.save_for_backward(g, o, cu)
        return o

    @staticmethod
    def backward(ctx, do):
        g, o, cu = ctx.saved_tensors
        dx, dg, _ = hc.hgrn_backward(g, o, do, cu_seqlens=cu)
        return dx, dg, None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="4x2048x512")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--varlen", action="store_true", help="the B sequences packed along time with cu_seqlens")
    args = p.parse_args()
    B, T, D = (int(v) for v in args.shape.split("x"))
    cu = None
    if args.varlen:
        cu = torch.arange(0, B * T + 1, T, device="cuda", dtype=torch.int32)
        B, T = 1, B * T
    x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, D, device="cuda")).bfloat16().requires_grad_()
    do = torch.randn_like(x)

    def ours():
        o, _ = htorch.hgrn(x, g, cu_seqlens=cu)
        return torch.autograd.grad(o, (x, g), do)

    def probe():
        return torch.autograd.grad(Probe.apply(x, g, cu), (x, g), do)

    steps = {"hgrn_cupy.torch": ours, "probe": probe}
    times = {k: [] for k in steps}
    for f in steps.values():
        for _ in range(50):
            f()
    torch.cuda.synchronize()
    for _ in range(args.rounds):
        for name, f in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                f()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / args.steps * 1e6)
    kind = " packed with cu_seqlens" if args.varlen else ""
    print(f"## Host us per training step, {torch.cuda.get_device_name()}, bf16 {args.shape}{kind}\n")
    print("| step | median us | min us |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.1f} | {min(ts):.1f} |")
    for name, f in steps.items():
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            f()
        prof.disable()
        torch.cuda.synchronize()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
        print(f"\n### {name}\n```\n{out.getvalue()[-2600:]}\n```")


if __name__ == "__main__":
    main()
