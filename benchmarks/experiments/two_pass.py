#!/usr/bin/env python
"""The two-pass forward (``two_pass.cu``): a reduce over chunks and an apply that re-reads them, against the
chunk engine, on the grids of one or two waves where the chunk engine's forward trails accelerated-scan.

    python benchmarks/experiments/two_pass.py [--cases ...] [--variants ...] [--smoke]
    python benchmarks/experiments/two_pass.py --compile-only    (NVRTC alone, no GPU)

The question: at bf16 2x4096x1024 (512 chunks of 128 steps, two waves of two blocks a multiprocessor) the
chunk engine's look-back takes 13% of the launch and its fold and second pass 11% (docs/performance.md,
"Open in the chunk engine"): each block's phases run in turn, waiting on the block before.  Here no block
waits: the reduce writes each chunk's map (8 bytes a channel), the apply composes the maps before its
chunk and scans it again, reading x and g a second time, from L2 where they fit (x and g under about
40 MB: 1x4096x1024, 2x4096x1024, 4x2048x512).  ``W{warps} R{rows} S{steps}``: a chunk of W * R * S steps
and 32 / R lanes of 16 bytes (the tile walk's window, ``tile_walk.cu``).  Each variant's output is checked
against the chunk engine's; forward only, dense, no states.
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _kernels as k  # noqa: E402
import tile_walk  # noqa: E402

CASES = ["bf16:1x4096x1024", "bf16:2x4096x1024", "bf16:4x2048x512", "bf16:4x4096x1024", "bf16:8x4096x1024",
         "f32:2x4096x1024", "bf16:8x4096x2048"]
SOURCE = Path(__file__).with_name("two_pass.cu")
ELEMENT = tile_walk.ELEMENT
# name: (warps, rows, steps a thread)
VARIANTS = {
    "W8 R2 S8": (8, 2, 8),
    "W8 R2 S4": (8, 2, 4),
    "W8 R4 S4": (8, 4, 4),
    "W16 R2 S4": (16, 2, 4),
}


def names_of(dtype, warps, rows, steps):
    args = tile_walk.template_args(dtype, warps, rows, steps)
    return f"tp::reduce<{args}>", f"tp::apply<{args}>"


def names():
    return [n for dt in ELEMENT for v in VARIANTS.values() for n in names_of(dt, *v)]


def source():
    """The library's common.cuh, the tile walk's kernels (whose window pieces the passes use), then the
    two passes: one text, as NVRTC compiles it."""
    return tile_walk.source() + "\n" + SOURCE.read_text()



def launcher(torch, module, name):
    """``fwd(set)``: o by the two passes ``name`` on the set's x and g (contiguous [B, T, D])."""
    warps, rows, steps = VARIANTS[name]

    def fwd(s):
        x, g, (B, T, D), dtype, vec = tile_walk.dense(s, "the two passes")
        reduce, apply = (module.get_function(n) for n in names_of(dtype, warps, rows, steps))
        win, tile = warps * rows * steps, 32 // rows * vec
        chunks = -(-T // win)
        maps = torch.empty((B, chunks, D, 2), dtype=torch.float32, device=x.device)
        grid, block = (chunks, -(-D // tile), B), (32, warps)
        i64 = np.int64
        k.raw_launch(torch, reduce, grid, block, (x, g, maps, i64(T), i64(D), i64(T * D), i64(D), i64(T * D),
                                                  i64(D), i64(chunks)))
        o = torch.empty_like(x)
        k.raw_launch(torch, apply, grid, block, (x, g, maps, o, i64(T), i64(D), i64(T * D), i64(D), i64(T * D),
                                                 i64(D), i64(T * D), i64(D), i64(chunks)))
        return o
    return fwd


def main():
    k.own_kernel_script(__doc__, "Two-pass forward", CASES, "bf16:2x4096x1024",
                        "forward; every variant checked against the chunk engine", VARIANTS, launcher,
                        "two_pass", (source, names, tile_walk.OPTIONS, SOURCE.name))


if __name__ == "__main__":
    main()
