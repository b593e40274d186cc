// Shared pieces of the hgrn_cupy kernels: storage types for 16-bit floats and their conversions, the
// accumulation type, gate_exp, the varlen bounds, the affine pair, the segment cursor, the vector words
// (Pack) every access goes through, and the asynchronous copies of a word into shared memory.
// Compiles with NVRTC alone: no CUDA toolkit header is included anywhere.
#pragma once

namespace hc {

typedef long long i64;

// 16-bit floats are stored as raw bits; all arithmetic happens after conversion.
struct half_t { unsigned short bits; };
struct bfloat16_t { unsigned short bits; };

// ---- conversions to and from the accumulation type ------------------------------------------
// half: the PTX cvt instructions (exact, round-to-nearest-even, all architectures >= sm_53).
// bfloat16: bit-level (the upper 16 bits of a float), rounding to nearest even; NaN stays NaN.
__device__ __forceinline__ float half_bits_to_float(unsigned short b) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
    return f;
}
__device__ __forceinline__ unsigned short float_to_half_bits(float f) {
    unsigned short b;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(f));
    return b;
}
__device__ __forceinline__ unsigned short double_to_half_bits(double f) {
    unsigned short b;
    asm("cvt.rn.f16.f64 %0, %1;" : "=h"(b) : "d"(f));
    return b;
}
__device__ __forceinline__ float bf16_bits_to_float(unsigned short b) {
    return __uint_as_float(((unsigned int)b) << 16);
}
__device__ __forceinline__ unsigned short float_to_bf16_bits(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned short b;  // the same rounding in one instruction where the hardware has it
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(f));
    return b;
#endif
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x0040u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
__device__ __forceinline__ unsigned short double_to_bf16_bits(double f) {
    // Round to float with round-to-odd first, so the second rounding cannot double-round.
    float r;
    asm("cvt.rz.f32.f64 %0, %1;" : "=f"(r) : "d"(f));
    unsigned int u = __float_as_uint(r);
    if ((double)r != f && (u & 0x7f800000u) != 0x7f800000u) u |= 1u;
    return float_to_bf16_bits(__uint_as_float(u));
}

template <typename Acc, typename T> struct Cvt;
template <> struct Cvt<float, float> {
    static __device__ __forceinline__ float load(float v) { return v; }
    static __device__ __forceinline__ float store(float v) { return v; }
};
template <> struct Cvt<float, half_t> {
    static __device__ __forceinline__ float load(half_t v) { return half_bits_to_float(v.bits); }
    static __device__ __forceinline__ half_t store(float v) { half_t r; r.bits = float_to_half_bits(v); return r; }
};
template <> struct Cvt<float, bfloat16_t> {
    static __device__ __forceinline__ float load(bfloat16_t v) { return bf16_bits_to_float(v.bits); }
    static __device__ __forceinline__ bfloat16_t store(float v) { bfloat16_t r; r.bits = float_to_bf16_bits(v); return r; }
};
template <> struct Cvt<double, double> {
    static __device__ __forceinline__ double load(double v) { return v; }
    static __device__ __forceinline__ double store(double v) { return v; }
};
template <> struct Cvt<double, float> {
    static __device__ __forceinline__ double load(float v) { return (double)v; }
    static __device__ __forceinline__ float store(double v) { return (float)v; }
};
template <> struct Cvt<double, half_t> {
    static __device__ __forceinline__ double load(half_t v) { return (double)half_bits_to_float(v.bits); }
    static __device__ __forceinline__ half_t store(double v) { half_t r; r.bits = double_to_half_bits(v); return r; }
};
template <> struct Cvt<double, bfloat16_t> {
    static __device__ __forceinline__ double load(bfloat16_t v) { return (double)bf16_bits_to_float(v.bits); }
    static __device__ __forceinline__ bfloat16_t store(double v) { bfloat16_t r; r.bits = double_to_bf16_bits(v); return r; }
};

