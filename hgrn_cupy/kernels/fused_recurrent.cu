// Fused recurrent engine: walks of time without a workspace.  The thread walks (fused_recurrent_fwd /
// _bwd): one thread owns VEC channels of one sequence and walks all of its time.  The block walks
// (fused_recurrent_block_fwd / _bwd, fused_recurrent_staged_fwd with the next window staged in shared
// memory, and fused_recurrent_bulk_fwd with windows moved by bulk tensor copies): a block of warps owns 32
// lanes of channels of one sequence and splits each window of time between its warps.
// fused_recurrent_step and fused_recurrent_step_bwd: one step (decoding) and its backward.  This file owns
// the kernels and the thread walks; fused_block_walk.cuh the block walks' machinery, fused_bulk_walk.cuh the
// bulk walk's copies.
//
// Thread walks
// grid  (ceil(D / (VEC * blockDim.x)), N)   N = sequences (B, or len(cu_seqlens) - 1); past 65535 (the
//                                           y bound) the host launches parts with moved pointers
// block (BLOCK,)                            VEC adjacent channels per thread (1, or 2 where the host
//                                           finds D, pointers and strides aligned): a warp reads
//                                           32 * VEC adjacent channels per step
// traffic per element: forward reads x, g and writes o; backward reads g, o, do and writes dx, dg.
// The loads of future steps do not depend on the state, so each thread keeps two tiles of PREFETCH
// steps in registers: while it scans one tile, the loads of the next are in flight.  Reverse mode and
// varlen are the same walk: a start pointer and a signed time stride per sequence.
#include "common.cuh"
#include "fused_block_walk.cuh"
#include "fused_bulk_walk.cuh"

