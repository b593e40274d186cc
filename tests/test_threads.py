"""Host threads (GPU): eight threads, each on its own stream (``torch.cuda.Stream`` or
``cupy.cuda.Stream``), call forward and backward many times with their own shapes and dtypes, while
another thread keeps calling ``hgrn_cupy.release_workspaces()``; every result must equal, bit for bit,
what the same call gives single-threaded.  And a first-call race: shapes no call has used before, all
threads released at once by a barrier, so that the compile and plan caches are filled under contention.

Inputs come from fixed seeds (the thread's index, in the messages).
"""
import threading
import time

import numpy as np
import pytest
from conftest import TOL, rel_err

cupy = pytest.importorskip("cupy")
import hgrn_cupy as hc  # noqa: E402

ml_dtypes = pytest.importorskip("ml_dtypes")

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison")]

ITERATIONS = 25
SEED = 7000

# (framework, engine, B, T, D, x dtype, g dtype, cu_seqlens or None, reverse), one per thread
WORKERS = [
    ("torch", "chunk", 2, 3000, 96, "float32", "float32", None, False),
    ("torch", "fused_recurrent", 1, 2500, 130, "bfloat16", "float32", (0, 700, 700, 2500), True),
    ("torch", "auto", 3, 1500, 64, "float16", "float16", None, True),
    ("torch", "chunk", 1, 4000, 33, "float64", "float32", (0, 1, 2000, 4000), False),
    ("cupy", "chunk", 1, 3500, 128, "bfloat16", "bfloat16", (0, 0, 1000, 3500), False),
    ("cupy", "fused_recurrent", 4, 1000, 257, "float32", "float16", None, False),
    ("cupy", "auto", 2, 2048, 40, "float32", "float32", None, True),
    ("cupy", "chunk", 2, 1800, 72, "float64", "float64", None, True),
]

# Shapes no other test uses (odd T and D), for the first-call race.
FRESH = [
    ("torch", "chunk", 1, 2999, 91, "float32", "bfloat16", None, False),
    ("torch", "fused_recurrent", 2, 1337, 53, "float16", "float64", None, True),
    ("torch", "chunk", 1, 3331, 77, "bfloat16", "float16", (0, 1000, 1000, 3331), True),
    ("torch", "auto", 3, 777, 109, "float64", "bfloat16", None, False),
    ("cupy", "chunk", 2, 2221, 45, "float16", "float32", None, True),
    ("cupy", "fused_recurrent", 1, 1999, 83, "bfloat16", "float64", (0, 5, 1999), False),
    ("cupy", "chunk", 1, 4111, 19, "float32", "float16", None, False),
    ("cupy", "auto", 2, 913, 151, "float64", "float32", None, True),
]

NP_DTYPE = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "bfloat16": ml_dtypes.bfloat16}
FORWARD = {"auto": hc.hgrn, "chunk": hc.chunk_hgrn, "fused_recurrent": hc.fused_recurrent_hgrn}


def log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


class Worker:
    """One thread's problem: device inputs made up front, and its call."""

    def __init__(self, index, spec):
        self.index, self.spec = index, spec
        fw, engine, B, T, D, xd, gd, cu, reverse = spec
        self.framework, self.engine, self.reverse = fw, engine, reverse
        rng = np.random.default_rng(SEED + index)
        N = B if cu is None else len(cu) - 1
        host = dict(x=rng.standard_normal((B, T, D)).astype(NP_DTYPE[xd]),
                    g=log_sigmoid(rng.standard_normal((B, T, D))).astype(NP_DTYPE[gd]),
                    h0=rng.standard_normal((N, D)).astype(np.float32),
                    do=rng.standard_normal((B, T, D)).astype(NP_DTYPE[xd]),
                    dht=rng.standard_normal((N, D)).astype(np.float32))
        self.host = host
        self.cu_host = None if cu is None else np.asarray(cu, np.int64)
        self.dev = {k: self._to_dev(v) for k, v in host.items()}
        self.cu = None if cu is None else self._to_dev(np.asarray(cu, np.int32))

    def _to_dev(self, a):
        if self.framework == "cupy":
            if a.dtype == np.dtype(ml_dtypes.bfloat16):
                return cupy.asarray(a.view(np.uint16)).view(ml_dtypes.bfloat16)
            return cupy.asarray(a)
        import torch

        if a.dtype == np.dtype(ml_dtypes.bfloat16):
            return torch.from_numpy(a.view(np.int16)).cuda().view(torch.bfloat16)
        return torch.from_numpy(a).cuda()

    def stream(self):
        if self.framework == "cupy":
            return cupy.cuda.Stream(non_blocking=True)
        import torch

        return torch.cuda.Stream()

    def use(self, stream):
        if self.framework == "cupy":
            return stream
        import torch

        return torch.cuda.stream(stream)

    def call(self):
        d = self.dev
        o, ht = FORWARD[self.engine](d["x"], d["g"], d["h0"], True, self.cu, self.reverse)
        dx, dg, dh0 = hc.hgrn_backward(d["g"], o, d["do"], d["dht"], d["h0"], self.cu, self.reverse,
                                       engine=self.engine)
        return o, ht, dx, dg, dh0

    def equal(self, a, b):
        if self.framework == "cupy":
            return bool(cupy.array_equal(a, b))
        import torch

        return torch.equal(a, b)

    def describe(self):
        return f"thread {self.index} (seed {SEED + self.index}): {self.spec}"


