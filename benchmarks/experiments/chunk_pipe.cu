// The pipelined chunk forward, an experiment (chunk_pipe.py times it against the chunk engine).  Compiled
// after the library's kernels/chunk.cu (the block shapes' macros set as the engine sets them), whose
// ChunkBlock (look-back, workspace protocol) and fwd_fold / fwd_scan it uses unchanged.
//
// The chunk engine's blocks each load one chunk into registers, then fold, look back, scan and store: on a
// multiprocessor of two blocks, memory idles while both are past their loads.  Here a grid of as many
// blocks as the GPU holds at once keeps working: each block takes chunks one after another, and the loads
// of its next NSTAGE chunks are in flight (cp.async into shared memory, each thread its own words, so no
// barrier guards them) while it folds, looks back, scans and stores the current one.
//
// Tickets: block b's first chunk is ticket b (blocks start in index order, as the engine's 16-bit kernels
// rely on), the rest come from an atomic counter in the workspace header (word `pad`), taken NSTAGE + 1
// chunks ahead by thread 0 and handed to the block through a ring in shared memory.  A block processes its
// tickets in increasing order and waits only on smaller ones, so the smallest unfinished ticket always
// progresses.  The block that finishes last (a second counter, just past the header) puts both counters
// back to all ones, so the workspace stays ready for the next launch as the engine's protocol leaves it.
//
// grid (blocks at once,)   block (32, WARPS)   dense [B, T, D], D a multiple of VEC, 16-byte aligned rows.
namespace cpipe {

using hc::AccT;
using hc::Affine;
using hc::Header;
using hc::i64;
using hc::Pack;
using hc::Slot;

template <typename TX, typename TG, int VEC, int WARPS, int ROWS, int STEPS, int NSTAGE, int BLOCKS>
__global__ void __launch_bounds__(32 * WARPS, BLOCKS) fwd(
    const TX* __restrict__ x, const TG* __restrict__ g, TX* __restrict__ o,
    i64 sxb, i64 sxt, i64 sgb, i64 sgt, i64 sob, i64 sot,
    const AccT<TX, TG>* __restrict__ h0, AccT<TX, TG>* __restrict__ ht, i64 T, i64 D, int reverse,
    Header* hdr, char* slots, i64 capacity, i64 ntiles, i64 nchunks) {
    typedef AccT<TX, TG> Acc;
    typedef hc::ChunkBlock<Acc, WARPS, ROWS, VEC> Block;
    static_assert(Pack<TX, VEC>::BYTES == 16 && Pack<TG, VEC>::BYTES == 16, "16-byte words");
    constexpr int NT = 32 * WARPS, M = NSTAGE + 2, G = Block::G, C = Block::C, LC = Block::LC;
    __shared__ Block sm;
    __shared__ unsigned ring[M];
    extern __shared__ uint4 stage[];  // [NSTAGE][2 tensors][STEPS][NT]
    const int tid = threadIdx.y * 32 + threadIdx.x;
    const unsigned total = (unsigned)(ntiles * nchunks);
    const unsigned long long slot_bytes = (unsigned long long)total * C * Slot<Acc>::BYTES;
    unsigned long long* counter = &hdr->pad;
    unsigned long long* done = reinterpret_cast<unsigned long long*>(hdr + 1);
    const int cl = threadIdx.x % LC, q = threadIdx.y * (32 / LC) + threadIdx.x / LC;
    const unsigned ntd = (unsigned)((D + C - 1) / C);
    const i64 tdir = reverse ? -1 : 1;

    // Thread 0 keeps one atomic in flight: the ticket it takes in iteration k enters the ring in iteration
    // k + 1 (as entry k + NSTAGE + 2), so no iteration waits for the counter's round trip.
    unsigned long long pending = 0;  // thread 0: the counter's answer for the next ring entry
    unsigned last = 0;               // thread 0: the last ticket that entered the ring
    if (tid == 0) {
        const typename Block::Counted got = Block::count_in(hdr);
        ring[0] = last = blockIdx.x;
#pragma unroll
        for (int i = 0; i < NSTAGE; ++i) ring[1 + i] = last = gridDim.x + (unsigned)(atomicAdd(counter, 1ull) + 1ull);
        if (last < total) pending = atomicAdd(counter, 1ull) + 1ull;  // from all ones
        sm.park(got);
        sm.settle(hdr, gridDim.x, slot_bytes);
    }
    __syncthreads();

    // Where ticket t's chunk is for this thread: its batch row, first channel, first logical step.
    auto place = [&](unsigned t, i64& batch, i64& d, i64& u0) {
        const unsigned chunk = t / (unsigned)ntiles, tile = t % (unsigned)ntiles;
        batch = tile / ntd;
        d = (i64)(tile % ntd) * C + cl * VEC;
        u0 = (i64)chunk * (G * STEPS) + (i64)q * STEPS;
    };
    auto issue = [&](unsigned t, int s) {
        if (t < total) {
            i64 batch, d, u0;
            place(t, batch, d, u0);
            const i64 t0 = reverse ? T - 1 - u0 : u0;
            const TX* xq = x + batch * sxb + t0 * sxt + d;
            const TG* gq = g + batch * sgb + t0 * sgt + d;
            const bool live = d < D;
#pragma unroll
            for (int j = 0; j < STEPS; ++j) {
                const bool on = live && u0 + j < T;
                hc::async_copy<16>(&stage[((s * 2 + 0) * STEPS + j) * NT + tid], on ? (const void*)xq : (const void*)x, on);
                hc::async_copy<16>(&stage[((s * 2 + 1) * STEPS + j) * NT + tid], on ? (const void*)gq : (const void*)g, on);
                xq += sxt * tdir; gq += sgt * tdir;
            }
        }
        hc::async_commit();
    };
#pragma unroll
    for (int s = 0; s < NSTAGE; ++s) issue(ring[s], s);
    // The slots of the predecessor of the chunk of ticket t, as they stand now: asked for a whole iteration
    // before the look-back reads them.
    Slot<Acc> pre[Block::PER];
    auto peek = [&](unsigned t) {
        if (t < total) Block::peek(slots, (i64)(t % (unsigned)ntiles) * nchunks, t / (unsigned)ntiles, true, pre);
    };
    peek(ring[0]);

    for (int k = 0;; ++k) {
        const unsigned cur = ring[k % M];
        if (cur >= total) break;  // block-uniform: read from shared memory after a barrier
        const int s = k % NSTAGE;
        hc::async_wait<NSTAGE - 1>();
        Pack<TX, VEC> xr[STEPS];
        Pack<TG, VEC> gr[STEPS];
#pragma unroll
        for (int j = 0; j < STEPS; ++j) {
            const uint4 a = stage[((s * 2 + 0) * STEPS + j) * NT + tid], b = stage[((s * 2 + 1) * STEPS + j) * NT + tid];
            xr[j].u[0] = a.x; xr[j].u[1] = a.y; xr[j].u[2] = a.z; xr[j].u[3] = a.w;
            gr[j].u[0] = b.x; gr[j].u[1] = b.y; gr[j].u[2] = b.z; gr[j].u[3] = b.w;
        }
        issue(ring[(k + NSTAGE) % M], s);  // this thread's words of the stage are in registers now

        i64 batch, d, u0;
        place(cur, batch, d, u0);
        const unsigned chunk = cur / (unsigned)ntiles;
        const i64 slot0 = (i64)(cur % (unsigned)ntiles) * nchunks;
        const bool live = d < D;
        const bool interior = u0 > 0 && u0 + STEPS < T;
        hc::SegmentCursor<false> seg(nullptr, 0, 0, T, reverse);
        Affine<Acc> mine[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) { mine[j].a = Acc(1); mine[j].b = Acc(0); }
        if (interior) hc::fwd_fold<false>(u0, T, D, d, batch, live, seg, xr, gr, h0, mine);
        else hc::fwd_fold<true>(u0, T, D, d, batch, live, seg, xr, gr, h0, mine);
        if (tid == 0) {  // the ticket after the ring's last, and the next one asked for
            last = last < total ? gridDim.x + (unsigned)pending : total;
            ring[(k + NSTAGE + 1) % M] = last;
            if (last < total) pending = atomicAdd(counter, 1ull) + 1ull;
        }
        sm.carry_in(slots, slot0, chunk, q, cl, mine, pre);  // its barriers also publish the ring's entry
        Acc h[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) h[j] = mine[j].a;
        const i64 t0 = reverse ? T - 1 - u0 : u0;
        TX* oq = o + batch * sob + t0 * sot + d;
        if (interior) hc::fwd_scan<false>(u0, T, D, d, batch, live, seg, xr, gr, h0, ht, oq, sot * tdir, h);
        else hc::fwd_scan<true>(u0, T, D, d, batch, live, seg, xr, gr, h0, ht, oq, sot * tdir, h);
        peek(ring[(k + 1) % M]);
    }
    hc::async_wait<0>();
    sm.finish(slots, blockIdx.x, gridDim.x, slot_bytes, (unsigned long long)capacity);
    if (tid == 0) {
        __threadfence();
        if (atomicAdd(done, 1ull) + 1ull == (unsigned long long)gridDim.x - 1ull) {  // from all ones
            atomicExch(counter, ~0ull);
            atomicExch(done, ~0ull);
        }
    }
}

}  // namespace cpipe
