#!/usr/bin/env python
"""The block walk fed by tensor-map copies (``tma_walk.cu``): the fused engine's forward block walk whose
windows arrive in shared memory by one bulk tensor copy a window and tensor, against the library's walks
(``hgrn()``, which takes the staged walk or a register walk at these shapes) and the chunk engine.

    python benchmarks/experiments/tma_walk.py [--cases ...] [--variants ...] [--smoke]
    python benchmarks/experiments/tma_walk.py --compile-only    (NVRTC alone, no GPU)

The question: the staged walk (block_pipe.py) loses when it stages deeper than two windows, and with
4-byte lanes, as if its per-lane copies (one cp.async of 4 or 8 bytes a step and tensor) cost more than
the bytes they move.  Here one thread asks for a whole window (``W{warps} S{steps}``: a box of W * S
steps x 32 lanes of 8 bytes, or 4 with ``L4``) of x and of g, ``N{stages}`` windows a block in shared memory, at least
``B{blocks}`` blocks a multiprocessor asked of the register allocation, and the split of L1 and shared
memory sized for that many; ``TS``: each warp's rows of o leave by one bulk tensor copy from shared memory
instead of each lane's stores; ``(bound)``: o = x + g in place of the recurrence, with the same copies,
waits, barrier a window and stores (what the schedule costs with no fold, meeting or scan), ``reads``
the same without stores, ``writes`` the stores alone (unchecked).  The tensor maps are the library's
(``nvrtc.tensor_map``, a 3-d map [D, T, N] whose out-of-bounds steps and channels read as zeros).  Each variant's output is checked
against the chunk engine's (the bounds are not); forward only, dense, no states.
"""
import ctypes
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _kernels as k  # noqa: E402

CASES = ["bf16:8x4096x2048", "bf16:16x4096x1024", "bf16:4x4096x4096", "bf16:32x2048x4096", "bf16:64x4096x1024",
         "bf16:8x4096x1024", "f32:8x4096x2048", "f32:32x4096x1024"]
SOURCE = Path(__file__).with_name("tma_walk.cu")
ELEMENT = k.ELEMENT
# name: (lane bytes, warps, steps a warp, windows staged, blocks a multiprocessor, bound, store); "L4": lanes
# of 4 bytes (two 16-bit channels, one float32), else 8.  bound: 1, o = x + g in
# place of the recurrence with the same copies, waits, barriers and stores; 2, the same without stores;
# 3, the stores alone (zeros; no copies).  store: 1, each warp's rows of o by one bulk tensor copy from
# shared memory ("TS"), else each lane's own stores.  Bounds are unchecked.
VARIANTS = {
    "W8 S8 N2 B2": (8, 8, 8, 2, 2, 0, 0),
    "W8 S8 N3 B1": (8, 8, 8, 3, 1, 0, 0),
    "W8 S8 N3 B2": (8, 8, 8, 3, 2, 0, 0),
    "W8 S8 N4 B1": (8, 8, 8, 4, 1, 0, 0),
    "W8 S8 N6 B1": (8, 8, 8, 6, 1, 0, 0),
    "W8 S4 N4 B2": (8, 8, 4, 4, 2, 0, 0),
    "W8 S4 N8 B1": (8, 8, 4, 8, 1, 0, 0),
    "W4 S8 N4 B2": (8, 4, 8, 4, 2, 0, 0),
    "W8 S8 N2 B2 (bound)": (8, 8, 8, 2, 2, 1, 0),
    "W8 S8 N3 B2 (bound)": (8, 8, 8, 3, 2, 1, 0),
    "W8 S8 N2 B2 TS": (8, 8, 8, 2, 2, 0, 1),
    "W8 S8 N3 B2 TS": (8, 8, 8, 3, 2, 0, 1),
    "W8 S8 N2 B2 TS (bound)": (8, 8, 8, 2, 2, 1, 1),
    "W8 S8 N2 B2 reads (bound)": (8, 8, 8, 2, 2, 2, 0),
    "W8 S8 N2 B2 writes (bound)": (8, 8, 8, 2, 2, 3, 0),
    "W8 S8 N2 B2 TS writes (bound)": (8, 8, 8, 2, 2, 3, 1),
    "L4 W8 S8 N2 B2 TS": (4, 8, 8, 2, 2, 0, 1),
    "L4 W8 S8 N3 B2 TS": (4, 8, 8, 3, 2, 0, 1),
    "L4 W8 S8 N4 B2 TS": (4, 8, 8, 4, 2, 0, 1),
    "L4 W8 S8 N3 B3 TS": (4, 8, 8, 3, 3, 0, 1),
    "L4 W8 S8 N6 B2 TS": (4, 8, 8, 6, 2, 0, 1),
    "L4 W8 S8 N8 B2 TS": (4, 8, 8, 8, 2, 0, 1),
    "L4 W8 S4 N8 B2 TS": (4, 8, 4, 8, 2, 0, 1),
    "L4 W8 S4 N12 B2 TS": (4, 8, 4, 12, 2, 0, 1),
}
OPTIONS = ("-std=c++17", "-DHC_BLOCK_STAGES=2", "-DHC_BLOCK_WARPS=8", "-DHC_BLOCK_STEPS=8")


