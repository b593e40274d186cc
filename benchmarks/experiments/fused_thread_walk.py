#!/usr/bin/env python
"""The fused engine's thread walk: register tiles and two channels a thread.

    python benchmarks/experiments/fused_thread_walk.py --group tiles [--cases ...] [--smoke]

The block walks are turned off throughout, so the thread walk runs at every shape.
- tiles: one channel a thread with 16- and 32-step tiles, two channels a thread with 8-, 16- and
  32-step tiles (two tiles in flight: the next tile's loads are issued before the current one is
  scanned), at 16K to 256K channels; the shipped rule is 32 steps for float32 and 16 for 16-bit types
  with one channel, and two channels (32 steps 16-bit, 16 float32) from WALK_VEC_MIN_CHANNELS on.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402


def library():
    """(fused engine launcher module, a function that drops cached plans), under the current module
    names.  Re-point here after a rename."""
    from hgrn_cupy import plans
    from hgrn_cupy.engines import fused_recurrent

    return fused_recurrent, plans._plans.clear


def thread_walk(fused):
    return [(fused, "BLOCK_WALK_CHANNELS", {k: (1 << 62, 1 << 62) for k in fused.BLOCK_WALK_CHANNELS})]


def tiles(fused, channels, steps):
    """``channels`` (1 or 2) a thread at every channel count, with ``steps``-step tiles."""
    shipped = fused.options

    def options(x_dtype, g_dtype):
        keep = tuple(o for o in shipped(x_dtype, g_dtype) if not o.startswith(("-DHC_PREFETCH=", "-DHC_PREFETCH_V=")))
        return keep + (f"-DHC_PREFETCH={steps}", f"-DHC_PREFETCH_V={steps}")
    return [(fused, "WALK_VEC_MIN_CHANNELS", 0 if channels == 2 else 1 << 62), (fused, "options", options)]


def groups(fused):
    tw = thread_walk(fused)
    return {
        "tiles": (["bf16:8x4096x2048", "bf16:16x2048x2048", "bf16:8x2048x4096", "bf16:16x2048x4096",
                   "bf16:32x2048x4096", "bf16:64x1024x4096", "f32:8x4096x2048", "f32:16x2048x2048",
                   "f32:16x2048x4096", "f32:32x2048x4096", "f32:64x1024x4096"],
                  {"as shipped": tw, "1 ch, 16 steps": tw + tiles(fused, 1, 16), "1 ch, 32 steps": tw + tiles(fused, 1, 32),
                   "2 ch, 8 steps": tw + tiles(fused, 2, 8), "2 ch, 16 steps": tw + tiles(fused, 2, 16),
                   "2 ch, 32 steps": tw + tiles(fused, 2, 32)}),
    }


def main():
    fused, forget = library()
    table = groups(fused)
    args, timer, gbps, hc = c.start(__doc__, "Fused engine thread walk", None, "bf16:32x2048x4096",
                                    'engine forced: fused_recurrent_hgrn and hgrn_backward(engine="fused_recurrent"); '
                                    "block walks off", groups=table,
                                    passes=lambda a: "fwd,bwd")
    c.run(args, timer, gbps, table[args.group][1], c.engine_calls(hc, "fused_recurrent"), forget)


if __name__ == "__main__":
    main()
