#!/usr/bin/env python
"""Context parallelism across the GPUs of one host: ``hgrn_cupy.distributed.torch.hgrn`` over NCCL, one
process a GPU, against ``hgrn_cupy.torch.hgrn`` on the whole sequence on one GPU.

    python benchmarks/experiments/cp_nccl.py [--shapes 1x1048576x1024,8x131072x2048] [--steps 20]
    python benchmarks/experiments/cp_nccl.py --smoke     # two CPU processes over gloo, tiny shapes

W = every visible GPU.  Each rank holds its slice of time (bf16 x, g, do; ranks in time order) and runs
forward, or forward and backward through autograd (``torch.autograd.backward(o, do)``), ``--steps`` times
back to back; a step's time is the wall time of those steps after a barrier and a synchronisation, over
the steps, the slowest rank's (host time included: each rank's Python runs in its own process, as in
training).  The single-GPU figure is rank 0 alone on the whole sequence, timed the same way while the
other ranks wait.  Reported per shape: both times, the speed-up and the speed-up over W (the parallel
efficiency), and each rank's outputs and gradients against the single call on its slice (relative L2
error).  Prints a Markdown table naming the GPU and W.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
from cp_split import cuts  # noqa: E402  (the ranks' slices of time, as the one-GPU split takes them)


def step_ms(fn, steps, device, sync_all=True):
    """Wall ms per step of ``fn()`` run ``steps`` times after one warm-up, started after a barrier (when
    ``sync_all``) and ended by a synchronisation of the device's work."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    if sync_all:
        dist.barrier()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3 / steps


def worker(rank, W, port, shapes, steps, smoke, out):
    from hgrn_cupy.distributed.torch import hgrn as cp_hgrn
    from hgrn_cupy.torch import hgrn as single

    if smoke:
        device, backend = torch.device("cpu"), "gloo"
    else:
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W)
    try:
        for B, T, D in shapes:
            gen = torch.Generator(device=device).manual_seed(0)
            dtype = torch.float32 if smoke else torch.bfloat16
            x, g, do = (torch.randn(B, T, D, device=device, generator=gen) for _ in range(3))
            g = torch.nn.functional.logsigmoid(g)
            x, g, do = x.to(dtype), g.to(dtype), do.to(dtype)
            sl = cuts(T, W)[rank]
            xs, gs = (a[:, sl].contiguous().requires_grad_() for a in (x, g))
            dos = do[:, sl].contiguous()

            def cp_fwd():
                with torch.no_grad():
                    return cp_hgrn(xs, gs)

            def cp_train():
                xs.grad = gs.grad = None  # no accumulation into the last step's gradients (as one_train)
                o, _ = cp_hgrn(xs, gs)
                torch.autograd.backward(o, dos)

            o_cp = cp_hgrn(xs, gs)[0]
            xs.grad = gs.grad = None
            cp_train()
            dx_cp, dg_cp = xs.grad.clone(), gs.grad.clone()
            t_cp = (step_ms(cp_fwd, steps, device), step_ms(cp_train, steps, device))
            slowest = torch.tensor(t_cp, dtype=torch.float64, device=device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)

            # The single call on the whole sequence, on every rank: its slice checks the rank's; timed on rank 0 alone.
            xf, gf = x.clone().requires_grad_(), g.clone().requires_grad_()
            o_full = single(xf, gf)[0]
            torch.autograd.backward(o_full, do)
            errs = torch.tensor([c.rel_err(o_cp, o_full[:, sl]), c.rel_err(dx_cp, xf.grad[:, sl]),
                                 c.rel_err(dg_cp, gf.grad[:, sl])],
                                dtype=torch.float64, device=device)
            dist.all_reduce(errs, op=dist.ReduceOp.MAX)
            t_one = (0.0, 0.0)
            if rank == 0:
                def one_fwd():
                    with torch.no_grad():
                        return single(x, g)

                def one_train():
                    xf.grad = gf.grad = None
                    o, _ = single(xf, gf)
                    torch.autograd.backward(o, do)
                t_one = (step_ms(one_fwd, steps, device, False), step_ms(one_train, steps, device, False))
            dist.barrier()
            if rank == 0:
                out.put((f"{B}x{T}x{D}", t_one, tuple(slowest.tolist()), tuple(errs.tolist())))
    finally:
        dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="1x1048576x1024,8x131072x2048")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="two CPU processes over gloo on tiny shapes")
    a = ap.parse_args()
    if a.smoke:
        W, shapes, steps, name = 2, [(2, 37, 5)], 2, "cpu (gloo)"
    else:
        W, name = torch.cuda.device_count(), torch.cuda.get_device_name(0)
        shapes, steps = [tuple(int(n) for n in s.split("x")) for s in a.shapes.split(",")], a.steps
        if W < 2:
            raise SystemExit(f"cp_nccl: {W} GPU visible; the run needs at least two")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (a shared host's rule)
    out = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(W, port, shapes, steps, a.smoke, out), nprocs=W, join=True)
    where = f"{W} CPU processes ({name})" if a.smoke else f"{W} GPUs ({name})"
    print(f"## Context parallelism over {where}, {'float32' if a.smoke else 'bf16'}, {steps} steps\n")
    print("| shape | pass | one GPU, whole sequence ms | W GPUs, slowest rank ms | speed-up | speed-up / W | "
          "rel err o / dx / dg |")
    print("|---|---|---|---|---|---|---|")
    while not out.empty():
        shape, one, cp, errs = out.get()
        for i, name_ in enumerate(("fwd", "fwd+bwd")):
            print(f"| {shape} | {name_} | {one[i]:.3f} | {cp[i]:.3f} | {one[i] / cp[i]:.2f} | "
                  f"{one[i] / cp[i] / W:.2f} | {errs[0]:.1e} / {errs[1]:.1e} / {errs[2]:.1e} |")


if __name__ == "__main__":
    main()
