"""How times are taken: the per-call timer (triton's do_bench with L2 flushed, or CUDA events
around back-to-back batches, or the wall clock on CPU), rotation of input sets so that a call never
finds its inputs in L2, the copy bandwidth that sets the copy floor, device time from CUDA-graph
replay, and host time per step (steps queued back to back, one synchronisation at the end; or one step
at a time, two columns in turn, for their difference)."""
from __future__ import annotations

import gc
import math
import statistics
import time

from .context import log, one_line


def rotating(fns):
    """One callable that runs ``fns`` in turn, one per call: each call meets inputs that the
    previous calls have pushed out of L2."""
    if len(fns) == 1:
        return fns[0]
    state = [0]

    def run():
        i = state[0]
        state[0] = i + 1 if i + 1 < len(fns) else 0
        return fns[i]()
    return run


def rotation_count(set_bytes, rotate_bytes, cap=256):
    """How many input sets make the rotation's working set exceed ``rotate_bytes``."""
    if set_bytes <= 0 or set_bytes >= rotate_bytes:
        return 1
    return max(1, min(cap, math.ceil(rotate_bytes / set_bytes)))


class Timer:
    """Median milliseconds per call of ``fn``.

    do_bench: triton.testing.do_bench (L2 flushed before every call; the host's time to queue a call
      hidden behind the flush while it is shorter than the flush).
    events: CUDA events around batches of calls; a ``torch.cuda._sleep`` queued ahead of each batch
      lets the host queue the whole batch first, so the batch runs back to back (device time, not
      host time); inputs are expected to rotate.
    wall: ``time.perf_counter`` with a synchronisation per call (CPU smoke runs only).
    """
    CYCLES_PER_MS = 2.0e6  # the spin is in clock cycles; a slower clock only lengthens it
    FLUSH_BYTES = 256 << 20  # what do_bench zeroes before every call

    def __init__(self, ctx, kind, warmup_ms, rep_ms):
        self.ctx, self.warmup_ms, self.rep_ms = ctx, warmup_ms, rep_ms
        self.kind = kind
        self._flush = None
        if ctx.device == "cpu":
            self.kind = "wall"
        elif kind in ("auto", "do_bench"):
            try:
                import inspect

                from triton.testing import do_bench
                if "return_mode" not in inspect.signature(do_bench).parameters:
                    raise ImportError("triton.testing.do_bench has no return_mode (triton too old)")
                self._do_bench = do_bench
                self.kind = "do_bench"
            except Exception as e:
                if kind == "do_bench":
                    raise SystemExit(f"--timer do_bench: triton does not import ({one_line(e)})")
                log(f"timer: triton does not import ({one_line(e)}); using CUDA events")
                self.kind = "events"

    def __call__(self, fn):
        if self.kind == "do_bench":
            return float(self._do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        if self.kind == "events":
            return self.events(fn)
        return self._wall(fn)

    def events(self, fn):
        torch = self.ctx.torch
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        for _ in range(3):
            fn()
        end.record()
        host_ms = (time.perf_counter() - t0) * 1e3 / 3
        torch.cuda.synchronize()
        est = max(start.elapsed_time(end) / 3, 1e-4)
        n = max(1, min(100, math.ceil(0.5 / est)))         # calls per timed batch: about 0.5 ms
        reps = max(7, min(2000, int(self.rep_ms / (est * n))))
        for _ in range(max(1, min(2000, int(self.warmup_ms / est)))):
            fn()
        sleep = getattr(torch.cuda, "_sleep", None)
        # The spin covers the batch's queuing whatever est reads: where the host is the slower, est reads it too.
        spin = int(min(host_ms * n * 1.5, 50.0) * self.CYCLES_PER_MS)
        events = []
        for _ in range(reps):
            if sleep is not None and spin:
                sleep(spin)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(n):
                fn()
            e.record()
            events.append((s, e))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) / n for s, e in events)

    def queued(self, fn, calls=20, rounds=3):
        """Milliseconds per call of ``fn`` timed as this timer times it, with the host queued ahead: for
        do_bench, :func:`queued_ms` (its L2 flush, then CUDA events around each call, behind a wait); the
        events timer queues ahead already, and its figure is its own.  What a cell reads above this figure
        is the host's time (``report.host_bound``)."""
        if self.kind != "do_bench":
            return self(fn)
        torch = self.ctx.torch
        if self._flush is None:
            self._flush = torch.empty(self.FLUSH_BYTES, dtype=torch.int8, device="cuda")
        return queued_ms(torch, self._flush, fn, calls, rounds)

    def _wall(self, fn):
        fn()
        times, spent = [], 0.0
        while len(times) < 3 or (spent < self.rep_ms and len(times) < 1000):
            t0 = time.perf_counter()
            fn()
            dt = (time.perf_counter() - t0) * 1e3
            times.append(dt)
            spent += dt
        return statistics.median(times)


