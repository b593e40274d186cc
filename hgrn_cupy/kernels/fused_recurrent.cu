// Fused recurrent engine: one thread owns VEC channels of one sequence and walks time.
//
// grid  (ceil(D / (VEC * blockDim.x)), N)   N = sequences (B, or len(cu_seqlens) - 1)
// block (BLOCK,)                            VEC adjacent channels per thread (1, or 2 where the host
//                                           finds D, pointers and strides aligned): a warp reads
//                                           32 * VEC adjacent channels per step
// traffic per element: forward reads x, g and writes o; backward reads g, o, do and writes dx, dg.
// fused_recurrent_step is the forward of a single step (T = 1, dense: decoding) with VEC channels per
// thread and 16-byte accesses, over a flat grid of N * D / VEC threads.
//
// The loads of future steps do not depend on the state, so each thread keeps two tiles of PREFETCH
// steps in registers: while it scans one tile, the loads of the next are in flight.  Reverse mode and
// varlen are the same walk: a start pointer and a signed time stride per sequence.
#include "common.cuh"

namespace hc {

// Steps each thread loads ahead per tile (two tiles in flight), with one channel per thread and with
// VEC > 1 channels per thread; tuning knobs.
#ifndef HC_PREFETCH
#define HC_PREFETCH 16
#endif
#ifndef HC_PREFETCH_V
#define HC_PREFETCH_V HC_PREFETCH
#endif
template <int VEC> struct Prefetch { static constexpr int STEPS = VEC == 1 ? HC_PREFETCH : HC_PREFETCH_V; };

// Whether a walk's main loop has a fast path for tiles wholly inside the sequence (no per-step bounds
// checks: a quarter fewer instructions per step).  It lengthens live ranges, so it is taken where it
// measured faster: every forward walk, and the backward walk with one 16-bit channel per thread.  On an
// H100 at 16K channels: bf16 forward 2.19x -> 1.73x of the floor, backward 1.86x -> 1.66x; float32
// forward 1.31x -> 1.27x (though it spills 16 bytes).  The backward with two bf16 channels per thread
// or with float32 spilled more and lost 5%, so it keeps the checked loop alone.
#ifndef HC_WALK_FAST_BWD
#define HC_WALK_FAST_BWD(TX, TG, VEC) (VEC == 1 && sizeof(TX) == 2 && sizeof(TG) == 2)
#endif

// One forward step of VEC channels: h = exp(g) h + x, stored at op.
template <typename Acc, typename TX, typename TG, int VEC>
__device__ __forceinline__ void forward_step(Acc* h, const Pack<TX, VEC>& x, const Pack<TG, VEC>& g, TX* op) {
    Pack<TX, VEC> out;
    out.clear();
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
        h[k] = gate_exp(g.template get<Acc>(k)) * h[k] + x.template get<Acc>(k);
        out.template set<Acc>(k, h[k]);
    }
    out.store(op);
}

template <typename TX, typename TG, int VEC>
struct FwdTile {
    typedef typename AccOf<TX, TG>::type Acc;
    static constexpr int P = Prefetch<VEC>::STEPS;
    Pack<TX, VEC> x[P];
    Pack<TG, VEC> g[P];

    // Loads steps s0 .. s0 + P - 1 (all of them when FULL: the caller knows s0 + P <= len) and
    // advances the pointers past them.
    template <bool FULL>
    __device__ __forceinline__ void load(const TX*& xp, const TG*& gp, i64 sxt, i64 sgt, i64 s0, i64 len) {
#pragma unroll
        for (int j = 0; j < P; ++j) {
            if (FULL || s0 + j < len) {
                x[j].load(xp);
                g[j].load(gp);
            }
            xp += sxt; gp += sgt;
        }
    }
    template <bool FULL>
    __device__ __forceinline__ void scan(Acc* h, TX*& op, i64 sot, i64 s0, i64 len) const {
#pragma unroll
        for (int j = 0; j < P; ++j) {
            if (FULL || s0 + j < len) {
                forward_step(h, x[j], g[j], op);
            }
            op += sot;
        }
    }
};

