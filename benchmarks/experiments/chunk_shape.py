#!/usr/bin/env python
"""The chunk engine's compile-time shape and forms, each against what it ships with.

    python benchmarks/experiments/chunk_shape.py [--cases ...] [--passes fwd,bwd] [--smoke]

Variants (16-bit and float32 vector kernels; docs/performance.md has the reasons):
- one-row and four-row warps: chunks of 64 or 256 steps instead of 128 (forward; backward half of that);
- half the steps a thread, and four warps a block.
The ticket order, the checked-only form, the look-back window and the blocks a SM were compile-time
switches once; they are constants of the kernels now (docs/performance.md keeps what they measured).
Each variant compiles its own module (NVRTC) on first use.  The 16-bit backward on grids of at most
NARROW_BWD_MAX_TILES tiles keeps its own four-row shape (NARROW_BWD) in every variant.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

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


def variants(chunk):
    s = lambda **kw: shape_settings(chunk, **kw)  # noqa: E731
    return {
        "as shipped": [],
        "one-row warps": s(fwd=(8, 1, 8), bwd=(8, 1, 4)),
        "four-row warps": s(fwd=(8, 4, 8), bwd=(8, 4, 4)),
        "half the steps": s(fwd=(8, 2, 4), bwd=(8, 2, 2)),
        "4 warps": s(fwd=(4, 2, 8), bwd=(4, 2, 4)),
    }


def main():
    chunk, forget = library()
    args, timer, gbps, hc = c.start(__doc__, "Chunk engine shapes and forms", CASES, "bf16:1x32768x1024",
                                    'engine forced: chunk_hgrn and hgrn_backward(engine="chunk")')
    c.run(args, timer, gbps, variants(chunk), c.engine_calls(hc, "chunk"), forget)


if __name__ == "__main__":
    main()
