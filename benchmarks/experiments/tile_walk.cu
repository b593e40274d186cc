// The tile walk (forward), an experiment for grids of one or two waves (tile_walk.py times it against the
// chunk engine and torch.add).  Compiled after the library's kernels/common.cuh (Pack, Affine, AccT,
// gate_exp), which tile_walk.py puts in front of this text.
//
// A block owns C = LC * VEC channels of one batch row for the whole sequence, LC = 32 / ROWS: a warp is
// ROWS rows of LC lanes, a lane moves VEC channels (16 bytes of the wider type) of one step, so a warp's
// access covers ROWS steps of the block's channels.  Time is walked in windows of WIN = WARPS * ROWS * S
// steps: slot q = warp * ROWS + row owns steps [q * S, q * S + S) of a window and folds them into one
// affine map per channel; the slots of a warp meet by shuffles (an inclusive scan over its rows), the
// warps by shared memory (their totals, one barrier a window, two buffers), and every thread composes the
// window's carry-in with the slots before its own, then scans its steps again from the raw words.  The
// next window's words are loaded before the current one is scanned.  No look-back and no workspace, as
// the library's block walk, whose tiles are 32 lanes wide (32 * VEC channels): here down to one lane a
// row, so that a few thousand channels still make a block for every multiprocessor.
//
// grid (ceil(D / C), B)   block (32, WARPS)   D a multiple of VEC, rows 16-byte aligned (the host checks).

namespace tw {

using hc::AccT;
using hc::Affine;
using hc::gate_exp;
using hc::i64;
using hc::Pack;

template <typename TX, typename TG, int VEC, int S>
struct Words {
    Pack<TX, VEC> x[S];
    Pack<TG, VEC> g[S];

    // This thread's steps u0 .. u0 + S - 1 (those inside the sequence, where the thread is live).
    __device__ __forceinline__ void load(const TX* xp, const TG* gp, i64 sxt, i64 sgt, i64 u0, i64 T, bool live) {
#pragma unroll
        for (int j = 0; j < S; ++j) {
            if (live && u0 + j < T) {
                x[j].load(xp + (u0 + j) * sxt);
                g[j].load(gp + (u0 + j) * sgt);
            } else {
                x[j].clear();
                g[j].clear();
            }
        }
    }
};

// This thread's S steps from u0 folded into one map per channel (m); a keeps each step's gate factor for
// the second pass.  Steps past T leave m as it is.
template <typename TX, typename TG, int VEC, int S>
__device__ __forceinline__ void fold(const Words<TX, TG, VEC, S>& in, Affine<AccT<TX, TG>> (&m)[VEC],
                                     AccT<TX, TG> (&a)[S][VEC], i64 u0, i64 T) {
    typedef AccT<TX, TG> Acc;
#pragma unroll
    for (int k = 0; k < VEC; ++k) { m[k].a = Acc(1); m[k].b = Acc(0); }
#pragma unroll
    for (int j = 0; j < S; ++j) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            a[j][k] = gate_exp(in.g[j].template get<Acc>(k));
            if (u0 + j < T) {
                m[k].b = a[j][k] * m[k].b + in.x[j].template get<Acc>(k);
                m[k].a = a[j][k] * m[k].a;
            }
        }
    }
}

// Inclusive scan over a warp's ROWS rows (lanes c, c + LC, ...): m becomes rows 0 .. r composed, before
// rows 0 .. r - 1 (identity at row 0).
template <typename Acc, int VEC, int ROWS>
__device__ __forceinline__ void scan_rows(Affine<Acc> (&m)[VEC], Affine<Acc> (&before)[VEC]) {
    constexpr int LC = 32 / ROWS;
    const int r = threadIdx.x / LC;
#pragma unroll
    for (int off = 1; off < ROWS; off <<= 1) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const Acc pa = __shfl_up_sync(0xffffffffu, m[k].a, off * LC);
            const Acc pb = __shfl_up_sync(0xffffffffu, m[k].b, off * LC);
            if (r >= off) {
                m[k].b = m[k].a * pb + m[k].b;
                m[k].a = m[k].a * pa;
            }
        }
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
        const Acc pa = __shfl_up_sync(0xffffffffu, m[k].a, LC);
        const Acc pb = __shfl_up_sync(0xffffffffu, m[k].b, LC);
        before[k].a = r > 0 ? pa : Acc(1);
        before[k].b = r > 0 ? pb : Acc(0);
    }
}

