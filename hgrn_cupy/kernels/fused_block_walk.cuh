// Fused recurrent engine, the block walks' machinery (their kernels are in fused_recurrent.cu): the
// window and its rules, the L2 prefetch of a later window, the meeting of a block's warps, a thread's
// place, the loads and scans of one window forward (BlockWalkFwd) and backward (BlockWalkBwd), and the
// shared-memory stages of the staged forward (BlockStage).
#pragma once
#include "common.cuh"

namespace hc {

// The window: warps a block, steps a warp; the launcher passes the values it launches with.
#ifndef HC_BLOCK_WARPS
#error "HC_BLOCK_WARPS is set by the launcher (hgrn_cupy/engines/fused_recurrent.py)"
#endif
#ifndef HC_BLOCK_STEPS
#error "HC_BLOCK_STEPS is set by the launcher (hgrn_cupy/engines/fused_recurrent.py)"
#endif
#ifndef HC_BLOCK_STAGES
#error "HC_BLOCK_STAGES is set by the launcher (hgrn_cupy/engines/fused_recurrent.py)"
#endif

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
//
// The window and the rules both block walks share.
template <typename TX, typename TG, int VEC> struct BlockWindow {
    typedef AccT<TX, TG> Acc;
    static constexpr int W = HC_BLOCK_WARPS, S = HC_BLOCK_STEPS, C = 32 * VEC, WIN = W * S;
    // Two resident blocks a SM (at most 128 registers): within it only the float64 walks spill, and the
    // library launches none of them; three spilled (docs/performance.md, "Block walks: a block of warps
    // per group of channels").
    static constexpr int MIN_BLOCKS = 2;
    // The fast form only with lanes of 4 bytes of each input: windows wholly inside the sequence skip the
    // per-step bounds checks, and the gates of the first pass over a window serve the second (the
    // backward's second pass also takes exp(g[s]) from them); with 8-byte lanes it spilled and ran slower
    // (docs/performance.md, "Block-walk fast form and loop shape").
    static constexpr bool FAST = sizeof(TX) * VEC <= 4 && sizeof(TG) * VEC <= 4;
    // While a loaded window waits for its scan, each warp asks L2 (evict-last, so that the streaming
    // traffic does not push the lines out first) for its rows of the window L2_AHEAD after it, windows
    // wholly inside the sequence only; two ahead lost to one (docs/performance.md, "Block-walk L2 prefetch").
    static constexpr int L2_AHEAD = 1;
    // The block's window partials in shared memory, two buffers of [W][C] (see block_carry).
    typedef Affine<Acc> Parts[W][C];
    __device__ __forceinline__ static Parts* parts() {
        __shared__ Parts part[2];
        return part;
    }
};

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

// Where a walk thread sits (the thread walks' and the block walks' alike: a block row of `lanes` threads,
// blockDim.x, takes vec channels a thread; the block walks pass their 32 as a constant): its first
// channel d (live: d < D; in a block walk every thread takes part in the barriers, live or not), the
// channels rem from its block's first on, its sequence n with bounds sb and length len, and the physical
// time t0 of logical step 0 with the direction dir of logical time.
struct WalkPlace {
    i64 d, n, len, t0, dir, rem;
    SeqBounds sb;
    bool live;
    __device__ __forceinline__ WalkPlace(int lanes, int vec, const void* cu_seqlens, int cu64, i64 T, i64 D,
                                         int reverse) {
        d = ((i64)blockIdx.x * lanes + threadIdx.x) * vec;
        n = blockIdx.y;
        live = d < D;
        sb = seq_bounds(cu_seqlens, cu64, n, T);
        len = sb.eos - sb.bos;
        t0 = reverse ? sb.eos - 1 : sb.bos;
        dir = reverse ? -1 : 1;
        rem = D - (i64)blockIdx.x * lanes * vec;
    }
};

template <typename TX, typename TG, int VEC>
struct BlockWalkFwd : BlockWindow<TX, TG, VEC> {
    typedef BlockWindow<TX, TG, VEC> Window;
    using typename Window::Acc;
    using Window::W; using Window::S; using Window::C; using Window::WIN; using Window::FAST;
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

// The staged block walk (forward): the block walk's windows and meeting of warps, with the next window on
// its way into shared memory instead of registers.  Each lane copies its own words (cp.async, one copy a
// step and tensor) and reads them back when the window's turn comes, so no barrier guards a stage; the
// registers a second window would hold are free.  Steps past the sequence arrive as zeros (x = 0, g = 0
// is the identity map), so the fold checks no bounds; the stores do.  Where it beats the register walk
// depends on the channel count and the card, so the tuner measures it (docs/performance.md, "Block-walk
// staged forward").  Dynamic shared memory: STAGES windows (the launcher's HC_BLOCK_STAGES, from which it
// also sizes the launch) of W * S rows of x and g, 32 words of BYTES each (STAGE_BYTES).
template <typename TX, typename TG, int VEC>
struct BlockStage : BlockWindow<TX, TG, VEC> {
    typedef BlockWindow<TX, TG, VEC> Window;
    using Window::W; using Window::S;
    static constexpr int BYTES = Pack<TX, VEC>::BYTES, WORDS = BYTES / 4, STAGES = HC_BLOCK_STAGES;
    static_assert(BYTES == Pack<TG, VEC>::BYTES && (BYTES == 4 || BYTES == 8 || BYTES == 16),
                  "a lane is one 4-, 8- or 16-byte word of each input (the sizes cp.async copies)");
    static constexpr int STAGE_BYTES = STAGES * W * S * 2 * 32 * BYTES;