def host64(a):
    """A float64 NumPy copy of a CuPy or torch array (bfloat16 included)."""
    if isinstance(a, cupy.ndarray):
        if a.dtype == np.dtype(ml_dtypes.bfloat16):
            a = cupy.ascontiguousarray(a.view(cupy.uint16)).get().view(ml_dtypes.bfloat16)
        else:
            a = a.get()
        return a.astype(np.float64)
    import torch

    return a.detach().to("cpu", torch.float64).numpy()


def sync_all():
    cupy.cuda.runtime.deviceSynchronize()


def run_threads(workers, iterations, release, barrier=True):
    """Run every worker in its own thread on its own stream; returns {index: [results of each call]}
    (device arrays, compared after the threads are done) and the errors raised in the threads."""
    results = {w.index: [] for w in workers}
    errors = []
    start = threading.Barrier(len(workers) + (1 if release else 0)) if barrier else None
    done = threading.Event()

    def work(w):
        try:
            s = w.stream()
            if start is not None:
                start.wait()
            with w.use(s):
                for _ in range(iterations):
                    results[w.index].append(w.call())
            s.synchronize()
        except Exception as e:  # reported by the main thread
            errors.append((w.describe(), repr(e)))

    def releaser():
        try:
            if start is not None:
                start.wait()
            while not done.is_set():
                release()
                time.sleep(0.0005)
        except Exception as e:
            errors.append(("release_workspaces thread", repr(e)))

    threads = [threading.Thread(target=work, args=(w,)) for w in workers]
    rel = threading.Thread(target=releaser) if release else None
    if rel is not None:
        rel.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    done.set()
    if rel is not None:
        rel.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a worker thread did not finish"
    sync_all()
    return results, errors


def check_against(workers, results, expected):
    names = ("o", "ht", "dx", "dg", "dh0")
    bad = []
    for w in workers:
        for i, res in enumerate(results[w.index]):
            for name, got, want in zip(names, res, expected[w.index]):
                if not w.equal(got, want):
                    bad.append(f"{w.describe()}: call {i}: {name} differs from the single-threaded result")
    assert not bad, "\n".join(bad[:20]) + (f"\n... {len(bad)} in all" if len(bad) > 20 else "")


def check_reference(w, res):
    """The single-threaded result against the float64 reference (so that 'equal' means 'right')."""
    h = w.host
    f = {k: v.astype(np.float64) for k, v in h.items()}
    o_ref, ht_ref = hc.naive_recurrent_hgrn(f["x"], f["g"], f["h0"], True, w.cu_host, w.reverse)
    o, ht, dx, dg, dh0 = res
    grads = hc.naive_recurrent_hgrn_bwd(f["g"], host64(o), f["do"], f["dht"], f["h0"], w.cu_host, w.reverse)
    xd, gd = w.spec[5], w.spec[6]
    acc = "float64" if "float64" in (xd, gd) else "float32"
    for name, got, want, dt in (("o", o, o_ref, xd), ("ht", ht, ht_ref, acc), ("dx", dx, grads[0], xd),
                                ("dg", dg, grads[1], gd), ("dh0", dh0, grads[2], "float32")):
        tol = max(TOL[dt], TOL[acc])
        assert rel_err(host64(got), want) <= tol, f"{w.describe()}: {name} against the reference"


def single_threaded(workers):
    expected = {}
    for w in workers:
        expected[w.index] = w.call()
    sync_all()
    return expected


@pytest.fixture(scope="module")
def _frameworks():
    pytest.importorskip("torch")


@pytest.mark.parametrize("with_release", [False, True], ids=["no_release", "release_workspaces"])
def test_threads_match_single_threaded(_frameworks, with_release):
    workers = [Worker(i, spec) for i, spec in enumerate(WORKERS)]
    sync_all()
    expected = single_threaded(workers)
    for w in workers:
        check_reference(w, expected[w.index])
    results, errors = run_threads(workers, ITERATIONS, hc.release_workspaces if with_release else None)
    assert not errors, errors
    check_against(workers, results, expected)


def test_first_call_race(_frameworks):
    """Fresh shapes (and dtype pairs) in every thread at once: nothing cached yet for any of them."""
    workers = [Worker(100 + i, spec) for i, spec in enumerate(FRESH)]
    sync_all()
    results, errors = run_threads(workers, 3, hc.release_workspaces)
    assert not errors, errors
    expected = single_threaded(workers)
    for w in workers:
        check_reference(w, expected[w.index])
    check_against(workers, results, expected)