def queued_ms(torch, flush, fn, calls=20, rounds=3):
    """Milliseconds per call of ``fn`` with the host queued ahead: ``calls`` calls, each after an L2 flush
    (``flush.zero_()``) and between its own CUDA events, queued on torch's current stream behind a wait
    long enough for the host to queue them all, ``rounds`` times, the median.  The kernels' time as
    do_bench would read it if the host cost nothing.  The loop is the tuner's
    (``hgrn_cupy.measure.behind_wait``), so the two read one condition."""
    from hgrn_cupy.measure import behind_wait

    device, stream = torch.cuda.current_device(), torch.cuda.current_stream().cuda_stream
    seconds = []
    for _ in range(rounds):
        seconds += behind_wait(device, stream, [fn], calls, flush.zero_)
    return statistics.median(seconds) * 1e3


def flush_ms(copy_gbps):
    """Milliseconds do_bench's L2 flush (a write of ``Timer.FLUSH_BYTES``) takes at the copy bandwidth."""
    return Timer.FLUSH_BYTES / (copy_gbps * 1e9) * 1e3


def host_ms(ctx, fn, calls=20):
    """Host milliseconds to queue one call of ``fn``: ``calls`` calls back to back, the clock read before
    the synchronisation at the end (a call that waits for the GPU reads the wait).  Under half a cell's
    time it cannot be what the cell reads (``sections.run_cell``)."""
    ctx.sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    ctx.sync()
    return (t1 - t0) * 1e3 / calls