// Thread (blockIdx.x * blockDim.x + threadIdx.x) owns channels [VEC * i, VEC * i + VEC) of sequence
// blockIdx.y; with VEC > 1, D is a multiple of VEC and every pointer and stride is VEC-aligned (the
// host checks).
template <typename TX, typename TG, int VEC>
__global__ void __launch_bounds__(256) fused_recurrent_fwd(
    const TX* __restrict__ x, const TG* __restrict__ g, TX* __restrict__ o,
    i64 sxb, i64 sxt, i64 sgb, i64 sgt, i64 sob, i64 sot,
    const typename AccOf<TX, TG>::type* __restrict__ h0, typename AccOf<TX, TG>::type* __restrict__ ht,
    const void* __restrict__ cu_seqlens, int cu64, i64 T, i64 D, int reverse) {
    typedef typename AccOf<TX, TG>::type Acc;
    constexpr int P = Prefetch<VEC>::STEPS;
    const i64 d = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    const i64 n = blockIdx.y;
    if (d >= D) return;
    const SeqBounds sb = seq_bounds(cu_seqlens, cu64, n, T);
    const i64 len = sb.eos - sb.bos;
    const i64 t0 = reverse ? sb.eos - 1 : sb.bos;  // physical time of logical step 0
    const i64 dir = reverse ? -1 : 1;
    const TX* xp = x + sb.batch * sxb + t0 * sxt + d;
    const TG* gp = g + sb.batch * sgb + t0 * sgt + d;
    TX* op = o + sb.batch * sob + t0 * sot + d;
    sxt *= dir; sgt *= dir; sot *= dir;

    Acc h[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) h[k] = h0 ? h0[n * D + d + k] : Acc(0);
    FwdTile<TX, TG, VEC> a, b;
    a.template load<false>(xp, gp, sxt, sgt, 0, len);
    i64 s = 0;
    for (; s + 3 * P <= len; s += 2 * P) {  // every step of the four tiles touched is inside the sequence
        b.template load<true>(xp, gp, sxt, sgt, s + P, len);
        a.template scan<true>(h, op, sot, s, len);
        a.template load<true>(xp, gp, sxt, sgt, s + 2 * P, len);
        b.template scan<true>(h, op, sot, s + P, len);
    }
    for (; s < len; s += 2 * P) {
        b.template load<false>(xp, gp, sxt, sgt, s + P, len);
        a.template scan<false>(h, op, sot, s, len);
        if (s + P >= len) break;
        a.template load<false>(xp, gp, sxt, sgt, s + 2 * P, len);
        b.template scan<false>(h, op, sot, s + P, len);
    }
    if (ht) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) ht[n * D + d + k] = h[k];
    }
}

// Backward walks logical time from the end.  At logical step s it needs g[s], do[s] and the previous
// state o[s-1] (h0 at s = 0); it carries dh[s+1] and exp(g[s+1]).
template <typename TX, typename TG, int VEC>
struct BwdTile {
    typedef typename AccOf<TX, TG>::type Acc;
    static constexpr int P = Prefetch<VEC>::STEPS;
    Pack<TG, VEC> g[P];
    Pack<TX, VEC> dout[P];
    Pack<TX, VEC> hprev[P];

    // A tile holds logical steps s = hi - j, j = 0..P-1 (only s >= 0 are loaded; all of them, each with
    // s >= 1, when FULL: the caller knows hi >= P); the pointers address step hi on entry and step
    // hi - P on return (op is one step behind: o[s-1]).
    template <bool FULL>
    __device__ __forceinline__ void load(const TG*& gp, const TX*& op, const TX*& dop,
                                         i64 sgt, i64 sot, i64 sdot, i64 hi) {
#pragma unroll
        for (int j = 0; j < P; ++j) {
            const i64 s = hi - j;
            if (FULL || s >= 0) {
                g[j].load(gp);
                dout[j].load(dop);
                if (FULL || s >= 1) hprev[j].load(op);
            }
            gp -= sgt; op -= sot; dop -= sdot;
        }
    }
    template <bool FULL>
    __device__ __forceinline__ void scan(Acc* dh, Acc* a_next, const Acc* h_init, TX*& dxp, TG*& dgp,
                                         i64 sdxt, i64 sdgt, i64 hi) const {
#pragma unroll
        for (int j = 0; j < P; ++j) {
            const i64 s = hi - j;
            if (FULL || s >= 0) {
                Pack<TX, VEC> dxo;
                Pack<TG, VEC> dgo;
                dxo.clear(); dgo.clear();
#pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    dh[k] = dout[j].template get<Acc>(k) + a_next[k] * dh[k];
                    const Acc a = gate_exp(g[j].template get<Acc>(k));
                    const Acc hp = (FULL || s >= 1) ? hprev[j].template get<Acc>(k) : h_init[k];
                    dxo.template set<Acc>(k, dh[k]);
                    dgo.template set<Acc>(k, dh[k] * a * hp);
                    a_next[k] = a;
                }
                dxo.store(dxp);
                dgo.store(dgp);
            }
            dxp -= sdxt; dgp -= sdgt;
        }
    }
};

