// Chunk engine: time split into chunks that are scanned in parallel, in one pass over memory.
//
// grid  (ntiles * nchunks,)   a tile is 32 * VEC channels of one batch row (of the packed row with varlen)
// block (32, WARPS)           lane = VEC consecutive channels; warp w owns STEPS consecutive steps of the chunk
// traffic per element: forward reads x, g and writes o; backward reads g, o, do and writes dx, dg
//   (plus one extra row per thread for the shifted gate).  Workspace: per (tile, chunk) a flag,
//   32 * VEC affine pairs and 32 * VEC states, O(N * D * chunks).
//
// Every access of a thread is one VEC-channel word (16 bytes where the host found the tensors aligned,
// VEC = 1 otherwise), so the per-step work -- addresses, bounds, segment bookkeeping -- is paid once
// per VEC elements.  Each thread keeps its steps' raw words in registers: a first pass folds them into
// one affine map per channel, the warps' maps are combined in shared memory, the chunk's carry-in comes
// from a single-pass decoupled look-back, and a second pass recomputes each step from the raw words and
// writes the outputs.  The look-back is block-wide: one warp reads the predecessors' flags, every thread
// folds the aggregates of its channels.  Blocks take chunk numbers from an atomic ticket in launch
// order, so a block only ever waits on blocks that are already running.  Segment starts (sequence
// starts, or t = 0) are steps with a = 0, which makes varlen and the initial state part of one scan.
#include "common.cuh"

namespace hc {

// Block shapes (warps per block, steps per thread) for each direction, scalar (VEC = 1) and vector
// kernels; hgrn_cupy/chunk.py passes the values it launches with, so the two sides cannot disagree.
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

#ifndef HC_FWD_MIN_BLOCKS_V
#define HC_FWD_MIN_BLOCKS_V 1
#endif
#ifndef HC_BWD_MIN_BLOCKS_V
#define HC_BWD_MIN_BLOCKS_V 1
#endif
#ifndef HC_LOOKBACK_BATCH
#define HC_LOOKBACK_BATCH 4
#endif

template <int DIRECTION, int VEC> struct Shape {
    static constexpr int WARPS = DIRECTION == 0 ? (VEC == 1 ? HC_FWD_WARPS_1 : HC_FWD_WARPS_V)
                                                : (VEC == 1 ? HC_BWD_WARPS_1 : HC_BWD_WARPS_V);
    static constexpr int STEPS = DIRECTION == 0 ? (VEC == 1 ? HC_FWD_STEPS_1 : HC_FWD_STEPS_V)
                                                : (VEC == 1 ? HC_BWD_STEPS_1 : HC_BWD_STEPS_V);
    // Resident blocks per SM the register allocation must allow (1: no constraint).
    static constexpr int MIN_BLOCKS = VEC == 1 ? 1 : (DIRECTION == 0 ? HC_FWD_MIN_BLOCKS_V : HC_BWD_MIN_BLOCKS_V);
};

// ---- workspace and look-back --------------------------------------------------------------------
enum { FLAG_NONE = 0, FLAG_AGGREGATE = 1, FLAG_INCLUSIVE = 2 };

// Affine pairs move through L2 as one 8-byte (float) or 16-byte (double) access.
__device__ __forceinline__ Affine<float> load_pair(const Affine<float>* p) {
    const float2 v = __ldcg(reinterpret_cast<const float2*>(p));
    Affine<float> r; r.a = v.x; r.b = v.y; return r;
}
__device__ __forceinline__ Affine<double> load_pair(const Affine<double>* p) {
    const double2 v = __ldcg(reinterpret_cast<const double2*>(p));
    Affine<double> r; r.a = v.x; r.b = v.y; return r;
}
__device__ __forceinline__ void store_pair(Affine<float>* p, Affine<float> v) {
    __stcg(reinterpret_cast<float2*>(p), make_float2(v.a, v.b));
}
__device__ __forceinline__ void store_pair(Affine<double>* p, Affine<double> v) {
    __stcg(reinterpret_cast<double2*>(p), make_double2(v.a, v.b));
}

// The block-level machinery shared by both directions.  Channel c of the tile (c = lane * VEC + k) is
// item i = k * 32 + lane of the workspace and of shared memory, so that every access is coalesced.
template <typename Acc, int WARPS, int VEC>
struct ChunkBlock {
    static constexpr int C = 32 * VEC;                   // channels per tile
    static constexpr int NT = 32 * WARPS;                // threads per block
    static constexpr int PER = (C + NT - 1) / NT;        // items per thread in the block-wide phases
    static constexpr int BATCH = HC_LOOKBACK_BATCH;      // predecessor aggregates in flight per item
    Affine<Acc> part[WARPS][C];                          // each warp's map of each channel; then its carry-in
    unsigned ticket;
    int nfold, found;

