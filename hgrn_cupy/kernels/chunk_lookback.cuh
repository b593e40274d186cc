// Chunk engine, the block-level machinery of hgrn_cupy/kernels/chunk.cu: the workspace (a header and one
// parity-marked slot per tile, chunk and channel), a block's count-in and place in the chunk order, the
// staggered first wave, the peek at the predecessor's slots, the carry-in by single-pass decoupled
// look-back, and the clearing of the previous launch's slots.
#pragma once
#include "common.cuh"

namespace hc {

// The workspace is a header and one slot per (tile, chunk, channel).  A slot holds the chunk's aggregate
// map, then its inclusive prefix as the map (0, h), in one access (8 bytes for float, 16 for double), so a
// reader sees a whole store or none of it and needs no flag and no fence.  A published a = 0 ends the walk
// back: the inclusive prefix is (0, h), and an aggregate with a = 0 (a sequence starts in the chunk, or a
// gate is 0) does not depend on earlier chunks either.
//
// Launches alternate in parity, and a slot is published for a launch when the sign bit of its a (never
// set in a map: a >= 0, NaNs stored as the canonical NaN) is the launch's parity and the rest of the
// word is not all ones; a slot of all one bits is unpublished for both parities.  The header's counter
// holds (launches << 32) + tickets taken - 1: one atomic gives a block its ticket and the parity, and
// the block that takes the last ticket advances the counter to the next launch.  Memory first filled with
// one bits is therefore ready for any number of launches in stream order, once each launch leaves every
// slot past its own (a later launch of the same parity could read them) unpublished: the header keeps the
// slot bytes of the last launch of each parity, and the blocks clear what the previous launch used beyond
// this one's extent.  The host may instead fill the whole workspace before each launch: then every launch
// is the first.
struct Header {
    unsigned long long count;    // starts at all ones: the first ticket is 0, of parity 0
    unsigned long long used[2];  // ~(slot bytes) of the last launch of each parity (all ones: none)
    unsigned long long pad;
};

template <typename Acc> struct Slot;
template <> struct Slot<float> {
    static constexpr int BYTES = 8;
    uint2 w;
    __device__ __forceinline__ static void store(void* p, Affine<float> m, unsigned parity) {
        unsigned a = __float_as_uint(m.a) & 0x7fffffffu;
        if (a > 0x7f800000u) a = 0x7fc00000u;  // a NaN
        asm volatile("st.global.cg.v2.u32 [%0], {%1, %2};" :: "l"(p), "r"(a | parity), "r"(__float_as_uint(m.b)) : "memory");
    }
    __device__ __forceinline__ void load(const void* p) {
        asm volatile("ld.volatile.global.v2.u32 {%0, %1}, [%2];" : "=r"(w.x), "=r"(w.y) : "l"(p) : "memory");
    }
    __device__ __forceinline__ void clear() { w.x = w.y = 0xffffffffu; }
    // parity: the launch's, in the sign bit.  A published word of either parity has its low 31 bits below
    // 0x7fffffff, so a word is this launch's exactly when, its sign flipped to 0, it reads below that.
    __device__ __forceinline__ bool ready(unsigned parity) const { return (w.x ^ parity) < 0x7fffffffu; }
    __device__ __forceinline__ Affine<float> map() const {
        Affine<float> m; m.a = __uint_as_float(w.x & 0x7fffffffu); m.b = __uint_as_float(w.y); return m;
    }
};
template <> struct Slot<double> {
    static constexpr int BYTES = 16;
    uint4 w;  // a (low, high word), b (low, high word); the parity in the sign bit of a's high word
    __device__ __forceinline__ static void store(void* p, Affine<double> m, unsigned parity) {
        unsigned long long a = (unsigned long long)__double_as_longlong(m.a) & 0x7fffffffffffffffull;
        const unsigned long long b = (unsigned long long)__double_as_longlong(m.b);
        if (a > 0x7ff0000000000000ull) a = 0x7ff8000000000000ull;  // a NaN
        asm volatile("st.global.cg.v4.u32 [%0], {%1, %2, %3, %4};"
                     :: "l"(p), "r"((unsigned)a), "r"((unsigned)(a >> 32) | parity), "r"((unsigned)b), "r"((unsigned)(b >> 32)) : "memory");
    }
    __device__ __forceinline__ void load(const void* p) {
        asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(w.x), "=r"(w.y), "=r"(w.z), "=r"(w.w) : "l"(p) : "memory");
    }
    __device__ __forceinline__ void clear() { w.x = w.y = w.z = w.w = 0xffffffffu; }
    __device__ __forceinline__ bool ready(unsigned parity) const { return (w.y ^ parity) < 0x7fffffffu; }
    __device__ __forceinline__ Affine<double> map() const {
        Affine<double> m;
        m.a = __longlong_as_double((long long)(((unsigned long long)(w.y & 0x7fffffffu) << 32) | w.x));
        m.b = __longlong_as_double((long long)(((unsigned long long)w.w << 32) | w.z));
        return m;
    }
};