template <typename TX, typename TG, int VEC>
__global__ void __launch_bounds__(256) fused_recurrent_bwd(
    const TG* __restrict__ g, const TX* __restrict__ o, const TX* __restrict__ dout,
    TX* __restrict__ dx, TG* __restrict__ dg,
    i64 sgb, i64 sgt, i64 sob, i64 sot, i64 sdob, i64 sdot, i64 sdxb, i64 sdxt, i64 sdgb, i64 sdgt,
    const typename AccOf<TX, TG>::type* __restrict__ h0, const typename AccOf<TX, TG>::type* __restrict__ dht,
    typename AccOf<TX, TG>::type* __restrict__ dh0,
    const void* __restrict__ cu_seqlens, int cu64, i64 T, i64 D, int reverse) {
    typedef typename AccOf<TX, TG>::type Acc;
    constexpr int P = Prefetch<VEC>::STEPS;
    const i64 d = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    const i64 n = blockIdx.y;
    if (d >= D) return;
    const SeqBounds sb = seq_bounds(cu_seqlens, cu64, n, T);
    const i64 len = sb.eos - sb.bos;
    const i64 t0 = reverse ? sb.eos - 1 : sb.bos;
    const i64 dir = reverse ? -1 : 1;
    sgt *= dir; sot *= dir; sdot *= dir; sdxt *= dir; sdgt *= dir;
    // Pointers start at the last logical step, len - 1 (o one step earlier), and walk back.
    const i64 last = len - 1;
    const TG* gp = g + sb.batch * sgb + t0 * dir * sgt + last * sgt + d;
    const TX* op = o + sb.batch * sob + t0 * dir * sot + (last - 1) * sot + d;
    const TX* dop = dout + sb.batch * sdob + t0 * dir * sdot + last * sdot + d;
    TX* dxp = dx + sb.batch * sdxb + t0 * dir * sdxt + last * sdxt + d;
    TG* dgp = dg + sb.batch * sdgb + t0 * dir * sdgt + last * sdgt + d;

    Acc h_init[VEC], dh[VEC], a_next[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
        h_init[k] = h0 ? h0[n * D + d + k] : Acc(0);
        dh[k] = dht ? dht[n * D + d + k] : Acc(0);
        a_next[k] = Acc(1);
    }
    BwdTile<TX, TG, VEC> a, b;
    a.template load<false>(gp, op, dop, sgt, sot, sdot, last);
    i64 hi = last;
    constexpr bool fast = HC_WALK_FAST_BWD(TX, TG, VEC);
    for (; fast && hi >= 3 * P; hi -= 2 * P) {  // every tile touched holds P steps, each with a previous state
        b.template load<true>(gp, op, dop, sgt, sot, sdot, hi - P);
        a.template scan<true>(dh, a_next, h_init, dxp, dgp, sdxt, sdgt, hi);
        a.template load<true>(gp, op, dop, sgt, sot, sdot, hi - 2 * P);
        b.template scan<true>(dh, a_next, h_init, dxp, dgp, sdxt, sdgt, hi - P);
    }
    for (; hi >= 0; hi -= 2 * P) {
        b.template load<false>(gp, op, dop, sgt, sot, sdot, hi - P);
        a.template scan<false>(dh, a_next, h_init, dxp, dgp, sdxt, sdgt, hi);
        if (hi - P < 0) break;
        a.template load<false>(gp, op, dop, sgt, sot, sdot, hi - 2 * P);
        b.template scan<false>(dh, a_next, h_init, dxp, dgp, sdxt, sdgt, hi - P);
    }
    if (dh0) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) dh0[n * D + d + k] = a_next[k] * dh[k];
    }
}

// The block walk (forward): a block of BLOCK_WARPS warps owns C = 32 * VEC channels of one sequence
// for the whole sequence and walks time in windows of BLOCK_WARPS * BLOCK_STEPS steps.  Warp w folds
// steps [w * S, w * S + S) of a window into one affine map per channel, the warps' maps meet in shared
// memory (one barrier per window; the buffer alternates between windows), every thread composes the
// window's carry-in with the maps of the warps before it, and scans its steps again from the raw
// words.  The next window's loads are in flight while the current one is scanned.  Against the walk
// above it puts BLOCK_WARPS times more threads on the same channels, which is what fills the GPU from
// a few thousand channels on; against the chunk engine it needs no look-back and no workspace.
//
// grid  (ceil(D / (32 * VEC)), N)   block (32, BLOCK_WARPS)
// VEC: 8 bytes of the wider type per lane where the host finds D, pointers and strides aligned.
#ifndef HC_BLOCK_WARPS
#define HC_BLOCK_WARPS 8
#endif
#ifndef HC_BLOCK_STEPS
#define HC_BLOCK_STEPS 8
#endif
// Resident blocks per SM the register allocation must allow: two gives 128 registers, within which only
// the float64 walks spill (36 and 72 bytes, ptxas -v; the library takes none of them); three spilled
// 80-340 bytes.
#ifndef HC_BLOCK_MIN_BLOCKS
#define HC_BLOCK_MIN_BLOCKS 2
#endif
// Whether a block walk's lanes are narrow enough (4 bytes of each input) for its fast form: windows
// wholly inside the sequence skip the per-step bounds checks, and the gates computed by the first pass
// over a window serve the second (the backward's second pass also takes exp(g[s]) from them).  With
// 8-byte lanes it spilled 200-600 bytes under the register bound above and ran 1.3-1.4x slower.
#ifndef HC_BLOCK_FAST
#define HC_BLOCK_FAST(TX, TG, VEC) (sizeof(TX) * VEC <= 4 && sizeof(TG) * VEC <= 4)
#endif

