"""hgrn_cupy.tuning without a GPU: a scripted timer stands in for CUDA events and a fixed string for
the device key, so every rule of the decision cache (who wins, what is kept, what reaches the file,
what survives a broken file or folder, concurrent writers) is checked on the CPU."""
import json
import multiprocessing
import os
import sys
import types
import warnings

import pytest

from hgrn_cupy import tuning

DEV = "Fake GPU|sm_90|driver 13000|runtime 13000|hgrn_cupy test"
KEY = tuning.shape_class(0, ("bfloat16", "bfloat16"), 4, 2048, 512, False)
ENGINES = ("chunk", "fused_recurrent")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache folder and in-memory state; yields the cache file's path."""
    monkeypatch.setenv("HGRN_CUPY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("HGRN_CUPY_TUNING", raising=False)
    monkeypatch.setattr(tuning.settings, "on_disk", True)
    tuning.forget()
    yield tmp_path / "cache" / "tuning.json"
    tuning.forget()


class Scripted:
    """``run`` and ``measure`` for choose(): run(name) notes the engine launched, measure(fn) calls fn
    and answers the scripted seconds of the engine it launched."""

    def __init__(self, times):
        self.times = dict(times)
        self.launched = []

    def run(self, name):
        self.launched.append(name)

    def measure(self, fn):
        before = len(self.launched)
        fn()
        assert len(self.launched) == before + 1, "measure's callable must launch exactly once"
        return self.times[self.launched[-1]]


def choose(timer, key=KEY, device=DEV, candidates=ENGINES, default="chunk", allow_timing=True):
    return tuning.choose(device, key, candidates, timer.run, default, allow_timing, measure=timer.measure)


def read(path):
    return json.loads(path.read_text())


@pytest.mark.parametrize("times, want", [({"chunk": 2e-6, "fused_recurrent": 1e-6}, "fused_recurrent"),
                                         ({"chunk": 1e-6, "fused_recurrent": 2e-6}, "chunk")])
def test_choice_follows_the_timer(cache, times, want):
    timer = Scripted(times)
    assert choose(timer) == want
    assert sorted(timer.launched) == sorted(ENGINES)  # each candidate timed once


@pytest.mark.parametrize("candidates", [ENGINES, ENGINES[::-1]])
def test_ties_go_to_the_first_candidate(cache, candidates):
    timer = Scripted({"chunk": 3e-6, "fused_recurrent": 3e-6})
    assert choose(timer, candidates=candidates) == candidates[0]


def test_a_stored_decision_is_returned_without_timing(cache):
    assert choose(Scripted({"chunk": 1.0, "fused_recurrent": 2.0})) == "chunk"
    timer = Scripted({"chunk": 2.0, "fused_recurrent": 1.0})  # would now pick the other
    for _ in range(3):
        assert choose(timer) == "chunk"
        assert choose(timer, allow_timing=False, default="fused_recurrent") == "chunk"
    assert timer.launched == []


def test_without_timing_the_default_is_returned_and_not_stored(cache):
    timer = Scripted({"chunk": 2.0, "fused_recurrent": 1.0})
    assert choose(timer, allow_timing=False, default="chunk") == "chunk"
    assert timer.launched == [] and not cache.exists()
    assert choose(timer) == "fused_recurrent"  # measured now: the default was not kept
    assert len(timer.launched) == 2


def test_a_stored_engine_outside_the_candidates_is_measured_again(cache):
    assert choose(Scripted({"chunk": 1.0, "fused_recurrent": 2.0})) == "chunk"
    timer = Scripted({"fused_recurrent": 1.0, "other": 2.0})
    assert choose(timer, candidates=("other", "fused_recurrent")) == "fused_recurrent"
    assert len(timer.launched) == 2


def test_the_file_is_written_and_read_back_by_a_fresh_state(cache):
    key2 = tuning.shape_class(1, ("float32", "float32"), 1, 32768, 1024, True)
    assert choose(Scripted({"chunk": 2.0, "fused_recurrent": 1.0})) == "fused_recurrent"
    assert choose(Scripted({"chunk": 1.0, "fused_recurrent": 2.0}), key=key2) == "chunk"
    data = read(cache)
    assert data == {"version": 1, "devices": {DEV: {repr(KEY): "fused_recurrent", repr(key2): "chunk"}}}
    assert sorted(os.listdir(cache.parent)) == ["tuning.json", "tuning.json.lock"]  # no temporary left

    tuning.forget()
    timer = Scripted({"chunk": 1.0, "fused_recurrent": 2.0})
    assert choose(timer) == "fused_recurrent"
    assert choose(timer, key=key2, allow_timing=False, default="fused_recurrent") == "chunk"
    assert timer.launched == []


@pytest.mark.parametrize("content", [
    b"\x00\xff\xfe garbage \x80",
    b'{"version": 1, "devices": {"x": ',  # cut short
    b"[1, 2, 3]",
    b'"devices"',
    b'{"version": 1, "devices": []}',
    b'{"version": 1, "devices": {"' + DEV.encode() + b'": ["chunk"]}}',
    b'{"version": 1, "devices": {"' + DEV.encode() + b'": {"k": 3}}}',
    b'{"version": "1", "devices": {}}',
    b'{"version": 2, "devices": {}}',
    b'{"devices": {}}',
])
def test_a_corrupt_file_warns_once_and_is_replaced(cache, content):
    cache.parent.mkdir()
    cache.write_bytes(content)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        timer = Scripted({"chunk": 2.0, "fused_recurrent": 1.0})
        assert choose(timer, allow_timing=False, default="chunk") == "chunk"
        assert choose(timer) == "fused_recurrent"
        key2 = tuning.shape_class(1, ("bfloat16", "bfloat16"), 4, 2048, 512, False)
        assert choose(timer, key=key2) == "fused_recurrent"
    said = [w for w in caught if "tuning cache" in str(w.message)]  # once, at the caller's line (not the library's)
    assert len(said) == 1 and os.path.samefile(said[0].filename, __file__), [(w.message, w.filename) for w in caught]
    assert read(cache) == {"version": 1, "devices": {DEV: {repr(KEY): "fused_recurrent",
                                                           repr(key2): "fused_recurrent"}}}


@pytest.mark.parametrize("how", ["under_a_file", "no_new_files", "read_only"])
def test_an_unwritable_folder_keeps_decisions_in_memory(cache, tmp_path, monkeypatch, how):
    if how == "under_a_file":  # a folder under a file can never be made, even by root
        blocker = tmp_path / "a_file"
        blocker.write_text("")
        monkeypatch.setenv("HGRN_CUPY_CACHE_DIR", str(blocker / "sub"))
    elif how == "no_new_files":  # what a read-only folder does to the temporary file, as root too

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tuning.tempfile, "mkstemp", refuse)
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        cache.parent.mkdir()
        cache.parent.chmod(0o500)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert choose(Scripted({"chunk": 2.0, "fused_recurrent": 1.0})) == "fused_recurrent"
        key2 = tuning.shape_class(0, ("float32", "float32"), 4, 2048, 512, False)
        assert choose(Scripted({"chunk": 1.0, "fused_recurrent": 2.0}), key=key2) == "chunk"
    assert len([w for w in caught if "tuning cache" in str(w.message)]) == 1
    assert not tuning.writes_to_disk()
    timer = Scripted({"chunk": 1.0, "fused_recurrent": 2.0})
    assert choose(timer) == "fused_recurrent" and timer.launched == []


