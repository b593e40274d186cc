#!/usr/bin/env python
"""The cache hints of every load and store the engines make (``Word`` in ``kernels/common.cuh``), each
against the streaming hints they ship with.

    python benchmarks/experiments/cache_hints.py [--group chunk|fused|chunk-more] [--cases ...] [--smoke]

Why: with no recurrence, the chunk forward's geometry moves its bytes at 1.05-1.07x the copy floor with
plain loads and stores and at 1.12-1.15x with the streaming ``.cs`` ones (``stream_schedule.py --group
habits``, "+hints").  Variants (the whole library's ``Word``, so both engines, both directions):
- "ld.cs st.cs": as shipped (``__ldcs`` / ``__stcs``: evict first);
- "ld.nc st.cs": loads through the read-only path (``__ldg``), stores streaming;
- "ld.cs st": streaming loads, plain stores;
- "ld.nc st": both plain;
- "ld.nc st, no L2 prefetch": both plain and the chunk engine's L2 prefetch off (``L2_AHEAD`` = 0), which
  was measured to pay for itself with the streaming hints.
Group chunk-more (the chunk engine's 16-byte accesses alone, against the shipped ones):
- "ld.cs.L2::256B": streaming loads that ask L2 for the whole 256-byte block around each;
- "ld.lu": loads marked last use;
- "st.cg": stores cached in L2 only, not streaming;
- "ld.cs.L2::256B, no L2 prefetch": the larger L2 fetch in place of the prefetch of a later block;
- "prefetch evict_normal": the L2 prefetch of a later block without the evict-last priority.
Each variant compiles the engines' sources with the lines replaced (the script stops if a line is not
found as often as expected) into modules of its own.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
import _kernels as k  # noqa: E402

# The helper every plain store goes through, defined where Word is declared.
PLAIN_STORE = ("template <int BYTES> struct Word;\n",
               "template <typename V> __device__ __forceinline__ void hc_st_plain(V* p, V v) { *p = v; }\n"
               "template <int BYTES> struct Word;\n")
# (old, new, occurrences in each source): the four widths of Word
NC_LOADS = [("__ldcs(", "__ldg(", 4)]
PLAIN_STORES = [(*PLAIN_STORE, 1), ("__stcs(", "hc_st_plain(", 4)]
# The 16-byte accesses with a PTX spelling of their own, defined where Word is declared.
WORD = "template <int BYTES> struct Word;\n"
ASM_ACCESS = ("#define HC_LD16(spell) __device__ __forceinline__ uint4 hc_ld16(const void* p) { uint4 v; "
              "asm(spell \" {%0, %1, %2, %3}, [%4];\" : \"=r\"(v.x), \"=r\"(v.y), \"=r\"(v.z), \"=r\"(v.w) : "
              "\"l\"(p)); return v; }\n"
              "#define HC_ST16(spell) __device__ __forceinline__ void hc_st16(void* p, uint4 v) { "
              "asm volatile(spell \" [%0], {%1, %2, %3, %4};\" :: \"l\"(p), \"r\"(v.x), \"r\"(v.y), \"r\"(v.z), "
              "\"r\"(v.w) : \"memory\"); }\n")
LD16 = ("__ldcs(static_cast<const uint4*>(p))", "hc_ld16(p)", 1)
ST16 = ("__stcs(static_cast<uint4*>(p), ", "hc_st16(p, ", 1)


def spelled(load="ld.global.cs.v4.u32", store="st.global.cs.v4.u32"):
    """Replacements that give Word<16> the PTX load and store ``load`` / ``store``."""
    return [(WORD, ASM_ACCESS + f'HC_LD16("{load}")\nHC_ST16("{store}")\n' + WORD, 1), LD16, ST16]


PREFETCH = ('asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(p));',
            'asm volatile("prefetch.global.L2 [%0];" ::"l"(p));', 1)
GROUPS = {
    "chunk": (["bf16:8x4096x2048", "bf16:1x262144x256", "bf16:1x32768x1024", "bf16:32x2048x4096",
               "bf16:4x4096x1024", "bf16:4x2048x512", "f32:8x4096x2048", "f32:1x262144x256"], "chunk"),
    "fused": (["bf16:8x4096x2048", "f32:8x4096x2048", "bf16:32x2048x4096", "f32:4x4096x1024"],
              "fused_recurrent"),
    "chunk-more": (["bf16:8x4096x2048", "bf16:1x262144x256", "bf16:1x32768x1024", "bf16:32x2048x4096",
                    "f32:8x4096x2048"], "chunk"),
}


def library():
    """(NVRTC module, the engines' launcher modules, a function that drops cached plans), under the
    library's current module names.  Re-point here after a rename."""
    from hgrn_cupy import nvrtc, plans
    from hgrn_cupy.engines import chunk, fused_recurrent

    return nvrtc, (chunk, fused_recurrent), plans._plans.clear


def hinted(nvrtc, engines, replacements):
    """Settings under which the engines' sources have ``replacements`` applied (``_common.patched_kernels``)."""
    return k.patched_kernels(nvrtc, [engine.SOURCE for engine in engines], replacements, "cache_hints.py")


def main():
    nvrtc, engines, forget = library()
    chunk = engines[0]
    groups = {name: (cases,) for name, (cases, _) in GROUPS.items()}
    args, timer, gbps, hc = c.start(__doc__, "Cache hints", None, "bf16:1x32768x1024",
                                    "engine forced: the group's, both directions", groups=groups)
    if args.group == "chunk-more":
        variants = {"ld.cs st.cs": [],
                    "ld.cs.L2::256B": hinted(nvrtc, [chunk], spelled(load="ld.global.cs.L2::256B.v4.u32")),
                    "ld.lu": hinted(nvrtc, [chunk], spelled(load="ld.global.lu.v4.u32")),
                    "st.cg": hinted(nvrtc, [chunk], spelled(store="st.global.cg.v4.u32")),
                    "prefetch evict_normal": hinted(nvrtc, [chunk], [PREFETCH])}
        variants["ld.cs.L2::256B, no L2 prefetch"] = variants["ld.cs.L2::256B"] + [(chunk, "L2_AHEAD", 0)]
    else:
        variants = {"ld.cs st.cs": [],
                    "ld.nc st.cs": hinted(nvrtc, engines, NC_LOADS),
                    "ld.cs st": hinted(nvrtc, engines, PLAIN_STORES),
                    "ld.nc st": hinted(nvrtc, engines, NC_LOADS + PLAIN_STORES)}
        variants["ld.nc st, no L2 prefetch"] = variants["ld.nc st"] + [(chunk, "L2_AHEAD", 0)]
    c.run(args, timer, gbps, variants, c.engine_calls(hc, GROUPS[args.group][1]), forget)


if __name__ == "__main__":
    main()