// The window after the one being loaded is asked of L2 while the loaded one waits for its scan: every
// warp's lanes each prefetch one 128-byte line of the warp's rows (windows wholly inside the sequence;
// 0 turns it off).  The lines are marked evict-last so that the streaming traffic does not push them out
// before their loads.  H100, x floor, fwd / bwd, none / plain prefetch / evict-last: bf16 16x4096x1024
// 1.198/1.196, 1.163/1.165, 1.125/1.135; float32 8x4096x1024 1.160/1.166, 1.081/1.146, 1.057/1.117.  Two
// windows ahead was slower than one.
#ifndef HC_BLOCK_L2_AHEAD
#define HC_BLOCK_L2_AHEAD 1
#endif

// Asks L2 for the S rows of 32 * VEC channels that a warp reads from p0 on (rows `stride` elements apart,
// `rem` channels of them inside the tensor): lane `slot` asks for one 128-byte line of them, slots outside
// [0, S * lines a row) and lines past the last channel for none.  Returns the number of slots used.
template <typename T, int VEC, int S>
__device__ __forceinline__ int prefetch_rows_l2(const T* p0, i64 stride, i64 rem, int slot) {
    constexpr int LINE = 128 / (int)sizeof(T), L = (32 * VEC + LINE - 1) / LINE;
    if (slot >= 0 && slot < S * L && (slot % L) * LINE < rem) {
        const T* p = p0 + (slot / L) * stride + (slot % L) * LINE;
        asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(p));
    }
    return S * L;
}

// Where a block walk's warps meet: every thread publishes its maps m (one per channel) of the window to
// `part` (row = warp; the buffer alternates between windows, so one barrier a window suffices), then
// composes `carry` (the value entering the window, per channel) with the maps of the warps that come
// before its own -- in warp order, or from the last warp when REVERSE -- into `mine`, and advances
// `carry` past the whole window.
template <typename Acc, int W, int VEC, bool REVERSE>
__device__ __forceinline__ void block_carry(Affine<Acc> (*part)[32 * VEC], const Affine<Acc>* m, Acc* carry, Acc* mine) {
    const int lane = threadIdx.x, w = threadIdx.y;
#pragma unroll
    for (int k = 0; k < VEC; ++k) part[w][k * 32 + lane] = m[k];
    __syncthreads();
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
        Acc h = carry[k];
        mine[k] = h;
#pragma unroll
        for (int i = 0; i < W; ++i) {
            const int q = REVERSE ? W - 1 - i : i;
            if (q == w) mine[k] = h;
            const Affine<Acc> p = part[q][k * 32 + lane];
            h = p.a * h + p.b;
        }
        carry[k] = h;
    }
}

// Where a block-walk thread sits: its first channel d (live: d < D; every thread takes part in the
// barriers), its sequence n with bounds sb and length len, and the physical time t0 of logical step 0
// with the direction dir of logical time.
struct BlockPlace {
    i64 d, n, len, t0, dir;
    SeqBounds sb;
    bool live;
    __device__ __forceinline__ BlockPlace(int vec, const void* cu_seqlens, int cu64, i64 T, i64 D, int reverse) {
        d = ((i64)blockIdx.x * 32 + threadIdx.x) * vec;
        n = blockIdx.y;
        live = d < D;
        sb = seq_bounds(cu_seqlens, cu64, n, T);
        len = sb.eos - sb.bos;
        t0 = reverse ? sb.eos - 1 : sb.bos;
        dir = reverse ? -1 : 1;
    }
};

template <typename TX, typename TG, int VEC>
struct BlockWalkFwd {
    typedef typename AccOf<TX, TG>::type Acc;
    static constexpr int W = HC_BLOCK_WARPS, S = HC_BLOCK_STEPS, C = 32 * VEC, WIN = W * S;
    static constexpr bool FAST = HC_BLOCK_FAST(TX, TG, VEC);
    Pack<TX, VEC> x[S];
    Pack<TG, VEC> g[S];

    // Loads this thread's steps u0 .. u0 + S - 1 of a window (those inside the sequence; all of them when
    // FULL: the caller knows the window lies inside it) and moves the pointers to the same steps of the
    // next window.
    template <bool FULL>
    __device__ __forceinline__ void load(const TX*& xp, const TG*& gp, i64 sxt, i64 sgt, i64 u0, i64 len, bool live) {
#pragma unroll
        for (int j = 0; j < S; ++j) {
            if (live && (FULL || u0 + j < len)) { x[j].load(xp); g[j].load(gp); }
            xp += sxt; gp += sgt;
        }
        xp += (WIN - S) * sxt; gp += (WIN - S) * sgt;
    }

