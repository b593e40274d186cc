#!/usr/bin/env python
"""Memory schedules a chunk kernel could have, with no recurrence: how close to torch.add each moves the
forward's bytes (x, g in, o = x + g out) in the chunk engine's geometry (``stream_schedule.cu``).

    python benchmarks/experiments/stream_schedule.py [--group schedules|habits|more|hints|carveout|residency|landed|cpasync] [--cases ...] [--smoke]
    python benchmarks/experiments/stream_schedule.py --compile-only    (NVRTC alone, no GPU)

The question: the shipped block design's memory schedule alone sits 1.08-1.09x the add on the H200
("loads and stores alone (bound)", here as "chunk bound", timed unchecked), so a forward at 1.05x of the
practical floor needs a schedule that keeps loads in flight through a block's life.  Variants:

- ``blocks SEG xSTEPS``: one block an item (8 warps; rows of SEG bytes; STEPS words of x and of g a
  thread in registers), the shipped shape without ticket, peek, prefetch or look-back;
- ``regpipe SEG 2xSTEPS``: persistent blocks (two a SM) that load their next item while they add and
  store this one;
- ``cp.async xSTEPS S{stages} B{blocks}``: persistent blocks whose next items come into shared memory
  by each thread's own 16-byte copies (``cp.async``) while they add and store this one;
- ``tma SEG S=steps xSTAGES``: persistent blocks (one a SM) whose next STAGES items come into shared
  memory by bulk copies (``cp.async.bulk``, sm_90 and later) while they add and store this one.

Group ``habits`` takes the shipped kernel's habits apart, from both ends: ``blocks 256B x8`` (the shipped
forward's geometry) with one habit added at a time (``+sync``: a block barrier between its loads and its
stores; ``+hints``: streaming ``.cs`` loads and stores; ``+prefetch``: the L2 prefetch of the block 96
later; ``+all``), and the chunk bound with one taken away at a time (``-prefetch``: L2_AHEAD 0;
``-stagger``; ``-barriers``: no carry-in, so no block barrier past the first wave's stagger; warp 0
publishes the chunk's slots, which the stagger waits on).

Group ``hints``: the streaming hints of the loads and of the stores apart, in the plain schedule; and the
chunk bound with the library's accesses made plain (``cache_hints.py``'s replacements), with and without
its L2 prefetch: whether the hints turn around with the recurrence or with the bound's schedule.

Group ``carveout``: whether the shared memory a chunk block holds (16 KB, its groups' maps) costs its
loads: the plain schedule launched with as much (unused) shared memory, with the driver's default split
of L1 and shared memory and with the least shared memory asked for; and the shipped chunk forward (the
real kernel, unchecked here) with the split asked for at 0%, 28% (64 KB) and 100%.

Group ``more``: a wait of about 1 us between a block's loads and its stores (``+delay``, what a
look-back does to the schedule), with plain and with streaming hints; and persistent blocks fed by one
bulk copy a tensor and item (``whole``: where a row is one 512-byte segment, D * itemsize = 512, the
item's rows are contiguous) against one copy a row.

Group ``landed``: what a wait costs once a block's words have landed, as the chunk kernel's fold,
meeting of warps and look-back make it wait (``+delay`` above starts as the loads go out and so overlaps
their flight): 1 and 3 us, with two blocks a SM of 8 steps a thread and with four of 4 steps (the same
bytes in flight a SM, twice the blocks to cover one block's wait).

Group ``cpasync``: persistent blocks whose next items come into shared memory by each thread's own
copies (``cp.async x{steps} S{stages} B{blocks a SM}``: stages of one item each, the one being stored
and the next ones in flight; streaming stores), with and without the wait once the words have landed:
whether loads kept in flight through that wait hold the rate.

Group ``residency``: the launcher prints each plain kernel's registers and the blocks a SM the
occupancy calculator gives it (the chunk bound holds two blocks of 8 warps a SM at 128 registers), and
``L1 least`` launches the plain schedule with the most shared memory (unused) two blocks a SM can take:
whether the loads in flight need L1.

Every variant but the chunk bounds is checked against torch.add (the first column).  A schedule that
reaches the add's ratio here is worth a recurrence on top (its look-back and scan cost what
``chunk_lookback.py --group phases`` measures); one that does not rules the design out.
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
import _kernels as k  # noqa: E402

CASES = ["bf16:8x4096x2048", "bf16:1x262144x256", "bf16:1x32768x1024", "bf16:32x2048x4096", "bf16:4x2048x512",
         "f32:8x4096x2048"]
SOURCE = Path(__file__).with_name("stream_schedule.cu")
OPTIONS = ("-std=c++17", "--use_fast_math")
WARPS = 8
# name: (kernel, lanes a row (SEG = 16 * lanes bytes), steps a thread, third template argument: resident
# blocks a SM (blocks, regpipe) or stages (tma); persistent grids: blocks a SM), then stream_blocks' MODE
# (stream_schedule.cu: 1 barrier, 2 streaming hints, 4 L2 prefetch, 8 a wait between loads and stores,
# 16 / 32 streaming loads / stores alone, 512 a wait once the words have landed, 1024 three times as long;
# 64, 128 and 256 below) or
# stream_tma's CONTIG (one copy a tensor and item: rows of one segment only)
VARIANTS = {
    "blocks 256B x8": ("stream_blocks", 16, 8, 2, 0),
    "blocks 256B x4": ("stream_blocks", 16, 4, 4, 0),
    "blocks 512B x8": ("stream_blocks", 32, 8, 2, 0),
    "regpipe 256B 2x4": ("stream_regpipe", 16, 4, 2),
    "regpipe 512B 2x4": ("stream_regpipe", 32, 4, 2),
    "tma 256B S=128 x3": ("stream_tma", 16, 8, 3, "false"),
    "tma 256B S=64 x6": ("stream_tma", 16, 4, 6, "false"),
    "tma 512B S=64 x3": ("stream_tma", 32, 8, 3, "false"),
    "tma 512B S=64 x3 whole": ("stream_tma", 32, 8, 3, "true"),
    "tma 512B S=32 x6 whole": ("stream_tma", 32, 4, 6, "true"),
    "blocks x8 +sync": ("stream_blocks", 16, 8, 2, 1),
    "blocks x8 +hints": ("stream_blocks", 16, 8, 2, 2),
    "blocks x8 +prefetch": ("stream_blocks", 16, 8, 2, 4),
    "blocks x8 +all": ("stream_blocks", 16, 8, 2, 7),
    "blocks x8 +delay": ("stream_blocks", 16, 8, 2, 8),
    "blocks x8 +delay +hints": ("stream_blocks", 16, 8, 2, 10),
    "blocks x8 +ld.cs": ("stream_blocks", 16, 8, 2, 16),
    "blocks x8 +st.cs": ("stream_blocks", 16, 8, 2, 32),
    "blocks x8 +smem": ("stream_blocks", 16, 8, 2, 64),
    "blocks x8 +smem, carveout 0": ("stream_blocks", 16, 8, 2, 192),
    "blocks x8, L1 least": ("stream_blocks", 16, 8, 2, 256),
    "blocks x8 +st.cs, L1 least": ("stream_blocks", 16, 8, 2, 256 + 32),
    "blocks x8 +landed 1us": ("stream_blocks", 16, 8, 2, 512),
    "blocks x8 +landed 3us": ("stream_blocks", 16, 8, 2, 512 + 1024),
    "blocks x4 +landed 1us": ("stream_blocks", 16, 4, 4, 512),
    "blocks x4 +landed 3us": ("stream_blocks", 16, 4, 4, 512 + 1024),
    "cp.async x4 S3 B2": ("stream_cpasync", 16, 4, 3, 2, 0),
    "cp.async x4 S3 B2 +landed 1us": ("stream_cpasync", 16, 4, 3, 2, 512),
    "cp.async x4 S3 B2 +landed 3us": ("stream_cpasync", 16, 4, 3, 2, 512 + 1024),
    "cp.async x8 S3 B1": ("stream_cpasync", 16, 8, 3, 1, 0),
    "cp.async x8 S3 B1 +landed 1us": ("stream_cpasync", 16, 8, 3, 1, 512),
}
# MODE bits the launcher reads (the kernel ignores them): 64 launches with the shipped forward block's
# shared memory (SMEM_BYTES, unused), 128 asks the driver for the least shared memory (carveout 0%), 256
# for the most (carveout 100%, two blocks' worth of unused dynamic shared memory: the least L1).
SMEM_BYTES = 16416
CARVEOUTS = {"default": None, "0%": 0, "28% (64 KB)": 28, "100%": 100}
# The shipped forward's carry-in holds the only block barriers of a 16-bit vector block past its first
# wave; without it, warp 0 still publishes the chunk's slots (values 0, the launch's parity), which the
# stagger waits on and the next launches expect overwritten.
NO_CARRY = ("    sm.carry_in(grid.slots, at.slot0, at.chunk, at.q, at.cl, mine, pre);\n    Acc h[VEC];\n",
            "    if (threadIdx.y == 0) {\n"
            "        const unsigned par = Block::parity_of(__shfl_sync(0xffffffffu, at.got.count, 0));\n"
            "        Affine<Acc> inc; inc.a = Acc(0); inc.b = Acc(0);\n"
            "        for (int i = threadIdx.x; i < Block::C; i += 32)\n"
            "            Slot<Acc>::store(grid.slots + ((at.slot0 + at.chunk) * Block::C + i) * Slot<Acc>::BYTES, inc, par);\n"
            "    }\n"
            "    Acc h[VEC];\n")
BOUND = "loads and stores alone (bound)"
NO_STAGGER = lambda total, at_once: 0  # noqa: E731
GROUPS = {
    "schedules": (CASES, ["torch.add", "chunk bound", "blocks 256B x8", "blocks 256B x4", "blocks 512B x8",
                          "regpipe 256B 2x4", "regpipe 512B 2x4", "tma 256B S=128 x3", "tma 256B S=64 x6",
                          "tma 512B S=64 x3"]),
    "habits": (CASES[:5], ["torch.add", "blocks 256B x8", "blocks x8 +sync", "blocks x8 +hints",
                           "blocks x8 +prefetch", "blocks x8 +all", "chunk bound", "chunk bound -prefetch",
                           "chunk bound -stagger", "chunk bound -barriers"]),
    "more": (["bf16:8x4096x2048", "bf16:1x262144x256", "bf16:32x2048x4096", "f32:1x262144x128",
              "bf16:1x524288x256"],
             ["torch.add", "blocks 256B x8", "blocks x8 +hints", "blocks x8 +delay", "blocks x8 +delay +hints",
              "tma 512B S=64 x3", "tma 512B S=64 x3 whole", "tma 512B S=32 x6 whole"]),
    "hints": (["bf16:8x4096x2048", "bf16:1x262144x256", "bf16:32x2048x4096", "f32:8x4096x2048"],
              ["torch.add", "blocks 256B x8", "blocks x8 +ld.cs", "blocks x8 +st.cs", "blocks x8 +hints",
               "chunk bound", "chunk bound ld.nc", "chunk bound st", "chunk bound ld.nc st",
               "chunk bound ld.nc st -prefetch"]),
    "carveout": (["bf16:8x4096x2048", "bf16:1x262144x256", "bf16:32x2048x4096", "f32:8x4096x2048"],
                 ["torch.add", "blocks 256B x8", "blocks x8 +smem", "blocks x8 +smem, carveout 0"]
                 + [f"chunk, carveout {c}" for c in CARVEOUTS]),
    "residency": (["bf16:8x4096x2048", "bf16:1x262144x256", "bf16:1x32768x1024", "bf16:32x2048x4096",
                   "f32:8x4096x2048"],
                  ["torch.add", "blocks 256B x8", "blocks x8 +st.cs", "blocks x8, L1 least",
                   "blocks x8 +st.cs, L1 least", "chunk bound", "chunk bound ld.nc"]),
    "cpasync": (["bf16:8x4096x2048", "bf16:1x262144x256", "bf16:1x32768x1024", "bf16:32x2048x4096",
                 "bf16:4x2048x512", "f32:8x4096x2048"],
                ["torch.add", "blocks 256B x8", "blocks x8 +landed 1us", "cp.async x4 S3 B2",
                 "cp.async x4 S3 B2 +landed 1us", "cp.async x4 S3 B2 +landed 3us", "cp.async x8 S3 B1",
                 "cp.async x8 S3 B1 +landed 1us"]),
    "landed": (["bf16:8x4096x2048", "bf16:1x262144x256", "bf16:1x32768x1024", "bf16:32x2048x4096"],
               ["torch.add", "blocks 256B x8", "blocks x8 +landed 1us", "blocks x8 +landed 3us", "blocks 256B x4",
                "blocks x4 +landed 1us", "blocks x4 +landed 3us", "chunk bound"]),
}
ELEMENT = {"bfloat16": "ss::Bf16", "float32": "ss::F32"}


def name_of(kernel, element, lanes, steps, third, *mode):
    """The name expression of one instantiation (launcher-only variants share their kernel's)."""
    return f"ss::{kernel}<{', '.join(str(a) for a in (element, lanes, steps, third, *mode))}>"


def names():
    return [name_of(k, e, *rest) for e in ELEMENT.values() for k, *rest in VARIANTS.values()]


def source():
    """The library's common.cuh (its cp.async helpers), then this experiment's kernels."""
    return k.after_library("common.cuh", SOURCE)


def compile_only():
    """Every instantiation through NVRTC for sm_90 (no GPU): prints the log, exits non-zero on failure."""
    k.compile_only(source(), SOURCE.name, names(), OPTIONS)


def hold_resident(nvrtc, fn, blocks, device):
    """The dynamic shared memory (bytes) that lets ``blocks`` blocks of ``fn`` share a SM and no more, with
    the split of L1 and shared memory asked for that holds them (``nvrtc.hold_shared``: all shared)."""
    per_sm, per_block = nvrtc.shared_room(fn.kernel, device)
    dynamic = (per_sm // blocks - per_block) // 128 * 128
    nvrtc.hold_shared(fn.kernel, dynamic, blocks, device)
    return dynamic


def report_residency(name, fn, shared):
    """Print a variant's registers a thread and the blocks a SM the occupancy calculator gives it."""
    from cupy_backends.cuda.api import driver

    per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, 32 * WARPS, shared)
    print(f"# {name}: {fn.num_regs} registers, {shared} B dynamic shared, {per_sm} blocks a SM", file=sys.stderr)


def launcher(torch, module, name, sms, nvrtc):
    """``fwd(set)``: o = x + g by variant ``name`` on the set's x and g (its launch made once a shape)."""
    kernel, lanes, steps, third, *mode = VARIANTS[name]
    made = {}

    def launch_for(x):
        B, T, D = x.shape
        dtype = str(x.dtype).removeprefix("torch.")
        fn = module.get_function(name_of(kernel, ELEMENT[dtype], lanes, steps, third, *mode))
        seg, rows, row_bytes = 16 * lanes, WARPS * (32 // lanes) * steps, D * x.element_size()
        if row_bytes % seg:
            raise ValueError(f"D * itemsize = {row_bytes} is not a multiple of {seg}")
        if mode == ["true"] and row_bytes != seg:
            raise ValueError(f"{name}: D * itemsize = {row_bytes}, not one {seg}-byte segment")
        ntiles, nchunks = B * (row_bytes // seg), -(-T // rows)
        shared = 0
        if kernel == "stream_blocks":
            grid = ntiles * nchunks
            shared = SMEM_BYTES if mode[0] & 64 else 0
            if mode[0] & 128:
                nvrtc.prefer_shared(fn.kernel, 0)
            if mode[0] & 256:
                shared = hold_resident(nvrtc, fn, 2, x.device.index)
            report_residency(name, fn, shared)
        elif kernel == "stream_cpasync":
            blocks = mode[0]
            grid, shared = min(ntiles * nchunks, blocks * sms), third * 2 * steps * 32 * WARPS * 16
            nvrtc.hold_shared(fn.kernel, shared, blocks, x.device.index)  # sets the dynamic bound too
            report_residency(name, fn, shared)
        elif kernel == "stream_regpipe":
            grid = min(ntiles * nchunks, third * sms)
        else:
            grid, shared = min(ntiles * nchunks, sms), third * 2 * rows * seg
            fn.max_dynamic_shared_size_bytes = shared
        scalars = tuple(np.int64(v) for v in (T, row_bytes, ntiles, nchunks, row_bytes // seg))
        return fn, grid, shared, scalars

    def fwd(s):
        x = s["x"]
        key = (tuple(x.shape), x.dtype)
        if key not in made:
            made[key] = launch_for(x)
        fn, grid, shared, scalars = made[key]
        return k.raw_forward(torch, fn, (grid,), (32, WARPS), x, s["g"], scalars, shared)
    return fwd


def main():
    if "--compile-only" in sys.argv:
        return compile_only()
    torch = c.torch_cuda()
    import cupy

    import cache_hints as ch
    import chunk_lookback as lb

    groups = {name: (cases,) for name, (cases, _) in GROUPS.items()}
    args, timer, gbps, hc = c.start(__doc__, "Stream schedules", None, "bf16:1x32768x1024",
                                    "o = x + g in the chunk engine's geometry; chunk bound: the shipped kernel with "
                                    "loads and stores alone (unchecked)", groups=groups, passes="fwd")
    nvrtc, chunk, forget = lb.library()
    module = cupy.RawModule(code=source(), options=OPTIONS, name_expressions=names())
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bound_lines = [(old, new, 1) for old, new in lb.PATCHES[BOUND]]
    plain = ch.NC_LOADS + ch.PLAIN_STORES
    bound = lb.patched_source(nvrtc, chunk, BOUND)
    bounds = {"chunk bound": bound,
              "chunk bound ld.nc": ch.hinted(nvrtc, [chunk], bound_lines + ch.NC_LOADS),
              "chunk bound st": ch.hinted(nvrtc, [chunk], bound_lines + ch.PLAIN_STORES),
              "chunk bound ld.nc st": ch.hinted(nvrtc, [chunk], bound_lines + plain),
              "chunk bound ld.nc st -prefetch": ch.hinted(nvrtc, [chunk], bound_lines + plain)
              + [(chunk, "L2_AHEAD", 0)],
              **{f"chunk, carveout {name}": k.carved(nvrtc, pct) for name, pct in CARVEOUTS.items()},
              "chunk bound -prefetch": bound + [(chunk, "L2_AHEAD", 0)],
              "chunk bound -stagger": bound + [(chunk, "stagger", NO_STAGGER)],
              "chunk bound -barriers": lb.patched_source(nvrtc, chunk, BOUND, [NO_CARRY])}
    variants, calls = {}, {}
    for name in GROUPS[args.group][1]:
        if name == "torch.add":
            variants[name], calls[name] = [], {"fwd": lambda s: torch.add(s["x"], s["g"])}
        elif name in bounds:
            variants[name], calls[name] = bounds[name], c.engine_calls(hc, "chunk")
        else:
            variants[name], calls[name] = [], {"fwd": launcher(torch, module, name, sms, nvrtc)}
    c.run(args, timer, gbps, variants, calls, forget, practical=False, unchecked=tuple(bounds))


if __name__ == "__main__":
    main()