namespace hc {

// Steps each thread loads ahead per tile (two tiles in flight), with one channel per thread and with
// VEC > 1 channels per thread: the launcher passes the values it launches with.
#ifndef HC_PREFETCH
#error "HC_PREFETCH is set by the launcher (hgrn_cupy/engines/fused_recurrent.py)"
#endif
#ifndef HC_PREFETCH_V
#error "HC_PREFETCH_V is set by the launcher (hgrn_cupy/engines/fused_recurrent.py)"
#endif
template <int VEC> struct Prefetch { static constexpr int STEPS = VEC == 1 ? HC_PREFETCH : HC_PREFETCH_V; };

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
    typedef AccT<TX, TG> Acc;
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
    const AccT<TX, TG>* __restrict__ h0, AccT<TX, TG>* __restrict__ ht,
    const void* __restrict__ cu_seqlens, int cu64, i64 T, i64 D, int reverse) {
    typedef AccT<TX, TG> Acc;
    constexpr int P = Prefetch<VEC>::STEPS;
    const WalkPlace at(blockDim.x, VEC, cu_seqlens, cu64, T, D, reverse);
    if (!at.live) return;
    const i64 d = at.d, n = at.n, len = at.len, b0 = at.sb.batch;
    const TX* xp = x + b0 * sxb + at.t0 * sxt + d;
    const TG* gp = g + b0 * sgb + at.t0 * sgt + d;
    TX* op = o + b0 * sob + at.t0 * sot + d;
    sxt *= at.dir; sgt *= at.dir; sot *= at.dir;

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
    typedef AccT<TX, TG> Acc;
    static constexpr int P = Prefetch<VEC>::STEPS;
    // The fast loop (tiles wholly inside the sequence, no per-step checks) lengthens live ranges: the
    // backward takes it only with one 16-bit channel a thread, where it does not spill (docs/performance.md,
    // "Fast form of the thread walk"; the forward always takes it).
    static constexpr bool FAST = VEC == 1 && sizeof(TX) == 2 && sizeof(TG) == 2;
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
    const AccT<TX, TG>* __restrict__ h0, const AccT<TX, TG>* __restrict__ dht, AccT<TX, TG>* __restrict__ dh0,
    const void* __restrict__ cu_seqlens, int cu64, i64 T, i64 D, int reverse) {
    typedef AccT<TX, TG> Acc;
    constexpr int P = Prefetch<VEC>::STEPS;
    const WalkPlace at(blockDim.x, VEC, cu_seqlens, cu64, T, D, reverse);
    if (!at.live) return;
    const i64 d = at.d, n = at.n, b0 = at.sb.batch, t0 = at.t0, dir = at.dir;
    sgt *= dir; sot *= dir; sdot *= dir; sdxt *= dir; sdgt *= dir;
    // Pointers start at the last logical step, len - 1 (o one step earlier), and walk back.
    const i64 last = at.len - 1;
    const TG* gp = g + b0 * sgb + t0 * dir * sgt + last * sgt + d;
    const TX* op = o + b0 * sob + t0 * dir * sot + (last - 1) * sot + d;
    const TX* dop = dout + b0 * sdob + t0 * dir * sdot + last * sdot + d;
    TX* dxp = dx + b0 * sdxb + t0 * dir * sdxt + last * sdxt + d;
    TG* dgp = dg + b0 * sdgb + t0 * dir * sdgt + last * sdgt + d;

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
    // The fast loop (BwdTile::FAST): every tile touched holds P steps, each with a previous state.
    for (; BwdTile<TX, TG, VEC>::FAST && hi >= 3 * P; hi -= 2 * P) {
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

// The block walk, forward (hgrn_cupy/kernels/fused_block_walk.cuh).
template <typename TX, typename TG, int VEC>
__global__ void __launch_bounds__(32 * BlockWindow<TX, TG, VEC>::W, BlockWindow<TX, TG, VEC>::MIN_BLOCKS)
fused_recurrent_block_fwd(
    const TX* __restrict__ x, const TG* __restrict__ g, TX* __restrict__ o,
    i64 sxb, i64 sxt, i64 sgb, i64 sgt, i64 sob, i64 sot,
    const AccT<TX, TG>* __restrict__ h0, AccT<TX, TG>* __restrict__ ht,
    const void* __restrict__ cu_seqlens, int cu64, i64 T, i64 D, int reverse) {
    typedef BlockWalkFwd<TX, TG, VEC> Walk;
    typedef typename Walk::Acc Acc;
    constexpr int S = Walk::S, C = Walk::C, WIN = Walk::WIN;
    const WalkPlace at(32, VEC, cu_seqlens, cu64, T, D, reverse);
    const i64 d = at.d, n = at.n, len = at.len, rem = at.rem;
    const bool live = at.live;
    typename Walk::Parts* part = Walk::parts();
    const i64 first = (i64)threadIdx.y * S;  // this warp's first logical step of window 0
    const TX* xp = x + at.sb.batch * sxb + at.t0 * sxt + d;
    const TG* gp = g + at.sb.batch * sgb + at.t0 * sgt + d;
    TX* op = o + at.sb.batch * sob + at.t0 * sot + d;
    sxt *= at.dir; sgt *= at.dir; sot *= at.dir;
    xp += first * sxt; gp += first * sgt; op += first * sot;

    Acc hin[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) hin[k] = h0 && live ? h0[n * D + d + k] : Acc(0);
    Walk a, b;
    // The fast form runs the windows in two loops: while the next three windows are whole (the test is the
    // same for the whole block), without per-step bounds checks, then the rest; 8-byte lanes run one loop
    // that checks every step.  Each loop shape scheduled better for its lanes (docs/performance.md,
    // "Block-walk fast form and loop shape").  After loading the window at v (pointers at v + WIN), each
    // asks L2 for the one L2_AHEAD after it where that one is whole.
    constexpr int AHEAD = Walk::L2_AHEAD;
    if constexpr (Walk::FAST) {
        a.template load<false>(xp, gp, sxt, sgt, first, len, live);
        i64 u = first;  // this thread's first step of the window in a
        const auto ahead = [&](i64 v) {
            if (v - first + (AHEAD + 1) * WIN <= len) Walk::prefetch(xp, gp, sxt, sgt, rem, (AHEAD - 1) * WIN);
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
        // full() is false in this form; load keeps the test because without it this walk compiles to
        // different SASS (address arithmetic), and its speed is sensitive to the schedule.
        const auto full = [&](i64 u) { return Walk::FAST && u - first + WIN <= len; };
        const auto load = [&](Walk& w, i64 u) {
            if (full(u)) w.template load<true>(xp, gp, sxt, sgt, u, len, live);
            else w.template load<false>(xp, gp, sxt, sgt, u, len, live);
            if (u - first + (AHEAD + 1) * WIN <= len) Walk::prefetch(xp, gp, sxt, sgt, rem, (AHEAD - 1) * WIN);
        };
        const auto scan = [&](const Walk& w, Affine<Acc> (*p)[C], i64 u) {
            w.template scan<false>(p, hin, op, sot, u, len, live);
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

// The staged block walk, forward (hgrn_cupy/kernels/fused_block_walk.cuh, BlockStage): the block walk's
// arguments and grid, BlockStage::STAGE_BYTES of dynamic shared memory.
template <typename TX, typename TG, int VEC>
__global__ void __launch_bounds__(32 * BlockWindow<TX, TG, VEC>::W, BlockWindow<TX, TG, VEC>::MIN_BLOCKS)
fused_recurrent_staged_fwd(
    const TX* __restrict__ x, const TG* __restrict__ g, TX* __restrict__ o,
    i64 sxb, i64 sxt, i64 sgb, i64 sgt, i64 sob, i64 sot,
    const AccT<TX, TG>* __restrict__ h0, AccT<TX, TG>* __restrict__ ht,
    const void* __restrict__ cu_seqlens, int cu64, i64 T, i64 D, int reverse) {
    typedef BlockStage<TX, TG, VEC> Stage;
    typedef typename Stage::Acc Acc;
    constexpr int S = Stage::S, W = Stage::W, WIN = Stage::WIN, STAGES = Stage::STAGES;
    extern __shared__ unsigned stage[];
    const WalkPlace at(32, VEC, cu_seqlens, cu64, T, D, reverse);
    const i64 d = at.d, n = at.n, len = at.len;
    const bool live = at.live;
    typename Stage::Parts* part = Stage::parts();
    const TX* xp = x + at.sb.batch * sxb + at.t0 * sxt + d;  // logical step 0 of each tensor
    const TG* gp = g + at.sb.batch * sgb + at.t0 * sgt + d;
    TX* op = o + at.sb.batch * sob + at.t0 * sot + d;
    sxt *= at.dir; sgt *= at.dir; sot *= at.dir;
    const i64 first = (i64)threadIdx.y * S, windows = (len + WIN - 1) / WIN;  // first: this warp's step in a window

    Acc hin[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) hin[k] = h0 && live ? h0[n * D + d + k] : Acc(0);
#pragma unroll
    for (int s = 0; s < STAGES; ++s)
        Stage::issue(stage, s, s < windows, x, g, xp, gp, sxt, sgt, s * WIN + first, len, live);
    // A window's own fold and scan, not BlockWalkFwd::scan: that one recomputes the gates in its second
    // pass (8-byte lanes) and checks every step of the fold, which cost this kernel its lead over 4-byte
    // lanes (docs/performance.md, "Block-walk staged forward"); zeros past the sequence need no check
    // before the stores.
    for (i64 i = 0; i < windows; ++i) {
        const int s = (int)(i % STAGES);
        const i64 u0 = i * WIN + first;
        Pack<TX, VEC> xr[S];
        Pack<TG, VEC> gr[S];
        Stage::wait_older();
        Stage::take(stage, s, xr, gr);
        Stage::issue(stage, s, i + STAGES < windows, x, g, xp, gp, sxt, sgt, u0 + STAGES * WIN, len, live);
        Affine<Acc> m[VEC];
        Acc a[S][VEC], h[VEC];
        fold_window(xr, gr, m, a);
        block_carry<Acc, W, VEC, false>(part[i & 1], m, hin, h);
        Pack<TX, VEC> out[S];
        apply_window(a, xr, h, out);
#pragma unroll
        for (int j = 0; j < S; ++j)
            if (live && u0 + j < len) out[j].store(op + (u0 + j) * sot);
    }
    Stage::wait_all();
    if (ht && live && threadIdx.y == 0) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) ht[n * D + d + k] = hin[k];
    }
}

// The bulk walk, forward (hgrn_cupy/kernels/fused_bulk_walk.cuh, BulkWalk): the block walk's grid and
// windows over a dense [N, T, D] that the maps describe, BulkWalk::SHARED_BYTES of dynamic shared memory.
// With reverse, logical window i is physical steps T - (i + 1) * WIN .. T - i * WIN - 1 (its rows read
// backwards; the last window's box starts at step 0, `shift` rows late) and a warp's rows of o end where
// the previous warp's begin.
template <typename TX, typename TG, int VEC>
__global__ void __launch_bounds__(32 * BlockWindow<TX, TG, VEC>::W, BlockWindow<TX, TG, VEC>::MIN_BLOCKS)
fused_recurrent_bulk_fwd(const __grid_constant__ BulkMaps maps, const AccT<TX, TG>* __restrict__ h0,
                         AccT<TX, TG>* __restrict__ ht, i64 T, i64 D, int reverse) {
    typedef BulkWalk<TX, TG, VEC> Walk;
    typedef typename Walk::Acc Acc;
    constexpr int S = Walk::S, W = Walk::W, WIN = Walk::WIN, BOX = Walk::BOX, STAGES = Walk::STAGES;
    extern __shared__ __align__(128) unsigned char bulk_stage[];  // 128-byte aligned: the copies' boxes
    __shared__ unsigned long long bar[STAGES];
    typename Walk::Parts* part = Walk::parts();
    const int w = threadIdx.y, c0 = (int)blockIdx.x * Walk::C, n = (int)blockIdx.y;
    const bool lead = threadIdx.x == 0 && w == 0;
    const i64 d = (i64)c0 + threadIdx.x * VEC, windows = (T + WIN - 1) / WIN;
    const bool live = d < D;
    auto box_t = [&](i64 i) { return (int)(reverse ? max(T - (i + 1) * WIN, (i64)0) : i * WIN); };
    unsigned char* rows = bulk_stage + STAGES * 2 * BOX + w * 2 * S * Walk::ROW;  // this warp's two buffers of o

    if (lead) Walk::init(bar);
    __syncthreads();
    if (lead) {
        for (int s = 0; s < STAGES && s < windows; ++s) Walk::fetch(&maps, bulk_stage + s * 2 * BOX, bar + s, c0, box_t(s), n);
    }
    Acc hin[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) hin[k] = h0 && live ? h0[n * D + d + k] : Acc(0);
    for (i64 i = 0; i < windows; ++i) {
        const int s = (int)(i % STAGES);
        Pack<TX, VEC> xr[S], out[S];
        Pack<TG, VEC> gr[S];
        Walk::wait(bar + s, (unsigned)((i / STAGES) & 1));
        Walk::take(bulk_stage + s * 2 * BOX, reverse, reverse ? (int)max((i + 1) * WIN - T, (i64)0) : 0, xr, gr);
        Affine<Acc> m[VEC];
        Acc a[S][VEC], h[VEC];
        fold_window(xr, gr, m, a);
        block_carry<Acc, W, VEC, false>(part[i & 1], m, hin, h);
        // past block_carry's barrier every warp holds its rows of stage s: the stage takes a later window
        if (lead && i + STAGES < windows) Walk::fetch(&maps, bulk_stage + s * 2 * BOX, bar + s, c0, box_t(i + STAGES), n);
        apply_window(a, xr, h, out);
        const i64 u0 = i * WIN + (i64)w * S;  // the warp's first logical step
        Walk::put(out, rows + (int)(i & 1) * S * Walk::ROW, reverse, &maps, c0, (int)(reverse ? T - u0 - S : u0), n);
    }
    Walk::drain();
    if (ht && live && w == 0) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) ht[n * D + d + k] = hin[k];
    }
}

// The block walk, backward (hgrn_cupy/kernels/fused_block_walk.cuh).
template <typename TX, typename TG, int VEC>
__global__ void __launch_bounds__(32 * BlockWindow<TX, TG, VEC>::W, BlockWindow<TX, TG, VEC>::MIN_BLOCKS)
fused_recurrent_block_bwd(
    const TG* __restrict__ g, const TX* __restrict__ o, const TX* __restrict__ dout,
    TX* __restrict__ dx, TG* __restrict__ dg,
    i64 sgb, i64 sgt, i64 sob, i64 sot, i64 sdob, i64 sdot, i64 sdxb, i64 sdxt, i64 sdgb, i64 sdgt,
    const AccT<TX, TG>* __restrict__ h0, const AccT<TX, TG>* __restrict__ dht, AccT<TX, TG>* __restrict__ dh0,
    const void* __restrict__ cu_seqlens, int cu64, i64 T, i64 D, int reverse) {
    typedef BlockWalkBwd<TX, TG, VEC> Walk;
    typedef typename Walk::Acc Acc;
    constexpr int S = Walk::S, WIN = Walk::WIN;
    const WalkPlace at(32, VEC, cu_seqlens, cu64, T, D, reverse);
    const i64 d = at.d, n = at.n, len = at.len, b0 = at.sb.batch, t0 = at.t0, rem = at.rem;
    const bool live = at.live;
    typename Walk::Parts* part = Walk::parts();
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
            // pointers now at window k - 1; ask L2 for window k - L2_AHEAD
            if (k - Walk::L2_AHEAD >= 1) Walk::prefetch(gp, op, dop, sgt, sot, sdot, rem, -(Walk::L2_AHEAD - 1) * WIN);
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
    const AccT<TX, TG>* __restrict__ h0, AccT<TX, TG>* __restrict__ ht,
    i64 N, i64 D) {
    typedef AccT<TX, TG> Acc;
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

// The backward of one step of every sequence (T = 1, dense): dh = do + dht, dx = dh, dg = dh * exp(g) * h0
// (h0 = 0 where none is given) and dh0 = exp(g) * dh in the accumulation type; o is not read (h[-1] is
// h0).  Thread i owns channels [VEC * i, VEC * i + VEC) of the flattened [N, D], as in fused_recurrent_step.
template <typename TX, typename TG, int VEC>
__global__ void __launch_bounds__(128) fused_recurrent_step_bwd(
    const TG* __restrict__ g, const TX* __restrict__ dout, TX* __restrict__ dx, TG* __restrict__ dg,
    i64 sgb, i64 sdob, i64 sdxb, i64 sdgb, const AccT<TX, TG>* __restrict__ h0,
    const AccT<TX, TG>* __restrict__ dht, AccT<TX, TG>* __restrict__ dh0, i64 N, i64 D) {
    typedef AccT<TX, TG> Acc;
    const i64 i = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    if (i >= N * D) return;
    const i64 n = i / D, d = i - n * D;
    Pack<TG, VEC> gr, dgo;
    Pack<TX, VEC> dr, dxo;
    gr.load(g + n * sgb + d);
    dr.load(dout + n * sdob + d);
    dxo.clear(); dgo.clear();
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
        Acc dh = dr.template get<Acc>(k);
        if (dht) dh += dht[i + k];
        const Acc a = gate_exp(gr.template get<Acc>(k));
        dxo.template set<Acc>(k, dh);
        dgo.template set<Acc>(k, dh * a * (h0 ? h0[i + k] : Acc(0)));  // NaN in dh stays NaN, as in the walk
        if (dh0) dh0[i + k] = a * dh;
    }
    dxo.store(dx + n * sdxb + d);
    dgo.store(dg + n * sdgb + d);
}

}  // namespace hc
