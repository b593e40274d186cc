#!/usr/bin/env python
"""The chunk kernels with some of their words in shared memory: more resident blocks for the same chunks.

    python benchmarks/experiments/chunk_stage.py [--cases ...] [--smoke]

The shipped kernels hold a thread's words (forward: 8 steps of x and g; backward: 4 of g, do and o) in
registers, two blocks of 8 warps a SM; between its words landing and its stores a block folds, meets its
warps and looks back, and at two blocks a SM every microsecond of that costs 18-25% (docs/performance.md,
"Waiting after the loads land").  Shorter chunks for more blocks lost (``chunk_shape.py --group
resident``: longer look-back chains, spills).  Here the chunks stay as they are and words move to dynamic
shared memory (``cp.async.cg``), so that the kernels fit three blocks a SM (80 registers), the split of L1
and shared memory set to hold them: the forward is the library's staged forward (``chunk.prepare(staged=
True)``, the tuner's variant "chunk, staged gate words": g staged, x in registers, 32 KB a block); the
backward stages its words of o (the previous states h[u-1], which only its second pass reads; 16 KB a
block) by a patch of its source and keeps g and do in registers.  Variants, both directions:

- "staged, 3 blocks": the above;
- "staged, 3 blocks, no look-back (bound)": the same with every carry-in 0 (timed only), what the
  look-back still costs it.

The backward's scalar kernels copy their words to shared memory synchronously (not timed here), and the
16-bit backward's four-row module (NARROW_BWD) keeps two blocks a SM.  Before the table every checked
variant runs on odd shapes (T not a multiple of a chunk, with states in and out, in time order and
reversed) with its outputs poisoned first, against the shipped kernels; in the table each is checked
against them again on the case's first input set.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
import _kernels as k  # noqa: E402
from chunk_lookback import NO_LOOKBACK  # noqa: E402
from chunk_shape import library  # noqa: E402

CASES = ["bf16:8x4096x2048", "bf16:1x262144x256", "bf16:1x32768x1024", "bf16:32x2048x4096",
         "bf16:4x4096x1024", "bf16:4x2048x512", "f32:8x4096x2048", "f32:1x32768x1024"]

# The backward's staged words of o: thread-major per step, so that a warp's 16-byte copies and reads are
# conflict-free (the scalar kernels copy theirs synchronously).
STAGED_O = r"""
#ifndef HC_STAGE_BLOCKS
#define HC_STAGE_BLOCKS 2
#endif
// Experiment (benchmarks/experiments/chunk_stage.py): a thread's words of o in dynamic shared memory.
template <typename T, int VEC> struct StagedO {
    typedef Pack<T, VEC> P;
    P* base;
    int stride;
    __device__ __forceinline__ explicit StagedO(int nt) : stride(nt) {
        extern __shared__ __align__(16) unsigned char hc_stage[];
        base = reinterpret_cast<P*>(hc_stage) + (threadIdx.y * 32 + threadIdx.x);
    }
    __device__ __forceinline__ void fetch(int j, const T* p, bool in) {
        if constexpr (P::BYTES == 16) async_copy<16>(base + j * stride, p, in);
        else { P w; w.clear(); if (in) w.load(p); base[j * stride] = w; }
    }
    __device__ __forceinline__ P operator[](int j) const {
        P r;
        if constexpr (P::BYTES == 16) {
            const uint4 v = *reinterpret_cast<const uint4*>(base + j * stride);
            r.u[0] = v.x; r.u[1] = v.y; r.u[2] = v.z; r.u[3] = v.w;
        } else {
            r = base[j * stride];
        }
        return r;
    }
};

