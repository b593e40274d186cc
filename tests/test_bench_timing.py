"""The benchmark's host-time measurements without a GPU (``benchmarks/timing.py``): a fake clock stands in
for the host, so what each measurement cancels (drift, busy spells) and what it reads is checked exactly."""
import sys
import types

import numpy as np
import pytest


def _paired_on_fake_host(monkeypatch, extra_us):
    """paired_host_diff_us of a step of 10 us against one of 3 us on a fake clock whose host adds
    ``extra_us()`` us to every step of a block (drawn at each synchronisation), time it spends on other
    work: the wall clock counts it, the process's CPU time does not."""
    from benchmarks import timing

    clock = {"t": 0.0, "cpu": 0.0, "extra": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["t"])
    monkeypatch.setattr(timing.time, "process_time", lambda: clock["cpu"])

    def step(cost_us):
        def run():
            clock["t"] += (cost_us + clock["extra"]) * 1e-6
            clock["cpu"] += cost_us * 1e-6
        return run

    def sync():
        clock["extra"] = extra_us()

    return timing.paired_host_diff_us(types.SimpleNamespace(sync=sync), [step(10.0)], [step(3.0)], n=20, pairs=15)


def test_paired_host_diff_cancels_drift_between_rounds(monkeypatch):
    """The host slows by 1.5 us a step at every synchronisation (hundreds of us over the run): the
    paired difference is still 7 us, in every round."""
    drift = iter(np.arange(1, 1000) * 1.5)
    diff, q1, q3, _, _ = _paired_on_fake_host(monkeypatch, lambda: float(next(drift)))
    assert abs(diff - 7.0) < 1e-6 and abs(q1 - 7.0) < 1e-6 and abs(q3 - 7.0) < 1e-6, (diff, q1, q3)


def test_paired_host_diff_fastest_blocks_and_cpu_time_drop_a_busy_host(monkeypatch):
    """A busy host adds 0, 10 or 40 us a step to whole blocks at random: the fastest blocks' difference
    and the CPU-time difference are the true 7 us, and the quartiles widen around the median."""
    rng = np.random.default_rng(5)
    diff, q1, q3, fastest, cpu = _paired_on_fake_host(
        monkeypatch, lambda: float(rng.choice([0.0, 0.0, 10.0, 40.0])))
    assert abs(fastest - 7.0) < 1e-6 and abs(cpu - 7.0) < 1e-6, (fastest, cpu)
    assert q1 <= diff <= q3 and q3 - q1 > 1.0, (q1, diff, q3)


def _interleaved_on_fake_host(monkeypatch, extra_us, cycles=400):
    """interleaved_host_diff_us of a step of 10 us against one of 3 us on a fake clock whose host adds
    ``extra_us()`` us to each step (drawn per step)."""
    from benchmarks import timing

    clock = {"t": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["t"])

    def step(cost_us):
        def run():
            clock["t"] += (cost_us + extra_us()) * 1e-6
        return run

    ctx = types.SimpleNamespace(sync=lambda: None)
    return timing.interleaved_host_diff_us(ctx, [step(10.0), step(10.0)], [step(3.0)], cycles)


def test_interleaved_host_diff_cancels_drift(monkeypatch):
    """The host slows by 0.5 us at every step (200 us a step by the end): each cycle's difference is off by
    the drift of one step, one way in a b cycles and the other in b a cycles, so the median is the true
    7 us and the quartiles 6.5 and 7.5."""
    drift = iter(np.arange(1, 10000) * 0.5)
    diff, q1, q3 = _interleaved_on_fake_host(monkeypatch, lambda: float(next(drift)))
    assert abs(diff - 7.0) < 1e-6 and abs(q1 - 6.5) < 1e-6 and abs(q3 - 7.5) < 1e-6, (diff, q1, q3)


def test_interleaved_host_diff_drops_busy_steps(monkeypatch):
    """A busy host adds 30 us to one step in ten at random: the median is still the true 7 us."""
    rng = np.random.default_rng(9)
    diff, q1, q3 = _interleaved_on_fake_host(monkeypatch, lambda: 30.0 if rng.random() < 0.1 else 0.0)
    assert abs(diff - 7.0) < 1e-6 and q1 <= diff <= q3, (diff, q1, q3)


def test_host_ms_is_the_queueing_time_of_one_call(monkeypatch):
    """Calls of 2 ms each on a fake clock read 2 ms, with a synchronisation before and after them."""
    from benchmarks import timing

    clock, syncs = {"t": 0.0}, []
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["t"])

    def call():
        clock["t"] += 2e-3
    ctx = types.SimpleNamespace(sync=lambda: syncs.append(clock["t"]))
    assert timing.host_ms(ctx, call, calls=7) == pytest.approx(2.0)
    assert syncs == [0.0, pytest.approx(14e-3)]


