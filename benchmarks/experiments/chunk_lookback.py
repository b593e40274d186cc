#!/usr/bin/env python
"""What the look-back costs the chunk engine, and two ways to shorten it where a grid has few tiles.

    python benchmarks/experiments/chunk_lookback.py [--cases ...] [--passes fwd,bwd] [--smoke]

A tile's chunks are chained by the look-back: a block whose predecessors have published only their
aggregates walks back over them, WINDOW slots a round (each round one trip to L2), until it meets an
inclusive prefix.  Where a grid has few tiles, the predecessor started a few blocks earlier and is still
walking itself, so walks are long; the more bandwidth a card has, the more chunks a tile must finish per
microsecond, and the longer the walks get.  Variants:
- "no look-back (bound)": every chunk takes carry 0 and publishes nothing before its inclusive prefix
  (wrong results, timed only): what the engine's other phases cost, the look-back's share being the rest;
- "four-row warps": chunks of 256 steps (forward; 128 backward) over tiles of 64 channels, so a grid has
  twice the tiles and each tile half the chunks (``chunk_shape.py`` has it too);
- "window 16": each thread reads 8 slots a round instead of 4 (``R0`` of ``ChunkBlock``).
The patched variants compile the library's kernel source with one line replaced (the script stops if
that line is not found) into a module of their own.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
from chunk_shape import shape_settings  # noqa: E402

CASES = ["bf16:1x262144x256", "bf16:1x32768x1024", "bf16:2x131072x512", "bf16:4x4096x1024", "bf16:8x4096x2048",
         "bf16:4x2048x512", "f32:1x262144x256", "f32:8x4096x2048"]

# (variant, source line as the library has it, the line the variant compiles instead)
PATCHES = {
    "no look-back (bound)": ("        if (c > 0) {\n", "        if (false) {  // bound: carry 0, no walk\n"),
    "window 16": ("    static constexpr int R0 = sizeof(Acc) == 8 ? 2 : 4;\n",
                  "    static constexpr int R0 = sizeof(Acc) == 8 ? 2 : 8;\n"),
}


def library():
    """(NVRTC module, chunk engine launcher module, a function that drops cached plans), under the
    library's current module names.  Re-point here after a rename."""
    from hgrn_cupy import nvrtc, plans
    from hgrn_cupy.engines import chunk

    return nvrtc, chunk, plans._plans.clear


def patched_source(nvrtc, chunk, name):
    """Settings that compile chunk.cu with PATCHES[name] applied, as a module of its own."""
    old, new = PATCHES[name]
    text = nvrtc.read_source(chunk.SOURCE)
    if text.count(old) != 1:
        sys.exit(f"chunk_lookback.py: the line patched for {name!r} is not in {chunk.SOURCE} once: {old!r}")
    sources = dict(nvrtc._sources)
    sources[chunk.SOURCE] = text.replace(old, new)
    tag = "-DHC_EXPERIMENT_" + "".join(ch if ch.isalnum() else "_" for ch in name).upper()  # a module key apart
    return [(nvrtc, "_sources", sources), (chunk, "OPTIONS", chunk.OPTIONS + (tag,))]


def main():
    nvrtc, chunk, forget = library()
    args, timer, gbps, hc = c.start(__doc__, "Chunk engine look-back", CASES, "bf16:4x2048x512",
                                    'engine forced: chunk_hgrn and hgrn_backward(engine="chunk")')
    variants = {"as shipped": [],
                "no look-back (bound)": patched_source(nvrtc, chunk, "no look-back (bound)"),
                "four-row warps": shape_settings(chunk, fwd=(8, 4, 8), bwd=(8, 4, 4)),
                "window 16": patched_source(nvrtc, chunk, "window 16")}
    c.run(args, timer, gbps, variants, c.engine_calls(hc, "chunk"), forget, unchecked=("no look-back (bound)",))


if __name__ == "__main__":
    main()