// Accumulate in double when either input is double, in float otherwise (docs/design.md, section 1).
template <typename A, typename B> struct AccOf { typedef float type; };
template <typename B> struct AccOf<double, B> { typedef double type; };
template <typename A> struct AccOf<A, double> { typedef double type; };
template <> struct AccOf<double, double> { typedef double type; };
template <typename A, typename B> using AccT = typename AccOf<A, B>::type;

// exp(g) as ex2.approx.ftz(g * log2(e)): two instructions (FMUL, MUFU.EX2; __expf adds three for
// results below 2^-126, which flush to 0 here: a gate that small changes h by less than 1e-38 |h|).
// Its relative error is about 2^-22 + |g| * 2^-24, far inside the float32 budget, and exp(-inf) = 0.
__device__ __forceinline__ float gate_exp(float g) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(g * 1.4426950408889634f));
    return r;
}
__device__ __forceinline__ double gate_exp(double g) { return exp(g); }

// The bounds [bos, eos) of sequence n. With cu_seqlens, sequences are packed along time of batch 0;
// the bounds are clamped into [0, T] so that malformed offsets can never address outside the tensor.
struct SeqBounds { i64 batch, bos, eos; };
__device__ __forceinline__ i64 load_offset(const void* cu, int cu64, i64 i) {
    return cu64 ? (i64)(static_cast<const long long*>(cu)[i]) : (i64)(static_cast<const int*>(cu)[i]);
}
__device__ __forceinline__ SeqBounds seq_bounds(const void* cu, int cu64, i64 n, i64 T) {
    SeqBounds s;
    if (cu == nullptr) { s.batch = n; s.bos = 0; s.eos = T; return s; }
    i64 a = load_offset(cu, cu64, n), b = load_offset(cu, cu64, n + 1);
    a = a < 0 ? 0 : (a > T ? T : a);
    b = b < a ? a : (b > T ? T : b);
    s.batch = 0; s.bos = a; s.eos = b;
    return s;
}

}  // namespace hc

namespace hc {

// The affine map h -> a*h + b of one or more steps.  compose(later, earlier) applies `earlier` first;
// the operation is associative, which is what lets time be split into chunks.
template <typename Acc> struct Affine { Acc a, b; };
template <typename Acc>
__device__ __forceinline__ Affine<Acc> compose(Affine<Acc> later, Affine<Acc> earlier) {
    Affine<Acc> r;
    r.a = later.a * earlier.a;
    r.b = later.a * earlier.b + later.b;
    return r;
}

// compose() for maps that may begin a sequence (a == 0 exactly): such a map drops what came before even
// where that is NaN or inf (0 * NaN would be NaN), so a sequence never inherits a non-finite state from the
// sequence packed before it.
template <typename Acc>
__device__ __forceinline__ Affine<Acc> compose_reset(Affine<Acc> later, Affine<Acc> earlier) {
    return later.a == Acc(0) ? later : compose(later, earlier);
}

// The map applied to a state h, with compose_reset's rule: a map that begins a sequence ignores h.
template <typename Acc>
__device__ __forceinline__ Acc apply_reset(Affine<Acc> m, Acc h) {
    return m.a == Acc(0) ? m.b : m.a * h + m.b;
}

}  // namespace hc

