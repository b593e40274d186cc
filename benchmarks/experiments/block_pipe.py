#!/usr/bin/env python
"""The staged block walk (``block_pipe.cu``): the fused engine's forward block walk with the loads of the
next windows in flight through shared memory, against the library's block walk (``hgrn()``, which takes it
at these shapes) and the chunk engine.

    python benchmarks/experiments/block_pipe.py [--group lanes|depth|copies|carveout] [--cases ...] [--variants ...] [--smoke]
    python benchmarks/experiments/block_pipe.py --compile-only    (NVRTC alone, no GPU)

The question: at the headline shapes the tuned block walk reads 1.06-1.08x the practical floor on the H200
(docs/performance.md, "H200: the library as shipped"), with one window of a block's bytes in flight in
registers and the window after it asked of L2.  Here a block keeps the loads of its next N - 1 windows in
flight (cp.async into shared memory, each thread its own words).  ``L{bytes} W{warps} S{steps}
N{stages} B{blocks} [PF]``: lanes of 4, 8 or 16 bytes, windows of W * S steps, N windows staged, at least B
blocks a multiprocessor asked of the register allocation, PF: each warp also asks L2 for its rows of the
window after the last one staged; C16: a warp copies its rows in 16-byte pieces (lanes copy words other
lanes read, with a warp barrier on each side), else each lane copies its own words.  H{k}: the split of L1
and shared memory asked for holds k such blocks a multiprocessor and no more (``nvrtc.hold_shared``, so L1
keeps the rest; Hmax: all the shared memory there is); without H, the driver's choice.  Each variant's output
is checked against the chunk engine's; forward only, dense, no states.
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _kernels as k  # noqa: E402

CASES = ["bf16:8x4096x2048", "bf16:32x2048x4096", "bf16:64x4096x1024", "bf16:16x4096x1024", "bf16:4x4096x4096",
         "bf16:8x4096x1024", "f32:8x4096x2048", "f32:32x4096x1024", "f32:8x4096x1024"]
SOURCE = Path(__file__).with_name("block_pipe.cu")
ELEMENT = k.ELEMENT
# name: (lane bytes, warps, steps a warp, windows staged, blocks a multiprocessor, L2 prefetch of the window
# after the last staged, copies of 16 bytes)
VARIANTS = {
    "L4 W8 S8 N2 B2": (4, 8, 8, 2, 2, 0, 0),
    "L4 W8 S8 N3 B2": (4, 8, 8, 3, 2, 0, 0),
    "L4 W8 S8 N4 B2": (4, 8, 8, 4, 2, 0, 0),
    "L4 W8 S4 N6 B2": (4, 8, 4, 6, 2, 0, 0),
    "L4 W4 S8 N4 B4": (4, 4, 8, 4, 4, 0, 0),
    "L8 W8 S8 N2 B2": (8, 8, 8, 2, 2, 0, 0),
    "L8 W8 S8 N3 B2": (8, 8, 8, 3, 2, 0, 0),
    "L8 W8 S4 N6 B2": (8, 8, 4, 6, 2, 0, 0),
    "L8 W8 S8 N2 B2 PF": (8, 8, 8, 2, 2, 1, 0),
    "L8 W8 S8 N3 B1": (8, 8, 8, 3, 1, 0, 0),
    "L8 W8 S4 N2 B2": (8, 8, 4, 2, 2, 0, 0),
    "L8 W8 S4 N3 B2": (8, 8, 4, 3, 2, 0, 0),
    "L8 W8 S4 N4 B2 PF": (8, 8, 4, 4, 2, 1, 0),
    "L8 W4 S8 N2 B4": (8, 4, 8, 2, 4, 0, 0),
    "L8 W16 S4 N2 B1": (8, 16, 4, 2, 1, 0, 0),
    "L16 W8 S4 N2 B2": (16, 8, 4, 2, 2, 0, 0),
    "L16 W8 S4 N2 B2 PF": (16, 8, 4, 2, 2, 1, 0),
    "L16 W4 S8 N2 B2": (16, 4, 8, 2, 2, 0, 0),
    "L8 W8 S8 N2 B2 C16": (8, 8, 8, 2, 2, 0, 1),
    "L8 W8 S8 N3 B2 C16": (8, 8, 8, 3, 2, 0, 1),
    "L8 W8 S4 N4 B2 C16": (8, 8, 4, 4, 2, 0, 1),
    "L4 W8 S8 N2 B2 C16": (4, 8, 8, 2, 2, 0, 1),
    "L4 W8 S8 N3 B2 C16": (4, 8, 8, 3, 2, 0, 1),
    "L4 W8 S8 N4 B2 C16": (4, 8, 8, 4, 2, 0, 1),
    "L4 W8 S4 N4 B2 C16": (4, 8, 4, 4, 2, 0, 1),
    "L4 W4 S8 N3 B4 C16": (4, 4, 8, 3, 4, 0, 1),
    "L8 W8 S8 N4 B1": (8, 8, 8, 4, 1, 0, 0),
    "L8 W8 S4 N4 B1": (8, 8, 4, 4, 1, 0, 0),
    "L8 W8 S8 N2 B1": (8, 8, 8, 2, 1, 0, 0),
    "L8 W8 S8 N4 B2": (8, 8, 8, 4, 2, 0, 0),
}
# The carveout variants: a variant above (its kernel) and the blocks a multiprocessor the split is sized
# for (0: all shared memory).  The attribute belongs to the kernel, so each launch sets its own.
HOLD = {"L8 W8 S8 N2 B2 H2": ("L8 W8 S8 N2 B2", 2), "L8 W8 S8 N2 B2 H1": ("L8 W8 S8 N2 B2", 1),
        "L8 W8 S8 N2 B2 Hmax": ("L8 W8 S8 N2 B2", 0), "L8 W8 S8 N3 B1 H1": ("L8 W8 S8 N3 B1", 1),
        "L8 W8 S8 N4 B1 H1": ("L8 W8 S8 N4 B1", 1), "L8 W8 S4 N4 B1 H1": ("L8 W8 S4 N4 B1", 1),
        "L8 W8 S8 N2 B1 H1": ("L8 W8 S8 N2 B1", 1), "L8 W8 S8 N3 B2 H1": ("L8 W8 S8 N3 B2", 1),
        "L8 W8 S8 N4 B2 H1": ("L8 W8 S8 N4 B2", 1), "L4 W8 S8 N2 B2 H2": ("L4 W8 S8 N2 B2", 2),
        "L4 W8 S8 N3 B2 H2": ("L4 W8 S8 N3 B2", 2), "L4 W8 S8 N4 B2 H2": ("L4 W8 S8 N4 B2", 2),
        "L4 W4 S8 N4 B4 H4": ("L4 W4 S8 N4 B4", 4)}
VARIANTS.update({name: VARIANTS[base] for name, (base, _) in HOLD.items()})
# The variants of each table in docs/performance.md ("Block-walk staged forward"), in its order.
GROUPS = {
    "lanes": [n for n in VARIANTS if n.startswith(("L4 W", "L8 W8 S8 N2 B2", "L8 W8 S8 N3 B2", "L8 W8 S4 N6"))
              and "C16" not in n and "PF" not in n and n not in HOLD],
    "depth": ["L8 W8 S8 N2 B2", "L8 W8 S8 N2 B2 PF", "L8 W8 S8 N3 B1", "L8 W8 S4 N2 B2", "L8 W8 S4 N3 B2",
              "L8 W8 S4 N4 B2 PF", "L8 W4 S8 N2 B4", "L8 W16 S4 N2 B1", "L16 W8 S4 N2 B2", "L16 W8 S4 N2 B2 PF",
              "L16 W4 S8 N2 B2"],
    "copies": ["L8 W8 S8 N2 B2"] + [n for n in VARIANTS if n.endswith("C16")],
    "carveout": ["L8 W8 S8 N2 B2"] + list(HOLD),
}
# fused_block_walk.cuh wants the library's window macros; this kernel takes its own shape.
OPTIONS = ("-std=c++17", "-DHC_BLOCK_STAGES=2", "-DHC_BLOCK_WARPS=8", "-DHC_BLOCK_STEPS=8")


def name_of(dtype, nbytes, warps, steps, stages, blocks, prefetch, c16):
    t, size = ELEMENT[dtype]
    return f"bpipe::fwd<{t}, {t}, {nbytes // size}, {warps}, {steps}, {stages}, {blocks}, {prefetch}, {c16}>"


def names():
    return list(dict.fromkeys(name_of(dt, *v) for dt in ELEMENT for v in VARIANTS.values()))


def source():
    """The library's fused_block_walk.cuh (common.cuh folded in), then the staged walk."""
    return k.after_library("fused_block_walk.cuh", SOURCE)



