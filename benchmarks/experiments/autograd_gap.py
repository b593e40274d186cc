"""Where a torch training step's time goes, per engine: hgrn_cupy.torch's hgrn, chunk_hgrn and
fused_recurrent_hgrn through ``torch.autograd.grad``, against the same launches called directly.

    python benchmarks/experiments/autograd_gap.py [--shape bf16:8x4096x1024,...] [--steps 200] [--rounds 2] [--trace DIR]

Per shape and step: host us per step (steps queued back to back, the clock read before the one
synchronisation at the end), wall us per step (after it), the forward's and the backward's host us
alone, ``do_bench``'s median (L2 flushed before each step, as the benchmark times its cells) and the
device us per step from CUDA-graph replay; in rounds whose order rotates.
Then, under ``torch.profiler`` (CPU and CUDA activity, every host thread), the host calls with the
most own time per step and the device time of each kernel per step, for each step in turn.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import hgrn_cupy as hc  # noqa: E402
import hgrn_cupy.torch as htorch  # noqa: E402
from benchmarks.timing import graph_ms  # noqa: E402

DT = {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16}


def inputs(case, sets=3):
    dt, _, shape = case.partition(":")
    B, T, D = (int(v) for v in shape.split("x"))
    out = []
    for i in range(sets):
        torch.manual_seed(i)
        x = torch.randn(B, T, D, device="cuda", dtype=DT[dt], requires_grad=True)
        g = torch.nn.functional.logsigmoid(torch.randn(B, T, D, device="cuda")).to(DT[dt]).requires_grad_()
        out.append((x, g, torch.randn_like(x)))
    return out


def steps(sets):
    """name -> (forward(i), backward(outputs, i)): set i of the rotation."""
    def autograd(fn):
        def fwd(i):
            x, g, _ = sets[i]
            return fn(x, g)[0]

        def bwd(o, i):
            x, g, do = sets[i]
            return torch.autograd.grad(o, (x, g), do)
        return fwd, bwd

    def direct(i):
        x, g, _ = sets[i]
        with torch.no_grad():
            return hc.hgrn(x.detach(), g.detach())[0]

    def direct_bwd(o, i):
        x, g, do = sets[i]
        return hc.hgrn_backward(g.detach(), o, do)

    return {"hgrn": autograd(htorch.hgrn), "chunk_hgrn": autograd(htorch.chunk_hgrn),
            "fused_recurrent_hgrn": autograd(htorch.fused_recurrent_hgrn), "direct (hgrn, hgrn_backward)": (direct, direct_bwd)}


def host_wall(fwd, bwd, n, count):
    """(host us, wall us) per step over n steps, and the forward's and backward's host us alone."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for k in range(n):
        bwd(fwd(k % count), k % count)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    f_host = b_host = 0.0
    for k in range(n):
        a = time.perf_counter()
        o = fwd(k % count)
        b = time.perf_counter()
        bwd(o, k % count)
        c = time.perf_counter()
        f_host, b_host = f_host + b - a, b_host + c - b
        if k % 8 == 7:
            torch.cuda.synchronize()  # the queue never holds more than a few steps
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6, f_host / n * 1e6, b_host / n * 1e6


def graph_us(fwd, bwd, count):
    """Device us per step: one CUDA graph holding a step per input set, replayed back to back."""
    steps = [lambda k=k: bwd(fwd(k), k) for k in range(count)]
    return graph_ms(torch, steps, rep_ms=100) * 1e3


def profile(name, fwd, bwd, count, n, trace):
    from torch.profiler import ProfilerActivity, profile as prof

    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for k in range(n):
            bwd(fwd(k % count), k % count)
        torch.cuda.synchronize()
    if trace:
        Path(trace).mkdir(parents=True, exist_ok=True)
        p.export_chrome_trace(str(Path(trace) / (re.sub(r"\W+", "_", name) + ".json")))
    ev = p.key_averages()
    cpu = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:14]
    dev = sorted((e for e in ev if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)[:8]
    print(f"\n#### {name}: host calls by own time, us per step (count per step)\n")
    print("| call | us | count |\n|---|---|---|")
    for e in cpu:
        print(f"| `{e.key[:70]}` | {e.self_cpu_time_total / n:.1f} | {e.count / n:.1f} |")
    print("\n| device | us per step | count |\n|---|---|---|")
    for e in dev:
        print(f"| `{e.key[:70]}` | {e.self_device_time_total / n:.1f} | {e.count / n:.1f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="bf16:8x4096x1024,bf16:1x32768x1024")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--profile-steps", type=int, default=20, help="0: no profile")
    p.add_argument("--trace", default=None, help="a folder for one chrome trace per step")
    args = p.parse_args()
    from triton.testing import do_bench

    print(f"# A training step per engine, {torch.cuda.get_device_name()}\n")
    for case in args.shape.split(","):
        sets = inputs(case)
        table = steps(sets)
        for fwd, bwd in table.values():  # plans made, engines tuned
            for k in range(20):
                bwd(fwd(k % len(sets)), k % len(sets))
        torch.cuda.synchronize()
        print(f"\n## {case}\n\n| round | step | host us | wall us | fwd host us | bwd host us | do_bench us | "
              "graph us |\n|---|---|---|---|---|---|---|---|")
        names = list(table)
        for r in range(args.rounds):  # the order rotates, so that no step is always timed first
            for name in names[r % len(names):] + names[:r % len(names)]:
                fwd, bwd = table[name]
                h, w, fh, bh = host_wall(fwd, bwd, args.steps, len(sets))
                state = [0]

                def one():
                    i = state[0] = (state[0] + 1) % len(sets)
                    bwd(fwd(i), i)
                db = do_bench(one, warmup=10, rep=100, return_mode="median") * 1e3
                print(f"| {r} | {name} | {h:.1f} | {w:.1f} | {fh:.1f} | {bh:.1f} | {db:.1f} | "
                      f"{graph_us(fwd, bwd, len(sets)):.1f} |")
        for name, (fwd, bwd) in table.items() if args.profile_steps else ():
            profile(f"{case} {name}", fwd, bwd, len(sets), args.profile_steps,
                    args.trace and str(Path(args.trace) / case.replace(":", "_")))


if __name__ == "__main__":
    main()