namespace hc {

// Segments in logical time.  Logical step u is physical step t = u, or t = T - 1 - u in reverse mode,
// of one batch row (dense) or of the packed row (cu_seqlens).  Segment m covers logical steps
// [start(m), start(m+1)); it is sequence n = m, or n = N - 1 - m in reverse mode.  A cursor walks the
// segments as u moves one step at a time.  Dense input is one segment [0, T) per batch row, which the
// VARLEN = false specialisation knows at compile time.
template <bool VARLEN> struct SegmentCursor;

template <> struct SegmentCursor<false> {
    i64 start, end;
    __device__ __forceinline__ SegmentCursor(const void*, int, i64, i64 T, int) : start(0), end(T) {}
    __device__ __forceinline__ i64 seq(i64 batch) const { return batch; }
    __device__ __forceinline__ void seek(i64) {}
    __device__ __forceinline__ void forward_to(i64) {}
    __device__ __forceinline__ void backward_to(i64) {}
};

template <> struct SegmentCursor<true> {
    const void* cu; int cu64; i64 nseg, T; int reverse;
    i64 m, start, end;  // current segment and its logical bounds

    __device__ __forceinline__ SegmentCursor(const void* cu_, int cu64_, i64 nseg_, i64 T_, int reverse_)
        : cu(cu_), cu64(cu64_), nseg(nseg_), T(T_), reverse(reverse_), m(0), start(0), end(0) {}
    __device__ __forceinline__ i64 phys_offset(i64 i) const {  // cu_seqlens[i], clamped into [0, T]
        i64 v = load_offset(cu, cu64, i);
        return v < 0 ? 0 : (v > T ? T : v);
    }
    // Segment 0 starts at 0 and the last one ends at T whatever the offsets say (valid offsets do so
    // already), so that every step lies in a segment and a step before its segment's start never
    // reads a previous step outside the tensors; results of invalid offsets are the guard's NaN.
    __device__ __forceinline__ i64 logical_start(i64 k) const {
        if (k <= 0) return 0;
        if (k >= nseg) return T;
        return reverse ? T - phys_offset(nseg - k) : phys_offset(k);
    }
    __device__ __forceinline__ i64 seq(i64) const { return reverse ? nseg - 1 - m : m; }
    // Place the cursor on the segment that holds logical step u (0 <= u < T): the last m with start(m) <= u.
    __device__ __forceinline__ void seek(i64 u) {
        i64 lo = 0, hi = nseg - 1;
        while (lo < hi) {
            const i64 mid = (lo + hi + 1) >> 1;
            if (logical_start(mid) <= u) lo = mid; else hi = mid - 1;
        }
        m = lo; start = logical_start(m); end = logical_start(m + 1);
    }
    __device__ __forceinline__ void forward_to(i64 u) {  // u only grows; skips empty segments
        while (u >= end && m + 1 < nseg) { ++m; start = end; end = logical_start(m + 1); }
    }
    __device__ __forceinline__ void backward_to(i64 u) {  // u only shrinks; skips empty segments
        while (u < start && m > 0) { --m; end = start; start = logical_start(m); }
    }
};

}  // namespace hc