class _FakeGpu:
    """One stream on a fake clock: the host pays each call's host cost as it queues it; the device runs
    what is queued in order, each op from when it is queued or the device is free, whichever is later.
    Events (CuPy's runtime, ``_FakeRuntime``) read the device's clock when it reaches them; the tuner's wait
    kernel (``hgrn_cupy.measure._wait``) spins the device.  Both act on the same stream."""

    def __init__(self, monkeypatch, timing):
        self.host = self.free = 0.0  # seconds
        monkeypatch.setattr(timing.time, "perf_counter", lambda: self.host)
        gpu = self

        class Buffer:
            def zero_(self):  # do_bench's L2 flush: 80 us on the device, 5 us to queue
                gpu.op(5e-6, 80e-6)

        self.torch = types.SimpleNamespace(
            int8="int8", empty=lambda *a, **k: Buffer(),
            cuda=types.SimpleNamespace(synchronize=lambda: gpu.sync(), current_device=lambda: 0,
                                       current_stream=lambda: types.SimpleNamespace(cuda_stream=0)))
        self.ctx = types.SimpleNamespace(torch=self.torch, device="cuda", sync=self.sync)
        from hgrn_cupy import measure

        monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(
            cuda=types.SimpleNamespace(runtime=_FakeRuntime(self))))
        monkeypatch.setattr(measure, "_wait", lambda device: lambda stream, ns: gpu.op(0.0, ns * 1e-9))

    def op(self, host_s, device_s):
        """Queue one op; the device time at which it starts."""
        self.host += host_s
        start = max(self.host, self.free)
        self.free = start + device_s
        return start

    def sync(self):
        self.host = max(self.host, self.free)

    def call(self, host_us, device_us):
        return lambda: self.op(host_us * 1e-6, device_us * 1e-6)


class _FakeRuntime:
    """The CUDA runtime calls ``hgrn_cupy.measure.behind_wait`` makes, on the fake GPU's one stream."""

    def __init__(self, gpu):
        self.gpu = gpu

    def eventCreate(self):
        return {}

    def eventRecord(self, event, stream):
        event["at"] = self.gpu.op(0.0, 0.0)

    def eventElapsedTime(self, start, end):
        return (end["at"] - start["at"]) * 1e3

    def eventSynchronize(self, event):
        self.gpu.sync()

    def streamSynchronize(self, stream):
        self.gpu.sync()

    def eventDestroy(self, event):
        pass


@pytest.mark.parametrize("host_us", [30.0, 150.0, 900.0, 10000.0, 40000.0])
def test_queued_reads_the_device_whatever_the_host(monkeypatch, host_us):
    """A 5 us kernel whose call takes the host 30 us (hidden by the flush) up to 40 ms: timed with the host
    queued ahead (``hgrn_cupy.measure.behind_wait``: the wait doubles up to 64 ms, then the batch halves)
    it reads 5 us each time, the flush's 80 us left out."""
    from benchmarks import timing

    gpu = _FakeGpu(monkeypatch, timing)
    timer = timing.Timer(gpu.ctx, "events", 1.0, 1.0)
    timer.kind = "do_bench"
    assert timer.queued(gpu.call(host_us, 5.0)) == pytest.approx(5e-3)


def test_queued_keeps_a_call_that_outlasts_the_longest_wait(monkeypatch):
    """A call that takes the host 100 ms, longer than the longest wait: one call a batch, and the interval
    holds what the host made the device wait (a host that slow is what the call gets)."""
    from benchmarks import timing
    from hgrn_cupy import measure

    gpu = _FakeGpu(monkeypatch, timing)
    # the 64 ms wait and the 80 us flush end 64.08 ms into a batch; the call reaches the GPU at 100.005 ms
    assert measure.behind_wait(0, 0, [gpu.call(1e5, 5.0)], 3, lambda: gpu.op(5e-6, 80e-6)) == [
        pytest.approx(36.0e-3 - 80e-6 + 10e-6)] * 3


@pytest.mark.parametrize("host, queued", [(0.01, False), (0.05, True), (0.3, True)])
def test_a_cell_is_timed_again_where_its_host_outlasts_half_the_flush(monkeypatch, host, queued):
    """``sections.run_cell`` times a cell again with the host queued ahead where queuing one call takes the
    host half the L2 flush's time or more (256 MiB at 3200 GB/s: 0.084 ms): a host of 0.05 ms against a
    cell of 0.2 ms too, which the flush does not hide, not one of 0.01 ms."""
    from benchmarks import sections

    asked = []

    class Timer:
        def __call__(self, fn):
            return 0.2

        def queued(self, fn):
            asked.append(fn)
            return 0.15

    monkeypatch.setattr(sections, "skip_reason", lambda *a: None)
    monkeypatch.setattr(sections, "host_ms", lambda ctx, fn: host)
    ctx = types.SimpleNamespace(device="cuda", timer=Timer(), results={"copy": {"gbps": 3200.0}},
                                account=lambda *a, **k: None)
    impl = types.SimpleNamespace(name="ours-auto", make=lambda pazz, s: lambda: None)
    checker = types.SimpleNamespace(cell=lambda impl, kinds: None, errs={}, first=1.0)
    cell = sections.run_cell(ctx, impl, "bwd", "tsweep", dict(B=1, T=2, D=3, dtype="bfloat16"), [{}], checker)
    assert cell["ms"] == 0.2 and cell["host_ms"] == host
    assert (len(asked), cell["device_ms"]) == ((1, 0.15) if queued else (0, None))
