"""What hgrn_cupy.torch's Python costs over the benchmark's minimal autograd.Function probe, with the
kernels taken out: both call the same stand-in for ``plans.forward`` / ``plans.backward`` (outputs from
``torch.empty_like``, no launch), so the difference is the routing and the Function's own code alone,
free of the GPU's queue and of the kernels' noise.

    python benchmarks/experiments/route_cost.py [--device cuda|cpu] [--rounds 31] [--steps 2000]

A step is ``o = f(x, g)`` then ``torch.autograd.grad(o, (x, g), do)`` on tiny tensors that require grad.
Rounds time blocks of steps a-b-b-a (ours, probe, probe, ours), so that host drift cancels in each
round's difference; prints each step's median us per step and the median over rounds of ours minus the
probe and of "its Function alone" (the Function ``hgrn_cupy.torch.hgrn`` applies, without the routing)
minus the probe; then the same steps one at a time, in turn (``benchmarks.timing.interleaved_steps_us``),
with the median and quartiles over cycles of each one's difference to the probe.  Runs without a GPU
(``--device cpu``): the Python is the same.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for the benchmark's probe
import hgrn_cupy as hc  # noqa: E402
import hgrn_cupy.torch as htorch  # noqa: E402
from benchmarks.impls.ours import probe_functions  # noqa: E402
from benchmarks.timing import interleaved_steps_us  # noqa: E402
from hgrn_cupy import plans  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=31)
    p.add_argument("--steps", type=int, default=2000)
    args = p.parse_args()
    x, g, do = (torch.randn(2, 8, 16, device=args.device) for _ in range(3))
    x.requires_grad_()
    g.requires_grad_()
    # the stand-ins: what a kept plan returns, without the launch
    plans.forward = lambda engine, x, g, *rest: (torch.empty_like(x), None)
    plans.backward = lambda engine, g, o, do, *rest: (torch.empty_like(o), torch.empty_like(g), None)
    probe = probe_functions(torch, hc)[0]
    plain = htorch._PLAIN["auto", False, False]
    steps = {"hgrn_cupy.torch": lambda: htorch.hgrn(x, g)[0], "its Function alone": lambda: plain.apply(x, g),
             "probe": lambda: probe.apply(x, g)}

    def block(name):
        f = steps[name]
        t = time.perf_counter()
        for _ in range(args.steps):
            torch.autograd.grad(f(), (x, g), do)
        return (time.perf_counter() - t) / args.steps * 1e6

    for name in steps:  # warm
        block(name)
    times = {name: [] for name in steps}
    diffs = {name: [] for name in steps if name != "probe"}
    for _ in range(args.rounds):
        for name in diffs:
            a, b, b2, a2 = block(name), block("probe"), block("probe"), block(name)
            times[name] += [a, a2]
            times["probe"] += [b, b2]
            diffs[name].append((a + a2 - b - b2) / 2)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"## Python cost per training step, kernels stood in for ({args.device}, {where}; "
          f"torch {torch.__version__})\n")
    print(f"{args.rounds} rounds of a-b-b-a blocks of {args.steps} steps.\n")
    print("| step | median us | minus probe, median of rounds, us |\n|---|---|---|")
    for name, ts in times.items():
        diff = f"{statistics.median(diffs[name]):+.2f}" if name in diffs else "+0.00"
        print(f"| {name} | {statistics.median(ts):.2f} | {diff} |")
    ctx = types.SimpleNamespace(sync=torch.cuda.synchronize if args.device == "cuda" else (lambda: None))
    grads = {n: [lambda f=f: torch.autograd.grad(f(), (x, g), do)] for n, f in steps.items()}
    per = interleaved_steps_us(ctx, grads, args.rounds * args.steps // 4)
    print(f"\nThe same steps one at a time, in turn ({len(per['probe'])} of each; "
          "benchmarks.timing.interleaved_steps_us):\n")
    print("| step | median us | minus probe, median over cycles, us | quartiles |\n|---|---|---|---|")
    for name, ts in per.items():
        q1, med, q3 = statistics.quantiles([a - b for a, b in zip(ts, per["probe"])], n=4)
        print(f"| {name} | {statistics.median(ts):.2f} | {med:+.2f} | [{q1:+.2f}, {q3:+.2f}] |")


if __name__ == "__main__":
    main()
