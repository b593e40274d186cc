// Chunk engine: time split into chunks that are scanned in parallel, in one pass over memory.
//
// grid  (ntiles * nchunks,)   a tile is LC * VEC channels of one batch row (of the packed row with varlen)
// block (32, WARPS)           a warp is ROWS rows of LC = 32 / ROWS lanes; lane = VEC consecutive channels.
//                             Row r of warp w is step group q = w * ROWS + r, which owns STEPS consecutive
//                             steps of the chunk: a chunk is G = WARPS * ROWS groups, G * STEPS steps.
// traffic per element: forward reads x, g and writes o; backward reads g, o, do and writes dx, dg
//   (plus one extra row per thread for the shifted gate).  Workspace: a header, then per (tile, chunk,
//   channel) one slot of 8 bytes (16 for float64), O(N * D * chunks), filled with ones once (kept memory,
//   which each launch leaves ready for the next) or before each launch.
//
// Every access of a thread is one VEC-channel word (16 bytes where the host found the tensors aligned,
// VEC = 1 otherwise), so the per-step work -- addresses, bounds, segment bookkeeping -- is paid once
// per VEC elements.  Each thread keeps its steps' raw words in registers: a first pass folds them into
// one affine map per channel, the groups' maps are combined in shared memory, the chunk's carry-in comes
// from a single-pass decoupled look-back, and a second pass recomputes each step from the raw words and
// writes the outputs.  Chunks strictly inside a dense row take a form without segment bookkeeping.
// The look-back reads slots that hold the map alone and the launch's parity (no flags, no fences, no
// tags; see "workspace and look-back"); SPLIT threads share a channel where the block
// has more threads than the tile has channels, each reading R predecessors per round, all in flight.
// Narrow tiles (ROWS > 1) make chunks longer in time for the same bytes: fewer chunks for the look-back
// to cross.  Blocks take chunk numbers in the order they start (their index, or an atomic ticket: see
// chunk_order), so a block only ever waits on blocks that are already running; where the host asks, each
// block also asks L2 for the rows of the block l2_ahead tickets later, and the second half of the first
// wave starts its loads as the first half's maps come out (stagger_start).  Segment starts (sequence
// starts, or t = 0) are steps with a = 0, which makes varlen and the initial state part of one scan.
#include "common.cuh"