    __device__ __forceinline__ static unsigned take_ticket(int* flags, ChunkBlock* sm) {
        if (threadIdx.x == 0 && threadIdx.y == 0) sm->ticket = atomicAdd(reinterpret_cast<unsigned int*>(flags), 1u);
        __syncthreads();
        return sm->ticket;
    }
    __device__ __forceinline__ static void publish(int* flags, i64 slot, int flag) {
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0 && threadIdx.y == 0) *reinterpret_cast<volatile int*>(flags + 1 + slot) = flag;
    }

    // Given every thread's maps `mine` (one per channel it owns) for chunk c of the tile whose chunk 0 is
    // workspace slot slot0, set each mine[k].a to the state before the thread's first step in channel k.
    __device__ void carry_in(int* flags, Affine<Acc>* agg, Acc* inc, i64 slot0, i64 c, Affine<Acc>* mine) {
        const int lane = threadIdx.x, w = threadIdx.y, tid = w * 32 + lane;
#pragma unroll
        for (int k = 0; k < VEC; ++k) part[w][k * 32 + lane] = mine[k];
        __syncthreads();
        Affine<Acc> total[PER];
#pragma unroll
        for (int r = 0; r < PER; ++r) {
            const int i = tid + r * NT;
            total[r].a = Acc(1); total[r].b = Acc(0);
            if (i < C) {
#pragma unroll
                for (int q = 0; q < WARPS; ++q) total[r] = compose(part[q][i], total[r]);
            }
        }
        const i64 slot = slot0 + c;
        Acc carry[PER];
        if (c == 0) {
#pragma unroll
            for (int r = 0; r < PER; ++r) {
                const int i = tid + r * NT;
                carry[r] = Acc(0);
                if (i < C) __stcg(inc + slot * C + i, total[r].b);
            }
            publish(flags, slot, FLAG_INCLUSIVE);
        } else {
#pragma unroll
            for (int r = 0; r < PER; ++r) {
                const int i = tid + r * NT;
                if (i < C) store_pair(agg + slot * C + i, total[r]);
            }
            publish(flags, slot, FLAG_AGGREGATE);
            Affine<Acc> acc[PER];
#pragma unroll
            for (int r = 0; r < PER; ++r) { acc[r].a = Acc(1); acc[r].b = Acc(0); }
            i64 j = c - 1;  // the nearest chunk not yet folded into acc
            for (;;) {
                if (w == 0) {  // lane l inspects chunk j - l: a window of 32 predecessors per round trip
                    const int f = j - lane >= 0 ? *reinterpret_cast<volatile int*>(flags + 1 + slot0 + j - lane)
                                                : FLAG_INCLUSIVE;
                    const unsigned ready = __ballot_sync(0xffffffffu, f != FLAG_NONE);
                    const unsigned incl = __ballot_sync(0xffffffffu, f == FLAG_INCLUSIVE);
                    const int nready = ready == 0xffffffffu ? 32 : __ffs(~ready) - 1;
                    const int first_inc = incl ? __ffs(incl) - 1 : 32;
                    __threadfence();
                    if (lane == 0) {
                        found = first_inc < nready;
                        nfold = first_inc < nready ? first_inc : nready;
                    }
                }
                __syncthreads();
                const int nf = nfold;
                const bool fnd = found;
                __syncthreads();  // nfold and found may be rewritten by the next round
#pragma unroll
                for (int r = 0; r < PER; ++r) {
                    const int i = tid + r * NT;
                    if (i >= C) continue;
                    // Fold chunks j, j-1, ..., j-nf+1 (latest first), BATCH loads in flight at a time.
                    const Affine<Acc>* p = agg + (slot0 + j) * C + i;
#pragma unroll 1
                    for (int k0 = 0; k0 < nf; k0 += BATCH) {
                        Affine<Acc> e[BATCH];
#pragma unroll
                        for (int k = 0; k < BATCH; ++k)
                            if (k0 + k < nf) e[k] = load_pair(p - k * C);
#pragma unroll
                        for (int k = 0; k < BATCH; ++k)
                            if (k0 + k < nf) acc[r] = compose(acc[r], e[k]);
                        p -= BATCH * C;
                    }
                    if (fnd) {
                        const Acc h = __ldcg(inc + (slot0 + j - nf) * C + i);
                        carry[r] = acc[r].a * h + acc[r].b;
                        __stcg(inc + slot * C + i, total[r].a * carry[r] + total[r].b);
                    }
                }
                if (fnd) break;
                j -= nf;
                if (nf == 0) __nanosleep(64);
            }
            publish(flags, slot, FLAG_INCLUSIVE);
        }
        // Walk the carry through the warps of this chunk; each warp's carry-in replaces its map's a.
#pragma unroll
        for (int r = 0; r < PER; ++r) {
            const int i = tid + r * NT;
            if (i < C) {
                Acc h = carry[r];
#pragma unroll
                for (int q = 0; q < WARPS; ++q) {
                    const Affine<Acc> m = part[q][i];
                    part[q][i].a = h;
                    h = m.a * h + m.b;
                }
            }
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < VEC; ++k) mine[k].a = part[w][k * 32 + lane].a;
    }
};