// The block-level machinery shared by both directions.  Channel c of the tile (c = cl * VEC + k, cl the
// channel lane) is item i = k * LC + cl of the workspace and of shared memory, so that every access is
// coalesced.  In the block-wide phases SPLIT adjacent threads share an item: each takes its share of the
// groups, and of the predecessors in each round of the look-back, and the partial maps meet through
// shuffles.  Where the tile has more channels than the block has threads, a thread takes PER items.
template <typename Acc, int WARPS, int ROWS, int VEC>
struct ChunkBlock {
    static constexpr int LC = 32 / ROWS;                 // channel lanes of a warp row
    static constexpr int G = WARPS * ROWS;               // step groups of a chunk
    static constexpr int C = LC * VEC;                   // channels per tile
    static constexpr int NT = 32 * WARPS;                // threads per block
    static constexpr int SPLIT = NT > C ? NT / C : 1;    // threads per item (= G / VEC where > 1)
    static constexpr int PER = NT > C ? 1 : C / NT;      // items per thread
    static constexpr int GSHARE = G / SPLIT;             // groups one thread combines
    // Predecessor slots one thread reads per round of the look-back (all in flight at once; 4, halved for
    // float64: a round of 8 takes longer and the walk is no shorter, docs/performance.md, "Look-back: one
    // slot a map, marked with the launch's parity"), and the window the SPLIT threads of an item read together.
    static constexpr int R0 = sizeof(Acc) == 8 ? 2 : 4;
    static constexpr int R = R0 * SPLIT > 32 ? 32 / SPLIT : R0;
    static constexpr int WINDOW = R * SPLIT;
    static_assert(ROWS == 1 || ROWS == 2 || ROWS == 4, "a warp row is 32, 16 or 8 lanes");
    static_assert(WARPS > 0 && (WARPS & (WARPS - 1)) == 0, "WARPS: a power of two");
    static_assert(SPLIT <= 32 && GSHARE * SPLIT == G && WINDOW <= 32, "SPLIT divides the groups; a window fits a mask");
    Affine<Acc> part[G][C];                              // each group's map of each channel; then its carry-in
    unsigned ticket, parity;                             // parity: the launch's, in the sign bit
    unsigned long long counted, used[2];                 // from count_in, parked by thread 0

