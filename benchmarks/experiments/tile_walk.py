#!/usr/bin/env python
"""The tile walk (``tile_walk.cu``): a block a narrow tile of channels for the whole sequence, against the
chunk engine, on the shapes where the chunk engine's forward trails accelerated-scan (grids of one or two
waves: a few thousand channels, a few thousand steps).

    python benchmarks/experiments/tile_walk.py [--cases ...] [--variants ...] [--smoke]
    python benchmarks/experiments/tile_walk.py --compile-only    (NVRTC alone, no GPU)

The question: accelerated-scan's forward, one program a channel on its own ``[B, D, T]`` layout, reads
3-20% faster than the chunk engine at 1x4096x512 - 8x4096x1024 (docs/performance.md, "Open in the chunk
engine"), where no launch setting of the chunk engine helps.  The tile walk needs no look-back: a block
walks its channels' whole sequence in windows, like the library's block walk, but its tiles are narrow
(``W{warps} R{rows} S{steps}``: a warp is R rows of 32 / R lanes, a lane 16 bytes of one step; the tile is
32 / R * 16 bytes wide and a window W * R * S steps), so 2K-8K channels make 128-1024 blocks.  Each
variant's output is checked against the chunk engine's (the first column after the floor); forward only,
dense, no states (the experiment decides whether the design is worth the rest).
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _kernels as k  # noqa: E402

# The mid-sized grids where the chunk engine trails accelerated-scan, then headline shapes where hgrn() takes
# the block walk (whether narrower tiles of 16-byte lanes would serve there too).
CASES = ["bf16:1x4096x1024", "bf16:2x4096x1024", "bf16:4x4096x1024", "bf16:8x4096x1024", "bf16:4x2048x512",
         "bf16:1x16384x1024", "f32:2x4096x1024", "f32:8x4096x1024", "bf16:8x4096x2048", "f32:8x4096x2048"]
SOURCE = Path(__file__).with_name("tile_walk.cu")
OPTIONS = ("-std=c++17",)
ELEMENT = {"bfloat16": ("hc::bfloat16_t", 8), "float32": ("float", 4)}
# name: (warps, rows, steps a thread); the tile is 32 / rows lanes of 16 bytes, the window warps * rows * steps.
VARIANTS = {
    "W8 R16 S4": (8, 16, 4),
    "W8 R16 S2": (8, 16, 2),
    "W8 R8 S4": (8, 8, 4),
    "W4 R16 S4": (4, 16, 4),
    "W8 R32 S2": (8, 32, 2),
    "W8 R4 S4": (8, 4, 4),
    "W8 R2 S4": (8, 2, 4),
    "W8 R1 S4": (8, 1, 4),
}


def template_args(dtype, warps, rows, steps):
    """The template arguments of a window kernel (``<TX, TG, VEC, ROWS, WARPS, S>``) for one dtype."""
    t, vec = ELEMENT[dtype]
    return f"{t}, {t}, {vec}, {rows}, {warps}, {steps}"


def name_of(dtype, warps, rows, steps):
    return f"tw::tile_walk_fwd<{template_args(dtype, warps, rows, steps)}>"


def names():
    return [name_of(dt, *v) for dt in ELEMENT for v in VARIANTS.values()]


def source():
    """The library's common.cuh, then this experiment's kernels: one text, as NVRTC compiles it."""
    return k.after_library("common.cuh", SOURCE)



def dense(s, who):
    """``(x, g, (B, T, D), dtype name, channels a 16-byte lane)`` of an input set, which ``who`` needs
    contiguous with D a multiple of the lane's channels; else ValueError."""
    x, g = s["x"], s["g"]
    dtype = str(x.dtype).removeprefix("torch.")
    _, vec = ELEMENT[dtype]
    if x.shape[2] % vec or not (x.is_contiguous() and g.is_contiguous()):
        raise ValueError(f"{who} needs contiguous inputs and D a multiple of {vec}")
    return x, g, tuple(x.shape), dtype, vec


def launcher(torch, module, name):
    """``fwd(set)``: o by the tile walk ``name`` on the set's x and g (contiguous [B, T, D])."""
    warps, rows, steps = VARIANTS[name]

    def fwd(s):
        x, g, (B, T, D), dtype, vec = dense(s, "the tile walk")
        fn = module.get_function(name_of(dtype, warps, rows, steps))
        tile = 32 // rows * vec
        scalars = (np.int64(v) for v in (T, D, T * D, D, T * D, D, T * D, D))
        return k.raw_forward(torch, fn, (-(-D // tile), B), (32, warps), x, g, scalars)
    return fwd


def main():
    k.own_kernel_script(__doc__, "Tile walk", CASES, "bf16:2x4096x1024",
                        "forward; every tile walk checked against the chunk engine", VARIANTS, launcher,
                        "tile_walk", (source, names, OPTIONS, SOURCE.name))


if __name__ == "__main__":
    main()
