#!/usr/bin/env python
"""What the look-back and each other phase cost the chunk engine, and two ways to shorten the look-back
where a grid has few tiles.

    python benchmarks/experiments/chunk_lookback.py [--group lookback|rows|phases] [--cases ...] [--smoke]

A tile's chunks are chained by the look-back: a block whose predecessors have published only their
aggregates walks back over them, WINDOW slots a round (each round one trip to L2), until it meets an
inclusive prefix.  Where a grid has few tiles, the predecessor started a few blocks earlier and is still
walking itself, so walks are long; the more bandwidth a card has, the more chunks a tile must finish per
microsecond, and the longer the walks get.

Groups:
- lookback (both passes): "no look-back (bound)", every chunk takes carry 0 and publishes nothing before
  its inclusive prefix (wrong results, timed only: what the other phases cost); "four-row warps", chunks
  of 256 steps (forward; 128 backward) over tiles of 64 channels, so a grid has twice the tiles and each
  tile half the chunks (``chunk_shape.py`` has it too); "window 16", each thread reads 8 slots a round
  instead of 4 (``R0`` of ``ChunkBlock``).
- rows (both passes): on grids of one, two, four and eight two-row tiles (the few-tile shapes where the
  look-back weighs most), the library as shipped (the 16-bit backward takes four-row warps up to
  NARROW_BWD_MAX_TILES tiles) against two-row warps everywhere and four-row warps everywhere.
- phases (forward): bounds that take one phase away after another, all timed only: no look-back; then
  no first pass (the fold); then a second pass that writes x + g (the kernel's loads and stores in its
  tile pattern, with none of the recurrence: the memory schedule alone); and, apart, no look-back with
  exp(g) replaced by one FMA (what the exponentials cost on the special-function unit).
The patched variants compile the library's kernel source with lines replaced (the script stops if a
line is not found exactly once) into a module of their own.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
import _kernels as k  # noqa: E402
from chunk_shape import shape_settings  # noqa: E402

NO_LOOKBACK = ("        if (c > 0) {\n", "        if (false) {  // bound: carry 0, no walk\n")
NO_FOLD = [("    if (interior) fwd_fold<false>(", "    if (false) fwd_fold<false>("),
           ("    else fwd_fold<true>(", "    else if (false) fwd_fold<true>(")]
ADD_ONLY = ("            h[k] = start ? b : a * h[k] + b;\n", "            h[k] = b + g[j].template get<Acc>(k);\n")
EXP_FMA = ('    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(g * 1.4426950408889634f));\n',
           "    r = fmaf(g, 0.125f, 1.0f);\n")
WINDOW_16 = ("    static constexpr int R0 = sizeof(Acc) == 8 ? 2 : 4;\n",
             "    static constexpr int R0 = sizeof(Acc) == 8 ? 2 : 8;\n")

# variant: the lines it replaces, (as the library has it, what the variant compiles instead)
PATCHES = {
    "no look-back (bound)": [NO_LOOKBACK],
    "window 16": [WINDOW_16],
    "no look-back, no fold (bound)": [NO_LOOKBACK] + NO_FOLD,
    "loads and stores alone (bound)": [NO_LOOKBACK] + NO_FOLD + [ADD_ONLY],
    "no look-back, exp as one FMA (bound)": [NO_LOOKBACK, EXP_FMA],
}
GROUPS = {
    "lookback": (["bf16:1x262144x256", "bf16:1x32768x1024", "bf16:2x131072x512", "bf16:4x4096x1024",
                  "bf16:8x4096x2048", "bf16:4x2048x512", "f32:1x262144x256", "f32:8x4096x2048"],
                 ["as shipped", "no look-back (bound)", "four-row warps", "window 16"]),
    "rows": (["bf16:1x524288x128", "bf16:1x262144x256", "bf16:1x65536x256", "f16:1x262144x256",
              "bf16:1x131072x512", "bf16:2x131072x256", "bf16:4x65536x256"],
             ["as shipped", "two-row backward everywhere", "four-row warps"]),
    "phases": (["bf16:1x262144x256", "bf16:1x32768x1024", "bf16:8x4096x2048", "bf16:4x2048x512",
                "f32:8x4096x2048"],
               ["as shipped", "no look-back (bound)", "no look-back, no fold (bound)",
                "loads and stores alone (bound)", "no look-back, exp as one FMA (bound)"]),
}


def library():
    """(NVRTC module, chunk engine launcher module, a function that drops cached plans), under the
    library's current module names.  Re-point here after a rename."""
    from hgrn_cupy import nvrtc, plans
    from hgrn_cupy.engines import chunk

    return nvrtc, chunk, plans._plans.clear


def patched_source(nvrtc, chunk, name, more=()):
    """Settings that compile chunk.cu with PATCHES[name] applied, then the (old, new) pairs ``more``, each
    line found once (``_common.patched_kernels``)."""
    return k.patched_kernels(nvrtc, [chunk.SOURCE], [(old, new, 1) for old, new in [*PATCHES[name], *more]],
                             f"chunk_lookback.py ({name})")


def main():
    nvrtc, chunk, forget = library()
    groups = {name: (cases,) for name, (cases, _) in GROUPS.items()}
    args, timer, gbps, hc = c.start(__doc__, "Chunk engine look-back and phases", None, "bf16:4x2048x512",
                                    'engine forced: chunk_hgrn and hgrn_backward(engine="chunk")', groups=groups,
                                    passes=lambda a: "fwd" if a.group == "phases" else "fwd,bwd")
    variants = {}
    for name in GROUPS[args.group][1]:
        if name == "as shipped":
            variants[name] = []
        elif name == "four-row warps":
            variants[name] = shape_settings(chunk, fwd=(8, 4, 8), bwd=(8, 4, 4))
        elif name == "two-row backward everywhere":
            variants[name] = [(chunk, "NARROW_BWD_MAX_TILES", 0)]
        else:
            variants[name] = patched_source(nvrtc, chunk, name)
    c.run(args, timer, gbps, variants, c.engine_calls(hc, "chunk"), forget,
          unchecked=[n for n in variants if n.endswith("(bound)")])


if __name__ == "__main__":
    main()