namespace hc {

// Block shapes (warps per block, rows per warp, steps per thread) for each direction, scalar (VEC = 1,
// one row) and vector kernels; hgrn_cupy/chunk.py passes the values it launches with, so the two sides
// cannot disagree.
#ifndef HC_FWD_WARPS_1
#define HC_FWD_WARPS_1 4
#endif
#ifndef HC_FWD_STEPS_1
#define HC_FWD_STEPS_1 16
#endif
#ifndef HC_BWD_WARPS_1
#define HC_BWD_WARPS_1 16
#endif
#ifndef HC_BWD_STEPS_1
#define HC_BWD_STEPS_1 8
#endif
#ifndef HC_FWD_WARPS_V
#define HC_FWD_WARPS_V 8
#endif
#ifndef HC_FWD_STEPS_V
#define HC_FWD_STEPS_V 8
#endif
#ifndef HC_BWD_WARPS_V
#define HC_BWD_WARPS_V 8
#endif
#ifndef HC_BWD_STEPS_V
#define HC_BWD_STEPS_V 4
#endif

#ifndef HC_FWD_ROWS_V
#define HC_FWD_ROWS_V 2
#endif
#ifndef HC_BWD_ROWS_V
#define HC_BWD_ROWS_V 2
#endif

#ifndef HC_FWD_MIN_BLOCKS_V
#define HC_FWD_MIN_BLOCKS_V 2
#endif
#ifndef HC_BWD_MIN_BLOCKS_V
#define HC_BWD_MIN_BLOCKS_V 2
#endif
#ifndef HC_CHUNK_INTERIOR  // 0: every chunk takes the checked form (for comparisons)
#define HC_CHUNK_INTERIOR 1
#endif
#ifndef HC_INDEX_ORDER_VEC  // kernels with VEC at least this take a block's chunk from its index (blocks are
#define HC_INDEX_ORDER_VEC 8  //  dispatched in increasing order); the others from an atomic ticket, taken before
#endif                        //  the block's loads (measured: benchmarks/NOTES.md)
#ifndef HC_LOOKBACK_BATCH  // predecessor slots a thread reads per round (halved for float64)
#define HC_LOOKBACK_BATCH 4
#endif

template <int DIRECTION, int VEC> struct Shape {
    static constexpr int WARPS = DIRECTION == 0 ? (VEC == 1 ? HC_FWD_WARPS_1 : HC_FWD_WARPS_V)
                                                : (VEC == 1 ? HC_BWD_WARPS_1 : HC_BWD_WARPS_V);
    static constexpr int STEPS = DIRECTION == 0 ? (VEC == 1 ? HC_FWD_STEPS_1 : HC_FWD_STEPS_V)
                                                : (VEC == 1 ? HC_BWD_STEPS_1 : HC_BWD_STEPS_V);
    static constexpr int ROWS = VEC == 1 ? 1 : (DIRECTION == 0 ? HC_FWD_ROWS_V : HC_BWD_ROWS_V);
    // Resident blocks per SM the register allocation must allow (1: no constraint).
    static constexpr int MIN_BLOCKS = VEC == 1 ? 1 : (DIRECTION == 0 ? HC_FWD_MIN_BLOCKS_V : HC_BWD_MIN_BLOCKS_V);
};

// ---- workspace and look-back --------------------------------------------------------------------
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
    // Predecessor slots one thread reads per round of the look-back (all in flight at once), and the
    // window the SPLIT threads of an item read together.
    static constexpr int R0 = (sizeof(Acc) == 8 ? HC_LOOKBACK_BATCH / 2 : HC_LOOKBACK_BATCH);
    static constexpr int R = R0 < 1 ? 1 : (R0 * SPLIT > 32 ? 32 / SPLIT : R0);
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
    // The block's place in the order the chunks are handed out, so that a block only waits on blocks that
    // are running or done: its index where VEC >= HC_INDEX_ORDER_VEC (the hardware dispatches blocks in
    // increasing index; nothing to wait for), else the count from count_in, which the block waits for.
    __device__ __forceinline__ static unsigned chunk_order(const Counted& got, ChunkBlock* sm) {
        if (VEC >= HC_INDEX_ORDER_VEC) return blockIdx.x;
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
            m = ((threadIdx.x & off) == 0) == LOW_EARLIER ? compose(o, m) : compose(m, o);
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
            for (int k = 0; k < GSHARE; ++k) share[r] = compose(part[s * GSHARE + k][i], share[r]);
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
                        if (s * R + k < nfold) m = compose(m, e[k].map());
                    m = join<false>(m);
                    if (!done[r]) {
                        acc[r] = compose(acc[r], m);
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
                inc.a = Acc(0); inc.b = total[r].a * carry[r] + total[r].b;
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
                    if (s >= off) before = compose(before, o);
                }
                Affine<Acc> o;
                o.a = __shfl_up_sync(0xffffffffu, before.a, 1, SPLIT);
                o.b = __shfl_up_sync(0xffffffffu, before.b, 1, SPLIT);
                if (s > 0) h = o.a * h + o.b;
            }
#pragma unroll
            for (int k = 0; k < GSHARE; ++k) {
                const Affine<Acc> m = part[s * GSHARE + k][i];
                part[s * GSHARE + k][i].a = h;
                h = m.a * h + m.b;
            }
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < VEC; ++k) mine[k].a = part[q][k * LC + cl].a;
    }
};

