// The varlen guard: a device-side check of cu_seqlens, and the NaN fill of a call's outputs when it fails.
// Eager calls check the offsets on the host.  Under JAX jit, during CUDA-graph capture, or with
// config.check_cu_seqlens_values = False nothing does, and the engines' kernels (which clamp every offset
// into [0, T], common.cuh) would leave outputs unwritten or wrong.  There a call brackets its kernels with
// these two, on its stream, so that every output of a call whose cu_seqlens are invalid is NaN.
//
// check_offsets<I>   (I = int or long long: the storage type of cu_seqlens)
//   grid (1), block (HC_GUARD_CHECK_THREADS): the one block walks all n = N + 1 entries, a block's width at
//   a time, and thread 0 writes *flag exactly once: 1 when the offsets are invalid, 0 otherwise.  So the
//   caller's 4-byte flag needs no zeroing, and no two writes race.  Invalid: n < 1, cu[0] != 0,
//   cu[n-1] != T, any cu[i] < 0 or > T, any cu[i+1] < cu[i] (compared as 64-bit integers).
//   traffic: reads each offset twice (the second read hits L1); n / HC_GUARD_CHECK_THREADS iterations.
//
// fill_if_flagged
//   grid (any; the host launches one wave), block (HC_GUARD_FILL_THREADS >= 16): when *flag != 0, writes
//   0xFF over every byte of up to four buffers (pointer, nbytes; nbytes <= 0 leaves a slot unused), grid-
//   stride: the bytes before the first 16-byte boundary and after the last one byte by byte, the rest as
//   16-byte stores.  All-ones bytes are a NaN in float16, bfloat16, float32 and float64 alike.  When the
//   flag is 0 every thread returns after one load.  Buffers may overlap (every write is the same byte).
#include "common.cuh"

namespace hc {

#ifndef HC_GUARD_CHECK_THREADS
#define HC_GUARD_CHECK_THREADS 1024
#endif
#ifndef HC_GUARD_FILL_THREADS
#define HC_GUARD_FILL_THREADS 256
#endif

template <typename I>
__global__ void __launch_bounds__(HC_GUARD_CHECK_THREADS) check_offsets(
    const I* __restrict__ cu, i64 n, i64 T, int* __restrict__ flag) {
    int bad = n < 1;
#pragma unroll 4
    for (i64 i = threadIdx.x; i < n; i += HC_GUARD_CHECK_THREADS) {
        const i64 v = (i64)cu[i];
        bad |= v < 0 || v > T;
        bad |= i == 0 && v != 0;
        bad |= i + 1 < n ? (i64)cu[i + 1] < v : v != T;
    }
    bad = __syncthreads_or(bad);
    if (threadIdx.x == 0) *flag = bad ? 1 : 0;
}

// 0xFF over bytes [0, nbytes) of p, by thread `tid` of `nthreads` (nthreads >= 16).
__device__ __forceinline__ void fill_ones(unsigned char* p, i64 nbytes, i64 tid, i64 nthreads) {
    if (nbytes <= 0) return;
    const i64 to_boundary = (i64)((16u - (unsigned)(reinterpret_cast<unsigned long long>(p) & 15u)) & 15u);
    const i64 head = to_boundary < nbytes ? to_boundary : nbytes;
    const i64 words = (nbytes - head) >> 4;
    const i64 tail = (nbytes - head) & 15;
    uint4* w = reinterpret_cast<uint4*>(p + head);
    const uint4 ones = make_uint4(~0u, ~0u, ~0u, ~0u);
    for (i64 k = tid; k < words; k += nthreads) w[k] = ones;
    if (tid < head) p[tid] = 0xFF;
    if (tid < tail) p[head + (words << 4) + tid] = 0xFF;
}

__global__ void __launch_bounds__(HC_GUARD_FILL_THREADS) fill_if_flagged(
    const int* __restrict__ flag, unsigned char* p0, i64 n0, unsigned char* p1, i64 n1, unsigned char* p2,
    i64 n2, unsigned char* p3, i64 n3) {
    if (*flag == 0) return;
    const i64 tid = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 nthreads = (i64)gridDim.x * blockDim.x;
    fill_ones(p0, n0, tid, nthreads);
    fill_ones(p1, n1, tid, nthreads);
    fill_ones(p2, n2, tid, nthreads);
    fill_ones(p3, n3, tid, nthreads);
}

}  // namespace hc
