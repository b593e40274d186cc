// Memory schedules for the chunk engine, with no recurrence: o = x + g over [B, T, D], moved in the chunk
// engine's geometry (stream_schedule.py times them against torch.add).  An item is one chunk of S steps
// of one tile (SEG bytes of one batch row's channels); items are numbered chunk-major (item i: chunk
// i / ntiles, tile i % ntiles), the order the chunk kernels hand chunks out in.  A block is 8 warps; a
// warp is 32 / LC rows of LC lanes, a lane moves one 16-byte word a row, so SEG = 16 * LC; row slot q
// (of G = 8 * 32 / LC) owns steps q * STEPS .. q * STEPS + STEPS - 1 of the item, as in chunk.cu.
//
//   stream_blocks  one block an item, every word in registers (the shipped schedule's shape); MODE adds
//                  the shipped kernel's habits one by one: MODE_SYNC a block barrier between the loads and
//                  the stores (the shipped carry-in has two), MODE_HINTS streaming loads and stores
//                  (ld/st.global.cs, as the library's Word), MODE_PREFETCH an L2 prefetch (evict-last) of
//                  the rows of the item PREFETCH_AHEAD later (as the shipped L2_AHEAD), MODE_DELAY a wait
//                  of about DELAY_NS between the loads and the stores (as a look-back's); MODE_LD_CS and
//                  MODE_ST_CS the streaming hint of the loads or of the stores alone; MODE_LANDED a wait of
//                  about DELAY_NS (three times that with MODE_LONG) that starts once the block's words have
//                  landed (MODE_DELAY's starts as the loads go out, so it overlaps their flight), as the
//                  chunk kernel's fold, meeting of warps and look-back do;
//   stream_regpipe persistent blocks that load their next item while they add and store this one;
//   stream_cpasync persistent blocks whose next items come into shared memory by each thread's own
//                  16-byte copies (cp.async) while they add and store this one;
//   stream_tma     persistent blocks, one a SM, whose next STAGES items are on their way into shared
//                  memory by bulk copies (cp.async.bulk, sm_90) while they add and store this one: one
//                  copy a row, or, with CONTIG (the host checks that a row is one segment, D * itemsize
//                  = SEG), one copy a tensor and item.
//
// Compiled after the library's kernels/common.cuh (hc::async_copy and its group calls, for stream_cpasync),
// which stream_schedule.py puts in front of this text.

