// The block walk fed by tensor-map copies, an experiment (tma_walk.py times it against the library's).
// Compiled after the library's kernels/fused_block_walk.cuh, whose fold_window and block_carry (the warps'
// maps meeting in shared memory) it uses unchanged.
//
// The staged walk (block_pipe.cu, the library's fused_recurrent_staged_fwd) has each lane copy its own
// words with cp.async, 8 or 4 bytes a copy: 16 to 32 copy instructions a lane a window.  Here one thread
// asks the tensor-memory accelerator for a whole window of x and of g (a box of W * S steps x 32 * VEC
// channels of one sequence, described by a tensor map the host builds) into shared memory, and the
// window's arrival is counted on an mbarrier of its stage.  A stage is free again once every warp has read
// its rows of it, which the barrier of block_carry (one a window) marks, so thread 0 issues the copy of
// window i + NSTAGE right after that barrier of window i.  Steps and channels outside the tensor arrive as
// zeros (the copy's out-of-bounds fill): x = 0, g = 0 is the identity map, so the fold needs no bounds;
// only the stores check them.
//
// STORE: 0, each lane stores its words (st.global); 1, each warp writes its rows of o into shared memory
// and one lane asks for one bulk tensor copy of them to global memory (a box of S steps x 32 * VEC
// channels; rows past the sequence are clipped by the copy), two buffers a warp.
//
// BOUND (bounds, wrong results by design): 1, the same copies, waits, barrier a window and stores, with
// o = x + g in place of the fold, the warps' meeting and the scan (what the walk's memory schedule costs
// with no recurrence); 2, the same without any store (reads alone); 3, the stores alone, of zeros (no
// copies, no waits).
//
// grid (ceil(D / (32 * VEC)), N)   block (32, W)   a window: W * S steps; a lane: VEC channels (8 bytes).
// Dense [N, T, D] with 16-byte aligned rows, no states, forward only.
namespace twalk {

using hc::AccT;
using hc::Affine;
using hc::i64;
using hc::Pack;

struct alignas(64) TensorMap {  // CUtensorMap: 128 opaque bytes the host encodes
    unsigned long long v[16];
};

__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void bar_init(unsigned long long* bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)) : "memory");
}

// Thread 0: window `i`'s box of x and of g into stage `dst`, counted on `bar`.
__device__ __forceinline__ void copy_box(const TensorMap* mx, const TensorMap* mg, void* dst, int box_bytes,
                                         unsigned long long* bar, int c0, int t0, int n) {
    const unsigned b = smem_addr(bar), d = smem_addr(dst);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(2 * box_bytes) : "memory");
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];"
        ::"r"(d), "l"(mx), "r"(c0), "r"(t0), "r"(n), "r"(b) : "memory");
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];"
        ::"r"(d + box_bytes), "l"(mg), "r"(c0), "r"(t0), "r"(n), "r"(b) : "memory");
}

__device__ __forceinline__ void bar_wait(unsigned long long* bar, unsigned parity) {
    const unsigned b = smem_addr(bar);
    unsigned done = 0;
    while (!done) {
        asm volatile(
            "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
            : "=r"(done) : "r"(b), "r"(parity) : "memory");
    }
}

// The warp's rows of o, S steps from u0, as one bulk tensor copy from `buf` (lane 0, after every lane's
// writes and their proxy fence).
__device__ __forceinline__ void store_box(const TensorMap* mo, const void* buf, int c0, int u0, int n) {
    asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%1, %2, %3}], [%4];"
                 ::"l"(mo), "r"(c0), "r"(u0), "r"(n), "r"(smem_addr(buf)) : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}
