#!/usr/bin/env python
"""The chunk engine's launch arguments, each against the value it ships with.

    python benchmarks/experiments/chunk_launch.py --group peek|prefetch|stagger|scratch|carveout|carveout-after
        [--cases ...] [--smoke]

Groups (each with the shapes its decision was taken on; docs/performance.md has the reasons):
- peek: each block asks for its predecessor's slots right behind its own loads, on grids of at most
  PEEK_MAX_TILES tiles or at least PEEK_MIN_TILES; against 8 and 64 as the upper bound, 256 as the
  lower, and no peek at all.
- prefetch: each block asks L2 (evict-last) for the rows of the block L2_AHEAD tickets later; against
  none, 48, 192 and 288.
- stagger: the second half of the first wave waits for the first half's maps before its loads (distance
  = half the blocks the GPU holds at once); against none, a third and two thirds.
- scratch: kept, self-clearing scratch (one kernel a call) against fresh memory filled before each
  launch (``config.keep_workspaces = False``: a memset and the kernel).
- carveout: the split of each multiprocessor's unified L1 / shared memory that the chunk kernels ask of
  the driver (CARVEOUT, percent shared memory: 28% is 64 KB on sm_90), against none (the driver's own
  choice), 50% and 100%; each variant loads its kernels anew (the preference stays with a loaded kernel).
- carveout-after: the same, each call right after a launch that leaves every multiprocessor split for the
  most shared memory (one block a SM holding all the shared memory a block may take, as a GEMM taking
  most of it would): whether the driver's own choice then keeps that split.  Every cell includes the
  launch; the header prints its time alone.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
import _kernels as k  # noqa: E402


def library():
    """The knobs' homes under the library's current module names: (chunk engine launcher module, the
    library's config object, a function that drops cached plans).  Re-point here after a rename."""
    from hgrn_cupy import config, nvrtc, plans
    from hgrn_cupy.engines import chunk

    return chunk, config, plans._plans.clear, nvrtc


HOG = r"""
extern "C" __global__ void hog(int* out) {
    extern __shared__ int s[];
    s[threadIdx.x] = threadIdx.x;
    __syncthreads();
    if (s[(threadIdx.x + 1) % blockDim.x] < 0) out[0] = 1;  // never true: the shared memory is used
}
"""


def shared_memory_hog(torch, nvrtc):
    """``hog()``: queues on torch's current stream one block a SM, each with the most dynamic shared
    memory a block may opt into and asking for 100% shared memory, so that every multiprocessor is left
    split for the most shared memory."""
    import cupy

    rt, dev = cupy.cuda.runtime, cupy.cuda.Device().id
    most = rt.deviceGetAttribute(rt.cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)
    grid = (rt.deviceGetAttribute(rt.cudaDevAttrMultiProcessorCount, dev),)
    fn = cupy.RawKernel(HOG, "hog")
    fn.max_dynamic_shared_size_bytes = most
    nvrtc.prefer_shared(fn.kernel, 100)
    out = cupy.zeros(1, cupy.int32)

    def hog():
        with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
            fn(grid, (32,), (out,), shared_mem=most)
    return hog


def after(first, calls):
    """``calls`` ({pass: f(set)}) with ``first()`` queued before each."""
    return {p: (lambda s, f=f: (first(), f(s))[1]) for p, f in calls.items()}


def groups(chunk, config, nvrtc):
    """{group: (cases, variants)}; variants as ``_common.run`` takes them, the shipped setting first."""
    carveout_cases = ["bf16:8x4096x2048", "bf16:1x262144x256", "bf16:1x32768x1024", "bf16:32x2048x4096",
                      "bf16:4x4096x1024", "bf16:4x2048x512", "f32:8x4096x2048", "f32:1x32768x1024",
                      "f32:1x262144x256", "f64:1x32768x256"]
    carveouts = {f"{chunk.CARVEOUT}% (as shipped)": [], "driver's choice": k.carved(nvrtc, None),
                 **{f"{pct}%": k.carved(nvrtc, pct) for pct in (50, 100)}}
    return {
        "peek": (["bf16:1x16384x2048", "bf16:2x16384x1024", "bf16:2x8192x2048", "bf16:4x4096x1024",
                  "f32:2x16384x1024", "bf16:8x4096x1024", "f32:4x4096x1024", "bf16:16x2048x1024",
                  "bf16:8x4096x2048", "bf16:1x262144x256", "bf16:32x2048x4096"],
                 {"as shipped": [],
                  "peek <= 8 tiles": [(chunk, "PEEK_MAX_TILES", 8)],
                  "peek <= 64 tiles": [(chunk, "PEEK_MAX_TILES", 64)],
                  "peek >= 256 tiles": [(chunk, "PEEK_MIN_TILES", 256)],
                  "no peek": [(chunk, "PEEK_MAX_TILES", 0), (chunk, "PEEK_MIN_TILES", 1 << 62)]}),
        "prefetch": (["bf16:1x32768x1024", "bf16:1x262144x256", "f32:1x32768x1024", "f32:1x262144x256",
                      "bf16:8x4096x2048", "bf16:4x4096x1024"],
                     {"as shipped": [],
                      "no prefetch": [(chunk, "L2_AHEAD", 0)],
                      "48 ahead": [(chunk, "L2_AHEAD", 48)],
                      "192 ahead": [(chunk, "L2_AHEAD", 192)],
                      "288 ahead": [(chunk, "L2_AHEAD", 288)]}),
        "stagger": (["bf16:4x2048x512", "bf16:1x2048x1024", "bf16:4x4096x1024", "bf16:1x32768x1024",
                     "bf16:8x4096x2048", "bf16:1x262144x256", "f32:1x32768x1024", "f32:8x4096x2048"],
                    {"as shipped": [],
                     "no stagger": [(chunk, "stagger", lambda total, n: 0)],
                     "a third": [(chunk, "stagger", lambda total, n: n // 3 if total > n else 0)],
                     "two thirds": [(chunk, "stagger", lambda total, n: 2 * n // 3 if total > n else 0)],
                     "half, one wave too": [(chunk, "stagger", lambda total, n: n // 2)]}),
        "scratch": (["bf16:4x2048x512", "bf16:1x4096x1024", "bf16:1x32768x1024", "bf16:1x262144x256",
                     "bf16:8x4096x2048", "bf16:32x2048x4096", "f32:4x2048x512", "f32:1x32768x1024",
                     "f32:1x262144x256", "f32:8x4096x2048"],
                    {"kept (as shipped)": [(config, "keep_workspaces", True)],
                     "fresh, filled per launch": [(config, "keep_workspaces", False)]}),
        "carveout": (carveout_cases, carveouts),
        "carveout-after": (carveout_cases, carveouts),
    }


def main():
    chunk, config, forget, nvrtc = library()
    table = groups(chunk, config, nvrtc)
    args, timer, gbps, hc = c.start(__doc__, "Chunk engine launch arguments", None, "bf16:1x32768x1024",
                                    'engine forced: chunk_hgrn and hgrn_backward(engine="chunk")', groups=table)
    calls = c.engine_calls(hc, "chunk")
    if args.group == "carveout-after":
        hog = shared_memory_hog(timer.torch, nvrtc)
        print(f"- every cell includes the shared-memory launch, alone {timer(hog) * 1e3:.1f} us\n")
        calls = after(hog, calls)
    c.run(args, timer, gbps, table[args.group][1], calls, forget)


if __name__ == "__main__":
    main()