def measure_copy(ctx):
    """Device-to-device copy bandwidth (read + write bytes per second), the copy floor's yardstick."""
    nbytes = ctx.args.copy_mb << 20
    buffers = [ctx.torch.randn(nbytes // 4, device=ctx.device)]
    buffers.append(ctx.torch.empty_like(buffers[0]))
    ms = ctx.timer(lambda: buffers[1].copy_(buffers[0]))
    buffers.clear()
    ctx.free()
    return dict(bytes=nbytes, ms=ms, gbps=2 * nbytes / (ms * 1e-3) / 1e9)


def graph_ms(torch, fns, rep_ms):
    """Device milliseconds per call from CUDA-graph replay: one graph holds one call per input set (so
    the calls meet inputs that are not in L2, as with the timer's rotation), replayed back to back
    between CUDA events for about ``rep_ms``; no launch or Python cost is in the figure.  The calls are
    warmed up on a side stream first, as torch asks before a capture (autograd keeps per-stream state).
    Raises when a call cannot be captured (one that synchronises, say)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for f in fns:
                f()
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        est = max(start.elapsed_time(end), 1e-3)
        reps = max(5, min(200, int(rep_ms / est)))
        sleep = getattr(torch.cuda, "_sleep", None)
        if sleep is not None:  # the host queues the replays while the device spins: no gaps between them
            sleep(int(min(0.05 * reps, 20.0) * Timer.CYCLES_PER_MS))
        events = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            graph.replay()
            e.record()
            events.append((s, e))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events) / len(fns)
    finally:
        del graph


def device_ms(ctx, fns):
    """(ms per call, how it was timed): CUDA-graph replay where the calls can be captured, else the
    run's timer on the rotated calls (do_bench or events: device time with launch costs), or the wall
    clock on CPU."""
    if ctx.device == "cuda":
        try:
            return graph_ms(ctx.torch, fns, ctx.args.rep_ms), "graph"
        except Exception as e:
            log(f"  (no CUDA graph: {one_line(e)}; timed with {ctx.timer.kind})")
            ctx.after_error()
            if ctx.broken:
                raise
    return ctx.timer(rotating(fns)), ctx.timer.kind


def host_steps_us(ctx, named, steps, target_s=0.25, repeats=3):
    """Host microseconds per step for each ``name -> [callable per input set]``: the wall time of n
    steps queued back to back (input sets in turn) with one synchronisation at the end, divided by n.
    n is ``steps``, fewer where a step is so slow that n of them would take over ``target_s``; the
    repeats take turns across the names (so drift in the host's speed hits every name alike) and the
    median is kept.  Returns {name: (us, n)}."""
    counts, times = {}, {name: [] for name in named}
    for name, fns in named.items():
        for i in range(max(5, len(fns))):  # warm-up, every set once
            fns[i % len(fns)]()
        est = _block_us(ctx, fns, 5)[0] * 1e-6
        counts[name] = max(10, min(steps, int(target_s / max(est, 1e-7))))
    for _ in range(repeats):
        for name, fns in named.items():
            times[name].append(_block_us(ctx, fns, counts[name])[0])
    return {name: (statistics.median(times[name]), counts[name]) for name in named}


def _block_us(ctx, fns, n):
    """Host us per step of n steps queued back to back (input sets in turn), synchronised before and after:
    ``(wall, CPU)``, CPU being the process's CPU time (every thread: torch runs the backward of CUDA
    tensors on a thread of its own), which leaves out the spells the host spent on something else.
    The garbage collector pauses during the block (its youngest generation collected first, which is
    cheap), so that a collection the steps' garbage triggers lands between blocks rather than in whichever
    column's block it happens to fall."""
    ctx.sync()
    gc.collect(0)
    gc.disable()
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            fns[i % len(fns)]()
        ctx.sync()
        return (time.perf_counter() - t0) / n * 1e6, (time.process_time() - c0) / n * 1e6
    finally:
        gc.enable()


def paired_host_diff_us(ctx, a, b, n, pairs=15):
    """(host us per step of a) - (host us per step of b), from ``pairs`` rounds of four blocks in the
    order a b b a: each round's mean difference cancels a host whose speed drifts linearly through the
    round, and the median over rounds drops a round a hiccup hit.  Columns timed seconds apart can differ
    by tens of us from drift alone.  a, b: [callable per input set]; n steps a block.  Returns (median,
    lower quartile, upper quartile, fastest, cpu): the quartiles of the rounds' differences say how far one
    round can be trusted; ``fastest`` is a's fastest block minus b's, which noise that only ever adds
    time (a busy host) does not enter; ``cpu`` is the median over rounds of the same difference in the
    process's CPU time, which time the host gave to other work does not enter either."""
    diffs, cpu_diffs, blocks_a, blocks_b = [], [], [], []
    for _ in range(pairs):
        (a1, ca1), (b1, cb1), (b2, cb2), (a2, ca2) = (_block_us(ctx, fns, n) for fns in (a, b, b, a))
        diffs.append((a1 + a2 - b1 - b2) / 2)
        cpu_diffs.append((ca1 + ca2 - cb1 - cb2) / 2)
        blocks_a += [a1, a2]
        blocks_b += [b1, b2]
    q1, _, q3 = statistics.quantiles(diffs, n=4) if len(diffs) > 1 else diffs * 3
    return statistics.median(diffs), q1, q3, min(blocks_a) - min(blocks_b), statistics.median(cpu_diffs)


def interleaved_steps_us(ctx, named, cycles):
    """{name: host us of each of its steps}: every step timed on its own, the columns of ``named``
    ({name: [callable per input set]}) taken in turn for ``cycles`` cycles (a b c, then c b a, ...), input
    sets in turn.  Drift slower than a cycle cancels in each cycle's differences, and the reversed order
    every other cycle cancels what a step leaves to the next; a step that waits for the GPU (a full queue)
    reads the wait.  The garbage collector runs between cycles (its youngest generation, every 50)."""
    names = list(named)
    per = {name: [] for name in names}
    clock = time.perf_counter
    ctx.sync()
    gc.collect(0)
    gc.disable()
    try:
        for i in range(cycles):
            for name in (names if i % 2 == 0 else names[::-1]):
                fns = named[name]
                f = fns[i % len(fns)]
                t0 = clock()
                f()
                per[name].append((clock() - t0) * 1e6)
            if i % 50 == 49:
                gc.collect(0)
    finally:
        gc.enable()
    ctx.sync()
    return per


def interleaved_host_diff_us(ctx, a, b, cycles):
    """(host us of a step of a) - (of a step of b), the two timed step by step in turn
    (``interleaved_steps_us``): the median over cycles of the two steps' difference, and its quartiles.
    a, b: [callable per input set]."""
    per = interleaved_steps_us(ctx, {"a": a, "b": b}, cycles)
    diffs = [x - y for x, y in zip(per["a"], per["b"])]
    q1, median, q3 = statistics.quantiles(diffs, n=4) if len(diffs) > 1 else diffs * 3
    return median, q1, q3
