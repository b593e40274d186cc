// Chunk engine: time split into chunks that are scanned in parallel, in one pass over memory.  This file
// owns the kernels chunk_fwd / chunk_fwd_staged / chunk_bwd, their block shapes and the two passes over a
// thread's steps; chunk_lookback.cuh owns the workspace and the block-level look-back they share.
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
// tags; see chunk_lookback.cuh); SPLIT threads share a channel where the block has more threads than the
// tile has channels, each reading R predecessors per round, all in flight.
// Narrow tiles (ROWS > 1) make chunks longer in time for the same bytes: fewer chunks for the look-back
// to cross.  Blocks take chunk numbers in the order they start (their index, or an atomic ticket: see
// chunk_order), so a block only ever waits on blocks that are already running; where the host asks, each
// block also asks L2 for the rows of the block l2_ahead tickets later, and the second half of the first
// wave starts its loads as the first half's maps come out (stagger_start).  Segment starts (sequence
// starts, or t = 0) are steps with a = 0, which makes varlen and the initial state part of one scan.
#include "common.cuh"
#include "chunk_lookback.cuh"

namespace hc {

// Block shapes (warps per block, rows per warp, steps per thread) for each direction, scalar (VEC = 1,
// one row) and vector kernels: the launcher passes the values it launches with, so the two sides cannot
// disagree.
#ifndef HC_FWD_WARPS_1
#error "HC_FWD_WARPS_1 is set by the launcher (hgrn_cupy/engines/chunk.py)"
#endif
#ifndef HC_FWD_STEPS_1
#error "HC_FWD_STEPS_1 is set by the launcher (hgrn_cupy/engines/chunk.py)"
#endif
#ifndef HC_BWD_WARPS_1
#error "HC_BWD_WARPS_1 is set by the launcher (hgrn_cupy/engines/chunk.py)"
#endif
#ifndef HC_BWD_STEPS_1
#error "HC_BWD_STEPS_1 is set by the launcher (hgrn_cupy/engines/chunk.py)"
#endif
#ifndef HC_FWD_WARPS_V
#error "HC_FWD_WARPS_V is set by the launcher (hgrn_cupy/engines/chunk.py)"
#endif
#ifndef HC_FWD_ROWS_V
#error "HC_FWD_ROWS_V is set by the launcher (hgrn_cupy/engines/chunk.py)"
#endif
#ifndef HC_FWD_STEPS_V
#error "HC_FWD_STEPS_V is set by the launcher (hgrn_cupy/engines/chunk.py)"
#endif
#ifndef HC_BWD_WARPS_V
#error "HC_BWD_WARPS_V is set by the launcher (hgrn_cupy/engines/chunk.py)"
#endif
#ifndef HC_BWD_ROWS_V
#error "HC_BWD_ROWS_V is set by the launcher (hgrn_cupy/engines/chunk.py)"
#endif
#ifndef HC_BWD_STEPS_V
#error "HC_BWD_STEPS_V is set by the launcher (hgrn_cupy/engines/chunk.py)"
#endif
#ifndef HC_STAGED_BLOCKS
#error "HC_STAGED_BLOCKS is set by the launcher (hgrn_cupy/engines/chunk.py)"
#endif

template <int DIRECTION, int VEC> struct Shape {
    static constexpr int WARPS = DIRECTION == 0 ? (VEC == 1 ? HC_FWD_WARPS_1 : HC_FWD_WARPS_V)
                                                : (VEC == 1 ? HC_BWD_WARPS_1 : HC_BWD_WARPS_V);
    static constexpr int STEPS = DIRECTION == 0 ? (VEC == 1 ? HC_FWD_STEPS_1 : HC_FWD_STEPS_V)
                                                : (VEC == 1 ? HC_BWD_STEPS_1 : HC_BWD_STEPS_V);
    static constexpr int ROWS = VEC == 1 ? 1 : (DIRECTION == 0 ? HC_FWD_ROWS_V : HC_BWD_ROWS_V);
    // Resident blocks a SM the register allocation must allow: two for the vector kernels (at most 128
    // registers), since three need fewer steps a thread and longer chunks beat more resident warps
    // (docs/performance.md, "Chunk shape and vector width"); no constraint for the scalar ones.
    static constexpr int MIN_BLOCKS = VEC == 1 ? 1 : 2;
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

// The launch's schedule and workspace, one argument of both kernels (hgrn_cupy/engines/chunk.py packs it
// as eight 8-byte words, in this order): the workspace header and slots (capacity: bytes from slots), the
// grid's tiles and chunks, how many tickets ahead a block asks L2 for rows (0: none), whether a block asks
// for its predecessor's slots before its loads (peek), and the first wave's stagger.
struct ChunkGrid {
    Header* hdr;
    char* slots;
    i64 capacity, ntiles, nchunks, l2_ahead, peek, stagger;
    // The ticket of the block whose rows the block of `ticket` asks L2 for, or -1: none.
    __device__ __forceinline__ i64 ahead(unsigned ticket) const {
        return l2_ahead > 0 && ticket + l2_ahead < ntiles * nchunks ? ticket + l2_ahead : -1;
    }
};

// Where a block of one chunk kernel (DIRECTION 0 forward, 1 backward) works, and its share of the
// launch's bookkeeping: its count (got) and its place in the order chunks are handed out (ticket, of
// total blocks, whose slots span slot_bytes), its chunk and tile, the tile's batch row, and this thread's
// step group q, channel lane cl, first channel d (live: d < D, a multiple of VEC) and first step s0 (u in
// the forward, v = T - 1 - u in the backward).  Counting the block in and the staggered start of the first
// wave happen here, in the kernels' order.  Also the kernel's types: its accumulation type, its block
// (shared() is the block's shared memory) and the steps a thread owns.
template <int DIRECTION, typename TX, typename TG, int VEC> struct ChunkPlace {
    typedef AccT<TX, TG> Acc;
    typedef Shape<DIRECTION, VEC> S;
    typedef ChunkBlock<Acc, S::WARPS, S::ROWS, VEC> Block;
    static constexpr int STEPS = S::STEPS;
    typename Block::Counted got;
    unsigned total, ticket, chunk, tile, ntd;
    unsigned long long slot_bytes;
    i64 batch, d, s0, slot0;  // slot0: the workspace slot of the tile's chunk 0
    int cl, q;
    bool live;
    __device__ __forceinline__ static Block& shared() {
        __shared__ Block sm;
        return sm;
    }
    __device__ __forceinline__ ChunkPlace(const ChunkGrid& grid, i64 D) {
        total = (unsigned)(grid.ntiles * grid.nchunks);  // grid < 2^31
        slot_bytes = (unsigned long long)total * Block::C * Slot<Acc>::BYTES;
        got = Block::count_in(grid.hdr);
        ticket = Block::chunk_order(got, &shared());
        chunk = ticket / (unsigned)grid.ntiles; tile = ticket % (unsigned)grid.ntiles;
        slot0 = (i64)tile * grid.nchunks;
        ntd = (unsigned)((D + Block::C - 1) / Block::C);
        batch = tile / ntd;
        cl = threadIdx.x % Block::LC; q = threadIdx.y * (32 / Block::LC) + threadIdx.x / Block::LC;
        d = (i64)(tile % ntd) * Block::C + cl * (Block::C / Block::LC);  // C / LC = VEC
        live = d < D;
        s0 = (i64)chunk * (Block::G * STEPS) + (i64)q * STEPS;
        Block::stagger_start(grid.slots, got, ticket, (unsigned)grid.stagger, (unsigned)grid.ntiles, grid.nchunks);
    }
    // Empty sequences own no step: the blocks of chunk 0 write their state out (out[n] = in[n], or 0 where
    // in is null); out is ht in the forward, dh0 in the backward.
    __device__ __forceinline__ void pass_empty(const void* cu_seqlens, int cu64, i64 N, i64 D, const Acc* in,
                                               Acc* out) const {
        if (!out || chunk != 0 || !live) return;
        for (i64 n = q; n < N; n += Block::G)
            if (load_offset(cu_seqlens, cu64, n) >= load_offset(cu_seqlens, cu64, n + 1))
#pragma unroll
                for (int k = 0; k < VEC; ++k) out[n * D + d + k] = in ? in[n * D + d + k] : Acc(0);
    }
};

// A forward thread's words of g, step j's at [j]: in registers (HeldWords), or in dynamic shared memory
// (StagedWords, 16-byte words: the staged kernel, chunk_fwd_staged), where each thread copies its own by
// cp.async and the block needs no registers for them, so that STAGED_BLOCKS blocks fit a SM
// (docs/performance.md, "Gate words in shared memory").  fetch(j, x, xp, p, any, in) loads step j's word of
// x at xp into x and asks for its word of g at p (zeros in both where !in; a copy then reads nothing but
// still names a valid address, any); sent() closes the requests, landed() waits for them; a thread reads
// only its own words.
template <typename T, int VEC, int STEPS, int THREADS> struct HeldWords {
    Pack<T, VEC> w[STEPS];
    template <typename X>
    __device__ __forceinline__ void fetch(int j, X& x, const typename X::Elem* xp, const T* p, const T*, bool in) {
        x.clear(); w[j].clear();
        if (in) { x.load(xp); w[j].load(p); }
    }
    __device__ __forceinline__ void sent() {}
    __device__ __forceinline__ void landed() {}
    __device__ __forceinline__ const Pack<T, VEC>& operator[](int j) const { return w[j]; }
};
template <typename T, int VEC, int STEPS, int THREADS> struct StagedWords {
    static_assert(Pack<T, VEC>::BYTES == 16, "staged words are 16 bytes");
    uint4* base;  // step j's word at base[j * THREADS]: a warp's copies and reads are conflict-free
    __device__ __forceinline__ StagedWords() {
        extern __shared__ uint4 stage_words[];  // STEPS x THREADS words (chunk.py: staged_bytes)
        base = stage_words + threadIdx.y * 32 + threadIdx.x;
    }
    template <typename X>
    __device__ __forceinline__ void fetch(int j, X& x, const typename X::Elem* xp, const T* p, const T* any, bool in) {
        x.clear();
        if (in) x.load(xp);
        async_copy<16>(base + j * THREADS, in ? p : any, in);
    }
    __device__ __forceinline__ void sent() { async_commit(); }
    __device__ __forceinline__ void landed() { async_wait<0>(); }
    __device__ __forceinline__ Pack<T, VEC> operator[](int j) const {
        const uint4 v = base[j * THREADS];
        Pack<T, VEC> r;
        r.u[0] = v.x; r.u[1] = v.y; r.u[2] = v.z; r.u[3] = v.w;
        return r;
    }
};

// The two passes over one thread's STEPS steps of a chunk, from the raw words it holds in registers through
// the look-back.  Each is written once for two forms: CHECKED skips steps past T and keeps the segment
// bookkeeping (a segment's start and end: h0, ht, dht, dh0); the interior form (steps strictly inside a
// dense row) has none of it.  The thread's place: its first logical step (u0 forward, v0 backward) of T,
// batch row `batch`, channels d .. d + VEC - 1 of D (live: d < D); seg.seq(batch) * D + d addresses its
// channels of the current sequence's row of a state [N, D].

// The steps u = u0 + j (j < STEPS) of one forward pass, with their segment bookkeeping where CHECKED (the
// interior form has none): step(j, u, start, h0p) for each step inside T, where start says that a segment
// starts at u and h0p is where its initial state's channels are when it does and one is given (else null).
template <bool CHECKED, int STEPS, typename Acc, bool VARLEN, typename Step>
__device__ __forceinline__ void fwd_steps(i64 u0, i64 T, i64 D, i64 d, i64 batch, bool live,
                                          SegmentCursor<VARLEN>& seg, const Acc* h0, Step step) {
    if (CHECKED && u0 < T) seg.seek(u0);
#pragma unroll
    for (int j = 0; j < STEPS; ++j) {
        const i64 u = u0 + j;
        if (!CHECKED || u < T) {
            bool start = false;
            const Acc* h0p = nullptr;
            if (CHECKED) {
                seg.forward_to(u);
                start = u == seg.start;
                h0p = start && h0 && live ? h0 + seg.seq(batch) * D + d : nullptr;
            }
            step(j, u, start, h0p);
        }
    }
}

// Forward, pass 1: the map of steps u0 + j (x[j], g[j]: g's words from their holder) per channel, h0 entering
// at a segment's start.
template <bool CHECKED, typename Acc, typename TX, typename GW, bool VARLEN, int VEC, int STEPS>
__device__ __forceinline__ void fwd_fold(i64 u0, i64 T, i64 D, i64 d, i64 batch, bool live, SegmentCursor<VARLEN>& seg,
                                         const Pack<TX, VEC> (&x)[STEPS], const GW& g,
                                         const Acc* h0, Affine<Acc>* mine) {
    fwd_steps<CHECKED, STEPS>(u0, T, D, d, batch, live, seg, h0, [&](int j, i64, bool start, const Acc* h0p) {
        const auto gj = g[j];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            Acc a = gate_exp(gj.template get<Acc>(k)), b = x[j].template get<Acc>(k);
            if (h0p) b += a * h0p[k];  // h[-1] = h0
            // a sequence begins: what came before is dropped, NaN included (0 * NaN is NaN).  A select on
            // `start`, not compose_reset: start is false at compile time in interior steps, so they pay nothing.
            mine[k].b = start ? b : a * mine[k].b + b;
            mine[k].a = start ? Acc(0) : a * mine[k].a;
        }
    });
}

// Forward, pass 2: from h (the state before step u0) the states, written to oq + j * sot, and to ht at a
// segment's last step.
template <bool CHECKED, typename Acc, typename TX, typename GW, bool VARLEN, int VEC, int STEPS>
__device__ __forceinline__ void fwd_scan(i64 u0, i64 T, i64 D, i64 d, i64 batch, bool live, SegmentCursor<VARLEN>& seg,
                                         const Pack<TX, VEC> (&x)[STEPS], const GW& g,
                                         const Acc* h0, Acc* ht, TX* oq, i64 sot, Acc* h) {
    fwd_steps<CHECKED, STEPS>(u0, T, D, d, batch, live, seg, h0, [&](int j, i64 u, bool start, const Acc* h0p) {
        const auto gj = g[j];
        Pack<TX, VEC> out;
        if (CHECKED) out.clear();
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            Acc a = gate_exp(gj.template get<Acc>(k)), b = x[j].template get<Acc>(k);
            if (h0p) b += a * h0p[k];
            h[k] = start ? b : a * h[k] + b;
            out.template set<Acc>(k, h[k]);
        }
        if (live) {
            out.store(oq);
            if (CHECKED && ht && u == seg.end - 1) {
                Acc* htp = ht + seg.seq(batch) * D + d;
#pragma unroll
                for (int k = 0; k < VEC; ++k) htp[k] = h[k];
            }
        }
        oq += sot;
    });
}