template <int N> __device__ __forceinline__ void stores_read_wait() {
    asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void stores_done() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

template <typename TX, typename TG, int VEC, int W, int S, int NSTAGE, int MINB, int BOUND, int STORE>
__global__ void __launch_bounds__(32 * W, MINB) fwd(const __grid_constant__ TensorMap mx,
                                                    const __grid_constant__ TensorMap mg,
                                                    const __grid_constant__ TensorMap mo, TX* __restrict__ o,
                                                    i64 sob, i64 sot, i64 T, i64 D) {
    typedef AccT<TX, TG> Acc;
    typedef Pack<TX, VEC> PX;
    typedef Pack<TG, VEC> PG;
    static_assert(PX::BYTES == PG::BYTES, "x and g of one itemsize");
    constexpr int WORDS = PX::WORDS, C = 32 * VEC, WIN = W * S, ROW = C * (int)sizeof(TX), BOX = WIN * ROW;
    constexpr bool LOADS = BOUND != 3, STORES = BOUND != 2;
    __shared__ Affine<Acc> part[2][W][C];
    __shared__ unsigned long long bar[NSTAGE];
    // [NSTAGE][x, g][WIN][C] elements, then with STORE [W][2 buffers][S][C] elements of o
    extern __shared__ __align__(128) unsigned char stage[];
    const int lane = threadIdx.x, w = threadIdx.y;
    const bool lead = lane == 0 && w == 0;
    const int c0 = (int)blockIdx.x * C, n = (int)blockIdx.y;
    const i64 d = (i64)c0 + lane * VEC;
    const bool live = d < D;
    TX* op = o + n * sob + d;
    const i64 nwin = (T + WIN - 1) / WIN;
    unsigned char* ostage = stage + NSTAGE * 2 * BOX + w * 2 * S * ROW;
    if (lead) {
#pragma unroll
        for (int s = 0; s < NSTAGE; ++s) bar_init(&bar[s]);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (LOADS && lead) {
        for (int s = 0; s < NSTAGE && s < nwin; ++s)
            copy_box(&mx, &mg, stage + s * 2 * BOX, BOX, &bar[s], c0, s * WIN, n);
    }
    // Past a barrier that follows every warp's reads of stage s, the stage takes window i + NSTAGE.
    auto refill = [&](i64 i, int s) {
        if (LOADS && lead && i + NSTAGE < nwin) {
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            copy_box(&mx, &mg, stage + s * 2 * BOX, BOX, &bar[s], c0, (int)((i + NSTAGE) * WIN), n);
        }
    };

    Acc carry[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) carry[k] = Acc(0);
    for (i64 i = 0; i < nwin; ++i) {
        const int s = (int)(i % NSTAGE);
        PX xr[S];
        PG gr[S];
        if constexpr (LOADS) {
            bar_wait(&bar[s], (unsigned)((i / NSTAGE) & 1));
            const unsigned* xs = (const unsigned*)(stage + s * 2 * BOX + w * S * ROW) + lane * WORDS;
            const unsigned* gs = xs + BOX / 4;
#pragma unroll
            for (int j = 0; j < S; ++j) {
#pragma unroll
                for (int q = 0; q < WORDS; ++q) { xr[j].u[q] = xs[j * ROW / 4 + q]; gr[j].u[q] = gs[j * ROW / 4 + q]; }
            }
        }
        const i64 u0 = i * WIN + (i64)w * S;
        PX out[S];
        if constexpr (BOUND) {
            __syncthreads();  // as block_carry's: every warp has read its rows of stage s
            refill(i, s);
#pragma unroll
            for (int j = 0; j < S; ++j) {
#pragma unroll
                for (int k = 0; k < VEC; ++k)
                    out[j].template set<Acc>(k, LOADS ? xr[j].template get<Acc>(k) + gr[j].template get<Acc>(k) : Acc(0));
            }
        } else {
            Affine<Acc> m[VEC];
            Acc a[S][VEC];
            hc::fold_window(xr, gr, m, a);
            Acc h[VEC];
            hc::block_carry<Acc, W, VEC, false>(part[i & 1], m, carry, h);
            refill(i, s);
            hc::apply_window(a, xr, h, out);
        }
        if constexpr (STORES && STORE == 0) {
#pragma unroll
            for (int j = 0; j < S; ++j)
                if (live && u0 + j < T) out[j].store(op + (u0 + j) * sot);
        } else if constexpr (STORES) {
            unsigned* buf = (unsigned*)(ostage + (int)(i & 1) * S * ROW) + lane * WORDS;
            if (lane == 0) stores_read_wait<1>();  // the copy two windows back has read this buffer
            __syncwarp();
#pragma unroll
            for (int j = 0; j < S; ++j) {
#pragma unroll
                for (int q = 0; q < WORDS; ++q) buf[j * ROW / 4 + q] = out[j].u[q];
            }
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            __syncwarp();
            if (lane == 0) store_box(&mo, ostage + (int)(i & 1) * S * ROW, c0, (int)u0, n);
        }
    }
    if (STORE && STORES && lane == 0) stores_done();
}

}  // namespace twalk