template <typename TX, typename TG, bool VARLEN, int VEC>
__global__ void __launch_bounds__(32 * Shape<0, VEC>::WARPS, Shape<0, VEC>::MIN_BLOCKS) chunk_fwd(
    const TX* __restrict__ x, const TG* __restrict__ g, TX* __restrict__ o,
    i64 sxb, i64 sxt, i64 sgb, i64 sgt, i64 sob, i64 sot,
    const typename AccOf<TX, TG>::type* __restrict__ h0, typename AccOf<TX, TG>::type* __restrict__ ht,
    const void* __restrict__ cu_seqlens, int cu64, i64 N, i64 T, i64 D, int reverse,
    int* ws_flags, Affine<typename AccOf<TX, TG>::type>* ws_agg, typename AccOf<TX, TG>::type* ws_inc,
    i64 ntiles, i64 nchunks) {
    typedef typename AccOf<TX, TG>::type Acc;
    constexpr int WARPS = Shape<0, VEC>::WARPS, STEPS = Shape<0, VEC>::STEPS, CHUNK_LEN = WARPS * STEPS;
    typedef ChunkBlock<Acc, WARPS, VEC> Block;
    __shared__ Block sm;
    const unsigned ticket = Block::take_ticket(ws_flags, &sm);
    const unsigned chunk = ticket / (unsigned)ntiles, tile = ticket % (unsigned)ntiles;  // grid < 2^31
    const unsigned ntd = (unsigned)((D + Block::C - 1) / Block::C);
    const i64 batch = tile / ntd;
    const i64 d = (i64)(tile % ntd) * Block::C + threadIdx.x * VEC;
    const bool live = d < D;  // D is a multiple of VEC
    const i64 u0 = (i64)chunk * CHUNK_LEN + (i64)threadIdx.y * STEPS;

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

    // Pass 1: the map of this thread's steps, per channel.
    SegmentCursor<VARLEN> seg(cu_seqlens, cu64, N, T, reverse);
    if (u0 < T) seg.seek(u0);
    Affine<Acc> mine[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) { mine[k].a = Acc(1); mine[k].b = Acc(0); }
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

    sm.carry_in(ws_flags, ws_agg, ws_inc, (i64)tile * nchunks, chunk, mine);
    Acc h[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) h[k] = mine[k].a;

    // Pass 2: the states, from the raw words again.
    TX* oq = o + batch * sob + t0 * sot + d;
    sot *= tdir;
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
    // Empty sequences never own a step: the blocks of chunk 0 pass their initial state through.
    if (VARLEN && ht && chunk == 0 && live) {
        for (i64 n = threadIdx.y; n < N; n += WARPS)
            if (load_offset(cu_seqlens, cu64, n) >= load_offset(cu_seqlens, cu64, n + 1))
#pragma unroll
                for (int k = 0; k < VEC; ++k) ht[n * D + d + k] = h0 ? h0[n * D + d + k] : Acc(0);
    }
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
    int* ws_flags, Affine<typename AccOf<TX, TG>::type>* ws_agg, typename AccOf<TX, TG>::type* ws_inc,
    i64 ntiles, i64 nchunks) {
    typedef typename AccOf<TX, TG>::type Acc;
    constexpr int WARPS = Shape<1, VEC>::WARPS, STEPS = Shape<1, VEC>::STEPS, CHUNK_LEN = WARPS * STEPS;
    typedef ChunkBlock<Acc, WARPS, VEC> Block;
    __shared__ Block sm;
    const unsigned ticket = Block::take_ticket(ws_flags, &sm);
    const unsigned chunk = ticket / (unsigned)ntiles, tile = ticket % (unsigned)ntiles;  // grid < 2^31
    const unsigned ntd = (unsigned)((D + Block::C - 1) / Block::C);
    const i64 batch = tile / ntd;
    const i64 d = (i64)(tile % ntd) * Block::C + threadIdx.x * VEC;
    const bool live = d < D;
    const i64 v0 = (i64)chunk * CHUNK_LEN + (i64)threadIdx.y * STEPS;  // u = T - 1 - v

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

    // Pass 1: the map of this thread's steps of the reversed scan, per channel.
    if (v0 < T) seg.seek(T - 1 - v0);
    Affine<Acc> mine[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) { mine[k].a = Acc(1); mine[k].b = Acc(0); }
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

    sm.carry_in(ws_flags, ws_agg, ws_inc, (i64)tile * nchunks, chunk, mine);
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
    if (VARLEN && dh0 && chunk == 0 && live) {
        for (i64 n = threadIdx.y; n < N; n += WARPS)
            if (load_offset(cu_seqlens, cu64, n) >= load_offset(cu_seqlens, cu64, n + 1))
#pragma unroll
                for (int k = 0; k < VEC; ++k) dh0[n * D + d + k] = dht ? dht[n * D + d + k] : Acc(0);
    }
}

}  // namespace hc
