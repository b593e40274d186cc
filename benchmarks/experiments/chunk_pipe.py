#!/usr/bin/env python
"""The pipelined chunk forward (``chunk_pipe.cu``): as many blocks as the GPU holds at once, each taking
chunks one after another with the loads of its next chunks in flight, against the chunk engine.

    python benchmarks/experiments/chunk_pipe.py [--cases ...] [--variants ...] [--smoke]
    python benchmarks/experiments/chunk_pipe.py --compile-only    (NVRTC alone, no GPU)

The question: the chunk engine's blocks load a chunk, then fold, look back, scan and store it; Nsight
Compute reads its DRAM traffic within 2% of the minimum, yet its forward sits at 1.06-1.23x the practical
floor on the H200 (docs/performance.md, "Open in the chunk engine"), with two blocks a multiprocessor and
memory idle while both are past their loads.  Here the loads of a block's next NSTAGE chunks (cp.async
into shared memory) overlap its fold, look-back, scan and stores.  ``W{warps} R{rows} S{steps} N{stages}
B{blocks}``: the engine's block of W warps of R rows, S steps a thread (a chunk of W * R * S steps),
N chunks in flight, at least B blocks a multiprocessor asked of the register allocation.  The look-back,
the workspace protocol and the two passes over a thread's steps are the engine's own (``chunk.cu``).
Each variant's output is checked against the chunk engine's; forward only, dense, no states.  Measured on
the H200 and dropped (docs/performance.md, "Tried in the chunk engine and dropped").
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _kernels as k  # noqa: E402
import tile_walk  # noqa: E402

CASES = ["bf16:1x262144x256", "bf16:8x4096x2048", "bf16:1x32768x1024", "bf16:4x4096x1024", "bf16:4x2048x512",
         "bf16:32x2048x4096", "f32:8x4096x2048", "bf16:2x4096x1024"]
SOURCE = Path(__file__).with_name("chunk_pipe.cu")
ELEMENT = tile_walk.ELEMENT
# name: (warps, rows, steps a thread, chunks in flight, blocks a multiprocessor the registers allow)
VARIANTS = {
    "W8 R2 S8 N2 B1": (8, 2, 8, 2, 1),
    "W8 R2 S8 N3 B1": (8, 2, 8, 3, 1),
    "W8 R2 S4 N2 B2": (8, 2, 4, 2, 2),
    "W8 R2 S4 N3 B2": (8, 2, 4, 3, 2),
    "W8 R2 S4 N4 B1": (8, 2, 4, 4, 1),
    "W16 R2 S4 N2 B1": (16, 2, 4, 2, 1),
    "W4 R2 S8 N4 B1": (4, 2, 8, 4, 1),
}
HEADER = 256  # the engine's header, then the finish counter, aligned as the engine aligns its slots


def name_of(dtype, warps, rows, steps, stages, blocks):
    t, vec = ELEMENT[dtype]
    return f"cpipe::fwd<{t}, {t}, {vec}, {warps}, {rows}, {steps}, {stages}, {blocks}>"


def names():
    return [name_of(dt, *v) for dt in ELEMENT for v in VARIANTS.values()]


def options():
    from hgrn_cupy import nvrtc
    from hgrn_cupy.engines import chunk

    return nvrtc.BASE_OPTIONS + chunk.OPTIONS


def source():
    """The library's chunk.cu (common.cuh and chunk_lookback.cuh folded in), then the pipelined kernel."""
    return k.after_library("chunk.cu", SOURCE)



def launcher(torch, module, name):
    """``fwd(set)``: o by the pipelined forward ``name`` on the set's x and g (contiguous [B, T, D])."""
    warps, rows, steps, stages, blocks = VARIANTS[name]
    kept = {}  # (shape, dtype) -> workspace, filled with ones once; each launch leaves it ready

    def fwd(s):
        from cupy_backends.cuda.api import driver, runtime

        x, g, (B, T, D), dtype, vec = tile_walk.dense(s, "the pipelined forward")
        fn = module.get_function(name_of(dtype, warps, rows, steps, stages, blocks))
        threads, tile, chunk = 32 * warps, 32 // rows * vec, warps * rows * steps
        shared = stages * 2 * steps * threads * 16
        fn.max_dynamic_shared_size_bytes = shared
        fn.preferred_shared_memory_carveout = 100
        per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, threads, shared)
        sms = runtime.deviceGetAttribute(runtime.cudaDevAttrMultiProcessorCount, x.device.index)
        ntiles, nchunks = B * -(-D // tile), -(-T // chunk)
        key = (B, T, D, dtype)
        if key not in kept:
            kept[key] = torch.full((HEADER + ntiles * nchunks * tile * 8,), 255, dtype=torch.uint8, device=x.device)
        ws = kept[key].data_ptr()
        grid = min(per_sm * sms, ntiles * nchunks)
        o = torch.empty_like(x)
        i64, u64 = np.int64, np.uint64
        k.raw_launch(torch, fn, (grid,), (32, warps),
                     (x, g, o, i64(T * D), i64(D), i64(T * D), i64(D), i64(T * D), i64(D), u64(0), u64(0),
                      i64(T), i64(D), np.int32(0), u64(ws), u64(ws + HEADER), i64(ntiles * nchunks * tile * 8),
                      i64(ntiles), i64(nchunks)), shared)
        return o
    return fwd


def main():
    k.own_kernel_script(__doc__, "Pipelined chunk forward", CASES, "bf16:1x262144x256",
                        "forward; every variant checked against the chunk engine", VARIANTS, launcher,
                        "chunk_pipe", (source, names, options(), SOURCE.name))


if __name__ == "__main__":
    main()
