// The staged tile walk (forward), an experiment for grids of one or two waves (tile_stage.py times it
// against the chunk engine, torch.add and accelerated-scan).  Compiled after the library's
// kernels/common.cuh and tile_walk.cu (Words, scan_window), which tile_stage.py puts in front of this text.
//
// The tile walk's block: C = 32 / ROWS * VEC channels of one batch row for the whole sequence, walked in
// windows of WIN = WARPS * ROWS * S steps, slot q = warp * ROWS + row owning steps [q * S, q * S + S) of a
// window (tile_walk.cu says how a window is scanned).  There the next window waits in registers, which
// took 179 registers a thread (bf16, W8 R16 S4): one block of eight warps a multiprocessor.  Here the
// words wait in shared memory: NST windows are on their way at once (cp.async.cg, 16 bytes a copy, each
// thread copying its own words, so no barrier guards a stage: a thread takes its words of stage s into
// registers, then queues window w + NST into the same stage).  With NST * WIN >= T the whole sequence is
// requested before the first window is scanned: one round trip a block.  Steps past the sequence and
// lanes past D arrive as zeros (their copies read nothing).
//
// grid (ceil(D / C), B)   block (32, WARPS)   dynamic shared memory NST * S * 2 * 32 * WARPS * 16 bytes.
// Dense rows with 16-byte aligned starts (the host checks), D a multiple of VEC, forward only, no states.

namespace ts {

using hc::AccT;
using hc::i64;
using hc::Pack;

template <typename TX, typename TG, int VEC, int ROWS, int WARPS, int S, int NST>
__global__ void __launch_bounds__(32 * WARPS) tile_stage_fwd(const TX* __restrict__ x, const TG* __restrict__ g,
                                                             TX* __restrict__ o, i64 T, i64 D, i64 sxb, i64 sxt,
                                                             i64 sgb, i64 sgt, i64 sob, i64 sot) {
    typedef AccT<TX, TG> Acc;
    constexpr int LC = 32 / ROWS, C = LC * VEC, WIN = WARPS * ROWS * S, NT = 32 * WARPS;
    static_assert(Pack<TX, VEC>::BYTES == 16 && Pack<TG, VEC>::BYTES == 16, "a lane is one 16-byte word of each input");
    extern __shared__ uint4 stage[];  // [NST][S][2][NT]: a warp's 32 words of one step and tensor are consecutive
    __shared__ hc::Affine<Acc> part[2][WARPS][C];
    const int lane = threadIdx.x, t = threadIdx.y * 32 + lane, q = threadIdx.y * ROWS + lane / LC;
    const i64 d = (i64)blockIdx.x * C + (lane % LC) * VEC, b = blockIdx.y;
    const bool live = d < D;
    const TX* xp = x + b * sxb + d;
    const TG* gp = g + b * sgb + d;
    TX* op = o + b * sob + d;
    const i64 mine = (i64)q * S, windows = (T + WIN - 1) / WIN;

    // Queues window w's words of this thread into stage s as one group (an empty group past the last
    // window, so that the groups stay one a window and wait_group counts windows).
    auto issue = [&](int s, i64 w) {
        if (w < windows) {
#pragma unroll
            for (int j = 0; j < S; ++j) {
                const i64 u = w * WIN + mine + j;
                const bool in = live && u < T;
#pragma unroll
                for (int m = 0; m < 2; ++m) {
                    const void* src = in ? (m ? (const void*)(gp + u * sgt) : (const void*)(xp + u * sxt))
                                         : (m ? (const void*)g : (const void*)x);
                    hc::async_copy<16>(&stage[((s * S + j) * 2 + m) * NT + t], src, in);
                }
            }
        }
        hc::async_commit();
    };
#pragma unroll
    for (int s = 0; s < NST; ++s) issue(s, s);
    Acc carry[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) carry[k] = Acc(0);
    for (i64 w = 0; w < windows; ++w) {
        const int s = (int)(w % NST);
        hc::async_wait<NST - 1>();
        tw::Words<TX, TG, VEC, S> in;
#pragma unroll
        for (int j = 0; j < S; ++j) {
            const uint4 vx = stage[((s * S + j) * 2 + 0) * NT + t], vg = stage[((s * S + j) * 2 + 1) * NT + t];
            in.x[j].u[0] = vx.x; in.x[j].u[1] = vx.y; in.x[j].u[2] = vx.z; in.x[j].u[3] = vx.w;
            in.g[j].u[0] = vg.x; in.g[j].u[1] = vg.y; in.g[j].u[2] = vg.z; in.g[j].u[3] = vg.w;
        }
        issue(s, w + NST);
        tw::scan_window<TX, TG, VEC, ROWS, WARPS, S>(in, part[w & 1], carry, op, sot, w * WIN + mine, T, live);
    }
}

}  // namespace ts