namespace ss {

typedef long long i64;

struct Bf16 {
    __device__ __forceinline__ static unsigned pack(float f) {
        unsigned u = __float_as_uint(f);
        return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    }
    __device__ __forceinline__ static unsigned add2(unsigned a, unsigned b) {
        const float lo = __uint_as_float(a << 16) + __uint_as_float(b << 16);
        const float hi = __uint_as_float(a & 0xffff0000u) + __uint_as_float(b & 0xffff0000u);
        return pack(lo) | (pack(hi) << 16);
    }
    __device__ __forceinline__ static uint4 add(uint4 a, uint4 b) {
        return make_uint4(add2(a.x, b.x), add2(a.y, b.y), add2(a.z, b.z), add2(a.w, b.w));
    }
};

struct F32 {
    __device__ __forceinline__ static unsigned add1(unsigned a, unsigned b) {
        return __float_as_uint(__uint_as_float(a) + __uint_as_float(b));
    }
    __device__ __forceinline__ static uint4 add(uint4 a, uint4 b) {
        return make_uint4(add1(a.x, b.x), add1(a.y, b.y), add1(a.z, b.z), add1(a.w, b.w));
    }
};

constexpr int WARPS = 8;

// Where item `item` lies and where this thread's rows of it are.
template <int LC, int STEPS> struct Place {
    static constexpr int SEG = 16 * LC;
    static constexpr int G = WARPS * (32 / LC);
    static constexpr int S = G * STEPS;
    i64 base;  // byte offset of the item's first row, this lane's word
    i64 t0;    // the item's first step
    int q, lane;
    __device__ __forceinline__ Place(i64 item, i64 ntiles, i64 tiles_per_row, i64 T, i64 row_bytes) {
        const i64 chunk = item / ntiles, tile = item % ntiles;
        const i64 b = tile / tiles_per_row, seg = tile % tiles_per_row;
        lane = threadIdx.x % LC;
        q = threadIdx.y * (32 / LC) + threadIdx.x / LC;
        t0 = chunk * S;
        base = (b * T + t0) * row_bytes + seg * SEG + lane * 16;
    }
    // the item's row r (0 <= r < S) of this thread's j-th step, and whether it is inside T
    __device__ __forceinline__ int row(int j) const { return q * STEPS + j; }
};

constexpr int MODE_SYNC = 1, MODE_HINTS = 2, MODE_PREFETCH = 4, MODE_DELAY = 8, MODE_LD_CS = 16, MODE_ST_CS = 32,
              MODE_LANDED = 512, MODE_LONG = 1024;
constexpr int PREFETCH_AHEAD = 96;
constexpr unsigned DELAY_NS = 1000;

template <int LC, int STEPS, bool HINTS = false>
__device__ __forceinline__ void load(const char* x, const char* g, const Place<LC, STEPS>& p, i64 T, i64 row_bytes,
                                     uint4 (&xs)[STEPS], uint4 (&gs)[STEPS]) {
#pragma unroll
    for (int j = 0; j < STEPS; ++j) {
        const int r = p.row(j);
        if (p.t0 + r < T) {
            const i64 off = p.base + r * row_bytes;
            const uint4* xp = reinterpret_cast<const uint4*>(x + off);
            const uint4* gp = reinterpret_cast<const uint4*>(g + off);
            xs[j] = HINTS ? __ldcs(xp) : __ldg(xp);
            gs[j] = HINTS ? __ldcs(gp) : __ldg(gp);
        }
    }
}

template <typename E, int LC, int STEPS, bool HINTS = false>
__device__ __forceinline__ void store(char* o, const Place<LC, STEPS>& p, i64 T, i64 row_bytes,
                                      const uint4 (&xs)[STEPS], const uint4 (&gs)[STEPS]) {
#pragma unroll
    for (int j = 0; j < STEPS; ++j) {
        const int r = p.row(j);
        if (p.t0 + r < T) {
            uint4* op = reinterpret_cast<uint4*>(o + p.base + r * row_bytes);
            if (HINTS) __stcs(op, E::add(xs[j], gs[j]));
            else *op = E::add(xs[j], gs[j]);
        }
    }
}

// Ask L2 (evict-last) for this thread's rows of x and g of item `item`.
template <int LC, int STEPS>
__device__ __forceinline__ void prefetch(const char* x, const char* g, const Place<LC, STEPS>& p, i64 T,
                                         i64 row_bytes) {
#pragma unroll
    for (int j = 0; j < STEPS; ++j) {
        const int r = p.row(j);
        if (p.t0 + r < T) {
            const i64 off = p.base + r * row_bytes;
            asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(x + off));
            asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(g + off));
        }
    }
}

// MODE_LANDED's wait: about DELAY_NS (three times that with MODE_LONG), its length reading a word of every
// load of the thread's rows inside T, so that it starts once they have landed.
template <int MODE, int LC, int STEPS>
__device__ __forceinline__ void wait_landed(const Place<LC, STEPS>& p, i64 T, const uint4 (&xs)[STEPS],
                                            const uint4 (&gs)[STEPS]) {
    unsigned any = 0;
#pragma unroll
    for (int j = 0; j < STEPS; ++j)
        if (p.t0 + p.row(j) < T) any |= xs[j].x | gs[j].x;
    __nanosleep((MODE & MODE_LONG ? 3 : 1) * DELAY_NS + (any & 1u));
}

// grid (ntiles * nchunks,), block (32, WARPS)
template <typename E, int LC, int STEPS, int MINB, int MODE>
__global__ void __launch_bounds__(32 * WARPS, MINB)
stream_blocks(const char* __restrict__ x, const char* __restrict__ g, char* __restrict__ o, i64 T, i64 row_bytes,
              i64 ntiles, i64 nchunks, i64 tiles_per_row) {
    constexpr bool LD_CS = (MODE & (MODE_HINTS | MODE_LD_CS)) != 0, ST_CS = (MODE & (MODE_HINTS | MODE_ST_CS)) != 0;
    const Place<LC, STEPS> p(blockIdx.x, ntiles, tiles_per_row, T, row_bytes);
    uint4 xs[STEPS], gs[STEPS];
    load<LC, STEPS, LD_CS>(x, g, p, T, row_bytes, xs, gs);
    if ((MODE & MODE_PREFETCH) && blockIdx.x + PREFETCH_AHEAD < ntiles * nchunks)
        prefetch(x, g, Place<LC, STEPS>(blockIdx.x + PREFETCH_AHEAD, ntiles, tiles_per_row, T, row_bytes), T, row_bytes);
    if (MODE & MODE_DELAY) __nanosleep(DELAY_NS);
    if (MODE & MODE_LANDED) wait_landed<MODE>(p, T, xs, gs);
    if (MODE & MODE_SYNC) __syncthreads();
    store<E, LC, STEPS, ST_CS>(o, p, T, row_bytes, xs, gs);
}