"""

BWD_HEAD = ("template <typename TX, typename TG, bool VARLEN, int VEC>\n"
            "__global__ void __launch_bounds__(32 * Shape<1, VEC>::WARPS, Shape<1, VEC>::MIN_BLOCKS) chunk_bwd(\n")
PATCHES = [
    # the backward: the previous states h[u-1] (o), which only pass 2 reads, staged; launch bounds from
    # HC_STAGE_BLOCKS
    ("template <bool CHECKED, typename Acc, typename TX, typename TG, bool VARLEN, int VEC, int STEPS>\n"
     "__device__ __forceinline__ void bwd_scan(", "template <bool CHECKED, typename Acc, typename TX, typename TG, "
     "bool VARLEN, int VEC, int STEPS, typename HW>\n__device__ __forceinline__ void bwd_scan(", 1),
    ("const Pack<TX, VEC> (&dout)[STEPS], const Pack<TX, VEC> (&hprev)[STEPS],",
     "const Pack<TX, VEC> (&dout)[STEPS], const HW& hprev,", 1),
    ("            Pack<TX, VEC> dxo;\n", "            const auto hj = hprev[j];\n            Pack<TX, VEC> dxo;\n", 1),
    (": hprev[j].template get<Acc>(k);", ": hj.template get<Acc>(k);", 1),
    (BWD_HEAD, STAGED_O + BWD_HEAD.replace("Shape<1, VEC>::MIN_BLOCKS", "VEC == 1 ? 1 : HC_STAGE_BLOCKS"), 1),
    ("    Pack<TX, VEC> dr[STEPS], orr[STEPS];\n",
     "    Pack<TX, VEC> dr[STEPS];\n    StagedO<TX, VEC> orr(32 * Shape<1, VEC>::WARPS);\n", 1),
    ("        gr[j].clear(); dr[j].clear(); orr[j].clear();\n", "        gr[j].clear(); dr[j].clear();\n"
     "        bool want = false;\n", 1),
    ("                if (!first) orr[j].load(oq);\n            }\n        }\n        gq += sgt; dq += sdot; oq += sot;\n    }\n",
     "                want = !first;\n            }\n        }\n        orr.fetch(j, want ? oq : o, want);\n"
     "        gq += sgt; dq += sdot; oq += sot;\n    }\n    async_commit();\n", 1),
    ("    if (interior)\n        bwd_scan<false>(", "    async_wait<0>();\n    if (interior)\n        bwd_scan<false>(", 1),
]


class StagedLaunch:
    """Stands in for ``hgrn_cupy.nvrtc`` in the chunk launcher: the backward kernels get the dynamic shared
    memory of their staged words, the split of L1 and shared memory that holds ``blocks`` of them a SM,
    and the occupancy (for the stagger) with that memory counted."""

    def __init__(self, real, shapes, blocks):
        self._real, self._shapes, self._blocks, self._staged = real, shapes, blocks, {}

    def __getattr__(self, name):
        return getattr(self._real, name)

    def get_function(self, source, names, name, device, options=()):
        fn = self._real.get_function(source, names, name, device, options)
        if "chunk_bwd<" in name:
            wide = not name.endswith(", 1>")
            warps, _, steps = self._shapes[1, wide]
            self._staged[fn.ptr] = steps * 32 * warps * (16 if wide else 8)
        return fn

    def prefer_shared(self, fn, percent):
        if fn.ptr not in self._staged:
            return self._real.prefer_shared(fn, percent)
        from cupy.cuda import runtime
        self._real.hold_shared(fn, self._staged[fn.ptr], self._blocks, runtime.getDevice())

    def blocks_at_once(self, fn, threads, device, dynamic=0):
        return self._real.blocks_at_once(fn, threads, device, self._staged.get(fn.ptr, dynamic))

    def bind(self, fn, grid, block, device, tail_words=1, shared=0, head_words=1):
        return self._real.bind(fn, grid, block, device, tail_words, self._staged.get(fn.ptr, shared), head_words)


def staged(chunk, blocks, more=()):
    """Settings under which the chunk forward is the library's staged one (``chunk.prepare(staged=True)``) and
    the backward stages its words of o, compiled and launched for ``blocks`` blocks a SM, with the
    replacements ``more`` besides."""
    from hgrn_cupy import nvrtc

    who = f"chunk_stage.py ({blocks} blocks)"
    prepare = chunk.prepare
    return k.patched_kernels(nvrtc, [chunk.SOURCE], PATCHES + [(old, new, 1) for old, new in more], who) + [
        (chunk, "OPTIONS", chunk.OPTIONS + (f"-DHC_STAGE_BLOCKS={blocks}",)),
        (chunk, "nvrtc", StagedLaunch(nvrtc, chunk.SHAPES, blocks)),
        (chunk, "prepare", lambda *args, **kw: prepare(*args, **{**kw, "staged": True}))]


ODD = ["bf16:3x1000x1000", "f32:2x777x520", "bf16:1x129x8"]


def check(torch, hc, variants, forget, unchecked):
    """Every variant not in ``unchecked`` against the first on ODD, forward (with h0 and ht) and backward (with
    h0 and dht), in time order and reversed, outputs poisoned (every byte one) so that an element left
    unwritten reads NaN; exits on a mismatch."""
    from hgrn_cupy import arrays

    for text in ODD:
        case = c.Case(text)
        s = c.make_sets(torch, case, count=1)[0]
        h0, dht = (torch.randn(case.B, case.D, device=s["x"].device, dtype=torch.float32) for _ in range(2))
        for reverse in (False, True):
            ref = None
            for name, settings in variants.items():
                if name in unchecked:
                    continue
                with c.patched(*settings, (arrays, "poison", True)):
                    forget()
                    o, ht = hc.chunk_hgrn(s["x"], s["g"], h0, True, reverse=reverse)
                    grads = hc.hgrn_backward(s["g"], o, s["do"], dht, h0, reverse=reverse, engine="chunk")
                    out = (o, ht) + tuple(grads)
                    torch.cuda.synchronize()
                    forget()
                ref = ref or out
                err = max(c.rel_err(a, b) for a, b in zip(out, ref))
                if not err < c.TOL[case.dtype]:  # NaN fails too
                    sys.exit(f"{name} on {text} (reverse={reverse}): rel err {err:.3g}")
    print(f"checked: {', '.join(n for n in variants if n not in unchecked)} on {', '.join(ODD)}, forward and "
          "backward, in time order and reversed\n")


def main():
    chunk, forget = library()
    args, timer, gbps, hc = c.start(__doc__, "Chunk kernels with staged words", CASES, "bf16:1x32768x1024",
                                    'engine forced: chunk_hgrn and hgrn_backward(engine="chunk")')
    bound = "staged, 3 blocks, no look-back (bound)"
    variants = {"as shipped": [], "staged, 3 blocks": staged(chunk, 3), bound: staged(chunk, 3, [NO_LOOKBACK])}
    check(timer.torch, hc, variants, forget, (bound,))
    c.run(args, timer, gbps, variants, c.engine_calls(hc, "chunk"), forget, unchecked=(bound,))


if __name__ == "__main__":
    main()