    // Asks L2 for this warp's steps `ahead` steps after those xp and gp address (xp, gp: this thread's;
    // rem: channels from the warp's first on).
    static __device__ __forceinline__ void prefetch(const TX* xp, const TG* gp, i64 sxt, i64 sgt, i64 rem, i64 ahead) {
        const int lane = threadIdx.x;
        const int used = prefetch_rows_l2<TX, VEC, S>(xp - lane * VEC + ahead * sxt, sxt, rem, lane);
        prefetch_rows_l2<TG, VEC, S>(gp - lane * VEC + ahead * sgt, sgt, rem, lane - used);
    }

    // Scans the window whose first step is u0 - w * S (FULL as in load); hin: the state before it, on
    // return the state after it (the same in every warp).
    template <bool FULL>
    __device__ __forceinline__ void scan(Affine<Acc> (*part)[C], Acc* hin, TX*& op, i64 sot, i64 u0, i64 len,
                                         bool live) const {
        Affine<Acc> m[VEC];
        Acc a[S][VEC];  // the gates, kept for the second pass where FAST
#pragma unroll
        for (int k = 0; k < VEC; ++k) { m[k].a = Acc(1); m[k].b = Acc(0); }
#pragma unroll
        for (int j = 0; j < S; ++j) {
            if (FULL || u0 + j < len) {
#pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    a[j][k] = gate_exp(g[j].template get<Acc>(k));
                    m[k].b = a[j][k] * m[k].b + x[j].template get<Acc>(k);
                    m[k].a = a[j][k] * m[k].a;
                }
            }
        }
        Acc h[VEC];
        block_carry<Acc, W, VEC, false>(part, m, hin, h);
#pragma unroll
        for (int j = 0; j < S; ++j) {
            if (live && (FULL || u0 + j < len)) {
                Pack<TX, VEC> out;
                out.clear();
#pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    h[k] = (FAST ? a[j][k] : gate_exp(g[j].template get<Acc>(k))) * h[k] + x[j].template get<Acc>(k);
                    out.template set<Acc>(k, h[k]);
                }
                out.store(op);
            }
            op += sot;
        }
        op += (WIN - S) * sot;
    }
};

template <typename TX, typename TG, int VEC>
__global__ void __launch_bounds__(32 * HC_BLOCK_WARPS, HC_BLOCK_MIN_BLOCKS) fused_recurrent_block_fwd(
    const TX* __restrict__ x, const TG* __restrict__ g, TX* __restrict__ o,
    i64 sxb, i64 sxt, i64 sgb, i64 sgt, i64 sob, i64 sot,
    const typename AccOf<TX, TG>::type* __restrict__ h0, typename AccOf<TX, TG>::type* __restrict__ ht,
    const void* __restrict__ cu_seqlens, int cu64, i64 T, i64 D, int reverse) {
    typedef BlockWalkFwd<TX, TG, VEC> Walk;
    typedef typename Walk::Acc Acc;
    constexpr int W = Walk::W, S = Walk::S, C = Walk::C, WIN = W * S;
    __shared__ Affine<Acc> part[2][W][C];
    const BlockPlace at(VEC, cu_seqlens, cu64, T, D, reverse);
    const i64 d = at.d, n = at.n, len = at.len, b0 = at.sb.batch, t0 = at.t0;
    const bool live = at.live;
    const i64 rem = D - (i64)blockIdx.x * 32 * VEC;  // channels from the block's first on
    const i64 first = (i64)threadIdx.y * S;  // this warp's first logical step of window 0
    const TX* xp = x + b0 * sxb + t0 * sxt + d;
    const TG* gp = g + b0 * sgb + t0 * sgt + d;
    TX* op = o + b0 * sob + t0 * sot + d;
    sxt *= at.dir; sgt *= at.dir; sot *= at.dir;
    xp += first * sxt; gp += first * sgt; op += first * sot;

    Acc hin[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) hin[k] = h0 && live ? h0[n * D + d + k] : Acc(0);
    Walk a, b;
    // Windows wholly inside the sequence (the test is the same for the whole block) skip the per-step
    // bounds checks in the fast form.  Two equivalent loop shapes: the fast form runs the windows in two
    // loops (while the next three windows are whole, then the rest), the other form tests each window
    // (always false without FAST, and folded away).  Each shape is the one that scheduled better on an
    // H100 for its lanes (benchmarks/NOTES.md, 2026-11-26 day).
    if constexpr (Walk::FAST) {
        a.template load<false>(xp, gp, sxt, sgt, first, len, live);
        i64 u = first;  // this thread's first step of the window in a
        // After loading the window at v (pointers at v + WIN), ask L2 for the one HC_BLOCK_L2_AHEAD after it.
        const auto ahead = [&](i64 v) {
            if (HC_BLOCK_L2_AHEAD > 0 && v - first + (HC_BLOCK_L2_AHEAD + 1) * WIN <= len)
                Walk::prefetch(xp, gp, sxt, sgt, rem, (HC_BLOCK_L2_AHEAD - 1) * WIN);
        };
        for (; u - first + 3 * WIN <= len; u += 2 * WIN) {
            b.template load<true>(xp, gp, sxt, sgt, u + WIN, len, live);
            ahead(u + WIN);
            a.template scan<true>(part[0], hin, op, sot, u, len, live);
            a.template load<true>(xp, gp, sxt, sgt, u + 2 * WIN, len, live);
            ahead(u + 2 * WIN);
            b.template scan<true>(part[1], hin, op, sot, u + WIN, len, live);
        }
        for (; u - first < len; u += 2 * WIN) {
            b.template load<false>(xp, gp, sxt, sgt, u + WIN, len, live);
            a.template scan<false>(part[0], hin, op, sot, u, len, live);
            if (u - first + WIN >= len) break;
            a.template load<false>(xp, gp, sxt, sgt, u + 2 * WIN, len, live);
            b.template scan<false>(part[1], hin, op, sot, u + WIN, len, live);
        }
    } else {
        const auto full = [&](i64 u) { return Walk::FAST && u - first + WIN <= len; };
        const auto load = [&](Walk& w, i64 u) {
            if (full(u)) w.template load<true>(xp, gp, sxt, sgt, u, len, live);
            else w.template load<false>(xp, gp, sxt, sgt, u, len, live);
            if (HC_BLOCK_L2_AHEAD > 0 && u - first + (HC_BLOCK_L2_AHEAD + 1) * WIN <= len)
                Walk::prefetch(xp, gp, sxt, sgt, rem, (HC_BLOCK_L2_AHEAD - 1) * WIN);
        };
        const auto scan = [&](const Walk& w, Affine<Acc> (*p)[C], i64 u) {
            if (full(u)) w.template scan<true>(p, hin, op, sot, u, len, live);
            else w.template scan<false>(p, hin, op, sot, u, len, live);
        };
        load(a, first);
        for (i64 u = first; u - first < len; u += 2 * WIN) {
            load(b, u + WIN);
            scan(a, part[0], u);
            if (u - first + WIN >= len) break;
            load(a, u + 2 * WIN);
            scan(b, part[1], u + WIN);
        }
    }
    if (ht && live && threadIdx.y == 0) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) ht[n * D + d + k] = hin[k];
    }
}

