#!/usr/bin/env python
"""JAX forward+backward through hgrn_cupy, against the same work through PyTorch and a pure-JAX scan.

    python benchmarks/jax_bench.py [--quick] [--reps N]

One pass = ``o = hgrn(x, g)`` and the gradients ``(dx, dg)`` for a cotangent ``do``, timed as one call:

* jax-auto, jax-chunk, jax-fused: ``hgrn_cupy.jax.hgrn`` / ``chunk_hgrn`` / ``fused_recurrent_hgrn``
  under ``jax.jit(jax.vjp ...)``: our CUDA kernels inside the compiled program (buffer callbacks on
  XLA's stream).
* torch: ``hgrn_cupy.torch.hgrn`` with ``torch.autograd.grad`` when that module imports, else
  ``hgrn_cupy.hgrn`` + ``hgrn_cupy.hgrn_backward`` on torch tensors (same kernels, no XLA).
* jax-assoc-scan: ``lax.associative_scan`` over the affine pairs ``(exp(g), x)`` in float32, and its
  JAX-derived gradient, under ``jax.jit``.

Timing: wall clock around ``call(); block_until_ready()`` (``torch.cuda.synchronize()`` for torch),
median of ``--reps`` runs after warm-up (compilation included in the warm-up).  The floor is the
minimal traffic of a forward+backward (8 tensors: fwd reads x, g, writes o; bwd reads g, o, do,
writes dx, dg) over the device-to-device copy bandwidth measured in the same run.  Cells read
``median ms (x floor)``.  ``rel err`` compares jax-auto's o, dx, dg with the associative scan's.
GPU only: without a JAX GPU device it prints "no GPU, skipped" and exits 0.  ``--cpu-smoke`` runs
the whole script on tiny CPU arrays, as a check of the script itself (the times mean nothing).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# JAX would otherwise take 75% of the GPU's memory at start, leaving torch too little.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402

SHAPES = [(8, 4096, 2048), (1, 32768, 1024), (32, 2048, 512)]
QUICK_SHAPES = [(8, 4096, 2048), (1, 32768, 1024)]
DTYPES = ("bfloat16", "float32")
QUICK_DTYPES = ("bfloat16",)
ITEMSIZE = {"bfloat16": 2, "float32": 4}


def gpu_device():
    try:
        import jax

        return jax.devices("gpu")[0]
    except Exception:  # no jax, CPU-only jaxlib, or no device
        return None


def median_seconds(fn, sync, reps, warmup=3):
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def jax_block(out):
    import jax

    jax.block_until_ready(out)


# ----------------------------------------------------------------------------------------------
# implementations: each returns a zero-argument callable doing one forward+backward

def jax_ours(fn, x, g, do):
    import jax

    def step(x, g, do):
        o, pullback = jax.vjp(lambda x, g: fn(x, g)[0], x, g)
        return (o,) + pullback(do)

    step = jax.jit(step)
    return lambda: step(x, g, do), step


def assoc_scan_hgrn(x, g):
    import jax
    import jax.numpy as jnp

    a, b = jnp.exp(g.astype(jnp.float32)), x.astype(jnp.float32)
    _, h = jax.lax.associative_scan(lambda e, l: (l[0] * e[0], l[0] * e[1] + l[1]), (a, b), axis=1)
    return h.astype(x.dtype)


def jax_assoc_scan(x, g, do):
    import jax

    def step(x, g, do):
        o, pullback = jax.vjp(assoc_scan_hgrn, x, g)
        return (o,) + pullback(do)

    step = jax.jit(step)
    return lambda: step(x, g, do), step


def torch_impl(shape, dtype, on_gpu=True):
    """(label, callable, sync) for the same work through PyTorch, or raises ImportError."""
    import torch

    import hgrn_cupy as hc

    tdt, dev = getattr(torch, dtype), "cuda" if on_gpu else "cpu"
    x = torch.randn(shape, device=dev, dtype=tdt)
    g = torch.nn.functional.logsigmoid(torch.randn(shape, device=dev)).to(tdt)
    do = torch.randn(shape, device=dev, dtype=tdt)
    sync = (lambda _: torch.cuda.synchronize()) if on_gpu else (lambda _: None)
    try:
        from hgrn_cupy.torch import hgrn as torch_hgrn
    except ImportError:
        torch_hgrn = None
    if torch_hgrn is not None:
        xr, gr = x.requires_grad_(), g.requires_grad_()

        def autograd_step():
            o, _ = torch_hgrn(xr, gr)
            return (o,) + torch.autograd.grad(o, (xr, gr), do)
        return "hgrn_cupy.torch (autograd)", autograd_step, sync

    def ops_step():
        o, _ = hc.hgrn(x, g)
        return (o,) + hc.hgrn_backward(g, o, do)[:2]
    return "hgrn_cupy.ops + hgrn_backward", ops_step, sync


def copy_bandwidth(device):
    """Bytes per second of a device-to-device copy (read + write counted) on 1 GiB."""
    import jax
    import jax.numpy as jnp

    a = jax.device_put(jnp.zeros((1 << 28 if device.platform == "gpu" else 1 << 20,), jnp.float32), device)
    neg = jax.jit(lambda a: -a)
    t = median_seconds(lambda: neg(a), jax_block, 20)
    return 2 * a.size * 4 / t


def rel_err(out, ref):
    import jax.numpy as jnp

    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


# ----------------------------------------------------------------------------------------------

def run(args):
    device = gpu_device()
    if device is None and not args.cpu_smoke:
        print("no GPU, skipped")
        return 0
    import jax
    import jax.numpy as jnp

    import hgrn_cupy.jax as hj

    shapes = QUICK_SHAPES if args.quick else SHAPES
    dtypes = QUICK_DTYPES if args.quick else DTYPES
    reps = args.reps or (10 if args.quick else 50)
    if args.cpu_smoke:
        device, shapes, dtypes, reps = jax.devices("cpu")[0], [(2, 64, 16)], DTYPES, 2
    bw = copy_bandwidth(device)
    print(f"device: {device.device_kind}; jax {jax.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s; "
          f"median of {reps} runs", flush=True)

    ours = {"jax-auto": hj.hgrn, "jax-chunk": hj.chunk_hgrn, "jax-fused": hj.fused_recurrent_hgrn}
    columns = list(ours) + ["torch", "jax-assoc-scan"]
    rows, torch_label = [], None
    for shape in shapes:
        for dtype in dtypes:
            key = jax.random.PRNGKey(0)
            kx, kg, kd = jax.random.split(key, 3)
            jdt = getattr(jnp, dtype)
            x = jax.device_put(jax.random.normal(kx, shape, jdt), device)
            g = jax.device_put(jax.nn.log_sigmoid(jax.random.normal(kg, shape)).astype(jdt), device)
            do = jax.device_put(jax.random.normal(kd, shape, jdt), device)
            floor = 8 * int(np.prod(shape)) * ITEMSIZE[dtype] / bw
            cells, outs = {}, {}
            for name, fn in ours.items():
                try:
                    call, _ = jax_ours(fn, x, g, do)
                    outs[name] = call()
                    cells[name] = median_seconds(call, jax_block, reps)
                except Exception as e:  # report and go on with the other columns
                    cells[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
            try:
                torch_label, call, sync = torch_impl(shape, dtype, not args.cpu_smoke)
                cells["torch"] = median_seconds(call, sync, reps)
                del call
            except ImportError as e:
                cells["torch"] = f"skipped ({e.name} not installed)"
            except Exception as e:
                cells["torch"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
            err = "-"
            try:
                call, _ = jax_assoc_scan(x, g, do)
                ref = call()
                cells["jax-assoc-scan"] = median_seconds(call, jax_block, reps)
                if "jax-auto" in outs:
                    err = "/".join(f"{rel_err(a, b):.1e}" for a, b in zip(outs["jax-auto"], ref))
                del ref
            except Exception as e:
                cells["jax-assoc-scan"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
            rows.append((shape, dtype, floor, cells, err))
            del x, g, do, outs
            print(format_row(rows[-1], columns), flush=True)

    print()
    print(f"forward+backward, median ms (x floor); torch = {torch_label or 'n/a'}; "
          f"rel err = jax-auto vs jax-assoc-scan for o/dx/dg")
    print()
    print("| B x T x D | dtype | floor ms | " + " | ".join(columns) + " | rel err |")
    print("|---|---|---|" + "---|" * len(columns) + "---|")
    for row in rows:
        print(format_row(row, columns))
    return 0


def format_row(row, columns):
    shape, dtype, floor, cells, err = row

    def cell(v):
        return v if isinstance(v, str) else f"{v * 1e3:.3f} ({v / floor:.2f}x)"
    return (f"| {'x'.join(map(str, shape))} | {dtype} | {floor * 1e3:.3f} | "
            + " | ".join(cell(cells[c]) for c in columns) + f" | {err} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="two shapes, bfloat16 only, 10 runs each")
    p.add_argument("--reps", type=int, default=0, help="timed runs per cell (default 50, quick 10)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks the script only")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