    // This thread's word of step j of tensor m (0: x, 1: g) in stage s.
    static __device__ __forceinline__ unsigned* word(unsigned* stage, int s, int j, int m) {
        return stage + ((((s * W + (int)threadIdx.y) * S + j) * 2 + m) * 32 + (int)threadIdx.x) * WORDS;
    }
    // Queues, as one group, the copies of this thread's steps u0 .. u0 + S - 1 of x and g (xp, gp: step 0,
    // strides in logical time) into stage s where `on`; steps at or past len, and lanes that are not live,
    // get zeros (their copies read nothing: the base pointers x0, g0 stand in).  An empty group where not
    // `on`, so that the groups stay one a window.
    static __device__ __forceinline__ void issue(unsigned* stage, int s, bool on, const TX* x0, const TG* g0,
                                                 const TX* xp, const TG* gp, i64 sxt, i64 sgt, i64 u0, i64 len,
                                                 bool live) {
        if (on) {
#pragma unroll
            for (int j = 0; j < S; ++j) {
                const bool in = live && u0 + j < len;
                async_copy<BYTES>(word(stage, s, j, 0), in ? (const void*)(xp + (u0 + j) * sxt) : (const void*)x0, in);
                async_copy<BYTES>(word(stage, s, j, 1), in ? (const void*)(gp + (u0 + j) * sgt) : (const void*)g0, in);
            }
        }
        async_commit();
    }
    // Waits until this thread's copies but the last group's have landed (the window about to be read).
    static __device__ __forceinline__ void wait_older() { async_wait<STAGES - 1>(); }
    static __device__ __forceinline__ void wait_all() { async_wait<0>(); }
    // This thread's words of stage s into registers.
    static __device__ __forceinline__ void take(unsigned* stage, int s, Pack<TX, VEC> (&x)[S], Pack<TG, VEC> (&g)[S]) {
#pragma unroll
        for (int j = 0; j < S; ++j) {
#pragma unroll
            for (int q = 0; q < WORDS; ++q) { x[j].u[q] = word(stage, s, j, 0)[q]; g[j].u[q] = word(stage, s, j, 1)[q]; }
        }
    }
};

// The fold of a whole window of S steps, VEC channels a lane: each channel's map of the steps into m,
// and exp(g) of each step into a (kept for the second pass).  No step is checked: the caller's words past
// the sequence are zeros, the identity map.
template <typename Acc, typename TX, typename TG, int VEC, int S>
__device__ __forceinline__ void fold_window(const Pack<TX, VEC> (&x)[S], const Pack<TG, VEC> (&g)[S],
                                            Affine<Acc> (&m)[VEC], Acc (&a)[S][VEC]) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) { m[k].a = Acc(1); m[k].b = Acc(0); }
#pragma unroll
    for (int j = 0; j < S; ++j) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            a[j][k] = gate_exp(g[j].template get<Acc>(k));
            m[k].b = a[j][k] * m[k].b + x[j].template get<Acc>(k);
            m[k].a = a[j][k] * m[k].a;
        }
    }
}

// The second pass over a warp's window once the carry h into its first step is known: h = a h + x at each
// step (a = exp(g), kept by fold_window), the states into out; h leaves as the state after the last step.
template <typename Acc, typename TX, int VEC, int S>
__device__ __forceinline__ void apply_window(const Acc (&a)[S][VEC], const Pack<TX, VEC> (&x)[S], Acc (&h)[VEC],
                                             Pack<TX, VEC> (&out)[S]) {
#pragma unroll
    for (int j = 0; j < S; ++j) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            h[k] = a[j][k] * h[k] + x[j].template get<Acc>(k);
            out[j].template set<Acc>(k, h[k]);
        }
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
struct BlockWalkBwd : BlockWindow<TX, TG, VEC> {
    typedef BlockWindow<TX, TG, VEC> Window;
    using typename Window::Acc;
    using Window::W; using Window::S; using Window::C; using Window::WIN; using Window::FAST;
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

}  // namespace hc