// The block walk (backward): the same split of time as the forward's, walked from the last window to
// the first.  The gradient obeys dh[s] = A[s] dh[s+1] + do[s] with A[s] = exp(g[s+1]) (A = 1 at the last
// step, where dh[len] = dht), so a warp folds its steps into one map dh[u0] = alpha dh[u0+S] + beta, the
// warps' maps meet in shared memory, and every thread composes the carry from the later warps before it
// scans its steps again writing dx = dh and dg = dh exp(g[s]) h[s-1] (h[-1] = h0).  Each thread loads
// S + 1 gate rows (its steps and the next one), do, and o one step behind.
// grid  (ceil(D / (32 * VEC)), N)   block (32, BLOCK_WARPS)   VEC: 4 bytes of the wider type per lane.
template <typename TX, typename TG, int VEC>
struct BlockWalkBwd {
    typedef typename AccOf<TX, TG>::type Acc;
    static constexpr int W = HC_BLOCK_WARPS, S = HC_BLOCK_STEPS, C = 32 * VEC, WIN = W * S;
    static constexpr bool FAST = HC_BLOCK_FAST(TX, TG, VEC);
    Pack<TG, VEC> g[S + 1];
    Pack<TX, VEC> dout[S];
    Pack<TX, VEC> hprev[S];

    // Loads logical steps u0 .. u0 + S - 1 of a window (and gate row u0 + S), then moves the pointers
    // to the same steps of the window before (op stays one step behind).  FULL: the caller knows that
    // the window is neither the first nor the last of the sequence, so every row exists.
    template <bool FULL>
    __device__ __forceinline__ void load(const TG*& gp, const TX*& op, const TX*& dop, i64 sgt, i64 sot, i64 sdot,
                                         i64 u0, i64 len, bool live) {
#pragma unroll
        for (int j = 0; j <= S; ++j) {
            if (live && (FULL || u0 + j < len)) g[j].load(gp);
            gp += sgt;
        }
#pragma unroll
        for (int j = 0; j < S; ++j) {
            if (live && (FULL || u0 + j < len)) {
                dout[j].load(dop);
                if (FULL || u0 + j >= 1) hprev[j].load(op);
            }
            dop += sdot; op += sot;
        }
        gp -= (WIN + S + 1) * sgt; dop -= (WIN + S) * sdot; op -= (WIN + S) * sot;
    }