def name_of(dtype, lane_bytes, warps, steps, stages, blocks, bound, store):
    t, size = ELEMENT[dtype]
    return f"twalk::fwd<{t}, {t}, {lane_bytes // size}, {warps}, {steps}, {stages}, {blocks}, {bound}, {store}>"


def names():
    return [name_of(dt, *v) for dt in ELEMENT for v in VARIANTS.values()]


def source():
    """The library's fused_block_walk.cuh (common.cuh folded in), then the walk."""
    return k.after_library("fused_block_walk.cuh", SOURCE)


def tensor_map(t, box_channels, box_steps):
    """The library's tensor map (``nvrtc.tensor_map``: bits of the itemsize, zeros out of bounds) over a
    contiguous [N, T, D] tensor ``t`` as bytes: dims (D, T, N) innermost first, boxes of box_channels x
    box_steps x 1."""
    from hgrn_cupy import nvrtc

    N, T, D = t.shape
    item = t.element_size()
    words = nvrtc.tensor_map(t.data_ptr(), item, (D, T, N), (D * item, T * D * item), (box_channels, box_steps, 1))
    return np.array(words, np.int64).tobytes()


def launcher(torch, module, name):
    """``fwd(set)``: o by the walk ``name`` on the set's x and g (contiguous [B, T, D])."""
    from cupy_backends.cuda.api import driver

    from hgrn_cupy import nvrtc

    lane_bytes, warps, steps, stages, blocks, bound, store = VARIANTS[name]
    maps = {}

    def fwd(s):
        x, g = s["x"], s["g"]
        B, T, D = x.shape
        dtype = str(x.dtype).removeprefix("torch.")
        size = ELEMENT[dtype][1]
        vec = lane_bytes // size
        if D % 8 or not (x.is_contiguous() and g.is_contiguous()) or x.dtype != g.dtype:
            raise ValueError("the walk needs contiguous x and g of one dtype and D a multiple of 8")
        fn = module.get_function(name_of(dtype, lane_bytes, warps, steps, stages, blocks, bound, store))
        box = warps * steps * 32 * vec * size
        shared = (stages + store) * 2 * box  # the input stages, then two of o's rows a warp
        fn.max_dynamic_shared_size_bytes = shared
        nvrtc.hold_shared(fn.kernel, shared, blocks, x.device.index)
        key = (x.data_ptr(), g.data_ptr(), x.shape)
        if key not in maps:
            maps[key] = tensor_map(x, 32 * vec, warps * steps) + tensor_map(g, 32 * vec, warps * steps)
        o = torch.empty_like(x)
        mo = tensor_map(o, 32 * vec, steps) if store else bytes(128)
        buf = ctypes.create_string_buffer(maps[key] + mo + np.array([o.data_ptr(), T * D, D, T, D], np.int64).tobytes(),
                                          424)
        base = ctypes.addressof(buf)
        params = (ctypes.c_void_p * 8)(base, base + 128, base + 256, *(base + 384 + 8 * i for i in range(5)))
        grid = (-(-D // (32 * vec)), B)
        driver.launchKernel(fn.kernel.ptr, grid[0], grid[1], 1, 32, warps, 1, shared,
                            torch.cuda.current_stream().cuda_stream, ctypes.addressof(params), 0)
        return o
    return fwd


def main():
    k.own_kernel_script(__doc__, "Block walk fed by tensor-map copies", CASES, "bf16:8x4096x2048",
                        "forward; every variant checked against the chunk engine", VARIANTS, launcher,
                        "tma_walk", (source, names, OPTIONS, SOURCE.name))


if __name__ == "__main__":
    main()
