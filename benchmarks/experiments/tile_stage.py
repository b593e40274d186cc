#!/usr/bin/env python
"""The staged tile walk (``tile_stage.cu``): the tile walk's narrow tiles (a block owns a few channels of
one sequence for the whole of it, no look-back) with its windows waiting in shared memory instead of
registers, against the chunk engine, ``hgrn()``, torch.add and accelerated-scan's Triton forward on its
own layout, on the grids of one or two waves where accelerated-scan leads.

    python benchmarks/experiments/tile_stage.py [--cases ...] [--variants ...] [--smoke]
    python benchmarks/experiments/tile_stage.py --compile-only    (NVRTC alone, no GPU)

The question: the tile walk (tile_walk.py) lost everywhere, but it held its next window in registers (179
a thread at bf16 W8 R16 S4: one block of eight warps a multiprocessor) and paid a round trip a window.
Staged (``W{warps} R{rows} S{steps} N{windows staged}``: a warp is R rows of 32 / R lanes of 16 bytes, a
window W * R * S steps), N * W * R * S >= T requests a block's whole sequence at once.  Each variant's
output is checked against the chunk engine's, accelerated-scan's too (its [B, D, T] output, transposed
back: a view); forward only, dense, no states.
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _kernels as k  # noqa: E402
import tile_walk  # noqa: E402

CASES = ["bf16:4x2048x512", "bf16:1x4096x256", "bf16:1x4096x1024", "bf16:2x4096x1024", "bf16:4x4096x1024",
         "bf16:8x4096x1024", "f32:2x4096x1024", "f32:8x4096x2048", "bf16:8x4096x2048"]
SOURCE = Path(__file__).with_name("tile_stage.cu")
OPTIONS = ("-std=c++17",)
ELEMENT = {"bfloat16": ("hc::bfloat16_t", 8), "float32": ("float", 4)}  # (C++ type, channels a 16-byte lane)
ASCAN = "ascan-triton"
# name: (warps, rows, steps a thread, windows staged, split each call); the tile is 32 / rows lanes of 16
# bytes.  "split each call" makes the driver calls of nvrtc.hold_shared (the split of L1 and shared memory)
# on every call rather than once: what they cost a call.
VARIANTS = {
    "W16 R16 S4 N2": (16, 16, 4, 2, False),
    "W8 R16 S4 N4": (8, 16, 4, 4, False),
    "W8 R16 S4 N2": (8, 16, 4, 2, False),
    "W16 R16 S2 N4": (16, 16, 2, 4, False),
    "W8 R32 S4 N2": (8, 32, 4, 2, False),
    "W8 R32 S4 N4": (8, 32, 4, 4, False),  # one lane a row: 8 channels a block; 4096 steps requested at once
    "W8 R8 S4 N4": (8, 8, 4, 4, False),
    "W8 R16 S4 N2, split each call": (8, 16, 4, 2, True),
}


def name_of(dtype, warps, rows, steps, stages):
    t, vec = ELEMENT[dtype]
    return f"ts::tile_stage_fwd<{t}, {t}, {vec}, {rows}, {warps}, {steps}, {stages}>"


def names():
    return sorted({name_of(dt, *v[:4]) for dt in ELEMENT for v in VARIANTS.values()})


def source():
    """common.cuh, the tile walk's kernels (whose window scan this uses), then this experiment's."""
    return tile_walk.source() + "\n" + SOURCE.read_text()


def launcher(torch, module, name):
    """``fwd(set)``: o by the staged tile walk ``name``, or accelerated-scan's forward for ``ASCAN``."""
    if name == ASCAN:
        from accelerated_scan import scalar

        def ascan(s):
            if "ascan" not in s:  # its layout and linear gates, made once a set (untimed)
                s["ascan"] = (s["g"].exp().transpose(1, 2).contiguous(), s["x"].transpose(1, 2).contiguous())
            return scalar.scan(*s["ascan"]).transpose(1, 2)
        return ascan
    from cupy_backends.cuda.api import driver

    from hgrn_cupy import nvrtc

    warps, rows, steps, stages, each_call = VARIANTS[name]
    shared = stages * steps * 2 * 32 * warps * 16
    held = set()

    def fwd(s):
        x, g, (B, T, D), dtype, vec = tile_walk.dense(s, "the staged tile walk")
        fn = module.get_function(name_of(dtype, warps, rows, steps, stages))
        blocks = max(1, 200_000 // shared)
        if dtype not in held:
            nvrtc.hold_shared(fn.kernel, shared, blocks, x.device.index)
            held.add(dtype)
        elif each_call:  # nvrtc.hold_shared's driver calls, which it skips once the function holds the values
            split = nvrtc.shared_split(fn.kernel, shared, blocks, x.device.index)
            driver.funcSetAttribute(fn.kernel.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared)
            driver.funcSetAttribute(fn.kernel.ptr, driver.CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, split)
        scalars = (np.int64(v) for v in (T, D, T * D, D, T * D, D, T * D, D))
        return k.raw_forward(torch, fn, (-(-D // (32 // rows * vec)), B), (32, warps), x, g, scalars, shared)
    return fwd


def main():
    variants = dict(VARIANTS, **{ASCAN: None})
    k.own_kernel_script(__doc__, "Staged tile walk", CASES, "bf16:4x2048x512",
                        "forward; every variant (and accelerated-scan) checked against the chunk engine", variants,
                        launcher, "tile_stage", (source, names, OPTIONS, SOURCE.name))


if __name__ == "__main__":
    main()