@pytest.mark.parametrize("how", ["env", "setting"])
def test_on_disk_caching_can_be_turned_off(cache, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("HGRN_CUPY_TUNING", "0")
    else:
        monkeypatch.setattr(tuning.settings, "on_disk", False)
    assert choose(Scripted({"chunk": 2.0, "fused_recurrent": 1.0})) == "fused_recurrent"
    assert not cache.exists() and not tuning.writes_to_disk()
    timer = Scripted({"chunk": 1.0, "fused_recurrent": 2.0})
    assert choose(timer) == "fused_recurrent" and timer.launched == []  # still kept in memory


def test_the_rule_run_untuned_warns_once_per_class(cache, monkeypatch):
    """Where nothing can be timed and nothing is stored, ``auto`` runs the rule's engine with one
    UntunedWarning per device and class, naming the shape and the tune command (dense calls of one dtype)
    or one call outside capture and jit (packed ones); none once a decision is stored or with tuning off."""
    from hgrn_cupy import checks, dispatch

    monkeypatch.setattr(dispatch.config, "engine", "auto")

    def run(N, T, D, varlen=False, device=DEV, tune=True, traced=False):
        call = checks.Call(None, 1 if varlen else N, T, D, N, ("bfloat16", "bfloat16"), "float32", varlen, True)
        monkeypatch.setattr(dispatch.config, "tune", tune)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine = dispatch.choose("auto", call, 0, False, device, None, False, traced=traced)
        assert engine == dispatch.rule(N, T, D, call.dtypes, 0)
        return [str(w.message) for w in caught if w.category is dispatch.UntunedWarning]

    (msg,) = run(8, 4096, 2048)
    assert "bfloat16/bfloat16 8x4096x2048" in msg and "`python -m hgrn_cupy tune 8x4096x2048 --dtype bfloat16`" in msg
    assert "CUDA-graph capture" in msg and "one such call outside capture first" in msg
    assert run(8, 5000, 2100) == []  # the same class
    assert len(run(8, 4096, 2048, device=DEV + " other")) == 1
    (msg,) = run(3, 9000, 256, varlen=True)
    assert "3 sequences packed in 9000 steps x 256" in msg and "tune" not in msg.split("Run ")[1].split(",")[0]
    (msg,) = run(5, 613, 37, varlen=True, traced=True)  # packed, under JAX tracing: no tune command, one eager call
    assert "JAX tracing" in msg and "Run " not in msg, msg
    assert "Call hgrn_cupy.hgrn (the top level, which runs eagerly) once on such arrays first, to store" in msg
    assert run(2, 512, 64, tune=False) == []
    tuning.choose(DEV, tuning.shape_class(0, ("bfloat16", "bfloat16"), 2, 512, 64, False), ENGINES, None,
                  "chunk", True, measure=lambda fn: 1.0)  # stored (the run is never called: measure stands in)
    assert run(2, 512, 64) == []


def test_device_keys_do_not_mix(cache):
    other = DEV.replace("sm_90", "sm_80")
    assert choose(Scripted({"chunk": 1.0, "fused_recurrent": 2.0})) == "chunk"
    timer = Scripted({"chunk": 2.0, "fused_recurrent": 1.0})
    assert choose(timer, device=other) == "fused_recurrent"
    assert len(timer.launched) == 2
    assert read(cache)["devices"] == {DEV: {repr(KEY): "chunk"}, other: {repr(KEY): "fused_recurrent"}}


def _writer(folder, worker, count, start):
    """One process of the concurrency test: store ``count`` keys of its own, one write each."""
    os.environ["HGRN_CUPY_CACHE_DIR"] = folder
    os.environ.pop("HGRN_CUPY_TUNING", None)
    tuning.forget()
    start.wait()
    timer = Scripted({"chunk": 1.0, "fused_recurrent": 2.0})
    for i in range(count):
        key = tuning.shape_class(worker % 2, ("float32", "bfloat16"), worker + 1, i + 1, 1, False)
        key = key + (worker, i)  # distinct per process and per call, whatever the bucketing
        assert choose(timer, key=key) == "chunk"


def test_concurrent_processes_lose_no_entry(cache):
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    count, workers = 40, 3
    procs = [ctx.Process(target=_writer, args=(str(cache.parent), w, count, start)) for w in range(workers)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * workers
    stored = read(cache)["devices"][DEV]
    assert len(stored) == count * workers and set(stored.values()) == {"chunk"}


def test_shape_class_buckets():
    bf = ("bfloat16", "bfloat16")
    base = tuning.shape_class(0, bf, 4, 2048, 512, False)
    # nearby shapes share a class: T and N * D within the same power of two
    assert tuning.shape_class(0, bf, 4, 3000, 512, False) == base
    assert tuning.shape_class(0, bf, 2, 2048, 1024, False) == base
    assert tuning.shape_class(0, bf, 5, 4095, 700, False) == base
    assert tuning.shape_class(0, bf, 4, 2048, 512, False, reverse=True) == base
    # far ones, and any change of direction, dtype or packing, do not
    for other in [tuning.shape_class(0, bf, 4, 4096, 512, False), tuning.shape_class(0, bf, 4, 1024, 512, False),
                  tuning.shape_class(0, bf, 64, 2048, 512, False), tuning.shape_class(0, bf, 4, 2048, 128, False),
                  tuning.shape_class(1, bf, 4, 2048, 512, False), tuning.shape_class(0, bf, 4, 2048, 512, True),
                  tuning.shape_class(0, ("float32", "bfloat16"), 4, 2048, 512, False)]:
        assert other != base
    assert tuning.shape_class(0, bf, 1, 0, 0, False) != tuning.shape_class(0, bf, 1, 1, 1, False)
    assert {base: 1}.get(tuning.shape_class(0, bf, 4, 3000, 512, False)) == 1  # a dict key: equal classes hash alike
    assert tuple(json.loads(json.dumps(base))) == base  # JSON-friendly


def test_device_key_reads_cupy(cache, monkeypatch):
    calls = []

    def props(device):
        calls.append(device)
        return {"name": b"Fake H200", "major": 9, "minor": 0}

    runtime = types.SimpleNamespace(getDeviceProperties=props, driverGetVersion=lambda: 13000,
                                    runtimeGetVersion=lambda: 12080)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime)))
    key = tuning.device_key(1)
    assert key.startswith("Fake H200|sm_90|driver 13000|runtime 12080|hgrn_cupy ")
    assert calls == [1] and tuning.device_key(1) == key and calls == [1]  # read once per device

    def missing(name):
        raise tuning.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(tuning.importlib.metadata, "version", missing)
    tuning.forget()
    assert tuning.device_key(0).endswith("|hgrn_cupy dev")
    # choose() with a device index names its decisions by that key
    assert choose(Scripted({"chunk": 2.0, "fused_recurrent": 1.0}), device=0) == "fused_recurrent"
    assert list(read(cache)["devices"]) == [tuning.device_key(0)]


