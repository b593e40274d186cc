#!/usr/bin/env python
"""The fused engine's block walks: where they apply, their lanes, their shape.

    python benchmarks/experiments/fused_block_walk.py --group bands|lanes|shape|narrow [--cases ...] [--smoke]

Groups (docs/performance.md has the reasons):
- bands: the block walk forced at every channel count, against the thread walk forced and the chunk
  engine; where the block walk wins is BLOCK_WALK_CHANNELS, and where the chunk engine wins over it is
  the engine crossover;
- lanes: 8-byte lanes everywhere, 4-byte lanes everywhere, against the shipped rule (forward 8 bytes
  from BLOCK_WALK_NARROW_BELOW channels on, 4 below; backward 4);
- shape: warps x steps a window (W16S4, W8S4, W4S8) against W8S8;
- narrow: at 16K-64K 16-bit channels, where the tuner takes 4-byte forward lanes on an H200, lanes of
  one 2-byte channel, and blocks of four warps (twice the blocks again), in both directions.
Every group but bands forces the block walk at every channel count, so the default shapes can sit
outside the shipped bands.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

OFF = 1 << 62


def library():
    """(fused engine launcher module, the compile helper module that builds the instantiation names, a
    function that drops cached plans), under the current module names.  Re-point here after a rename."""
    from hgrn_cupy import plans
    from hgrn_cupy.engines import fused_recurrent

    return fused_recurrent, fused_recurrent, plans._plans.clear


def everywhere(fused):
    """Block walk at every channel count (16-bit and float32; float64 has none)."""
    return [(fused, "BLOCK_WALK_CHANNELS", {k: ((0, OFF) if k[0] in (2, 4) else v)
                                            for k, v in fused.BLOCK_WALK_CHANNELS.items()})]


def nowhere(fused):
    return [(fused, "BLOCK_WALK_CHANNELS", {k: (OFF, OFF) for k in fused.BLOCK_WALK_CHANNELS})]


def with_options(fused, *extra):
    """The engine's compile options plus ``extra`` (each distinct set compiles its own module)."""
    shipped = fused.options
    return [(fused, "options", lambda x_dtype, g_dtype, *rest: shipped(x_dtype, g_dtype, *rest) + tuple(extra))]


def lanes(fused, comp, nbytes):
    """Block-walk lanes of ``nbytes`` bytes in both directions.  The compile helper spells the kernels a
    module holds from the same rule, so both modules take it, and a marker option keeps the module apart."""
    def width(x_dtype, g_dtype, direction=0, narrow=False):
        return max(1, nbytes // max(fused.nvrtc.ITEMSIZE[x_dtype], fused.nvrtc.ITEMSIZE[g_dtype]))
    return ([(fused, "block_walk_width", width), (comp, "block_walk_width", width)]
            + with_options(fused, f"-DHC_EXPERIMENT_LANES={nbytes}"))


def walk_shape(fused, warps, steps):
    return [(fused, "BLOCK_WARPS", warps), (fused, "BLOCK_STEPS", steps), (fused, "BLOCK_WALK_MIN_T", warps * steps)]


def groups(fused, comp):
    """{group: (cases, variants, engines)}: engines maps variant names to "chunk" where the chunk engine
    runs instead of the fused one."""
    ev = everywhere(fused)
    sweep = ["bf16:4x4096x1024", "bf16:8x4096x1024", "bf16:8x4096x2048", "bf16:32x4096x1024", "bf16:64x4096x1024",
             "bf16:32x2048x4096", "f32:4x4096x1024", "f32:8x4096x1024", "f32:8x4096x2048", "f32:32x4096x1024",
             "f32:64x4096x1024", "f32:32x2048x4096"]
    return {
        "bands": (sweep, {"block walk": ev, "thread walk": nowhere(fused), "chunk engine": []}, {"chunk engine"}),
        "lanes": (["bf16:8x4096x1024", "bf16:16x4096x1024", "bf16:8x4096x2048", "bf16:32x4096x1024",
                   "bf16:64x4096x1024", "bf16:4x4096x4096", "f32:8x4096x2048"],
                  {"as shipped": ev, "8-byte lanes": ev + lanes(fused, comp, 8),
                   "4-byte lanes": ev + lanes(fused, comp, 4)}, set()),
        "shape": (["bf16:8x4096x2048", "bf16:32x4096x1024", "bf16:64x4096x1024", "f32:8x4096x2048"],
                  {"W8S8 (as shipped)": ev, "W16S4": ev + walk_shape(fused, 16, 4), "W8S4": ev + walk_shape(fused, 8, 4),
                   "W4S8": ev + walk_shape(fused, 4, 8)}, set()),
        "narrow": (["bf16:8x4096x2048", "bf16:16x4096x1024", "bf16:32x2048x4096", "bf16:64x4096x1024"],
                   {"4-byte lanes": ev + lanes(fused, comp, 4), "2-byte lanes": ev + lanes(fused, comp, 2),
                    "4-byte lanes, W4S8": ev + lanes(fused, comp, 4) + walk_shape(fused, 4, 8),
                    "2-byte lanes, W4S8": ev + lanes(fused, comp, 2) + walk_shape(fused, 4, 8)}, set()),
    }


def main():
    fused, comp, forget = library()
    table = groups(fused, comp)
    args, timer, gbps, hc = c.start(__doc__, "Fused engine block walks", None, "bf16:8x4096x2048",
                                    'engine forced: fused_recurrent_hgrn and hgrn_backward(engine="fused_recurrent"), '
                                    "unless a column names the chunk engine", groups=table)
    _, variants, chunk_engine = table[args.group]
    calls = {n: c.engine_calls(hc, "chunk" if n in chunk_engine else "fused_recurrent") for n in variants}
    c.run(args, timer, gbps, variants, calls, forget)


if __name__ == "__main__":
    main()
