// The tuner's wait (hgrn_cupy/measure.py): one thread holds its stream for a span of the GPU's global
// timer, so that the launches the host queues behind it meanwhile run back to back, as in a busy stream,
// and the events around them time the kernels alone, not the host's time to issue them.
//
// wait_ns   grid (1), block (1); ns: nanoseconds of %globaltimer (wall time, whatever the SM clock).

namespace hc {

__global__ void wait_ns(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < ns);
}

}  // namespace hc