def test_cache_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HGRN_CUPY_CACHE_DIR", str(tmp_path / "a"))
    assert tuning.cache_path() == str(tmp_path / "a" / "tuning.json")
    monkeypatch.delenv("HGRN_CUPY_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning.cache_path() == str(tmp_path / "xdg" / "hgrn_cupy" / "tuning.json")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tuning.cache_path() == str(tmp_path / "home" / ".cache" / "hgrn_cupy" / "tuning.json")


def test_tune_command_arguments(monkeypatch, capsys):
    from hgrn_cupy import __main__ as cli

    assert cli.parse_shape("4x2048x512") == (4, 2048, 512)
    for bad in ["4x2048", "4x0x512", "ax2x3", "4x2x3x5"]:
        with pytest.raises(ValueError):
            cli.parse_shape(bad)
    monkeypatch.setattr(cli, "gpu_info", lambda: ([], None, "no CUDA device"))
    assert cli.main(["tune", "2x64x32"]) == 1
    assert "tune needs a CUDA GPU: no CUDA device" in capsys.readouterr().out


def test_tune_command_prints_each_candidate(monkeypatch, capsys):
    """The tune command prints the device key, then per row the choice and every candidate's time in us
    (candidates differ from row to row: variants apply to some shapes only), then where the cache is."""
    from hgrn_cupy import __main__ as cli

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=lambda: types.SimpleNamespace(id=0)))
    monkeypatch.setattr(cli, "gpu_info", lambda: ([], fake, None))
    monkeypatch.setattr(tuning, "device_key", lambda device: DEV)
    rows = [((8, 4096, 2048), "bfloat16", 0, "fused_recurrent, 4-byte lanes",
             {"fused_recurrent": 167e-6, "chunk": 137.2e-6, "fused_recurrent, 4-byte lanes": 129e-6}),
            ((4, 2048, 512), "bfloat16", 1, "chunk", {"chunk": 34.3e-6, "fused_recurrent": 108.9e-6})]
    asked = []
    monkeypatch.setattr(tuning, "tune",
                        lambda shapes, dtypes, device: (asked.append((shapes, dtypes, device)), rows)[1])
    assert cli.main(["tune", "8x4096x2048", "4x2048x512"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert asked == [([(8, 4096, 2048), (4, 2048, 512)], ("bfloat16",), DEV)]
    assert out[0] == f"device: {DEV}" and out[1].split()[-3:] == ["us", "per", "candidate"]
    assert out[2].split()[:4] == ["8x4096x2048", "bfloat16", "forward", "fused_recurrent,"]
    assert out[2].endswith("fused_recurrent 167.0, chunk 137.2, fused_recurrent, 4-byte lanes 129.0")
    assert out[3].split()[:4] == ["4x2048x512", "bfloat16", "backward", "chunk"]
    assert out[3].endswith("chunk 34.3, fused_recurrent 108.9") and out[4].startswith("cache: ")


def test_tune_stores_what_choose_reads(cache, monkeypatch):
    """tune() on NumPy standing in for CuPy (the public functions then run the CPU reference): its
    decisions land under the keys choose() looks up, replacing earlier ones."""
    pytest.importorskip("ml_dtypes")
    import numpy as np

    fake = types.SimpleNamespace(random=np.random, logaddexp=np.logaddexp, uint32=np.uint32, uint16=np.uint16,
                                 cuda=types.SimpleNamespace(Device=lambda: types.SimpleNamespace(id=0)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(tuning, "device_key", lambda device: DEV)
    shapes = [(2, 40, 8), (1, 100, 64)]  # one chunk at most: no staged chunk forward to time
    # the backward is scripted to prefer the fused engine, the forward the chunk engine
    calls = iter([1.0, 2.0, 2.0, 1.0] * 4)
    key0 = tuning.shape_class(0, ("float32", "float32"), 2, 40, 8, False)
    assert choose(Scripted({"chunk": 2.0, "fused_recurrent": 1.0}), key=key0) == "fused_recurrent"
    rows = tuning.tune(shapes, dtypes=("float32", "bfloat16"), measure=lambda fn: (fn(), next(calls))[1])
    assert [(r[0], r[1], r[2]) for r in rows] == [(s, dt, d) for s in shapes for dt in ("float32", "bfloat16")
                                                 for d in (0, 1)]
    for shape, dtype, direction, engine, times in rows:
        assert engine == ("chunk", "fused_recurrent")[direction] and set(times) == set(ENGINES)
        key = tuning.shape_class(direction, (dtype, dtype), shape[0], shape[1], shape[2], False)
        timer = Scripted({"chunk": 1.0, "fused_recurrent": 1.0})
        assert choose(timer, key=key, allow_timing=False, default="none") == engine and timer.launched == []
        assert read(cache)["devices"][DEV][repr(key)] == engine


def test_tune_measures_and_stores_the_variants(cache, monkeypatch):
    """tune() (NumPy standing in for CuPy) times every candidate a first call would, launch variants
    included, each through the internal interface on the tuner's own arrays (the CPU reference here), and
    stores the fastest, a variant too, where choose() finds it."""
    pytest.importorskip("ml_dtypes")
    import numpy as np

    from hgrn_cupy import dispatch, plans

    fake = types.SimpleNamespace(random=np.random, logaddexp=np.logaddexp, uint32=np.uint32, uint16=np.uint16,
                                 cuda=types.SimpleNamespace(Device=lambda: types.SimpleNamespace(id=0)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(tuning, "device_key", lambda device: DEV)
    shape = (1, 65, 8192)  # a block walk for bfloat16 both ways: the variants apply
    names = {d: dispatch.candidates(*shape, ("bfloat16", "bfloat16"), d) for d in (0, 1)}
    assert len(names[0]) == 8 and names[0][5] == "fused_recurrent, staged, 8-byte lanes" and len(names[1]) == 3
    assert names[0][6:] == ("fused_recurrent, bulk copies, 4-byte lanes", "fused_recurrent, bulk copies, 8-byte lanes")
    ran = []
    real_forward, real_backward = plans.forward, plans.backward
    monkeypatch.setattr(plans, "forward", lambda name, *a: (ran.append((0, name)), real_forward(name, *a))[1])
    monkeypatch.setattr(plans, "backward", lambda name, *a: (ran.append((1, name)), real_backward(name, *a))[1])
    fastest = {0: names[0][5], 1: names[1][2]}  # a variant in each direction, the staged forward

    def measure(fn):
        fn()
        direction, name = ran[-1]
        return 1.0 if name == fastest[direction] else 2.0
    rows = tuning.tune([shape], measure=measure)
    assert [(r[2], r[3], tuple(r[4])) for r in rows] == [(d, fastest[d], names[d]) for d in (0, 1)]
    for direction in (0, 1):
        key = tuning.shape_class(direction, ("bfloat16", "bfloat16"), *shape, False)
        timer = Scripted({})
        assert choose(timer, key=key, candidates=names[direction], allow_timing=False, default="none") == \
            fastest[direction] and timer.launched == []
        assert read(cache)["devices"][DEV][repr(key)] == fastest[direction]