// Backward, pass 1: the map of the reversed scan's steps u = T - 1 - v0 - j (do[j]) per channel, with
// a = exp(g[u+1]) (gnext for j = 0, else g[j - 1]), restarting (a = 0, plus dht) at a segment's last step.
template <bool CHECKED, typename Acc, typename TX, typename TG, bool VARLEN, int VEC, int STEPS>
__device__ __forceinline__ void bwd_fold(i64 v0, i64 T, i64 D, i64 d, i64 batch, bool live, SegmentCursor<VARLEN>& seg,
                                         const Pack<TG, VEC>& gnext, const Pack<TG, VEC> (&g)[STEPS],
                                         const Pack<TX, VEC> (&dout)[STEPS], const Acc* dht, Affine<Acc>* mine) {
    if (CHECKED && v0 < T) seg.seek(T - 1 - v0);
#pragma unroll
    for (int j = 0; j < STEPS; ++j) {
        const i64 v = v0 + j, u = T - 1 - v;
        if (!CHECKED || v < T) {
            bool last = false;
            const Acc* dhtp = nullptr;
            if (CHECKED) {
                seg.backward_to(u);
                last = u == seg.end - 1;
                dhtp = last && dht && live ? dht + seg.seq(batch) * D + d : nullptr;
            }
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                const Acc a = gate_exp(j == 0 ? gnext.template get<Acc>(k) : g[j - 1].template get<Acc>(k));
                Acc b = dout[j].template get<Acc>(k);
                if (dhtp) b += dhtp[k];
                mine[k].b = last ? b : a * mine[k].b + b;  // a segment's last step restarts the reversed scan
                mine[k].a = last ? Acc(0) : a * mine[k].a;
            }
        }
    }
}

