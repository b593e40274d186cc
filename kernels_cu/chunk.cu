// Chunk engine: time split into chunks that are scanned in parallel, in one pass over memory.
//
// grid  (ntiles * nchunks,)   a tile is 32 channels of one batch row (of the packed row with varlen)
// block (32, WARPS)           lane = channel; warp w owns STEPS consecutive steps of the chunk
// traffic per element: forward reads x, g and writes o; backward reads g, o, do and writes dx, dg
//   (plus one extra row per thread for the shifted gate and state).  Workspace: per (tile, chunk)
//   a flag and 32 affine pairs and 32 states, O(N * D * chunks).
//
// Each thread keeps its STEPS steps in registers as affine maps (a, b).  The warps' aggregates are
// combined in shared memory; the chunk's carry-in comes from a single-pass decoupled look-back:
// every block publishes its aggregate at once, then its inclusive state once it knows its carry.
// Blocks take chunk numbers from an atomic ticket in launch order, so a block only ever waits on
// blocks that are already running.  Segment starts (sequence starts, or t = 0) are steps with
// a = 0, which makes varlen and the initial state part of the same scan.
#include "common.cuh"

namespace hc {

// Block shape of each direction (warps per block, steps per thread); hgrn_cupy/chunk.py passes the
// values it launches with, so that the two sides cannot disagree.
#ifndef HC_FWD_WARPS
#define HC_FWD_WARPS 4
#endif
#ifndef HC_FWD_STEPS
#define HC_FWD_STEPS 16
#endif
#ifndef HC_BWD_WARPS
#define HC_BWD_WARPS 16
#endif
#ifndef HC_BWD_STEPS
#define HC_BWD_STEPS 8
#endif

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

// Workspace view of one launch: flags[0] is the ticket counter, flags[1 + slot] the flags.
template <typename Acc>
struct LookBack {
    int* flags; Affine<Acc>* agg; Acc* inc;
    static constexpr int BATCH = 4;  // predecessor aggregates loaded together per round trip

    __device__ __forceinline__ void publish(i64 slot, int flag, int lane) {
        __threadfence();
        __syncwarp();
        if (lane == 0) *reinterpret_cast<volatile int*>(flags + 1 + slot) = flag;
    }
    // Run by one whole warp: the state before chunk c of the tile whose chunk 0 is slot0.
    __device__ Acc carry_in(i64 slot0, i64 c, Affine<Acc> total, int lane) {
        const i64 slot = slot0 + c;
        if (c == 0) {
            __stcg(inc + slot * 32 + lane, total.b);
            publish(slot, FLAG_INCLUSIVE, lane);
            return Acc(0);
        }
        store_pair(agg + slot * 32 + lane, total);
        publish(slot, FLAG_AGGREGATE, lane);

        Affine<Acc> acc; acc.a = Acc(1); acc.b = Acc(0);
        i64 j = c - 1;  // the nearest chunk not yet folded into acc
        for (;;) {
            // Lane l inspects chunk j - l: a window of 32 predecessors per round trip.
            const int f = j - lane >= 0 ? *reinterpret_cast<volatile int*>(flags + 1 + slot0 + j - lane)
                                        : FLAG_INCLUSIVE;
            const unsigned ready = __ballot_sync(0xffffffffu, f != FLAG_NONE);
            const unsigned incl = __ballot_sync(0xffffffffu, f == FLAG_INCLUSIVE);
            const int nready = ready == 0xffffffffu ? 32 : __ffs(~ready) - 1;
            const int first_inc = incl ? __ffs(incl) - 1 : 32;
            __threadfence();
            const bool found = first_inc < nready;
            const int nfold = found ? first_inc : nready;
            Acc h = Acc(0);
            if (found) h = __ldcg(inc + (slot0 + j - first_inc) * 32 + lane);
            // Fold chunks j, j-1, ..., j-nfold+1 (latest first), BATCH loads in flight at a time.
            const Affine<Acc>* p = agg + (slot0 + j) * 32 + lane;
#pragma unroll 1
            for (int k0 = 0; k0 < nfold; k0 += BATCH) {
                Affine<Acc> e[BATCH];
#pragma unroll
                for (int k = 0; k < BATCH; ++k)
                    if (k0 + k < nfold) e[k] = load_pair(p - k * 32);
#pragma unroll
                for (int k = 0; k < BATCH; ++k)
                    if (k0 + k < nfold) acc = compose(acc, e[k]);
                p -= BATCH * 32;
            }
            if (found) {
                const Acc carry = acc.a * h + acc.b;
                __stcg(inc + slot * 32 + lane, total.a * carry + total.b);
                publish(slot, FLAG_INCLUSIVE, lane);
                return carry;
            }
            j -= nfold;
            if (nfold == 0) __nanosleep(64);
        }
    }
};

// The block-level part shared by both directions: take a ticket, combine the warps' aggregates,
// obtain the chunk's carry-in, and return this warp's own carry-in.
template <typename Acc, int CHUNK_WARPS>
struct ChunkBlock {
    Affine<Acc> part[CHUNK_WARPS][32];
    Acc carry[32];
    unsigned ticket;