def launcher(torch, module, name):
    """``fwd(set)``: o by the staged block walk ``name`` on the set's x and g (contiguous [B, T, D])."""
    from hgrn_cupy import nvrtc

    nbytes, warps, steps, stages, blocks, prefetch, c16 = VARIANTS[name]
    hold = HOLD[name][1] if name in HOLD else None

    def fwd(s):
        x, g = s["x"], s["g"]
        B, T, D = x.shape
        dtype = str(x.dtype).removeprefix("torch.")
        vec = nbytes // ELEMENT[dtype][1]
        if D % (16 // x.element_size() if c16 else vec) or not (x.is_contiguous() and g.is_contiguous()):
            raise ValueError(f"the staged block walk needs contiguous inputs and D a multiple of {vec}")
        fn = module.get_function(name_of(dtype, nbytes, warps, steps, stages, blocks, prefetch, c16))
        shared = stages * warps * steps * 2 * 32 * nbytes
        fn.max_dynamic_shared_size_bytes = shared
        if hold is None:
            nvrtc.prefer_shared(fn.kernel, -1)  # the driver's choice
        elif hold:
            nvrtc.hold_shared(fn.kernel, shared, hold, x.device.index)
        else:
            nvrtc.prefer_shared(fn.kernel, 100)
        i64 = np.int64
        return k.raw_forward(torch, fn, (-(-D // (32 * vec)), B), (32, warps), x, g,
                             tuple(i64(v) for v in (T * D, D, T * D, D, T * D, D, T, D)), shared)
    return fwd


def main():
    k.own_kernel_script(__doc__, "Staged block walk", CASES, "bf16:8x4096x2048",
                        "forward; every variant checked against the chunk engine", VARIANTS, launcher,
                        "block_pipe", (source, names, OPTIONS, SOURCE.name), groups=GROUPS)


if __name__ == "__main__":
    main()