    // Count the block in: thread 0 adds one to the header's counter and asks for the header's record of the
    // last launches (`got`).  The count comes back with the launch's parity, and the block counted in last
    // (every other block has been counted by then) advances the counter to the next launch.  Nothing waits
    // for these before park(), which thread 0 reaches once its loads are in flight.
    struct Counted { unsigned long long count, used0, used1; };
    __device__ __forceinline__ static Counted count_in(Header* hdr) {
        Counted got = {0ull, 0ull, 0ull};
        if (threadIdx.x == 0 && threadIdx.y == 0) {
            got.count = atomicAdd(&hdr->count, 1ull) + 1ull;  // from all ones
            asm volatile("ld.global.cg.u64 %0, [%1];" : "=l"(got.used0) : "l"(&hdr->used[0]));
            asm volatile("ld.global.cg.u64 %0, [%1];" : "=l"(got.used1) : "l"(&hdr->used[1]));
        }
        return got;
    }
    // The launch's parity, in the sign bit, from a count that count_in returned.
    __device__ __forceinline__ static unsigned parity_of(unsigned long long count) {
        return ((unsigned)(count >> 32) & 1u) << 31;
    }
    // Thread 0 parks count_in's values in shared memory (the block reads them after the next barrier).
    __device__ __forceinline__ void park(const Counted& got) {
        if (threadIdx.x == 0 && threadIdx.y == 0) { counted = got.count; used[0] = got.used0; used[1] = got.used1; }
    }
    // Thread 0, before carry_in's first barrier, for a launch of `total` blocks: the parity into shared
    // memory, and the last block's duties: advance the counter, record this launch's slot bytes for the next.
    __device__ __forceinline__ void settle(Header* hdr, unsigned total, unsigned long long slot_bytes) {
        if (threadIdx.x == 0 && threadIdx.y == 0) {
            parity = parity_of(counted);
            if ((unsigned)counted == total - 1u) {
                atomicAdd(&hdr->count, (1ull << 32) - total);
                hdr->used[parity ? 1 : 0] = ~slot_bytes;
            }
        }
    }
    // Kernels of VEC >= INDEX_ORDER_VEC (16-bit vector kernels) take their chunk from the block index, the
    // others from an atomic ticket taken before their loads: the ticket's round trip delays the loads, yet
    // float32 ran faster with it (docs/performance.md, "Blocks in index order (16-bit vector kernels) or
    // ticket order (the rest)").
    static constexpr int INDEX_ORDER_VEC = 8;
    // The block's place in the order the chunks are handed out, so that a block only waits on blocks that
    // are running or done: its index where VEC >= INDEX_ORDER_VEC (the hardware dispatches blocks in
    // increasing index; nothing to wait for), else the count from count_in, which the block waits for.
    __device__ __forceinline__ static unsigned chunk_order(const Counted& got, ChunkBlock* sm) {
        if (VEC >= INDEX_ORDER_VEC) return blockIdx.x;
        if (threadIdx.x == 0 && threadIdx.y == 0) sm->ticket = (unsigned)got.count;
        __syncthreads();
        return sm->ticket;
    }
    // The first blocks of a launch all start at once, and their loads would all land together, leaving the
    // look-back and the stores of that first wave with nothing to overlap.  Where the host asks (`stagger`
    // > 0: half the blocks the GPU holds at once, the grid being larger), block k of the first wave
    // (stagger <= k < 2 * stagger) starts its loads only once block k - stagger has published its map, so
    // the second half of the wave loads while the first half looks back and stores.  Block k - stagger came
    // first in the order and publishes without waiting on anyone: no cycle.
    __device__ __forceinline__ static void stagger_start(const char* slots, const Counted& got, unsigned ticket,
                                                         unsigned stagger, unsigned ntiles, i64 nchunks) {
        if (ticket < stagger || ticket - stagger >= stagger) return;  // block-uniform
        if (threadIdx.x == 0 && threadIdx.y == 0) {
            const unsigned par = parity_of(got.count), k = ticket - stagger;
            const char* p = slots + ((i64)(k % ntiles) * nchunks + k / ntiles) * C * Slot<Acc>::BYTES;
            Slot<Acc> e;
            for (e.load(p); !e.ready(par); e.load(p)) __nanosleep(100);
        }
        __syncthreads();
    }
    // The block's last duty: leave unpublished what the previous launch (of the other parity) used past
    // this launch's `slot_bytes`, at most `capacity`: block `ticket` of `total` takes every total-th run of
    // NT 16-byte words (slot bytes are multiples of 256).
    __device__ __forceinline__ void finish(char* slots, unsigned ticket, unsigned total,
                                           unsigned long long slot_bytes, unsigned long long capacity) const {
        const unsigned long long previous = used[parity ? 0 : 1];
        const unsigned long long end = ~previous < capacity ? ~previous : capacity;
        const unsigned long long stride = 16ull * NT * total;
        for (unsigned long long b = slot_bytes + 16ull * ((unsigned long long)ticket * NT + threadIdx.y * 32 + threadIdx.x);
             b < end; b += stride)
            asm volatile("st.global.cg.v4.u32 [%0], {%1, %1, %1, %1};" :: "l"(slots + b), "r"(0xffffffffu) : "memory");
    }