// grid (persistent blocks,), block (32, WARPS): items blockIdx.x, + gridDim.x, ... with the next one's
// words in flight while this one is added and stored.
template <typename E, int LC, int STEPS, int MINB>
__global__ void __launch_bounds__(32 * WARPS, MINB)
stream_regpipe(const char* __restrict__ x, const char* __restrict__ g, char* __restrict__ o, i64 T, i64 row_bytes,
               i64 ntiles, i64 nchunks, i64 tiles_per_row) {
    const i64 total = ntiles * nchunks, stride = gridDim.x;
    i64 a = blockIdx.x;
    if (a >= total) return;
    uint4 xa[STEPS], ga[STEPS], xb[STEPS], gb[STEPS];
    Place<LC, STEPS> pa(a, ntiles, tiles_per_row, T, row_bytes);
    load(x, g, pa, T, row_bytes, xa, ga);
    for (;;) {
        const i64 b = a + stride;
        const Place<LC, STEPS> pb(b, ntiles, tiles_per_row, T, row_bytes);
        if (b < total) load(x, g, pb, T, row_bytes, xb, gb);
        store<E>(o, pa, T, row_bytes, xa, ga);
        if (b >= total) return;
        a = b + stride;
        pa = Place<LC, STEPS>(a, ntiles, tiles_per_row, T, row_bytes);
        if (a < total) load(x, g, pa, T, row_bytes, xa, ga);
        store<E>(o, pb, T, row_bytes, xb, gb);
        if (a >= total) return;
    }
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// grid (MINB blocks a SM, persistent), block (32, WARPS), dynamic shared memory STAGES * 2 * STEPS * 32 *
// WARPS words of 16 bytes: items blockIdx.x, + gridDim.x, ...; while a block adds and stores one item, its
// next STAGES - 1 are on their way into shared memory (cp.async.cg, each thread copying the words it will
// read itself, so no barrier guards a stage; rows past T arrive as zeros).  MODE_LANDED waits once the
// item's words have landed, as in stream_blocks.
template <typename E, int LC, int STEPS, int STAGES, int MINB, int MODE>
__global__ void __launch_bounds__(32 * WARPS, MINB)
stream_cpasync(const char* __restrict__ x, const char* __restrict__ g, char* __restrict__ o, i64 T, i64 row_bytes,
               i64 ntiles, i64 nchunks, i64 tiles_per_row) {
    typedef Place<LC, STEPS> P;
    extern __shared__ __align__(16) uint4 words[];
    constexpr int NT = 32 * WARPS;
    const int tid = threadIdx.y * 32 + threadIdx.x;
    const i64 total = ntiles * nchunks, stride = gridDim.x;
    // this thread's word of step j of tensor m (0: x, 1: g) in stage s
    auto word = [&](int s, int j, int m) { return &words[((s * STEPS + j) * 2 + m) * NT + tid]; };
    auto issue = [&](i64 item, int s) {
        if (item < total) {
            const P p(item, ntiles, tiles_per_row, T, row_bytes);
#pragma unroll
            for (int j = 0; j < STEPS; ++j) {
                const int r = p.row(j);
                const bool in = p.t0 + r < T;
                const i64 off = in ? p.base + r * row_bytes : 0;
#pragma unroll
                for (int m = 0; m < 2; ++m) hc::async_copy<16>(word(s, j, m), (m ? g : x) + off, in);
            }
        }
        hc::async_commit();  // one group an item, empty past the end
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) issue(blockIdx.x + s * stride, s);
    int k = 0;
    for (i64 item = blockIdx.x; item < total; item += stride, ++k) {
        issue(item + (STAGES - 1) * stride, (k + STAGES - 1) % STAGES);  // the stage this thread read last
        hc::async_wait<STAGES - 1>();  // this item's group has landed
        const int s = k % STAGES;
        uint4 xs[STEPS], gs[STEPS];
#pragma unroll
        for (int j = 0; j < STEPS; ++j) { xs[j] = *word(s, j, 0); gs[j] = *word(s, j, 1); }
        const P p(item, ntiles, tiles_per_row, T, row_bytes);
        if (MODE & MODE_LANDED) wait_landed<MODE>(p, T, xs, gs);
        store<E, LC, STEPS, true>(o, p, T, row_bytes, xs, gs);
    }
    hc::async_wait<0>();
}

__device__ __forceinline__ void bar_wait(unsigned bar, unsigned parity) {
    unsigned done;
    do {
        asm volatile("{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
                     "selp.u32 %0, 1, 0, p;\n\t}" : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    } while (!done);
}

// Warp 0 starts the bulk copies of item `item`'s rows of x and g into stage `stage` (x rows, then g rows):
// one a row, or where CONTIG (rows of one segment, so an item's rows are contiguous) one a tensor.
template <int LC, int STEPS, bool CONTIG>
__device__ __forceinline__ void issue(i64 item, i64 total, unsigned char* stage, unsigned bar, const char* x,
                                      const char* g, i64 T, i64 row_bytes, i64 ntiles, i64 tiles_per_row) {
    typedef Place<LC, STEPS> P;
    if (item >= total) return;
    const i64 chunk = item / ntiles, tile = item % ntiles;
    const i64 b = tile / tiles_per_row, seg = tile % tiles_per_row;
    const i64 t0 = chunk * P::S;
    const int rows = T - t0 < P::S ? (int)(T - t0) : P::S;
    const int lane = threadIdx.x;
    if (lane == 0)
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
                     :: "r"(bar), "r"(2 * rows * P::SEG) : "memory");
    __syncwarp();
    const i64 first = (b * T + t0) * row_bytes + seg * P::SEG;
    if constexpr (CONTIG) {
        if (lane < 2)
            asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                         :: "r"(smem_addr(stage + lane * P::S * P::SEG)), "l"((lane ? g : x) + first),
                            "r"(rows * P::SEG), "r"(bar) : "memory");
    } else {
        for (int r = lane; r < 2 * rows; r += 32) {
            const int row = r < rows ? r : r - rows;
            const char* src = (r < rows ? x : g) + first + row * row_bytes;
            const unsigned dst = smem_addr(stage + (r < rows ? 0 : P::S * P::SEG) + row * P::SEG);
            asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                         :: "r"(dst), "l"(src), "n"(P::SEG), "r"(bar) : "memory");
        }
    }
}

