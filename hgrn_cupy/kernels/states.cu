// State-only passes: the affine map of a whole slice of time, per channel, from two tensors and nothing
// written of size T.  They are what context parallelism exchanges between ranks (docs/context_parallel.md).
//
//   states_fwd over x, g:   h -> exp(g[t]) * h + x[t] in the recurrence's order; from h = 0 the walk ends
//                           at b, so h_end = A * h_start + b with A = prod exp(g).
//   states_bwd over do, g:  e -> exp(g[t]) * e + exp(g[t]) * do[t] in the other order (e[t] = exp(g[t]) *
//                           dh[t], e = 0 past the end); it ends at c, so dh0 = A * dht + c.
// `reverse` mirrors time as in the recurrence.  Both walk "logical" steps u = 0 .. T-1: physical step
// t = u, or t = T-1-u where the walk runs backwards in time (forward with reverse, backward without).
//
// states_walk<false> (states_fwd) / states_walk<true> (states_bwd)
//   grid  (ntiles, nsplit)  a tile is 32 * VEC channels of one batch row; split s owns logical steps
//                           [s * span, (s+1) * span), span a multiple of WARPS * UNROLL.
//   block (32, WARPS)       lane = VEC consecutive channels (one 16-byte word per tensor where the host
//                           found the tensors aligned, VEC = 1 otherwise); warp w owns the w-th of WARPS
//                           equal, contiguous parts of the split's steps.  Each thread folds its steps into
//                           one map per channel, UNROLL steps of loads in flight at a time; the warps' maps
//                           meet in shared memory, in order.
//   traffic per element: reads the two inputs once.  Writes one map (2 Acc) per (split, channel):
//                           O(N * D * nsplit), into the outputs directly when nsplit == 1.
// The host picks nsplit so that the grid is about one wave of resident blocks: every block walks an equal
// stretch, and no second wave runs half empty.
//
// states_combine
//   grid  (ceil(N*D / 32)), block (32, ROWS): thread (x, y) composes the y-th of ROWS contiguous runs of
//   one channel's nsplit maps; row 0 composes the ROWS partial maps in order and writes A and b.
//   nsplit = 0 (T = 0) writes the identity (1, 0).
//
// Nothing takes a shortcut on a = 0: a NaN or inf anywhere in a slice reaches its map as the sequential
// walk would carry it (0 * NaN is NaN both ways).
#include "common.cuh"

namespace hc {

// Warps a block, steps of both tensors' loads a thread has in flight, and rows of the combine: the
// launcher passes the values it launches with.
#ifndef HC_STATES_WARPS
#error "HC_STATES_WARPS is set by the launcher (hgrn_cupy/states.py)"
#endif
#ifndef HC_STATES_UNROLL
#error "HC_STATES_UNROLL is set by the launcher (hgrn_cupy/states.py)"
#endif
#ifndef HC_STATES_MIN_BLOCKS
#define HC_STATES_MIN_BLOCKS 2
#endif
#ifndef HC_STATES_COMBINE_ROWS
#error "HC_STATES_COMBINE_ROWS is set by the launcher (hgrn_cupy/states.py)"
#endif

template <typename Acc, typename TV, typename TG, int VEC, bool BWD>
__device__ __forceinline__ void fold_step(Affine<Acc>* m, const Pack<TV, VEC>& v, const Pack<TG, VEC>& g) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
        const Acc a = gate_exp(g.template get<Acc>(k));
        const Acc x = v.template get<Acc>(k);
        m[k].b = BWD ? a * (m[k].b + x) : a * m[k].b + x;
        m[k].a = a * m[k].a;
    }
}

// One thread's walk: `count` logical steps from the pointers, stepping `dv` / `dg` elements a step.
template <typename Acc, typename TV, typename TG, int VEC, bool BWD>
__device__ __forceinline__ void walk(Affine<Acc>* m, const TV* pv, const TG* pg, i64 dv, i64 dg, i64 count) {
    constexpr int U = HC_STATES_UNROLL;
    i64 j = 0;
    for (; j + U <= count; j += U) {
        Pack<TV, VEC> v[U];
        Pack<TG, VEC> g[U];
#pragma unroll
        for (int i = 0; i < U; ++i) { v[i].load(pv + i * dv); g[i].load(pg + i * dg); }
#pragma unroll
        for (int i = 0; i < U; ++i) fold_step<Acc, TV, TG, VEC, BWD>(m, v[i], g[i]);
        pv += U * dv; pg += U * dg;
    }
    for (; j < count; ++j) {
        Pack<TV, VEC> v;
        Pack<TG, VEC> g;
        v.load(pv); g.load(pg);
        fold_step<Acc, TV, TG, VEC, BWD>(m, v, g);
        pv += dv; pg += dg;
    }
}

