// Fused recurrent engine: one thread owns one (sequence, channel) and walks time.
//
// grid  (ceil(D / blockDim.x), N)   N = sequences (B, or len(cu_seqlens) - 1)
// block (BLOCK,)                    one thread per channel; a warp reads 32 adjacent channels
// traffic per element: forward reads x, g and writes o; backward reads g, o, do and writes dx, dg.
// fused_recurrent_step is the forward of a single step (T = 1, dense: decoding) with VEC channels per
// thread and 16-byte accesses, over a flat grid of N * D / VEC threads.
//
// The loads of future steps do not depend on the state, so each thread keeps two tiles of PREFETCH
// steps in registers: while it scans one tile, the loads of the next are in flight.  Reverse mode and
// varlen are the same walk: a start pointer and a signed time stride per sequence.
#include "common.cuh"

namespace hc {

// Steps each thread loads ahead per tile (two tiles in flight); a tuning knob.
#ifndef HC_PREFETCH
#define HC_PREFETCH 16
#endif
constexpr int PREFETCH = HC_PREFETCH;

template <typename TX, typename TG>
struct FwdTile {
    typedef typename AccOf<TX, TG>::type Acc;
    TX x[PREFETCH];
    TG g[PREFETCH];

    // Loads steps s0 .. s0 + PREFETCH - 1 and advances the pointers past them.
    __device__ __forceinline__ void load(const TX*& xp, const TG*& gp, i64 sxt, i64 sgt, i64 s0, i64 len) {
#pragma unroll
        for (int j = 0; j < PREFETCH; ++j) {
            if (s0 + j < len) {
                x[j] = load_stream(xp);
                g[j] = load_stream(gp);
            }
            xp += sxt; gp += sgt;
        }
    }
    __device__ __forceinline__ void scan(Acc& h, TX*& op, i64 sot, i64 s0, i64 len) const {
#pragma unroll
        for (int j = 0; j < PREFETCH; ++j) {
            if (s0 + j < len) {
                h = gate_exp(Cvt<Acc, TG>::load(g[j])) * h + Cvt<Acc, TX>::load(x[j]);
                store_stream(op, Cvt<Acc, TX>::store(h));
            }
            op += sot;
        }
    }
};

template <typename TX, typename TG>
__global__ void __launch_bounds__(256) fused_recurrent_fwd(
    const TX* __restrict__ x, const TG* __restrict__ g, TX* __restrict__ o,
    i64 sxb, i64 sxt, i64 sgb, i64 sgt, i64 sob, i64 sot,
    const typename AccOf<TX, TG>::type* __restrict__ h0, typename AccOf<TX, TG>::type* __restrict__ ht,
    const void* __restrict__ cu_seqlens, int cu64, i64 T, i64 D, int reverse) {
    typedef typename AccOf<TX, TG>::type Acc;
    const i64 d = (i64)blockIdx.x * blockDim.x + threadIdx.x;
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

    Acc h = h0 ? h0[n * D + d] : Acc(0);
    FwdTile<TX, TG> a, b;
    a.load(xp, gp, sxt, sgt, 0, len);
    for (i64 s = 0; s < len; s += 2 * PREFETCH) {
        b.load(xp, gp, sxt, sgt, s + PREFETCH, len);
        a.scan(h, op, sot, s, len);
        if (s + PREFETCH >= len) break;
        a.load(xp, gp, sxt, sgt, s + 2 * PREFETCH, len);
        b.scan(h, op, sot, s + PREFETCH, len);
    }
    if (ht) ht[n * D + d] = h;
}

// Backward walks logical time from the end.  At logical step s it needs g[s], do[s] and the previous
// state o[s-1] (h0 at s = 0); it carries dh[s+1] and exp(g[s+1]).
template <typename TX, typename TG>
struct BwdTile {
    typedef typename AccOf<TX, TG>::type Acc;
    TG g[PREFETCH];
    TX dout[PREFETCH];
    TX hprev[PREFETCH];

    // A tile holds logical steps s = hi - j, j = 0..PREFETCH-1 (only s >= 0 are loaded); the pointers
    // address step hi on entry and step hi - PREFETCH on return (op is one step behind: o[s-1]).
    __device__ __forceinline__ void load(const TG*& gp, const TX*& op, const TX*& dop,
                                         i64 sgt, i64 sot, i64 sdot, i64 hi) {
#pragma unroll
        for (int j = 0; j < PREFETCH; ++j) {
            const i64 s = hi - j;
            if (s >= 0) {
                g[j] = load_stream(gp);
                dout[j] = load_stream(dop);
                if (s >= 1) hprev[j] = load_stream(op);
            }
            gp -= sgt; op -= sot; dop -= sdot;
        }
    }
    __device__ __forceinline__ void scan(Acc& dh, Acc& a_next, Acc h_init, TX*& dxp, TG*& dgp,
                                         i64 sdxt, i64 sdgt, i64 hi) const {
#pragma unroll
        for (int j = 0; j < PREFETCH; ++j) {
            const i64 s = hi - j;
            if (s >= 0) {
                dh = Cvt<Acc, TX>::load(dout[j]) + a_next * dh;
                const Acc a = gate_exp(Cvt<Acc, TG>::load(g[j]));
                const Acc hp = s >= 1 ? Cvt<Acc, TX>::load(hprev[j]) : h_init;
                store_stream(dxp, Cvt<Acc, TX>::store(dh));
                store_stream(dgp, Cvt<Acc, TG>::store(dh * a * hp));
                a_next = a;
            }
            dxp -= sdxt; dgp -= sdgt;
        }
    }
};

template <typename TX, typename TG>
__global__ void __launch_bounds__(256) fused_recurrent_bwd(
    const TG* __restrict__ g, const TX* __restrict__ o, const TX* __restrict__ dout,
    TX* __restrict__ dx, TG* __restrict__ dg,
    i64 sgb, i64 sgt, i64 sob, i64 sot, i64 sdob, i64 sdot, i64 sdxb, i64 sdxt, i64 sdgb, i64 sdgt,
    const typename AccOf<TX, TG>::type* __restrict__ h0, const typename AccOf<TX, TG>::type* __restrict__ dht,
    typename AccOf<TX, TG>::type* __restrict__ dh0,
    const void* __restrict__ cu_seqlens, int cu64, i64 T, i64 D, int reverse) {
    typedef typename AccOf<TX, TG>::type Acc;
    const i64 d = (i64)blockIdx.x * blockDim.x + threadIdx.x;
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

    const Acc h_init = h0 ? h0[n * D + d] : Acc(0);
    Acc dh = dht ? dht[n * D + d] : Acc(0);
    Acc a_next = Acc(1);
    BwdTile<TX, TG> a, b;
    a.load(gp, op, dop, sgt, sot, sdot, last);
    for (i64 hi = last; hi >= 0; hi -= 2 * PREFETCH) {
        b.load(gp, op, dop, sgt, sot, sdot, hi - PREFETCH);
        a.scan(dh, a_next, h_init, dxp, dgp, sdxt, sdgt, hi);
        if (hi - PREFETCH < 0) break;
        a.load(gp, op, dop, sgt, sot, sdot, hi - 2 * PREFETCH);
        b.scan(dh, a_next, h_init, dxp, dgp, sdxt, sdgt, hi - PREFETCH);
    }
    if (dh0) dh0[n * D + d] = a_next * dh;
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