// L2 prefetch for a later block (dense only): where the block of ticket `ticket` reads as this thread,
// (group q, channel lane cl): batch row, first channel, physical step of its first row, rows in range.
// Forward rows start at logical step u0 (t = u0, or T - 1 - u0 in reverse); backward rows at v0 counted
// from the end (t = T - 1 - v0, or v0 in reverse).
template <typename Block, int STEPS> struct Later {
    i64 batch, d, t, n, rows_before_end;  // rows_before_end: backward rows whose h[u-1] exists
    __device__ __forceinline__ Later(i64 ticket, i64 ntiles, unsigned ntd, int cl, int q, i64 T, int reverse,
                                     int backward) {
        const i64 chunk = ticket / ntiles, tile = ticket % ntiles;
        batch = tile / ntd;
        d = (tile % ntd) * Block::C + cl * (Block::C / Block::LC);  // C / LC = VEC
        const i64 w0 = chunk * (Block::G * STEPS) + (i64)q * STEPS;
        n = T - w0 < STEPS ? T - w0 : STEPS;
        rows_before_end = T - 1 - w0;
        t = (reverse != backward) ? T - 1 - w0 : w0;
    }
};
template <int STEPS, typename T>
__device__ __forceinline__ void prefetch_rows(const T* p, i64 step, i64 n) {
#pragma unroll
    for (int j = 0; j < STEPS; ++j) {
        if (j < n) asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(p));
        p += step;
    }
}