template <typename TX, typename TG, int VEC, int ROWS, int WARPS, int S>
__device__ __forceinline__ void scan_window(const Words<TX, TG, VEC, S>& in, Affine<AccT<TX, TG>> (*part)[(32 / ROWS) * VEC],
                                            AccT<TX, TG>* carry, TX* op, i64 sot, i64 u0, i64 T, bool live) {
    typedef AccT<TX, TG> Acc;
    constexpr int LC = 32 / ROWS;
    const int lane = threadIdx.x, w = threadIdx.y, c = lane % LC, r = lane / LC;
    Affine<Acc> m[VEC], before[VEC];
    Acc a[S][VEC];
    fold<TX, TG, VEC, S>(in, m, a, u0, T);
    scan_rows<Acc, VEC, ROWS>(m, before);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
        if (r == ROWS - 1) part[w][c * VEC + k] = m[k];
    }
    __syncthreads();
    Acc h[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
        Acc hw = carry[k], hc_ = carry[k];
#pragma unroll
        for (int i = 0; i < WARPS; ++i) {
            if (i == w) hw = hc_;
            const Affine<Acc> p = part[i][c * VEC + k];
            hc_ = p.a * hc_ + p.b;
        }
        carry[k] = hc_;
        h[k] = before[k].a * hw + before[k].b;
    }
#pragma unroll
    for (int j = 0; j < S; ++j) {
        if (live && u0 + j < T) {
            Pack<TX, VEC> out;
            out.clear();
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                h[k] = a[j][k] * h[k] + in.x[j].template get<Acc>(k);
                out.template set<Acc>(k, h[k]);
            }
            out.store(op + (u0 + j) * sot);
        }
    }
}

template <typename TX, typename TG, int VEC, int ROWS, int WARPS, int S>
__global__ void __launch_bounds__(32 * WARPS) tile_walk_fwd(const TX* __restrict__ x, const TG* __restrict__ g,
                                                            TX* __restrict__ o, i64 T, i64 D, i64 sxb, i64 sxt,
                                                            i64 sgb, i64 sgt, i64 sob, i64 sot) {
    typedef AccT<TX, TG> Acc;
    constexpr int LC = 32 / ROWS, C = LC * VEC, WIN = WARPS * ROWS * S;
    __shared__ Affine<Acc> part[2][WARPS][C];
    const int lane = threadIdx.x, q = threadIdx.y * ROWS + lane / LC;
    const i64 d = (i64)blockIdx.x * C + (lane % LC) * VEC, b = blockIdx.y;
    const bool live = d < D;
    const TX* xp = x + b * sxb + d;
    const TG* gp = g + b * sgb + d;
    TX* op = o + b * sob + d;
    Acc carry[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) carry[k] = Acc(0);
    Words<TX, TG, VEC, S> A, B;
    const i64 mine = (i64)q * S;  // this thread's first step in a window
    A.load(xp, gp, sxt, sgt, mine, T, live);
    for (i64 w0 = 0; w0 < T; w0 += 2 * WIN) {
        B.load(xp, gp, sxt, sgt, w0 + WIN + mine, T, live);
        scan_window<TX, TG, VEC, ROWS, WARPS, S>(A, part[0], carry, op, sot, w0 + mine, T, live);
        if (w0 + WIN >= T) break;
        A.load(xp, gp, sxt, sgt, w0 + 2 * WIN + mine, T, live);
        scan_window<TX, TG, VEC, ROWS, WARPS, S>(B, part[1], carry, op, sot, w0 + WIN + mine, T, live);
    }
}

}  // namespace tw