    // The composition of the partial maps of the SPLIT adjacent lanes that share an item, every lane
    // getting it; the lane with the lower s holds the earlier stretch of time if LOW_EARLIER.
    template <bool LOW_EARLIER>
    __device__ __forceinline__ static Affine<Acc> join(Affine<Acc> m) {
#pragma unroll
        for (int off = 1; off < SPLIT; off <<= 1) {
            Affine<Acc> o;
            o.a = __shfl_xor_sync(0xffffffffu, m.a, off);
            o.b = __shfl_xor_sync(0xffffffffu, m.b, off);
            m = ((threadIdx.x & off) == 0) == LOW_EARLIER ? compose_reset(o, m) : compose_reset(m, o);
        }
        return m;
    }
    // The OR of a bit mask over the SPLIT lanes that share an item.
    __device__ __forceinline__ static unsigned join_bits(unsigned m) {
#pragma unroll
        for (int off = 1; off < SPLIT; off <<= 1) m |= __shfl_xor_sync(0xffffffffu, m, off);
        return m;
    }

    // Where `on`, the slots of chunk c - 1 of the tile whose chunk 0 is workspace slot slot0, as they stand
    // now (this thread's items); else unpublished.  A block asks for them right behind its own loads:
    // where that chunk's inclusive prefix is out by then, as it mostly is where the grid has more tiles
    // than a wave has blocks, the look-back needs no round trip.
    __device__ __forceinline__ static void peek(const char* slots, i64 slot0, i64 c, bool on, Slot<Acc>* pre) {
        const int i0 = (threadIdx.y * 32 + threadIdx.x) / SPLIT;
#pragma unroll
        for (int r = 0; r < PER; ++r) {
            pre[r].clear();
            if (on && c > 0)
                pre[r].load(slots + ((slot0 + c - 1) * C + i0 + r * (NT / SPLIT)) * Slot<Acc>::BYTES);
        }
    }

