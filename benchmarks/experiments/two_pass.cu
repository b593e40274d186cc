// The two-pass forward, an experiment for grids of one or two waves whose x and g fit in L2 (two_pass.py
// times it against the chunk engine).  Compiled after the library's kernels/common.cuh and tile_walk.cu
// (tw::Words, tw::fold, tw::scan_rows, tw::scan_window), which two_pass.py puts in front of this text.
//
// A chunk is the tile walk's window: WIN = WARPS * ROWS * S steps of C = 32 / ROWS * VEC channels of one
// batch row, slot q = warp * ROWS + row owning S consecutive steps of it.
// reduce: a block per chunk folds it into one map per channel (a: the product of its gate factors, b: its
//   last state from a zero state) and writes the map to maps[B, chunks, D].  No block waits on another.
// apply: a block per chunk composes the maps of the chunks before its own (slot q a run of ceil(k / Q) of
//   them, Q = WARPS * ROWS slots, the slots meeting as the window scan's do), so that its carry-in is the
//   state before the chunk; then scans the chunk from it and writes o.  x and g are read twice, the second
//   time from L2 where they fit; the maps are 8 bytes a channel a chunk (float) and stay in L2.
//
// grid (chunks, ceil(D / C), B)   block (32, WARPS)   D a multiple of VEC, rows 16-byte aligned (the host
// checks).  The library's chunk engine needs no second read: its blocks wait on their predecessors instead.

namespace tp {

using hc::AccT;
using hc::Affine;
using hc::i64;

template <typename TX, typename TG, int VEC, int ROWS, int WARPS, int S>
__global__ void __launch_bounds__(32 * WARPS) reduce(const TX* __restrict__ x, const TG* __restrict__ g,
                                                     Affine<AccT<TX, TG>>* __restrict__ maps, i64 T, i64 D,
                                                     i64 sxb, i64 sxt, i64 sgb, i64 sgt, i64 chunks) {
    typedef AccT<TX, TG> Acc;
    constexpr int LC = 32 / ROWS, C = LC * VEC, WIN = WARPS * ROWS * S;
    __shared__ Affine<Acc> part[WARPS][C];
    const int lane = threadIdx.x, w = threadIdx.y, c = lane % LC, r = lane / LC, q = w * ROWS + r;
    const i64 k = blockIdx.x, d = (i64)blockIdx.y * C + c * VEC, b = blockIdx.z;
    const bool live = d < D;
    const i64 u0 = k * WIN + (i64)q * S;
    tw::Words<TX, TG, VEC, S> in;
    in.load(x + b * sxb + d, g + b * sgb + d, sxt, sgt, u0, T, live);
    Affine<Acc> m[VEC], before[VEC];
    Acc a[S][VEC];
    tw::fold<TX, TG, VEC, S>(in, m, a, u0, T);
    tw::scan_rows<Acc, VEC, ROWS>(m, before);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        if (r == ROWS - 1) part[w][c * VEC + j] = m[j];
    }
    __syncthreads();
    if (q == 0 && live) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            Affine<Acc> t = part[0][c * VEC + j];
#pragma unroll
            for (int i = 1; i < WARPS; ++i) t = hc::compose(part[i][c * VEC + j], t);
            maps[(b * chunks + k) * D + d + j] = t;
        }
    }
}

template <typename TX, typename TG, int VEC, int ROWS, int WARPS, int S>
__global__ void __launch_bounds__(32 * WARPS) apply(const TX* __restrict__ x, const TG* __restrict__ g,
                                                    const Affine<AccT<TX, TG>>* __restrict__ maps,
                                                    TX* __restrict__ o, i64 T, i64 D, i64 sxb, i64 sxt,
                                                    i64 sgb, i64 sgt, i64 sob, i64 sot, i64 chunks) {
    typedef AccT<TX, TG> Acc;
    constexpr int LC = 32 / ROWS, C = LC * VEC, WIN = WARPS * ROWS * S, Q = WARPS * ROWS;
    __shared__ Affine<Acc> part[2][WARPS][C];
    const int lane = threadIdx.x, w = threadIdx.y, c = lane % LC, r = lane / LC, q = w * ROWS + r;
    const i64 k = blockIdx.x, d = (i64)blockIdx.y * C + c * VEC, b = blockIdx.z;
    const bool live = d < D;
    const i64 u0 = k * WIN + (i64)q * S;
    tw::Words<TX, TG, VEC, S> in;  // the chunk's words, in flight while the carry-in is composed
    in.load(x + b * sxb + d, g + b * sgb + d, sxt, sgt, u0, T, live);
    // slot q composes maps [q * run, min(k, q * run + run)); the slots in order cover the chunks before k
    const i64 run = (k + Q - 1) / Q, first = q * run, last = first + run < k ? first + run : k;
    Affine<Acc> m[VEC], before[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) { m[j].a = Acc(1); m[j].b = Acc(0); }
    if (live) {
        for (i64 i = first; i < last; ++i) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) m[j] = hc::compose(maps[(b * chunks + i) * D + d + j], m[j]);
        }
    }
    tw::scan_rows<Acc, VEC, ROWS>(m, before);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        if (r == ROWS - 1) part[0][w][c * VEC + j] = m[j];
    }
    __syncthreads();
    Acc carry[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        Acc h = Acc(0);  // the state before chunk 0
#pragma unroll
        for (int i = 0; i < WARPS; ++i) {
            const Affine<Acc> p = part[0][i][c * VEC + j];
            h = p.a * h + p.b;
        }
        carry[j] = h;
    }
    tw::scan_window<TX, TG, VEC, ROWS, WARPS, S>(in, part[1], carry, o + b * sob + d, sot, u0, T, live);
}

}  // namespace tp