// One pass: BWD = false walks x and g (states_fwd above), BWD = true do and g (states_bwd).
// out_a, out_b: [nsplit, N, D].
template <bool BWD, typename TV, typename TG, int VEC>
__global__ void __launch_bounds__(32 * HC_STATES_WARPS, HC_STATES_MIN_BLOCKS) states_walk(
    const TV* __restrict__ v, const TG* __restrict__ g, i64 svb, i64 svt, i64 sgb, i64 sgt,
    i64 N, i64 T, i64 D, int reverse, i64 span, AccT<TV, TG>* __restrict__ out_a, AccT<TV, TG>* __restrict__ out_b) {
    typedef AccT<TV, TG> Acc;
    constexpr int WARPS = HC_STATES_WARPS;
    constexpr int TILE = 32 * VEC;
    __shared__ Affine<Acc> part[WARPS][TILE];

    const i64 tiles_per_row = (D + TILE - 1) / TILE;
    const i64 n = blockIdx.x / tiles_per_row;
    const i64 d_tile = (blockIdx.x % tiles_per_row) * TILE;
    const int lane = threadIdx.x, w = threadIdx.y;
    const i64 d = d_tile + (i64)lane * VEC;
    const bool live = d < D;  // with VEC > 1 the host guarantees D % VEC == 0

    const i64 wspan = span / WARPS;
    const i64 u0 = (i64)blockIdx.y * span + w * wspan;
    const i64 count = live ? (u0 < T ? (T - u0 < wspan ? T - u0 : wspan) : 0) : 0;
    const bool descending = (reverse != 0) != BWD;
    const i64 t0 = descending ? T - 1 - u0 : u0;

    Affine<Acc> m[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) { m[k].a = Acc(1); m[k].b = Acc(0); }
    if (count > 0)
        walk<Acc, TV, TG, VEC, BWD>(m, v + n * svb + t0 * svt + d, g + n * sgb + t0 * sgt + d,
                                    descending ? -svt : svt, descending ? -sgt : sgt, count);
#pragma unroll
    for (int k = 0; k < VEC; ++k) part[w][lane * VEC + k] = m[k];
    __syncthreads();

    const i64 base = (i64)blockIdx.y * N * D + n * D + d_tile;
    for (int c = w * 32 + lane; c < TILE; c += 32 * WARPS) {
        Affine<Acc> r = part[0][c];
#pragma unroll
        for (int q = 1; q < WARPS; ++q) r = compose(part[q][c], r);
        if (d_tile + c < D) { out_a[base + c] = r.a; out_b[base + c] = r.b; }
    }
}

// pa, pb: [nsplit, nd] maps in walk order; a, b: [nd].
template <typename Acc>
__global__ void __launch_bounds__(32 * HC_STATES_COMBINE_ROWS) states_combine(
    const Acc* __restrict__ pa, const Acc* __restrict__ pb, i64 nd, i64 nsplit, Acc* __restrict__ a,
    Acc* __restrict__ b) {
    constexpr int ROWS = HC_STATES_COMBINE_ROWS;
    __shared__ Affine<Acc> part[ROWS][32];
    const i64 j = (i64)blockIdx.x * 32 + threadIdx.x;
    const i64 per = (nsplit + ROWS - 1) / ROWS;
    const i64 s0 = threadIdx.y * per;
    const i64 s1 = s0 + per < nsplit ? s0 + per : nsplit;
    Affine<Acc> m;
    m.a = Acc(1); m.b = Acc(0);
    if (j < nd) {
        i64 s = s0;
        for (; s + 4 <= s1; s += 4) {  // four maps' loads in flight
            Affine<Acc> q[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) { q[i].a = pa[(s + i) * nd + j]; q[i].b = pb[(s + i) * nd + j]; }
#pragma unroll
            for (int i = 0; i < 4; ++i) m = compose(q[i], m);
        }
        for (; s < s1; ++s) {
            Affine<Acc> q;
            q.a = pa[s * nd + j]; q.b = pb[s * nd + j];
            m = compose(q, m);
        }
    }
    part[threadIdx.y][threadIdx.x] = m;
    __syncthreads();
    if (threadIdx.y == 0 && j < nd) {
        Affine<Acc> r = part[0][threadIdx.x];
        for (int y = 1; y < ROWS; ++y) r = compose(part[y][threadIdx.x], r);
        a[j] = r.a;
        b[j] = r.b;
    }
}

}  // namespace hc