template <typename TX, typename TG, bool VARLEN, int VEC>
__global__ void __launch_bounds__(32 * Shape<0, VEC>::WARPS, Shape<0, VEC>::MIN_BLOCKS) chunk_fwd(
    const TX* __restrict__ x, const TG* __restrict__ g, TX* __restrict__ o,
    i64 sxb, i64 sxt, i64 sgb, i64 sgt, i64 sob, i64 sot,
    const typename AccOf<TX, TG>::type* __restrict__ h0, typename AccOf<TX, TG>::type* __restrict__ ht,
    const void* __restrict__ cu_seqlens, int cu64, i64 N, i64 T, i64 D, int reverse,
    Header* ws_hdr, char* ws_slots, i64 ws_capacity, i64 ntiles, i64 nchunks, i64 l2_ahead, int peek,
    i64 stagger) {
    typedef typename AccOf<TX, TG>::type Acc;
    constexpr int WARPS = Shape<0, VEC>::WARPS, ROWS = Shape<0, VEC>::ROWS, STEPS = Shape<0, VEC>::STEPS;
    typedef ChunkBlock<Acc, WARPS, ROWS, VEC> Block;
    constexpr int CHUNK_LEN = Block::G * STEPS;
    __shared__ Block sm;
    const unsigned total = (unsigned)(ntiles * nchunks);  // grid < 2^31
    const unsigned long long slot_bytes = (unsigned long long)total * Block::C * Slot<Acc>::BYTES;
    const typename Block::Counted got = Block::count_in(ws_hdr);
    const unsigned ticket = Block::chunk_order(got, &sm);
    const unsigned chunk = ticket / (unsigned)ntiles, tile = ticket % (unsigned)ntiles;  // grid < 2^31
    const unsigned ntd = (unsigned)((D + Block::C - 1) / Block::C);
    const i64 batch = tile / ntd;
    const int cl = threadIdx.x % Block::LC, q = threadIdx.y * ROWS + threadIdx.x / Block::LC;
    const i64 d = (i64)(tile % ntd) * Block::C + cl * VEC;
    const bool live = d < D;  // D is a multiple of VEC
    const i64 u0 = (i64)chunk * CHUNK_LEN + (i64)q * STEPS;
    Block::stagger_start(ws_slots, got, ticket, (unsigned)stagger, (unsigned)ntiles, nchunks);

    // Logical step u0 + j of this thread lives at p + j * step for each tensor.
    const i64 tdir = reverse ? -1 : 1, t0 = reverse ? T - 1 - u0 : u0;
    const TX* xq = x + batch * sxb + t0 * sxt + d;
    const TG* gq = g + batch * sgb + t0 * sgt + d;
    sxt *= tdir; sgt *= tdir;

    Pack<TX, VEC> xr[STEPS];
    Pack<TG, VEC> gr[STEPS];
#pragma unroll
    for (int j = 0; j < STEPS; ++j) {
        xr[j].clear(); gr[j].clear();
        if (live && u0 + j < T) { xr[j].load(xq); gr[j].load(gq); }
        xq += sxt; gq += sgt;
    }
    Slot<Acc> pre[Block::PER];  // the predecessor's slots, asked for behind this thread's loads
    Block::peek(ws_slots, (i64)tile * nchunks, chunk, peek != 0, pre);
    if (!VARLEN && l2_ahead > 0 && ticket + l2_ahead < ntiles * nchunks) {  // rows a later block will load
        const Later<Block, STEPS> later(ticket + l2_ahead, ntiles, ntd, cl, q, T, reverse ? 1 : 0, 0);
        if (later.d < D && later.n > 0) {
            prefetch_rows<STEPS>(x + later.batch * sxb + later.t * (sxt * tdir) + later.d, sxt, later.n);
            prefetch_rows<STEPS>(g + later.batch * sgb + later.t * (sgt * tdir) + later.d, sgt, later.n);
        }
    }

    sm.park(got);  // behind this thread's loads

    // Pass 1: the map of this thread's steps, per channel.  Dense steps strictly inside the row (no
    // start, not the last step) need no segment bookkeeping: the interior form skips it.
    const bool interior = !VARLEN && HC_CHUNK_INTERIOR && u0 > 0 && u0 + STEPS < T;
    SegmentCursor<VARLEN> seg(cu_seqlens, cu64, N, T, reverse);
    if (u0 < T && !interior) seg.seek(u0);
    Affine<Acc> mine[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) { mine[k].a = Acc(1); mine[k].b = Acc(0); }
    if (interior) {
#pragma unroll
        for (int j = 0; j < STEPS; ++j)
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                const Acc a = gate_exp(gr[j].template get<Acc>(k)), b = xr[j].template get<Acc>(k);
                mine[k].b = a * mine[k].b + b;
                mine[k].a = a * mine[k].a;
            }
    } else {
#pragma unroll
    for (int j = 0; j < STEPS; ++j) {
        const i64 u = u0 + j;
        if (u < T) {
            seg.forward_to(u);
            const bool start = u == seg.start;
            const Acc* h0p = start && h0 && live ? h0 + seg.seq(batch) * D + d : nullptr;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                Acc a = gate_exp(gr[j].template get<Acc>(k)), b = xr[j].template get<Acc>(k);
                if (h0p) b += a * h0p[k];  // h[-1] = h0
                if (start) a = Acc(0);     // a sequence begins
                mine[k].b = a * mine[k].b + b;
                mine[k].a = a * mine[k].a;
            }
        }
    }
    }

    sm.settle(ws_hdr, total, slot_bytes);
    sm.carry_in(ws_slots, (i64)tile * nchunks, chunk, q, cl, mine, pre);
    Acc h[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) h[k] = mine[k].a;

    // Pass 2: the states, from the raw words again.
    TX* oq = o + batch * sob + t0 * sot + d;
    sot *= tdir;
    if (interior) {
#pragma unroll
        for (int j = 0; j < STEPS; ++j) {
            Pack<TX, VEC> out;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                h[k] = gate_exp(gr[j].template get<Acc>(k)) * h[k] + xr[j].template get<Acc>(k);
                out.template set<Acc>(k, h[k]);
            }
            if (live) out.store(oq);
            oq += sot;
        }
    } else {
    if (u0 < T) seg.seek(u0);
#pragma unroll
    for (int j = 0; j < STEPS; ++j) {
        const i64 u = u0 + j;
        if (u < T) {
            seg.forward_to(u);
            const bool start = u == seg.start;
            const Acc* h0p = start && h0 && live ? h0 + seg.seq(batch) * D + d : nullptr;
            Pack<TX, VEC> out;
            out.clear();
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                Acc a = gate_exp(gr[j].template get<Acc>(k)), b = xr[j].template get<Acc>(k);
                if (h0p) b += a * h0p[k];
                if (start) a = Acc(0);
                h[k] = a * h[k] + b;
                out.template set<Acc>(k, h[k]);
            }
            if (live) {
                out.store(oq);
                if (ht && u == seg.end - 1) {
                    Acc* htp = ht + seg.seq(batch) * D + d;
#pragma unroll
                    for (int k = 0; k < VEC; ++k) htp[k] = h[k];
                }
            }
        }
        oq += sot;
    }
    }
    // Empty sequences never own a step: the blocks of chunk 0 pass their initial state through.
    if (VARLEN && ht && chunk == 0 && live) {
        for (i64 n = q; n < N; n += Block::G)
            if (load_offset(cu_seqlens, cu64, n) >= load_offset(cu_seqlens, cu64, n + 1))
#pragma unroll
                for (int k = 0; k < VEC; ++k) ht[n * D + d + k] = h0 ? h0[n * D + d + k] : Acc(0);
    }
    sm.finish(ws_slots, ticket, total, slot_bytes, (unsigned long long)ws_capacity);
}