    // Asks L2 for this warp's rows of the window `ahead` steps after the one gp, op and dop address
    // (this thread's pointers as load leaves them; ahead is negative going back in time; rem: channels from
    // the warp's first on).
    static __device__ __forceinline__ void prefetch(const TG* gp, const TX* op, const TX* dop, i64 sgt, i64 sot,
                                                    i64 sdot, i64 rem, i64 ahead) {
        const int lane = threadIdx.x;
        int used = prefetch_rows_l2<TG, VEC, S>(gp - lane * VEC + ahead * sgt, sgt, rem, lane);
        used += prefetch_rows_l2<TX, VEC, S>(dop - lane * VEC + ahead * sdot, sdot, rem, lane - used);
        prefetch_rows_l2<TX, VEC, S>(op - lane * VEC + ahead * sot, sot, rem, lane - used);
    }

    // A[s] for step u0 + j: exp(g[s+1]), or 1 at the last step of the sequence.
    template <bool FULL>
    __device__ __forceinline__ Acc shifted_gate(int j, int k, i64 u0, i64 len) const {
        return FULL || u0 + j + 1 < len ? gate_exp(g[j + 1].template get<Acc>(k)) : Acc(1);
    }

    // Scans the window whose steps this thread holds from u0 on (FULL as in load); dhc: dh at the first
    // step of the next window on entry (dht after the last), dh at this window's first step on return.
    // dxp, dgp address step u0 + S - 1 on entry and the same step of the window before on return.
    template <bool FULL>
    __device__ __forceinline__ void scan(Affine<Acc> (*part)[C], Acc* dhc, const Acc* h_init, TX*& dxp, TG*& dgp,
                                         i64 sdxt, i64 sdgt, i64 u0, i64 len, bool live) const {
        Affine<Acc> m[VEC];
        Acc A[S][VEC];  // A[j]: shifted_gate of step u0 + j, kept for the second pass where FAST
#pragma unroll
        for (int k = 0; k < VEC; ++k) { m[k].a = Acc(1); m[k].b = Acc(0); }
#pragma unroll
        for (int j = S - 1; j >= 0; --j) {
            if (FULL || u0 + j < len) {
#pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    A[j][k] = shifted_gate<FULL>(j, k, u0, len);
                    m[k].b = A[j][k] * m[k].b + dout[j].template get<Acc>(k);
                    m[k].a = A[j][k] * m[k].a;
                }
            }
        }
        Acc dh[VEC];
        block_carry<Acc, W, VEC, true>(part, m, dhc, dh);
#pragma unroll
        for (int j = S - 1; j >= 0; --j) {
            if (live && (FULL || u0 + j < len)) {
                Pack<TX, VEC> dxo;
                Pack<TG, VEC> dgo;
                dxo.clear(); dgo.clear();
#pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    // exp(g[j]) is A[j - 1] when FAST (step u0 + j exists, so A[j - 1] is not the 1 of a
                    // sequence's last step)
                    dh[k] = (FAST ? A[j][k] : shifted_gate<FULL>(j, k, u0, len)) * dh[k] + dout[j].template get<Acc>(k);
                    const Acc a = FAST && j >= 1 ? A[j - 1][k] : gate_exp(g[j].template get<Acc>(k));
                    const Acc hp = FULL || u0 + j >= 1 ? hprev[j].template get<Acc>(k) : h_init[k];
                    dxo.template set<Acc>(k, dh[k]);
                    dgo.template set<Acc>(k, dh[k] * a * hp);
                }
                dxo.store(dxp);
                dgo.store(dgp);
            }
            dxp -= sdxt; dgp -= sdgt;
        }
        dxp -= (WIN - S) * sdxt; dgp -= (WIN - S) * sdgt;
    }
};