// grid (SMs,), block (32, WARPS), dynamic shared memory STAGES * 2 * S * SEG bytes.
template <typename E, int LC, int STEPS, int STAGES, bool CONTIG>
__global__ void __launch_bounds__(32 * WARPS, 1)
stream_tma(const char* __restrict__ x, const char* __restrict__ g, char* __restrict__ o, i64 T, i64 row_bytes,
           i64 ntiles, i64 nchunks, i64 tiles_per_row) {
    typedef Place<LC, STEPS> P;
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ __align__(8) unsigned long long bars[STAGES];
    constexpr int STAGE_BYTES = 2 * P::S * P::SEG;
    const i64 total = ntiles * nchunks, stride = gridDim.x;
    if (threadIdx.x == 0 && threadIdx.y == 0) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s)
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem_addr(&bars[s])) : "memory");
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (threadIdx.y == 0)
        for (int s = 0; s < STAGES; ++s)
            issue<LC, STEPS, CONTIG>(blockIdx.x + s * stride, total, smem + s * STAGE_BYTES, smem_addr(&bars[s]), x, g, T,
                             row_bytes, ntiles, tiles_per_row);
    int k = 0;
    for (i64 item = blockIdx.x; item < total; item += stride, ++k) {
        const int s = k % STAGES;
        const unsigned char* stage = smem + s * STAGE_BYTES;
        bar_wait(smem_addr(&bars[s]), (unsigned)(k / STAGES) & 1u);
        const P p(item, ntiles, tiles_per_row, T, row_bytes);
#pragma unroll
        for (int j = 0; j < STEPS; ++j) {
            const int r = p.row(j);
            if (p.t0 + r < T) {
                const uint4 xv = *reinterpret_cast<const uint4*>(stage + r * P::SEG + p.lane * 16);
                const uint4 gv = *reinterpret_cast<const uint4*>(stage + (P::S + r) * P::SEG + p.lane * 16);
                *reinterpret_cast<uint4*>(o + p.base + r * row_bytes) = E::add(xv, gv);
            }
        }
        __syncthreads();  // every thread has read stage s: it may be refilled
        if (threadIdx.y == 0)
            issue<LC, STEPS, CONTIG>(item + STAGES * stride, total, smem + s * STAGE_BYTES, smem_addr(&bars[s]), x, g, T,
                             row_bytes, ntiles, tiles_per_row);
    }
}

}  // namespace ss
