#!/usr/bin/env python
"""The chunk engine's compile-time shape and forms, each against what it ships with.

    python benchmarks/experiments/chunk_shape.py [--group shapes|resident] [--cases ...] [--passes fwd,bwd] [--smoke]

Group ``shapes`` (16-bit and float32 vector kernels; docs/performance.md has the reasons):
- one-row and four-row warps: chunks of 64 or 256 steps instead of 128 (forward; backward half of that);
- half the steps a thread, and four warps a block.

Group ``resident`` (forward): more blocks a SM, each holding fewer steps, so that the SM keeps loading
while a block folds, meets its warps and looks back (``stream_schedule.py --group landed`` measures what
such a wait costs two blocks a SM and four): the forward's vector kernels with 4 or 6 steps a thread
compiled for 3 or 4 resident blocks (``__launch_bounds__``: at most 80 or 64 registers; NVRTC's ptxas
reports 28-112 bytes of spills a thread for these), four blocks with the split of L1 and shared memory
at 50% (four blocks' 17 KB of shared memory do not fit the shipped 28%).
The ticket order, the checked-only form, the look-back window and the blocks a SM were compile-time
switches once; they are constants of the kernels now (docs/performance.md keeps what they measured).
Each variant compiles its own module (NVRTC) on first use.  The 16-bit backward on grids of at most
NARROW_BWD_MAX_TILES tiles keeps its own four-row shape (NARROW_BWD) in every variant.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
import _kernels as k  # noqa: E402

CASES = ["bf16:4x2048x512", "bf16:4x4096x1024", "bf16:1x32768x1024", "bf16:8x4096x2048", "bf16:1x262144x256",
         "bf16:32x2048x4096", "f32:8x4096x2048", "f32:1x32768x1024"]


def library():
    """(chunk engine launcher module, a function that drops cached plans), under the library's current
    module names.  Re-point here after a rename."""
    from hgrn_cupy import plans
    from hgrn_cupy.engines import chunk

    return chunk, plans._plans.clear


def shape_settings(chunk, fwd=None, bwd=None, extra=()):
    """Settings that give the vector kernels (warps, rows, steps) ``fwd`` / ``bwd`` and add ``extra``
    compile options.  The options are spelled as the launcher spells them from SHAPES."""
    shapes = dict(chunk.SHAPES)
    if fwd:
        shapes[0, True] = fwd
    if bwd:
        shapes[1, True] = bwd
    options = tuple(f"-DHC_{'FWD' if d == 0 else 'BWD'}_{what}_{'V' if v else '1'}={shapes[d, v][i]}"
                    for (d, v) in shapes for i, what in enumerate(("WARPS", "ROWS", "STEPS"))
                    if what != "ROWS" or v)
    return [(chunk, "SHAPES", shapes), (chunk, "OPTIONS", options + tuple(extra))]


MIN_BLOCKS = "    static constexpr int MIN_BLOCKS = VEC == 1 ? 1 : 2;\n"


def resident(chunk, steps, blocks, carveout=None):
    """Settings that give the forward's vector kernels ``steps`` steps a thread and launch bounds of
    ``blocks`` blocks a SM (the split of L1 and shared memory at ``carveout`` percent where given)."""
    from hgrn_cupy import nvrtc

    bound = f"    static constexpr int MIN_BLOCKS = VEC == 1 ? 1 : (DIRECTION == 0 ? {blocks} : 2);\n"
    settings = shape_settings(chunk, fwd=(8, 2, steps)) + k.patched_kernels(
        nvrtc, [chunk.SOURCE], [(MIN_BLOCKS, bound, 1)], f"chunk_shape.py ({steps} steps, {blocks} blocks)")
    return settings + ([(chunk, "CARVEOUT", carveout)] if carveout else [])


def variants(chunk, group):
    s = lambda **kw: shape_settings(chunk, **kw)  # noqa: E731
    if group == "resident":
        return {"as shipped": [],
                "4 steps, 3 blocks a SM": resident(chunk, 4, 3),
                "4 steps, 4 blocks a SM": resident(chunk, 4, 4, 50),
                "6 steps, 3 blocks a SM": resident(chunk, 6, 3)}
    return {
        "as shipped": [],
        "one-row warps": s(fwd=(8, 1, 8), bwd=(8, 1, 4)),
        "four-row warps": s(fwd=(8, 4, 8), bwd=(8, 4, 4)),
        "half the steps": s(fwd=(8, 2, 4), bwd=(8, 2, 2)),
        "4 warps": s(fwd=(4, 2, 8), bwd=(4, 2, 4)),
    }


GROUPS = {"shapes": (CASES,),
          "resident": (["bf16:8x4096x2048", "bf16:1x262144x256", "bf16:1x32768x1024", "bf16:32x2048x4096",
                        "bf16:4x4096x1024", "bf16:4x2048x512", "f32:8x4096x2048", "f32:1x32768x1024"],)}


def main():
    chunk, forget = library()
    args, timer, gbps, hc = c.start(__doc__, "Chunk engine shapes and forms", None, "bf16:1x32768x1024",
                                    'engine forced: chunk_hgrn and hgrn_backward(engine="chunk")', groups=GROUPS,
                                    passes=lambda a: "fwd" if a.group == "resident" else "fwd,bwd")
    c.run(args, timer, gbps, variants(chunk, args.group), c.engine_calls(hc, "chunk"), forget)


if __name__ == "__main__":
    main()