    __device__ __forceinline__ static unsigned take_ticket(int* flags, ChunkBlock* sm) {
        if (threadIdx.x == 0 && threadIdx.y == 0) sm->ticket = atomicAdd(reinterpret_cast<unsigned int*>(flags), 1u);
        __syncthreads();
        return sm->ticket;
    }
    __device__ __forceinline__ Acc warp_carry_in(LookBack<Acc> lb, i64 slot0, i64 c, Affine<Acc> mine) {
        const int lane = threadIdx.x, w = threadIdx.y;
        part[w][lane] = mine;
        __syncthreads();
        if (w == 0) {
            Affine<Acc> total = part[0][lane];
#pragma unroll
            for (int k = 1; k < CHUNK_WARPS; ++k) total = compose(part[k][lane], total);
            carry[lane] = lb.carry_in(slot0, c, total, lane);
        }
        __syncthreads();
        Acc h = carry[lane];
        for (int k = 0; k < w; ++k) h = part[k][lane].a * h + part[k][lane].b;
        return h;
    }
};

template <typename TX, typename TG, bool VARLEN>
__global__ void __launch_bounds__(32 * HC_FWD_WARPS) chunk_fwd(
    const TX* __restrict__ x, const TG* __restrict__ g, TX* __restrict__ o,
    i64 sxb, i64 sxt, i64 sgb, i64 sgt, i64 sob, i64 sot,
    const typename AccOf<TX, TG>::type* __restrict__ h0, typename AccOf<TX, TG>::type* __restrict__ ht,
    const void* __restrict__ cu_seqlens, int cu64, i64 N, i64 T, i64 D, int reverse,
    int* ws_flags, Affine<typename AccOf<TX, TG>::type>* ws_agg, typename AccOf<TX, TG>::type* ws_inc,
    i64 ntiles, i64 nchunks) {
    typedef typename AccOf<TX, TG>::type Acc;
    constexpr int CHUNK_WARPS = HC_FWD_WARPS, CHUNK_STEPS = HC_FWD_STEPS, CHUNK_LEN = CHUNK_WARPS * CHUNK_STEPS;
    __shared__ ChunkBlock<Acc, CHUNK_WARPS> sm;
    const unsigned ticket = ChunkBlock<Acc, CHUNK_WARPS>::take_ticket(ws_flags, &sm);
    const unsigned chunk = ticket / (unsigned)ntiles, tile = ticket % (unsigned)ntiles;  // grid < 2^31
    const unsigned ntd = (unsigned)((D + 31) / 32);
    const i64 batch = tile / ntd;
    const i64 d = (i64)(tile % ntd) * 32 + threadIdx.x;
    const bool live = d < D;
    const i64 u0 = (i64)chunk * CHUNK_LEN + (i64)threadIdx.y * CHUNK_STEPS;

    SegmentCursor<VARLEN> seg(cu_seqlens, cu64, N, T, reverse);
    if (u0 < T) seg.seek(u0);
    // Logical step u0 + j of this thread lives at p + j * step for each tensor.
    const i64 tdir = reverse ? -1 : 1, t0 = reverse ? T - 1 - u0 : u0;
    const TX* xq = x + batch * sxb + t0 * sxt + d;
    const TG* gq = g + batch * sgb + t0 * sgt + d;
    TX* oq = o + batch * sob + t0 * sot + d;
    sxt *= tdir; sgt *= tdir; sot *= tdir;

    Acc a[CHUNK_STEPS], b[CHUNK_STEPS];
    Affine<Acc> mine; mine.a = Acc(1); mine.b = Acc(0);
#pragma unroll
    for (int j = 0; j < CHUNK_STEPS; ++j) {
        const i64 u = u0 + j;
        a[j] = Acc(1); b[j] = Acc(0);
        if (u < T) {
            seg.forward_to(u);
            if (live) {
                a[j] = gate_exp(Cvt<Acc, TG>::load(load_stream(gq)));
                b[j] = Cvt<Acc, TX>::load(load_stream(xq));
                if (u == seg.start && h0) b[j] += a[j] * h0[seg.seq(batch) * D + d];  // h[-1] = h0
            }
            if (u == seg.start) a[j] = Acc(0);  // a sequence begins
        }
        gq += sgt; xq += sxt;
        Affine<Acc> step; step.a = a[j]; step.b = b[j];
        mine = compose(step, mine);
    }

    LookBack<Acc> lb{ws_flags, ws_agg, ws_inc};
    Acc h = sm.warp_carry_in(lb, (i64)tile * nchunks, chunk, mine);

    if (u0 < T) seg.seek(u0);
#pragma unroll
    for (int j = 0; j < CHUNK_STEPS; ++j) {
        const i64 u = u0 + j;
        h = a[j] * h + b[j];
        if (u < T && live) {
            store_stream(oq, Cvt<Acc, TX>::store(h));
            if (ht) {
                seg.forward_to(u);
                if (u == seg.end - 1) ht[seg.seq(batch) * D + d] = h;
            }
        }
        oq += sot;
    }
    // Empty sequences never own a step: the blocks of chunk 0 pass their initial state through.
    if (VARLEN && ht && chunk == 0 && live) {
        for (i64 n = threadIdx.y; n < N; n += CHUNK_WARPS)
            if (load_offset(cu_seqlens, cu64, n) >= load_offset(cu_seqlens, cu64, n + 1))
                ht[n * D + d] = h0 ? h0[n * D + d] : Acc(0);
    }
}

// Backward: the same scan over v = T - 1 - u.  With the gate shifted by one step,
// dh[u] = do[u] + exp(g[u+1]) * dh[u+1], restarting (a = 0, plus dht) at each segment's last step.
template <typename TX, typename TG, bool VARLEN>
__global__ void __launch_bounds__(32 * HC_BWD_WARPS) chunk_bwd(
    const TG* __restrict__ g, const TX* __restrict__ o, const TX* __restrict__ dout,
    TX* __restrict__ dx, TG* __restrict__ dg,
    i64 sgb, i64 sgt, i64 sob, i64 sot, i64 sdob, i64 sdot, i64 sdxb, i64 sdxt, i64 sdgb, i64 sdgt,
    const typename AccOf<TX, TG>::type* __restrict__ h0, const typename AccOf<TX, TG>::type* __restrict__ dht,
    typename AccOf<TX, TG>::type* __restrict__ dh0,
    const void* __restrict__ cu_seqlens, int cu64, i64 N, i64 T, i64 D, int reverse,
    int* ws_flags, Affine<typename AccOf<TX, TG>::type>* ws_agg, typename AccOf<TX, TG>::type* ws_inc,
    i64 ntiles, i64 nchunks) {
    typedef typename AccOf<TX, TG>::type Acc;
    constexpr int CHUNK_WARPS = HC_BWD_WARPS, CHUNK_STEPS = HC_BWD_STEPS, CHUNK_LEN = CHUNK_WARPS * CHUNK_STEPS;
    __shared__ ChunkBlock<Acc, CHUNK_WARPS> sm;
    const unsigned ticket = ChunkBlock<Acc, CHUNK_WARPS>::take_ticket(ws_flags, &sm);
    const unsigned chunk = ticket / (unsigned)ntiles, tile = ticket % (unsigned)ntiles;  // grid < 2^31
    const unsigned ntd = (unsigned)((D + 31) / 32);
    const i64 batch = tile / ntd;
    const i64 d = (i64)(tile % ntd) * 32 + threadIdx.x;
    const bool live = d < D;
    const i64 v0 = (i64)chunk * CHUNK_LEN + (i64)threadIdx.y * CHUNK_STEPS;  // u = T - 1 - v

    SegmentCursor<VARLEN> seg(cu_seqlens, cu64, N, T, reverse);
    if (v0 < T) seg.seek(T - 1 - v0);
    // Step j of this thread is u = T - 1 - v0 - j, at physical t = t0 - tdir * j.
    const i64 tdir = reverse ? -1 : 1, t0 = reverse ? v0 : T - 1 - v0;
    const TG* gq = g + batch * sgb + t0 * sgt + d;
    const TG* const gq0 = gq;
    const TX* oq = o + batch * sob + (t0 - tdir) * sot + d;  // the previous state h[u-1]
    const TX* dq = dout + batch * sdob + t0 * sdot + d;
    sgt *= -tdir; sot *= -tdir; sdot *= -tdir;

    // a[j], b[j]: the step map of the reversed scan; c[j] = exp(g[u]) * h[u-1], so that dg = dh * c.
    Acc a[CHUNK_STEPS], b[CHUNK_STEPS], c[CHUNK_STEPS];
    Affine<Acc> mine; mine.a = Acc(1); mine.b = Acc(0);
    Acc g_next = Acc(1);  // exp(g[u+1]) for the current step
    if (live && v0 < T && v0 >= 1) g_next = gate_exp(Cvt<Acc, TG>::load(load_stream(gq - sgt)));
#pragma unroll
    for (int j = 0; j < CHUNK_STEPS; ++j) {
        const i64 v = v0 + j, u = T - 1 - v;
        a[j] = Acc(1); b[j] = Acc(0); c[j] = Acc(0);
        if (v < T) {
            seg.backward_to(u);
            const bool last = u == seg.end - 1, first = u == seg.start;
            a[j] = last ? Acc(0) : g_next;
            if (live) {
                const Acc ga = gate_exp(Cvt<Acc, TG>::load(load_stream(gq)));
                b[j] = Cvt<Acc, TX>::load(load_stream(dq));
                if (last && dht) b[j] += dht[seg.seq(batch) * D + d];
                if (!first) c[j] = ga * Cvt<Acc, TX>::load(load_stream(oq));
                else if (h0) c[j] = ga * h0[seg.seq(batch) * D + d];
                g_next = ga;
            }
        }
        gq += sgt; dq += sdot; oq += sot;
        Affine<Acc> step; step.a = a[j]; step.b = b[j];
        mine = compose(step, mine);
    }

    LookBack<Acc> lb{ws_flags, ws_agg, ws_inc};
    Acc dh = sm.warp_carry_in(lb, (i64)tile * nchunks, chunk, mine);

    if (v0 < T) seg.seek(T - 1 - v0);
    const i64 sdx = -tdir * sdxt, sdg = -tdir * sdgt;
    TX* dxq = dx + batch * sdxb + t0 * sdxt + d;
    TG* dgq = dg + batch * sdgb + t0 * sdgt + d;
#pragma unroll
    for (int j = 0; j < CHUNK_STEPS; ++j) {
        const i64 v = v0 + j, u = T - 1 - v;
        dh = a[j] * dh + b[j];
        if (v < T && live) {
            store_stream(dxq, Cvt<Acc, TX>::store(dh));
            store_stream(dgq, Cvt<Acc, TG>::store(dh * c[j]));
            if (dh0) {
                seg.backward_to(u);
                if (u == seg.start)  // rare: one step per sequence, so the gate is read again
                    dh0[seg.seq(batch) * D + d] = gate_exp(Cvt<Acc, TG>::load(gq0[j * sgt])) * dh;
            }
        }
        dxq += sdx; dgq += sdg;
    }
    if (VARLEN && dh0 && chunk == 0 && live) {
        for (i64 n = threadIdx.y; n < N; n += CHUNK_WARPS)
            if (load_offset(cu_seqlens, cu64, n) >= load_offset(cu_seqlens, cu64, n + 1))
                dh0[n * D + d] = dht ? dht[n * D + d] : Acc(0);
    }
}

}  // namespace hc