template <typename TX, typename TG, int VEC>
__global__ void __launch_bounds__(32 * HC_BLOCK_WARPS, HC_BLOCK_MIN_BLOCKS) fused_recurrent_block_bwd(
    const TG* __restrict__ g, const TX* __restrict__ o, const TX* __restrict__ dout,
    TX* __restrict__ dx, TG* __restrict__ dg,
    i64 sgb, i64 sgt, i64 sob, i64 sot, i64 sdob, i64 sdot, i64 sdxb, i64 sdxt, i64 sdgb, i64 sdgt,
    const typename AccOf<TX, TG>::type* __restrict__ h0, const typename AccOf<TX, TG>::type* __restrict__ dht,
    typename AccOf<TX, TG>::type* __restrict__ dh0,
    const void* __restrict__ cu_seqlens, int cu64, i64 T, i64 D, int reverse) {
    typedef BlockWalkBwd<TX, TG, VEC> Walk;
    typedef typename Walk::Acc Acc;
    constexpr int W = Walk::W, S = Walk::S, C = Walk::C, WIN = W * S;
    __shared__ Affine<Acc> part[2][W][C];
    const BlockPlace at(VEC, cu_seqlens, cu64, T, D, reverse);
    const i64 d = at.d, n = at.n, len = at.len, b0 = at.sb.batch, t0 = at.t0;
    const bool live = at.live;
    const i64 rem = D - (i64)blockIdx.x * 32 * VEC;  // channels from the block's first on
    const TG* g0 = g + b0 * sgb + t0 * sgt + d;  // logical step 0 of each tensor
    const TX* op = o + b0 * sob + t0 * sot + d;
    const TX* dop = dout + b0 * sdob + t0 * sdot + d;
    TX* dxp = dx + b0 * sdxb + t0 * sdxt + d;
    TG* dgp = dg + b0 * sdgb + t0 * sdgt + d;
    sgt *= at.dir; sot *= at.dir; sdot *= at.dir; sdxt *= at.dir; sdgt *= at.dir;
    const i64 nwin = (len + WIN - 1) / WIN;
    i64 u0 = (nwin - 1) * WIN + (i64)threadIdx.y * S;  // this thread's first step in the last window
    const TG* gp = g0 + u0 * sgt;
    op += (u0 - 1) * sot;
    dop += u0 * sdot;
    dxp += (u0 + S - 1) * sdxt;
    dgp += (u0 + S - 1) * sdgt;

    Acc h_init[VEC], dhc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
        h_init[k] = h0 && live ? h0[n * D + d + k] : Acc(0);
        dhc[k] = dht && live ? dht[n * D + d + k] : Acc(0);
    }
    Walk a, b;
    // In the fast form, window k skips the per-step bounds checks when every row it reads or writes
    // exists: it is neither the last window (partial, and no gate row after it) nor the first (no step
    // before it).  The test is the same for the whole block.
    const auto full = [&](i64 k) { return Walk::FAST && k >= 1 && k <= nwin - 2; };
    const auto load = [&](Walk& w, i64 k, i64 u) {
        if (full(k)) {
            w.template load<true>(gp, op, dop, sgt, sot, sdot, u, len, live);
            // pointers now at window k - 1; ask L2 for window k - HC_BLOCK_L2_AHEAD
            if (HC_BLOCK_L2_AHEAD > 0 && k - HC_BLOCK_L2_AHEAD >= 1)
                Walk::prefetch(gp, op, dop, sgt, sot, sdot, rem, -(HC_BLOCK_L2_AHEAD - 1) * WIN);
        } else {
            w.template load<false>(gp, op, dop, sgt, sot, sdot, u, len, live);
        }
    };
    const auto scan = [&](const Walk& w, i64 k, i64 u) {
        if (full(k)) w.template scan<true>(part[k & 1], dhc, h_init, dxp, dgp, sdxt, sdgt, u, len, live);
        else w.template scan<false>(part[k & 1], dhc, h_init, dxp, dgp, sdxt, sdgt, u, len, live);
    };
    if (nwin > 0) load(a, nwin - 1, u0);
    for (i64 k = nwin - 1; k >= 0; k -= 2) {
        if (k >= 1) load(b, k - 1, u0 - WIN);
        scan(a, k, u0);
        if (k == 0) break;
        if (k >= 2) load(a, k - 2, u0 - 2 * WIN);
        scan(b, k - 1, u0 - WIN);
        u0 -= 2 * WIN;
    }
    if (dh0 && live && threadIdx.y == 0) {  // dh0 = exp(g[0]) dh[0]; dht itself for an empty sequence
        Pack<TG, VEC> g_first;
        g_first.clear();
        if (len > 0) g_first.load(g0);
#pragma unroll
        for (int k = 0; k < VEC; ++k)
            dh0[n * D + d + k] = (len > 0 ? gate_exp(g_first.template get<Acc>(k)) : Acc(1)) * dhc[k];
    }
}

// One step of every sequence, o = exp(g) * h0 + x and ht = o in the accumulation type (T = 1, dense).
// Thread i owns channels [VEC * i, VEC * i + VEC) of the flattened [N, D]; D is a multiple of VEC, and
// x, g, o are VEC-aligned with batch strides that are multiples of VEC (the host checks).
template <typename TX, typename TG, int VEC>
__global__ void __launch_bounds__(128) fused_recurrent_step(
    const TX* __restrict__ x, const TG* __restrict__ g, TX* __restrict__ o, i64 sxb, i64 sgb, i64 sob,
    const typename AccOf<TX, TG>::type* __restrict__ h0, typename AccOf<TX, TG>::type* __restrict__ ht,
    i64 N, i64 D) {
    typedef typename AccOf<TX, TG>::type Acc;
    const i64 i = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    if (i >= N * D) return;
    const i64 n = i / D, d = i - n * D;
    Pack<TX, VEC> xr, out;
    Pack<TG, VEC> gr;
    xr.load(x + n * sxb + d);
    gr.load(g + n * sgb + d);
    out.clear();
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
        Acc h = xr.template get<Acc>(k);
        if (h0) h += gate_exp(gr.template get<Acc>(k)) * h0[i + k];
        out.template set<Acc>(k, h);
        if (ht) ht[i + k] = h;
    }
    out.store(o + n * sob + d);
}

}  // namespace hc
