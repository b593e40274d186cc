"""The host cost of a planned call with the driver stood in for: no GPU needed, so the Python of the plan
path (key, plan body, launch packing) can be timed to a tenth of a microsecond on any machine.

    python benchmarks/experiments/plan_cost.py [--calls 20000]

torch CPU tensors pose as CUDA tensors; kernels are "compiled" into stand-ins and ``cuLaunchKernel``
does nothing, so a call costs its Python and torch's allocations alone.  Times the decode step
(``fused_recurrent_hgrn`` on 1x1x1024 with an initial and a final state, the call a server repeats each
token) through the top level and through ``hgrn_cupy.torch`` under ``torch.no_grad``: us per call, best
of five repeats, then the top functions of a profile by own time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import timeit
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout
import hgrn_cupy as hc  # noqa: E402
import hgrn_cupy.torch as htorch  # noqa: E402
from hgrn_cupy import arrays as ar  # noqa: E402
from hgrn_cupy import nvrtc, workspace  # noqa: E402


def stand_in():
    """The GPU's places in the plan path, stood in for (for this process)."""
    import cupy
    from cupy_backends.cuda.api import driver

    functions = {}
    type(ar.TORCH).is_gpu = lambda self, a: True
    type(ar.TORCH).capturing = lambda self, like: False
    torch._C._cuda_getCurrentRawStream = lambda index: 77
    cupy.cuda.runtime.getDevice = lambda: None
    cupy.cuda.runtime.setDevice = lambda device: None
    nvrtc.get_function = lambda source, names, name, device, options=(): functions.setdefault(
        name, types.SimpleNamespace(ptr=1000 + len(functions)))
    nvrtc.blocks_at_once = lambda fn, threads, device: 8
    driver.launchKernel = lambda *args: None
    workspace.capturing = lambda stream_ptr: False


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=20000)
    args = p.parse_args()
    stand_in()
    x, g, h0 = torch.randn(1, 1, 1024), torch.randn(1, 1, 1024), torch.randn(1, 1024)

    def torch_no_grad():
        with torch.no_grad():
            return htorch.fused_recurrent_hgrn(x, g, h0, True)

    calls = {"top level": lambda: hc.fused_recurrent_hgrn(x, g, h0, True), "hgrn_cupy.torch, no_grad": torch_no_grad}
    print(f"## Planned decode call, 1x1x1024 with states in and out, driver stood in for (torch {torch.__version__})\n")
    print("| call | us per call (best of 5) |\n|---|---|")
    for name, f in calls.items():
        f()
        us = min(timeit.repeat(f, number=args.calls, repeat=5)) / args.calls * 1e6
        print(f"| {name} | {us:.2f} |")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        calls["top level"]()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    print(f"\n### Profile of the top-level call\n```\n{out.getvalue()[-2400:]}\n```")


if __name__ == "__main__":
    main()
