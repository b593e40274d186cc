// The staged block walk, an experiment (block_pipe.py times it against the library's).  Compiled after the
// library's kernels/fused_block_walk.cuh, whose fold_window and block_carry (the warps' maps meeting in
// shared memory) it uses unchanged.
//
// The library's forward block walk holds a window in registers and has the next window's loads in flight
// while it scans the current one, plus an L2 prefetch of the window after: about one window of a block's
// bytes on their way at a time.  Here the loads of the next NSTAGE - 1 windows are in flight (cp.async
// into shared memory; each thread copies and later reads only its own words, so no barrier guards them),
// so a block keeps several windows of bytes in flight through its fold, barrier, scan and stores.  Steps
// past the sequence arrive as zeros: x = 0, g = 0 is the identity map, so the fold needs no bounds; only
// the stores check them.
//
// grid (ceil(D / (32 * VEC)), N)   block (32, W)   a window: W * S steps; a lane: VEC channels (4 or 8
// bytes).  Dense [N, T, D], no states, forward only.
namespace bpipe {

using hc::AccT;
using hc::Affine;
using hc::i64;
using hc::Pack;

template <typename TX, typename TG, int VEC, int W, int S, int NSTAGE, int MINB, int PF, int C16>
__global__ void __launch_bounds__(32 * W, MINB) fwd(const TX* __restrict__ x, const TG* __restrict__ g,
                                                    TX* __restrict__ o, i64 sxb, i64 sxt, i64 sgb, i64 sgt,
                                                    i64 sob, i64 sot, i64 T, i64 D) {
    typedef AccT<TX, TG> Acc;
    typedef Pack<TX, VEC> PX;
    typedef Pack<TG, VEC> PG;
    static_assert(PX::BYTES == PG::BYTES && PX::BYTES >= 4, "lanes of 4, 8 or 16 bytes");
    constexpr int BYTES = PX::BYTES, WORDS = PX::WORDS, C = 32 * VEC, WIN = W * S;
    __shared__ Affine<Acc> part[2][W][C];
    extern __shared__ unsigned stage[];  // [NSTAGE][W][S][2][32] words of BYTES
    const int lane = threadIdx.x, w = threadIdx.y;
    const i64 d = (i64)blockIdx.x * C + lane * VEC, n = blockIdx.y;
    const bool live = d < D;
    const TX* xp = x + n * sxb + d;
    const TG* gp = g + n * sgb + d;
    TX* op = o + n * sob + d;
    const i64 nwin = (T + WIN - 1) / WIN;
    auto word = [&](int s, int j, int m) { return stage + ((((s * W + w) * S + j) * 2 + m) * 32 + lane) * WORDS; };
    // With C16 a warp's rows (S steps of x and g, 32 * BYTES bytes each) are copied in 16-byte pieces by
    // any of its lanes, so each lane reads words other lanes copied: a warp barrier after the wait makes
    // them visible, one after the reads frees the stage for the next copy.  Without it each lane copies
    // its own words.
    constexpr int PIECES = 32 * BYTES / 16, PER_LANE = 2 * S * PIECES / 32;
    static_assert(!C16 || (2 * S * PIECES) % 32 == 0, "whole pieces a lane");
    const i64 chan0 = (i64)blockIdx.x * C;  // the block's first channel
    auto issue = [&](i64 i, int s) {
        if (i < nwin) {
            const i64 u0 = i * WIN + (i64)w * S;
            if constexpr (C16) {
#pragma unroll
                for (int r = 0; r < PER_LANE; ++r) {
                    const int c = lane + 32 * r, row = c / PIECES, piece = c % PIECES, j = row / 2, m = row % 2;
                    const i64 ch = chan0 + piece * (16 / (int)sizeof(TX));  // x and g have one itemsize here
                    const bool on = ch < D && u0 + j < T;
                    const void* src = m == 0 ? (const void*)(x + n * sxb + (u0 + j) * sxt + ch)
                                             : (const void*)(g + n * sgb + (u0 + j) * sgt + ch);
                    const unsigned* dst = stage + ((((s * W + w) * S + j) * 2 + m) * 32) * WORDS + piece * 4;
                    hc::async_copy<16>((void*)dst, on ? src : (const void*)x, on);
                }
            } else {
#pragma unroll
                for (int j = 0; j < S; ++j) {
                    const bool on = live && u0 + j < T;
                    hc::async_copy<BYTES>(word(s, j, 0), on ? (const void*)(xp + (u0 + j) * sxt) : (const void*)x, on);
                    hc::async_copy<BYTES>(word(s, j, 1), on ? (const void*)(gp + (u0 + j) * sgt) : (const void*)g, on);
                }
            }
        }
        hc::async_commit();
    };
#pragma unroll
    for (int s = 0; s < NSTAGE; ++s) issue(s, s);

    Acc carry[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) carry[k] = Acc(0);
    for (i64 i = 0; i < nwin; ++i) {
        const int s = (int)(i % NSTAGE);
        hc::async_wait<NSTAGE - 1>();
        if (C16) __syncwarp();
        PX xr[S];
        PG gr[S];
#pragma unroll
        for (int j = 0; j < S; ++j) {
#pragma unroll
            for (int q = 0; q < WORDS; ++q) { xr[j].u[q] = word(s, j, 0)[q]; gr[j].u[q] = word(s, j, 1)[q]; }
        }
        if (C16) __syncwarp();
        issue(i + NSTAGE, s);  // the warp's words of the stage are in registers now
        if (PF && (i + NSTAGE + 1) * WIN <= T) {  // L2, evict-last: the window after the last one staged
            const i64 v = (i + NSTAGE + 1) * WIN + (i64)w * S;
            const int used = hc::prefetch_rows_l2<TX, VEC, S>(xp - lane * VEC + v * sxt, sxt, D - (i64)blockIdx.x * C, lane);
            hc::prefetch_rows_l2<TG, VEC, S>(gp - lane * VEC + v * sgt, sgt, D - (i64)blockIdx.x * C, lane - used);
        }

        Affine<Acc> m[VEC];
        Acc a[S][VEC];
        hc::fold_window(xr, gr, m, a);
        Acc h[VEC];
        hc::block_carry<Acc, W, VEC, false>(part[i & 1], m, carry, h);
        const i64 u0 = i * WIN + (i64)w * S;
#pragma unroll
        for (int j = 0; j < S; ++j) {
            PX out;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                h[k] = a[j][k] * h[k] + xr[j].template get<Acc>(k);
                out.template set<Acc>(k, h[k]);
            }
            if (live && u0 + j < T) out.store(op + (u0 + j) * sot);
        }
    }
    hc::async_wait<0>();
}

}  // namespace bpipe