// Backward, pass 2: from dh (at the step after v0's) and en (exp of that step's gate), dh, then dx and dg
// (h[u-1] in hprev[j], or h0 at a segment's first step: bit j of first_mask), written to dxq + j * sdx and
// dgq + j * sdg, and dh0 at a segment's first step.
template <bool CHECKED, typename Acc, typename TX, typename TG, bool VARLEN, int VEC, int STEPS>
__device__ __forceinline__ void bwd_scan(i64 v0, i64 T, i64 D, i64 d, i64 batch, bool live, SegmentCursor<VARLEN>& seg,
                                         unsigned first_mask, const Pack<TG, VEC> (&g)[STEPS],
                                         const Pack<TX, VEC> (&dout)[STEPS], const Pack<TX, VEC> (&hprev)[STEPS],
                                         const Acc* h0, const Acc* dht, Acc* dh0, TX* dxq, i64 sdx, TG* dgq, i64 sdg,
                                         Acc* dh, Acc* en) {
    if (CHECKED && v0 < T) seg.seek(T - 1 - v0);
#pragma unroll
    for (int j = 0; j < STEPS; ++j) {
        const i64 v = v0 + j, u = T - 1 - v;
        if (!CHECKED || v < T) {
            bool last = false, first = false;
            const Acc *dhtp = nullptr, *h0p = nullptr;
            Acc* dh0p = nullptr;
            if (CHECKED) {
                seg.backward_to(u);
                last = u == seg.end - 1;
                first = (first_mask >> j) & 1u;
                dhtp = last && dht && live ? dht + seg.seq(batch) * D + d : nullptr;
                h0p = first && h0 && live ? h0 + seg.seq(batch) * D + d : nullptr;
                dh0p = first && dh0 && live ? dh0 + seg.seq(batch) * D + d : nullptr;
            }
            Pack<TX, VEC> dxo;
            Pack<TG, VEC> dgo;
            if (CHECKED) { dxo.clear(); dgo.clear(); }
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                Acc b = dout[j].template get<Acc>(k);
                if (dhtp) b += dhtp[k];
                dh[k] = last ? b : en[k] * dh[k] + b;
                const Acc e = gate_exp(g[j].template get<Acc>(k));
                const Acc prev = first ? (h0p ? h0p[k] : Acc(0)) : hprev[j].template get<Acc>(k);
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

// Forward, one block's chunk, g's words held by Words (HeldWords or StagedWords).
template <typename TX, typename TG, bool VARLEN, int VEC, template <typename, int, int, int> class Words>
__device__ __forceinline__ void fwd_chunk(
    const TX* __restrict__ x, const TG* __restrict__ g, TX* __restrict__ o,
    i64 sxb, i64 sxt, i64 sgb, i64 sgt, i64 sob, i64 sot,
    const AccT<TX, TG>* __restrict__ h0, AccT<TX, TG>* __restrict__ ht,
    const void* __restrict__ cu_seqlens, int cu64, i64 N, i64 T, i64 D, int reverse, const ChunkGrid grid) {
    typedef ChunkPlace<0, TX, TG, VEC> Place;
    typedef typename Place::Acc Acc;
    constexpr int STEPS = Place::STEPS;
    const Place at(grid, D);
    const i64 d = at.d, u0 = at.s0;
    const bool live = at.live;
    typedef typename Place::Block Block;
    Block& sm = Place::shared();

    // Logical step u0 + j of this thread lives at p + j * step for each tensor.
    const i64 tdir = reverse ? -1 : 1, t0 = reverse ? T - 1 - u0 : u0;
    const TX* xq = x + at.batch * sxb + t0 * sxt + d;
    const TG* gq = g + at.batch * sgb + t0 * sgt + d;
    sxt *= tdir; sgt *= tdir;

    Pack<TX, VEC> xr[STEPS];
    Words<TG, VEC, STEPS, 32 * Place::S::WARPS> gr;
#pragma unroll
    for (int j = 0; j < STEPS; ++j) {
        gr.fetch(j, xr[j], xq, gq, g, live && u0 + j < T);
        xq += sxt; gq += sgt;
    }
    gr.sent();
    Slot<Acc> pre[Block::PER];  // the predecessor's slots, asked for behind this thread's loads
    Block::peek(grid.slots, at.slot0, at.chunk, grid.peek != 0, pre);
    if (const i64 ahead = VARLEN ? -1 : grid.ahead(at.ticket); ahead >= 0) {  // rows a later block will load
        const Later<Block, STEPS> later(ahead, grid.ntiles, at.ntd, at.cl, at.q, T, reverse ? 1 : 0, 0);
        if (later.d < D && later.n > 0) {
            prefetch_rows<STEPS>(x + later.batch * sxb + later.t * (sxt * tdir) + later.d, sxt, later.n);
            prefetch_rows<STEPS>(g + later.batch * sgb + later.t * (sgt * tdir) + later.d, sgt, later.n);
        }
    }

    sm.park(at.got);  // behind this thread's loads

    // Pass 1, then the look-back, then pass 2.  Dense steps strictly inside the row (no start, not the last
    // step) take the interior form (docs/performance.md, "Interior form").
    const bool interior = !VARLEN && u0 > 0 && u0 + STEPS < T;
    SegmentCursor<VARLEN> seg(cu_seqlens, cu64, N, T, reverse);
    Affine<Acc> mine[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) { mine[k].a = Acc(1); mine[k].b = Acc(0); }
    gr.landed();
    if (interior) fwd_fold<false>(u0, T, D, d, at.batch, live, seg, xr, gr, h0, mine);
    else fwd_fold<true>(u0, T, D, d, at.batch, live, seg, xr, gr, h0, mine);

    sm.settle(grid.hdr, at.total, at.slot_bytes);
    sm.carry_in(grid.slots, at.slot0, at.chunk, at.q, at.cl, mine, pre);
    Acc h[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) h[k] = mine[k].a;

    TX* oq = o + at.batch * sob + t0 * sot + d;
    sot *= tdir;
    if (interior) fwd_scan<false>(u0, T, D, d, at.batch, live, seg, xr, gr, h0, ht, oq, sot, h);
    else fwd_scan<true>(u0, T, D, d, at.batch, live, seg, xr, gr, h0, ht, oq, sot, h);
    if (VARLEN) at.pass_empty(cu_seqlens, cu64, N, D, h0, ht);
    sm.finish(grid.slots, at.ticket, at.total, at.slot_bytes, (unsigned long long)grid.capacity);
}

template <typename TX, typename TG, bool VARLEN, int VEC>
__global__ void __launch_bounds__(32 * Shape<0, VEC>::WARPS, Shape<0, VEC>::MIN_BLOCKS) chunk_fwd(
    const TX* __restrict__ x, const TG* __restrict__ g, TX* __restrict__ o,
    i64 sxb, i64 sxt, i64 sgb, i64 sgt, i64 sob, i64 sot,
    const AccT<TX, TG>* __restrict__ h0, AccT<TX, TG>* __restrict__ ht,
    const void* __restrict__ cu_seqlens, int cu64, i64 N, i64 T, i64 D, int reverse, const ChunkGrid grid) {
    fwd_chunk<TX, TG, VARLEN, VEC, HeldWords>(x, g, o, sxb, sxt, sgb, sgt, sob, sot, h0, ht, cu_seqlens, cu64, N, T,
                                              D, reverse, grid);
}

// The staged forward (16-byte words of g only): g's words in STEPS x threads x 16 bytes of dynamic shared
// memory (chunk.py: staged_bytes), HC_STAGED_BLOCKS blocks a SM.
template <typename TX, typename TG, bool VARLEN, int VEC>
__global__ void __launch_bounds__(32 * Shape<0, VEC>::WARPS, HC_STAGED_BLOCKS) chunk_fwd_staged(
    const TX* __restrict__ x, const TG* __restrict__ g, TX* __restrict__ o,
    i64 sxb, i64 sxt, i64 sgb, i64 sgt, i64 sob, i64 sot,
    const AccT<TX, TG>* __restrict__ h0, AccT<TX, TG>* __restrict__ ht,
    const void* __restrict__ cu_seqlens, int cu64, i64 N, i64 T, i64 D, int reverse, const ChunkGrid grid) {
    fwd_chunk<TX, TG, VARLEN, VEC, StagedWords>(x, g, o, sxb, sxt, sgb, sgt, sob, sot, h0, ht, cu_seqlens, cu64, N,
                                                T, D, reverse, grid);
}

// Backward: the same scan over v = T - 1 - u.  With the gate shifted by one step,
// dh[u] = do[u] + exp(g[u+1]) * dh[u+1], restarting (a = 0, plus dht) at each segment's last step;
// dx = dh and dg = dh * exp(g[u]) * h[u-1] (h0 at a segment's first step).
template <typename TX, typename TG, bool VARLEN, int VEC>
__global__ void __launch_bounds__(32 * Shape<1, VEC>::WARPS, Shape<1, VEC>::MIN_BLOCKS) chunk_bwd(
    const TG* __restrict__ g, const TX* __restrict__ o, const TX* __restrict__ dout,
    TX* __restrict__ dx, TG* __restrict__ dg,
    i64 sgb, i64 sgt, i64 sob, i64 sot, i64 sdob, i64 sdot, i64 sdxb, i64 sdxt, i64 sdgb, i64 sdgt,
    const AccT<TX, TG>* __restrict__ h0, const AccT<TX, TG>* __restrict__ dht, AccT<TX, TG>* __restrict__ dh0,
    const void* __restrict__ cu_seqlens, int cu64, i64 N, i64 T, i64 D, int reverse, const ChunkGrid grid) {
    typedef ChunkPlace<1, TX, TG, VEC> Place;
    typedef typename Place::Acc Acc;
    constexpr int STEPS = Place::STEPS;
    const Place at(grid, D);
    const i64 batch = at.batch, d = at.d, v0 = at.s0;  // u = T - 1 - v
    const bool live = at.live;
    typedef typename Place::Block Block;
    Block& sm = Place::shared();

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
    Block::peek(grid.slots, at.slot0, at.chunk, grid.peek != 0, pre);
    if (const i64 ahead = VARLEN ? -1 : grid.ahead(at.ticket); ahead >= 0) {  // rows a later block will load
        const Later<Block, STEPS> later(ahead, grid.ntiles, at.ntd, at.cl, at.q, T, reverse ? 1 : 0, 1);
        if (later.d < D && later.n > 0) {
            prefetch_rows<STEPS>(g + later.batch * sgb + later.t * (-tdir * sgt) + later.d, sgt, later.n);
            prefetch_rows<STEPS>(dout + later.batch * sdob + later.t * (-tdir * sdot) + later.d, sdot, later.n);
            prefetch_rows<STEPS>(o + later.batch * sob + (later.t - tdir) * (-tdir * sot) + later.d, sot,
                                 later.n < later.rows_before_end ? later.n : later.rows_before_end);  // h[u-1], u >= 1
        }
    }

    sm.park(at.got);  // behind this thread's loads

    // Pass 1, then the look-back, then pass 2.  Dense steps strictly inside the row (not the last step, not
    // the first) take the interior form (docs/performance.md, "Interior form").
    const bool interior = !VARLEN && v0 > 0 && v0 + STEPS < T;
    Affine<Acc> mine[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) { mine[k].a = Acc(1); mine[k].b = Acc(0); }
    if (interior) bwd_fold<false>(v0, T, D, d, batch, live, seg, gnext, gr, dr, dht, mine);
    else bwd_fold<true>(v0, T, D, d, batch, live, seg, gnext, gr, dr, dht, mine);

    sm.settle(grid.hdr, at.total, at.slot_bytes);
    sm.carry_in(grid.slots, at.slot0, at.chunk, at.q, at.cl, mine, pre);
    Acc dh[VEC], en[VEC];  // en: exp of the gate one step later, the a of the current step
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
        dh[k] = mine[k].a;
        en[k] = gate_exp(gnext.template get<Acc>(k));
    }

    const i64 sdx = -tdir * sdxt, sdg = -tdir * sdgt;
    TX* dxq = dx + batch * sdxb + t0 * sdxt + d;
    TG* dgq = dg + batch * sdgb + t0 * sdgt + d;
    if (interior)
        bwd_scan<false>(v0, T, D, d, batch, live, seg, first_mask, gr, dr, orr, h0, dht, dh0, dxq, sdx, dgq, sdg, dh, en);
    else bwd_scan<true>(v0, T, D, d, batch, live, seg, first_mask, gr, dr, orr, h0, dht, dh0, dxq, sdx, dgq, sdg, dh, en);
    if (VARLEN) at.pass_empty(cu_seqlens, cu64, N, D, dht, dh0);
    sm.finish(grid.slots, at.ticket, at.total, at.slot_bytes, (unsigned long long)grid.capacity);
}

}  // namespace hc