namespace hc {

// VEC consecutive elements moved as one access (2, 4, 8 or 16 bytes; the caller guarantees alignment),
// held as 32-bit words in registers, and converted element by element.  Loads and stores stream (evict
// first): every element is touched once, and the chunk engine's stores, which wait on the recurrence,
// ran slower as plain stores (docs/performance.md, "Cache hints in the engines").
template <int BYTES> struct Word;
template <> struct Word<2> {
    static __device__ __forceinline__ void load(unsigned* u, const void* p) { u[0] = __ldcs(static_cast<const unsigned short*>(p)); }
    static __device__ __forceinline__ void store(void* p, const unsigned* u) { __stcs(static_cast<unsigned short*>(p), (unsigned short)u[0]); }
};
template <> struct Word<4> {
    static __device__ __forceinline__ void load(unsigned* u, const void* p) { u[0] = __ldcs(static_cast<const unsigned*>(p)); }
    static __device__ __forceinline__ void store(void* p, const unsigned* u) { __stcs(static_cast<unsigned*>(p), u[0]); }
};
template <> struct Word<8> {
    static __device__ __forceinline__ void load(unsigned* u, const void* p) {
        const uint2 v = __ldcs(static_cast<const uint2*>(p)); u[0] = v.x; u[1] = v.y;
    }
    static __device__ __forceinline__ void store(void* p, const unsigned* u) { __stcs(static_cast<uint2*>(p), make_uint2(u[0], u[1])); }
};
template <> struct Word<16> {
    static __device__ __forceinline__ void load(unsigned* u, const void* p) {
        const uint4 v = __ldcs(static_cast<const uint4*>(p)); u[0] = v.x; u[1] = v.y; u[2] = v.z; u[3] = v.w;
    }
    static __device__ __forceinline__ void store(void* p, const unsigned* u) {
        __stcs(static_cast<uint4*>(p), make_uint4(u[0], u[1], u[2], u[3]));
    }
};

// Element k of a packed word, and back.
template <typename T> struct Lane;
template <> struct Lane<float> {
    static __device__ __forceinline__ float get(const unsigned* u, int k) { return __uint_as_float(u[k]); }
    static __device__ __forceinline__ void set(unsigned* u, int k, float v) { u[k] = __float_as_uint(v); }
};
template <> struct Lane<double> {
    static __device__ __forceinline__ double get(const unsigned* u, int k) { return __hiloint2double((int)u[2 * k + 1], (int)u[2 * k]); }
    static __device__ __forceinline__ void set(unsigned* u, int k, double v) {
        u[2 * k] = (unsigned)__double2loint(v); u[2 * k + 1] = (unsigned)__double2hiint(v);
    }
};
template <typename Bits> struct Lane16 {
    static __device__ __forceinline__ Bits get(const unsigned* u, int k) {
        Bits r; r.bits = (unsigned short)(u[k >> 1] >> (16 * (k & 1))); return r;
    }
    static __device__ __forceinline__ void set(unsigned* u, int k, Bits v) {
        if (k & 1) u[k >> 1] = (u[k >> 1] & 0xffffu) | ((unsigned)v.bits << 16);
        else u[k >> 1] = (u[k >> 1] & 0xffff0000u) | v.bits;
    }
};
template <> struct Lane<half_t> : Lane16<half_t> {};
template <> struct Lane<bfloat16_t> : Lane16<bfloat16_t> {};

template <typename T, int VEC> struct Pack {
    typedef T Elem;
    static constexpr int BYTES = (int)sizeof(T) * VEC;
    static constexpr int WORDS = BYTES >= 4 ? BYTES / 4 : 1;
    unsigned u[WORDS];
    __device__ __forceinline__ void clear() {
#pragma unroll
        for (int i = 0; i < WORDS; ++i) u[i] = 0u;
    }
    __device__ __forceinline__ void load(const T* p) { Word<BYTES>::load(u, p); }
    __device__ __forceinline__ void store(T* p) const { Word<BYTES>::store(p, u); }
    template <typename Acc> __device__ __forceinline__ Acc get(int k) const { return Cvt<Acc, T>::load(Lane<T>::get(u, k)); }
    template <typename Acc> __device__ __forceinline__ void set(int k, Acc v) { Lane<T>::set(u, k, Cvt<Acc, T>::store(v)); }
};

// ---- asynchronous copies of one word, global -> shared (cp.async, sm_80 on) ------------------------
// BYTES (4, 8 or 16) from src to dst where `in`; elsewhere dst is zero-filled and nothing is read, but
// src must still be a valid global address (callers pass a tensor's base).  16-byte words bypass L1
// (.cg); 4 and 8 bytes have only the form that caches in L1 (.ca).
template <int BYTES>
__device__ __forceinline__ void async_copy(void* dst, const void* src, bool in) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    if constexpr (BYTES == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(in ? 16 : 0) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(d), "l"(src), "n"(BYTES), "r"(in ? BYTES : 0)
                     : "memory");
}
// Closes this thread's copies since the last commit into one group (an empty one where there were none).
__device__ __forceinline__ void async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Waits until at most PENDING of this thread's groups, the latest ones, are still on their way.
template <int PENDING> __device__ __forceinline__ void async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(PENDING) : "memory");
}

}  // namespace hc
