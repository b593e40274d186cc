// Fused recurrent engine, the bulk walk's machinery (its kernel, fused_recurrent_bulk_fwd, is in
// fused_recurrent.cu): the tensor maps a launch carries, the mbarriers that count a window's arrival, and
// the bulk tensor copies (sm_90's tensor-memory accelerator) that bring windows of x and g into shared
// memory and take a warp's rows of o out of it.
//
// The bulk walk is the forward block walk (fused_block_walk.cuh: windows of W warps x S steps, the warps'
// maps meeting in shared memory) with its bytes moved by whole boxes: one thread asks for a window of x
// and of g (a box of W * S steps x 32 lanes of channels, one copy a tensor), STAGES windows a block in
// flight, and each warp sends its S rows of o by one copy from shared memory.  Steps and channels outside
// the tensor arrive as zeros (the maps' out-of-bounds fill; x = 0, g = 0 is the identity map, so the fold
// checks nothing) and the copies of o clip them, so no step is checked at all.  Where it beats the register
// and staged walks depends on the grid and the card, so the tuner measures it (docs/performance.md,
// "Block-walk staged forward": the tensor-map walk).
#pragma once
#include "fused_block_walk.cuh"

// Windows in shared memory a block, per lane width (bytes): the launcher passes the values it sizes the
// launch's shared memory with.
#ifndef HC_BULK_STAGES_4
#error "HC_BULK_STAGES_4 is set by the launcher (hgrn_cupy/engines/fused_recurrent.py)"
#endif
#ifndef HC_BULK_STAGES_8
#error "HC_BULK_STAGES_8 is set by the launcher (hgrn_cupy/engines/fused_recurrent.py)"
#endif

namespace hc {

struct alignas(64) TensorMap {  // a CUtensorMap: 128 bytes the host encodes (nvrtc.tensor_map)
    unsigned long long v[16];
};
// A launch's maps of x, g and o over [N, T, D] (dimensions D, T, N, innermost first): boxes of a window
// (x, g: WIN steps x C channels), of a warp's rows (o: S steps x C channels) and of one row (row, over o).
// No copy is given a negative step (on an H200 such copies stopped the walk with an illegal
// instruction): a reverse walk's box that would begin before step 0 begins at 0 and the rows it misses
// are the identity (take's shift), and a warp whose rows begin before step 0 sends them one a copy.
struct alignas(64) BulkMaps {
    TensorMap x, g, o, row;
};

template <typename TX, typename TG, int VEC>
struct BulkWalk : BlockWindow<TX, TG, VEC> {
    typedef BlockWindow<TX, TG, VEC> Window;
    using Window::W; using Window::S; using Window::C; using Window::WIN;
    static constexpr int BYTES = Pack<TX, VEC>::BYTES, WORDS = BYTES / 4, ROW = 32 * BYTES, BOX = WIN * ROW;
    static_assert(BYTES == Pack<TG, VEC>::BYTES && (BYTES == 4 || BYTES == 8), "lanes of 4 or 8 bytes of each input");
    static constexpr int STAGES = BYTES == 8 ? HC_BULK_STAGES_8 : HC_BULK_STAGES_4;
    // Dynamic shared memory: STAGES windows of x and g (2 * BOX each), then two buffers of S rows of o a
    // warp (W * 2 * S * ROW = 2 * BOX).
    static constexpr int SHARED_BYTES = (2 * STAGES + 2) * BOX;

    static __device__ __forceinline__ unsigned at(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
    // Thread 0, once: the stages' barriers, each expecting one arrival (the thread that asks for a window).
    static __device__ __forceinline__ void init(unsigned long long* bar) {
        for (int s = 0; s < STAGES; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(at(bar + s)) : "memory");
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    // Thread 0: the box of x and of g whose first step is t0 into `dst`, counted on `bar`.  Where the stage
    // was read before, the caller has passed a barrier since; the fence orders those reads before the copy.
    static __device__ __forceinline__ void fetch(const BulkMaps* maps, void* dst, unsigned long long* bar, int c0,
                                                 int t0, int n) {
        const unsigned b = at(bar), d = at(dst);
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(2 * BOX) : "memory");
        asm volatile(
            "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];"
            ::"r"(d), "l"(&maps->x), "r"(c0), "r"(t0), "r"(n), "r"(b) : "memory");
        asm volatile(
            "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];"
            ::"r"(d + BOX), "l"(&maps->g), "r"(c0), "r"(t0), "r"(n), "r"(b) : "memory");
    }
    // Every thread: until the copy counted on `bar` in its phase `parity` has landed.
    static __device__ __forceinline__ void wait(unsigned long long* bar, unsigned parity) {
        unsigned done = 0;
        while (!done) {
            asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
                         : "=r"(done) : "r"(at(bar)), "r"(parity) : "memory");
        }
    }
    // This thread's words of logical step j of its warp from the stage at `src` (rows in physical order:
    // reversed where the walk runs backwards, the box then starting `shift` rows late; a step whose row
    // falls before the box is the identity, x = 0 and g = 0).
    static __device__ __forceinline__ void take(const unsigned char* src, int reverse, int shift,
                                                Pack<TX, VEC> (&x)[S], Pack<TG, VEC> (&g)[S]) {
        const int w = threadIdx.y, lane = threadIdx.x;
#pragma unroll
        for (int j = 0; j < S; ++j) {
            const int r = reverse ? WIN - 1 - (w * S + j) - shift : w * S + j;
            const bool in = r >= 0;
            const unsigned* xs = (const unsigned*)(src + r * ROW) + lane * WORDS;
            const unsigned* gs = (const unsigned*)(src + BOX + r * ROW) + lane * WORDS;
#pragma unroll
            for (int q = 0; q < WORDS; ++q) { x[j].u[q] = in ? xs[q] : 0u; g[j].u[q] = in ? gs[q] : 0u; }
        }
    }
    // The warp's S rows of o (logical steps j, rows physical) from registers through `buf` to global memory
    // as one copy whose first step is t0 (rows before step 0, in reverse, go one a copy from step 0): lane
    // 0 waits until the copy that last used `buf` has read it, every lane writes its words and fences them
    // for the copy, lane 0 asks for it.
    static __device__ __forceinline__ void put(const Pack<TX, VEC> (&out)[S], unsigned char* buf, int reverse,
                                               const BulkMaps* maps, int c0, int t0, int n) {
        const int lane = threadIdx.x;
        if (lane == 0) asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
        __syncwarp();
#pragma unroll
        for (int j = 0; j < S; ++j) {
            unsigned* dst = (unsigned*)(buf + (reverse ? S - 1 - j : j) * ROW) + lane * WORDS;
#pragma unroll
            for (int q = 0; q < WORDS; ++q) dst[q] = out[j].u[q];
        }
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncwarp();
        if (lane == 0) {
            if (t0 >= 0) {
                asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%1, %2, %3}], [%4];"
                             ::"l"(&maps->o), "r"(c0), "r"(t0), "r"(n), "r"(at(buf)) : "memory");
            } else {
                for (int p = -t0; p < S; ++p)
                    asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%1, %2, %3}], [%4];"
                                 ::"l"(&maps->row), "r"(c0), "r"(t0 + p), "r"(n), "r"(at(buf + p * ROW)) : "memory");
            }
            asm volatile("cp.async.bulk.commit_group;" ::: "memory");
        }
    }
    // Lane 0 of each warp, last: its copies of o have completed.
    static __device__ __forceinline__ void drain() {
        if (threadIdx.x == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    }
};

}  // namespace hc