// Backward: the same scan over v = T - 1 - u.  With the gate shifted by one step,
// dh[u] = do[u] + exp(g[u+1]) * dh[u+1], restarting (a = 0, plus dht) at each segment's last step;
// dx = dh and dg = dh * exp(g[u]) * h[u-1] (h0 at a segment's first step).
template <typename TX, typename TG, bool VARLEN, int VEC>
__global__ void __launch_bounds__(32 * Shape<1, VEC>::WARPS, Shape<1, VEC>::MIN_BLOCKS) chunk_bwd(
    const TG* __restrict__ g, const TX* __restrict__ o, const TX* __restrict__ dout,
    TX* __restrict__ dx, TG* __restrict__ dg,
    i64 sgb, i64 sgt, i64 sob, i64 sot, i64 sdob, i64 sdot, i64 sdxb, i64 sdxt, i64 sdgb, i64 sdgt,
    const typename AccOf<TX, TG>::type* __restrict__ h0, const typename AccOf<TX, TG>::type* __restrict__ dht,
    typename AccOf<TX, TG>::type* __restrict__ dh0,
    const void* __restrict__ cu_seqlens, int cu64, i64 N, i64 T, i64 D, int reverse,
    Header* ws_hdr, char* ws_slots, i64 ws_capacity, i64 ntiles, i64 nchunks, i64 l2_ahead, int peek,
    i64 stagger) {
    typedef typename AccOf<TX, TG>::type Acc;
    constexpr int WARPS = Shape<1, VEC>::WARPS, ROWS = Shape<1, VEC>::ROWS, STEPS = Shape<1, VEC>::STEPS;
    typedef ChunkBlock<Acc, WARPS, ROWS, VEC> Block;
    constexpr int CHUNK_LEN = Block::G * STEPS;
    __shared__ Block sm;
    const unsigned total = (unsigned)(ntiles * nchunks);  // grid < 2^31
    const unsigned long long slot_bytes = (unsigned long long)total * Block::C * Slot<Acc>::BYTES;
    const typename Block::Counted got = Block::count_in(ws_hdr);
    const unsigned ticket = Block::chunk_order(got, &sm);
    const unsigned chunk = ticket / (unsigned)ntiles, tile = ticket % (unsigned)ntiles;  // grid < 2^31
    const unsigned ntd = (unsigned)((D + Block::C - 1) / Block::C);
    const i64 batch = tile / ntd;
    const int cl = threadIdx.x % Block::LC, q = threadIdx.y * ROWS + threadIdx.x / Block::LC;
    const i64 d = (i64)(tile % ntd) * Block::C + cl * VEC;
    const bool live = d < D;
    const i64 v0 = (i64)chunk * CHUNK_LEN + (i64)q * STEPS;  // u = T - 1 - v
    Block::stagger_start(ws_slots, got, ticket, (unsigned)stagger, (unsigned)ntiles, nchunks);

    // Step j of this thread is u = T - 1 - v0 - j, at physical t = t0 - tdir * j.
    const i64 tdir = reverse ? -1 : 1, t0 = reverse ? v0 : T - 1 - v0;
    const TG* gq = g + batch * sgb + t0 * sgt + d;
    const TX* oq = o + batch * sob + (t0 - tdir) * sot + d;  // the previous state h[u-1]
    const TX* dq = dout + batch * sdob + t0 * sdot + d;
    sgt *= -tdir; sot *= -tdir; sdot *= -tdir;

    // The gate one step later than this thread's first step (u0 + 1), then per step g[u], do[u], h[u-1].
    // h[u-1] is read only where u - 1 belongs to the same segment (or the same dense row).
    SegmentCursor<VARLEN> seg(cu_seqlens, cu64, N, T, reverse);
    Pack<TG, VEC> gnext, gr[STEPS];
    Pack<TX, VEC> dr[STEPS], orr[STEPS];
    gnext.clear();
    if (live && v0 < T && v0 >= 1) gnext.load(gq - sgt);
    if (v0 < T) seg.seek(T - 1 - v0);
    unsigned first_mask = 0;  // bit j: step j is the first of its segment
#pragma unroll
    for (int j = 0; j < STEPS; ++j) {
        const i64 v = v0 + j, u = T - 1 - v;
        gr[j].clear(); dr[j].clear(); orr[j].clear();
        if (v < T) {
            seg.backward_to(u);
            const bool first = u == seg.start;
            first_mask |= (unsigned)first << j;
            if (live) {
                gr[j].load(gq); dr[j].load(dq);
                if (!first) orr[j].load(oq);
            }
        }
        gq += sgt; dq += sdot; oq += sot;
    }
    Slot<Acc> pre[Block::PER];  // the predecessor's slots, asked for behind this thread's loads
    Block::peek(ws_slots, (i64)tile * nchunks, chunk, peek != 0, pre);
    if (!VARLEN && l2_ahead > 0 && ticket + l2_ahead < ntiles * nchunks) {  // rows a later block will load
        const Later<Block, STEPS> later(ticket + l2_ahead, ntiles, ntd, cl, q, T, reverse ? 1 : 0, 1);
        if (later.d < D && later.n > 0) {
            prefetch_rows<STEPS>(g + later.batch * sgb + later.t * (-tdir * sgt) + later.d, sgt, later.n);
            prefetch_rows<STEPS>(dout + later.batch * sdob + later.t * (-tdir * sdot) + later.d, sdot, later.n);
            prefetch_rows<STEPS>(o + later.batch * sob + (later.t - tdir) * (-tdir * sot) + later.d, sot,
                                 later.n < later.rows_before_end ? later.n : later.rows_before_end);  // h[u-1], u >= 1
        }
    }

    sm.park(got);  // behind this thread's loads

    // Pass 1: the map of this thread's steps of the reversed scan, per channel.  Dense steps strictly
    // inside the row (not the last step, not the first) need no segment bookkeeping.
    const bool interior = !VARLEN && HC_CHUNK_INTERIOR && v0 > 0 && v0 + STEPS < T;
    if (v0 < T && !interior) seg.seek(T - 1 - v0);
    Affine<Acc> mine[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) { mine[k].a = Acc(1); mine[k].b = Acc(0); }
    if (interior) {
#pragma unroll
        for (int j = 0; j < STEPS; ++j)
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                const Acc a = gate_exp(j == 0 ? gnext.template get<Acc>(k) : gr[j - 1].template get<Acc>(k));
                mine[k].b = a * mine[k].b + dr[j].template get<Acc>(k);
                mine[k].a = a * mine[k].a;
            }
    } else {
#pragma unroll
    for (int j = 0; j < STEPS; ++j) {
        const i64 v = v0 + j, u = T - 1 - v;
        if (v < T) {
            seg.backward_to(u);
            const bool last = u == seg.end - 1;
            const Acc* dhtp = last && dht && live ? dht + seg.seq(batch) * D + d : nullptr;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                const Acc a = last ? Acc(0) : gate_exp(j == 0 ? gnext.template get<Acc>(k) : gr[j - 1].template get<Acc>(k));
                Acc b = dr[j].template get<Acc>(k);
                if (dhtp) b += dhtp[k];
                mine[k].b = a * mine[k].b + b;
                mine[k].a = a * mine[k].a;
            }
        }
    }
    }

    sm.settle(ws_hdr, total, slot_bytes);
    sm.carry_in(ws_slots, (i64)tile * nchunks, chunk, q, cl, mine, pre);
    Acc dh[VEC], en[VEC];  // en: exp of the gate one step later, the a of the current step
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
        dh[k] = mine[k].a;
        en[k] = gate_exp(gnext.template get<Acc>(k));
    }

    // Pass 2: dh, then dx and dg, from the raw words again.
    const i64 sdx = -tdir * sdxt, sdg = -tdir * sdgt;
    TX* dxq = dx + batch * sdxb + t0 * sdxt + d;
    TG* dgq = dg + batch * sdgb + t0 * sdgt + d;
    if (interior) {
#pragma unroll
        for (int j = 0; j < STEPS; ++j) {
            Pack<TX, VEC> dxo;
            Pack<TG, VEC> dgo;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                dh[k] = en[k] * dh[k] + dr[j].template get<Acc>(k);
                const Acc e = gate_exp(gr[j].template get<Acc>(k));
                dxo.template set<Acc>(k, dh[k]);
                dgo.template set<Acc>(k, dh[k] * (e * orr[j].template get<Acc>(k)));
                en[k] = e;
            }
            if (live) { dxo.store(dxq); dgo.store(dgq); }
            dxq += sdx; dgq += sdg;
        }
    } else {
    if (v0 < T) seg.seek(T - 1 - v0);
#pragma unroll
    for (int j = 0; j < STEPS; ++j) {
        const i64 v = v0 + j, u = T - 1 - v;
        if (v < T) {
            seg.backward_to(u);
            const bool last = u == seg.end - 1, first = (first_mask >> j) & 1u;
            const Acc* dhtp = last && dht && live ? dht + seg.seq(batch) * D + d : nullptr;
            const Acc* h0p = first && h0 && live ? h0 + seg.seq(batch) * D + d : nullptr;
            Acc* dh0p = first && dh0 && live ? dh0 + seg.seq(batch) * D + d : nullptr;
            Pack<TX, VEC> dxo;
            Pack<TG, VEC> dgo;
            dxo.clear(); dgo.clear();
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                Acc b = dr[j].template get<Acc>(k);
                if (dhtp) b += dhtp[k];
                dh[k] = (last ? Acc(0) : en[k]) * dh[k] + b;
                const Acc e = gate_exp(gr[j].template get<Acc>(k));
                const Acc prev = first ? (h0p ? h0p[k] : Acc(0)) : orr[j].template get<Acc>(k);
                dxo.template set<Acc>(k, dh[k]);
                dgo.template set<Acc>(k, dh[k] * (e * prev));
                if (dh0p) dh0p[k] = e * dh[k];
                en[k] = e;
            }
            if (live) { dxo.store(dxq); dgo.store(dgq); }
        }
        dxq += sdx; dgq += sdg;
    }
    }
    if (VARLEN && dh0 && chunk == 0 && live) {
        for (i64 n = q; n < N; n += Block::G)
            if (load_offset(cu_seqlens, cu64, n) >= load_offset(cu_seqlens, cu64, n + 1))
#pragma unroll
                for (int k = 0; k < VEC; ++k) dh0[n * D + d + k] = dht ? dht[n * D + d + k] : Acc(0);
    }
    sm.finish(ws_slots, ticket, total, slot_bytes, (unsigned long long)ws_capacity);
}

}  // namespace hc