    // Given every thread's maps `mine` (one per channel it owns, group q, channel lane cl) for chunk c of
    // the tile whose chunk 0 is workspace slot slot0, and the slots `pre` from peek, set each mine[k].a to
    // the state before the thread's first step in channel k.
    __device__ void carry_in(char* slots, i64 slot0, i64 c, int q, int cl, Affine<Acc>* mine, const Slot<Acc>* pre) {
        const int tid = threadIdx.y * 32 + threadIdx.x, s = tid % SPLIT, i0 = tid / SPLIT;
        typedef Slot<Acc> S;
#pragma unroll
        for (int k = 0; k < VEC; ++k) part[q][k * LC + cl] = mine[k];
        __syncthreads();
        const unsigned par = parity;  // settled before the barrier
        Affine<Acc> share[PER], total[PER];  // the map of this thread's groups; of the whole chunk
#pragma unroll
        for (int r = 0; r < PER; ++r) {
            const int i = i0 + r * (NT / SPLIT);
            share[r].a = Acc(1); share[r].b = Acc(0);
#pragma unroll
            for (int k = 0; k < GSHARE; ++k) share[r] = compose_reset(part[s * GSHARE + k][i], share[r]);
            total[r] = join<true>(share[r]);
        }
        char* const mine_slot = slots + ((slot0 + c) * C + i0) * S::BYTES;
        Acc carry[PER];
#pragma unroll
        for (int r = 0; r < PER; ++r) carry[r] = Acc(0);
        if (c > 0) {
#pragma unroll
            for (int r = 0; r < PER; ++r)
                if (s == 0) S::store(mine_slot + r * (NT / SPLIT) * S::BYTES, total[r], par);
            // Each round the SPLIT lanes of an item read the slots of chunks j, j-1, ..., j-WINDOW+1 (lane s
            // takes R of them, all in flight at once) and fold the published run that starts at j, up to
            // and including the first inclusive prefix, which ends the walk.
            Affine<Acc> acc[PER];
            i64 j[PER];
            bool done[PER];
#pragma unroll
            for (int r = 0; r < PER; ++r) {
                acc[r].a = Acc(1); acc[r].b = Acc(0); j[r] = c - 1; done[r] = false;
                if (pre[r].ready(par) && pre[r].map().a == Acc(0)) {  // chunk c - 1's inclusive prefix, peeked
                    carry[r] = pre[r].map().b;
                    done[r] = true;
                }
            }
            for (;;) {
                bool all = true;
#pragma unroll
                for (int r = 0; r < PER; ++r) all = all && done[r];
                if (__all_sync(0xffffffffu, all)) break;
#pragma unroll
                for (int r = 0; r < PER; ++r) {
                    const char* p = slots + ((slot0 + j[r] - s * R) * C + i0 + r * (NT / SPLIT)) * S::BYTES;
                    S e[R];
                    unsigned ready = 0u, incl = 0u;
                    if (!done[r]) {
#pragma unroll
                        for (int k = 0; k < R; ++k)
                            if (j[r] - s * R - k >= 0) e[k].load(p - (i64)k * C * S::BYTES);
#pragma unroll
                        for (int k = 0; k < R; ++k) {
                            if (j[r] - s * R - k < 0) continue;
                            const bool ok = e[k].ready(par);
                            ready |= (unsigned)ok << (s * R + k);
                            incl |= (unsigned)(ok && e[k].map().a == Acc(0)) << (s * R + k);
                        }
                    }
                    ready = join_bits(ready);
                    incl = join_bits(incl);
                    const int nready = ~ready == 0u ? 32 : __ffs(~ready) - 1;  // at most WINDOW
                    const int first_inc = incl ? __ffs(incl) - 1 : 32;
                    const bool found = first_inc < nready;
                    const int nfold = found ? first_inc + 1 : nready;
                    Affine<Acc> m;
                    m.a = Acc(1); m.b = Acc(0);
#pragma unroll
                    for (int k = 0; k < R; ++k)
                        if (s * R + k < nfold) m = compose_reset(m, e[k].map());
                    m = join<false>(m);
                    if (!done[r]) {
                        acc[r] = compose_reset(acc[r], m);
                        if (found) {
                            carry[r] = acc[r].b;  // the inclusive prefix is (0, h): acc.a * h + acc.b
                            done[r] = true;
                        } else {
                            j[r] -= nready;
                            if (nready == 0) __nanosleep(64);
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int r = 0; r < PER; ++r) {
            if (s == 0) {
                Affine<Acc> inc;
                inc.a = Acc(0); inc.b = apply_reset(total[r], carry[r]);
                S::store(mine_slot + r * (NT / SPLIT) * S::BYTES, inc, par);
            }
        }
        // Walk the carry through the groups of this chunk; each group's carry-in replaces its map's a.
#pragma unroll
        for (int r = 0; r < PER; ++r) {
            const int i = i0 + r * (NT / SPLIT);
            Acc h = carry[r];
            if constexpr (SPLIT > 1) {  // first through the shares of the lanes before this one
                Affine<Acc> before = share[r];  // becomes the map of shares 0 .. s
#pragma unroll
                for (int off = 1; off < SPLIT; off <<= 1) {
                    Affine<Acc> o;
                    o.a = __shfl_up_sync(0xffffffffu, before.a, off, SPLIT);
                    o.b = __shfl_up_sync(0xffffffffu, before.b, off, SPLIT);
                    if (s >= off) before = compose_reset(before, o);
                }
                Affine<Acc> o;
                o.a = __shfl_up_sync(0xffffffffu, before.a, 1, SPLIT);
                o.b = __shfl_up_sync(0xffffffffu, before.b, 1, SPLIT);
                if (s > 0) h = apply_reset(o, h);
            }
#pragma unroll
            for (int k = 0; k < GSHARE; ++k) {
                const Affine<Acc> m = part[s * GSHARE + k][i];
                part[s * GSHARE + k][i].a = h;
                h = apply_reset(m, h);
            }
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < VEC; ++k) mine[k].a = part[q][k * LC + cl].a;
    }
};

}  // namespace hc
