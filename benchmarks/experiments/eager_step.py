"""Host time of a PyTorch training step through hgrn_cupy.torch against the minimal autograd.Function
probe, in paired rounds, and where the difference goes (cProfile of each step).

    python benchmarks/experiments/eager_step.py [--shape 4x2048x512,...] [--rounds 15] [--steps 300] [--varlen]

Each round times every step once, in an order that rotates from round to round (so that neither step
always follows the other or a synchronisation); the table gives each step's median and minimum, and the
median over rounds of its difference to the probe in the same round, which host drift between rounds
does not enter; the same for the process's CPU time (``time.process_time``, every thread: torch runs the
backward of CUDA tensors on its own thread), which leaves out the spells the host ran something else.
Then the same steps interleaved one by one, each timed on its own (its host time: a step that does not
wait for the GPU returns when its work is queued), the order reversed every other cycle; the median over
cycles of each step's difference to the probe in the same cycle is free of drift slower than a cycle.
Prints a Markdown table per shape naming the GPU, then the top functions of each profile by own time and
the functions whose call counts differ between hgrn_cupy.torch and its Function alone (what the routing
adds) and the time of each test the routing makes (first shape only).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
import timeit
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for the benchmark's probe
import hgrn_cupy as hc  # noqa: E402
import hgrn_cupy.torch as htorch  # noqa: E402
from benchmarks.impls.ours import probe_functions  # noqa: E402
from benchmarks.timing import interleaved_steps_us  # noqa: E402


# The benchmark's probes (the host-step table's "ours-probe"): the minimal Function, and the one with options.
Probe, ProbeWithOptions = probe_functions(torch, hc)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="4x2048x512", help="comma-separated BxTxD")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--varlen", action="store_true", help="the B sequences packed along time with cu_seqlens")
    args = p.parse_args()
    for i, shape in enumerate(args.shape.split(",")):
        run(shape, args, profile=i == 0)


def run(shape, args, profile):
    B, T, D = (int(v) for v in shape.split("x"))
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

    # our Function takes cu_seqlens only where there is one; so does the probe (its form with options)
    inputs = (x, g) if cu is None else (x, g, cu)
    probe_inputs = (x, g) if cu is None else (x, g, None, cu, False, False)
    probe_fn = Probe if cu is None else ProbeWithOptions
    plain = htorch._PLAIN["auto", False, cu is not None]

    def probe():
        return torch.autograd.grad(probe_fn.apply(*probe_inputs), (x, g), do)

    def function_only():  # our Function without the routing in front of it
        return torch.autograd.grad(plain.apply(*inputs), (x, g), do)

    steps = {"hgrn_cupy.torch": ours, "its Function alone": function_only, "probe": probe}
    names = list(steps)
    times = {k: [] for k in steps}
    cpu = {k: [] for k in steps}  # process CPU time: what the host spent, its idle and preempted spells left out
    for f in steps.values():
        for _ in range(50):
            f()
    torch.cuda.synchronize()
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            f = steps[name]
            torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                f()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / args.steps * 1e6)
            cpu[name].append((time.process_time() - c0) / args.steps * 1e6)
    kind = " packed with cu_seqlens" if args.varlen else ""
    print(f"## Host us per training step, {torch.cuda.get_device_name()}, bf16 {shape}{kind}\n")
    print(f"{args.rounds} rounds of {args.steps} steps.\n")
    print("| step | median us | min us | minus probe, median of rounds, us | CPU us, median | CPU minus probe, "
          "median of rounds, us |\n|---|---|---|---|---|---|")
    for name, ts in times.items():
        diff = statistics.median(a - b for a, b in zip(ts, times["probe"]))
        cdiff = statistics.median(a - b for a, b in zip(cpu[name], cpu["probe"]))
        print(f"| {name} | {statistics.median(ts):.1f} | {min(ts):.1f} | {diff:+.1f} | "
              f"{statistics.median(cpu[name]):.1f} | {cdiff:+.1f} |")
    print()
    per = interleaved_steps_us(types.SimpleNamespace(sync=torch.cuda.synchronize),
                               {name: [f] for name, f in steps.items()}, args.rounds * args.steps // len(steps))
    print(f"Each step timed on its own, the steps in turn ({len(per['probe'])} of each; order reversed every "
          "other cycle):\n")
    print("| step | median us | minus probe, median over cycles, us | quartiles |\n|---|---|---|---|")
    for name, ts in per.items():
        diffs = [a - b for a, b in zip(ts, per["probe"])]
        q1, med, q3 = statistics.quantiles(diffs, n=4)
        print(f"| {name} | {statistics.median(ts):.1f} | {med:+.2f} | [{q1:+.1f}, {q3:+.1f}] |")
    print()
    if not profile:
        return
    stats = {}
    for name, f in steps.items():
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            f()
        prof.disable()
        torch.cuda.synchronize()
        out = io.StringIO()
        st = pstats.Stats(prof, stream=out)
        st.sort_stats("tottime").print_stats(14)
        stats[name] = st.stats
        print(f"\n### {name}\n```\n{out.getvalue()[-2600:]}\n```")
    routing_parts(x, g)
    print("\n### What the routing adds: functions whose calls per step differ, hgrn_cupy.torch against its "
          "Function alone (own time under the profiler)\n")
    print("| function | calls per step (ours / Function) | own us per step (ours / Function) |\n|---|---|---|")
    ours, alone = stats["hgrn_cupy.torch"], stats["its Function alone"]
    for key in sorted(set(ours) | set(alone), key=lambda k: -(ours.get(k, (0, 0, 0))[2])):
        a, b = ours.get(key, (0, 0, 0.0)), alone.get(key, (0, 0, 0.0))
        if a[1] != b[1]:
            where = f"{key[0].rsplit('/', 2)[-1]}:{key[1]}({key[2]})"
            print(f"| {where} | {a[1] / args.steps:.2f} / {b[1] / args.steps:.2f} | "
                  f"{a[2] / args.steps * 1e6:.2f} / {b[2] / args.steps * 1e6:.2f} |")


def routing_parts(x, g):
    """Nanoseconds per call of each test the routing in front of the Function makes (timeit, best of 5)."""
    print("\n### The routing's parts, ns per call (timeit, best of 5 repeats of 100000)\n")
    print("| call | ns |\n|---|---|")
    env = {"torch": torch, "htorch": htorch, "x": x, "g": g}
    for stmt in ("torch.compiler.is_compiling()", "torch._C._get_tracing_state()",
                 "torch._C._len_torch_dispatch_stack()", "htorch._functorch_active()", "torch.is_grad_enabled()",
                 "x.requires_grad or g.requires_grad", "htorch._PLAIN['auto', False, False]",
                 "htorch._last_axis_dense(x)"):
        ns = min(timeit.repeat(stmt, globals=env, number=100000, repeat=5)) / 100000 * 1e9
        print(f"| `{stmt}` | {ns:.0f} |")


if __name__ == "__main__":
    main()
