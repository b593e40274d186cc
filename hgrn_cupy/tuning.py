"""Per-device engine choice by measurement: the shape classes, the device key, the decision cache (in
memory and in a JSON file) and the ahead-of-time tuner behind ``python -m hgrn_cupy tune``.

The dispatch asks :func:`choose` for an engine; the first call of a shape class on a device times every
candidate once (the engines, and launch variants of them whose best setting moves with the card) and
the winner is kept, so the same call always gets the same launch afterwards (in this process and,
through the file, in later ones).  Nothing here imports CuPy until a GPU is used.

Cache file (``cache_path()``)::

    {"version": 1, "devices": {device_key: {repr(shape_class): engine or variant name}}}
"""
from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import json
import os
import tempfile
import threading

from . import notices
from .measure import queued

try:
    import fcntl
except ImportError:  # no POSIX file locks: writes stay atomic but concurrent writers may drop entries
    fcntl = None

FORMAT_VERSION = 1


class Settings:
    """Switches of the tuner.

    on_disk: keep decisions in the cache file as well as in memory (``HGRN_CUPY_TUNING=0`` in the
        environment turns the file off too; either one off is off).
    repeats: calls per candidate that the default measurement queues behind its wait
        (:func:`hgrn_cupy.measure.queued`).
    """
    on_disk = True
    repeats = 5


settings = Settings()

_lock = threading.Lock()
_memory: dict = {}      # (device key, repr(shape class)) -> engine name
_loaded = set()         # cache files already read into _memory
_warned = set()         # (path or (device, class), kind) already warned about: one warning each
_memory_only = set()    # cache files found unwritable: decisions stay in memory


# ----------------------------------------------------------------------------------------------
# keys

def _bucket(n):
    """Power-of-two bucket of a non-negative count: 0 for 0, else floor(log2(n)) + 1."""
    return int(n).bit_length()


def bucket_counts(b):
    """The counts ``(lo, hi)``, both included, that bucket ``b`` of :func:`_bucket` holds."""
    return (0, 0) if b == 0 else (1 << (b - 1), (1 << b) - 1)


def shape_class(direction, dtypes, N, T, D, varlen, reverse=False):
    """The bucket of a call that one engine decision covers.

    Args:
        direction: 0 forward, 1 backward (the backward reads and writes more arrays per step).
        dtypes: dtype names of the inputs (x, g) in the forward, (o, g) in the backward.
        N: number of sequences (B, or the number of packed sequences with ``cu_seqlens``).
        T: steps per row of the ``[B, T, D]`` arrays.
        D: channels.
        varlen: whether ``cu_seqlens`` packs sequences (the walks then start and stop per sequence).
        reverse: accepted for the caller's convenience and left out: both engines walk time either way
            with the same memory pattern (a time step is one contiguous row of channels).

    Returns:
        ``(direction, x dtype, g dtype, varlen, bucket(T), bucket(N * D))`` of ints, strings and a bool.

    Why these features: the fused engine runs one thread (or one lane of a block) per channel and walks
    all of T, so its speed follows N * D (how full the GPU is) and T (how long each walk is); the chunk
    engine parallelises over T as well, so the crossover between them is a line in (T, N * D).  Bytes
    per element set the memory traffic and the vector widths.  Both counts go by powers of two because
    the crossover moves smoothly: nearby shapes share one decision and a few dozen classes cover every
    practical call, so tuning stays cheap.
    """
    x_dtype, g_dtype = (str(d) for d in dtypes)
    return (int(direction), x_dtype, g_dtype, bool(varlen), _bucket(T), _bucket(int(N) * int(D)))


_device_keys: dict = {}


def device_key(device: int) -> str:
    """Name of the hardware and software a decision holds for: GPU name, compute capability, CUDA
    driver and runtime versions and the hgrn_cupy version (``device``: CUDA device index).  A new
    driver, toolkit or library version starts with fresh decisions."""
    key = _device_keys.get(device)
    if key is None:
        import cupy

        rt = cupy.cuda.runtime
        props = rt.getDeviceProperties(device)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        try:
            version = importlib.metadata.version("hgrn_cupy")
        except importlib.metadata.PackageNotFoundError:
            version = "dev"
        key = (f"{name}|sm_{props['major']}{props['minor']}|driver {rt.driverGetVersion()}"
               f"|runtime {rt.runtimeGetVersion()}|hgrn_cupy {version}")
        _device_keys[device] = key
    return key


def _device(device):
    return device if isinstance(device, str) else device_key(device)


# ----------------------------------------------------------------------------------------------
# the cache file

def cache_path() -> str:
    """``$HGRN_CUPY_CACHE_DIR/tuning.json``, else ``$XDG_CACHE_HOME/hgrn_cupy/tuning.json``, else
    ``~/.cache/hgrn_cupy/tuning.json``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.environ.get("HGRN_CUPY_CACHE_DIR") or os.path.join(base, "hgrn_cupy"), "tuning.json")


def _on_disk():
    return settings.on_disk and os.environ.get("HGRN_CUPY_TUNING", "1").strip() != "0"


def writes_to_disk() -> bool:
    """Whether decisions stored now also go to the cache file (on, and the folder writable so far)."""
    return _on_disk() and cache_path() not in _memory_only


def _first(what, kind):
    """True the first time (``what``, ``kind``) is asked about since the last :func:`forget`."""
    with _lock:
        if (what, kind) in _warned:
            return False
        _warned.add((what, kind))
    return True


def _warn_once(path, kind, message):
    if _first(path, kind):
        notices.warn(message, RuntimeWarning)


def _read(path):
    """{device key: {class: engine}} from the file; {} when it is missing, and (with one warning) when it
    cannot be read or is not in the expected format; the next write replaces it."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except (FileNotFoundError, NotADirectoryError):  # no file yet; a folder that cannot exist warns on write
        return {}
    except OSError as e:
        _warn_once(path, "read", f"hgrn_cupy: cannot read the tuning cache {path} ({e}); ignoring it")
        return {}
    try:
        data = json.loads(raw.decode("utf-8"))
        devices = data["devices"]
        ok = (type(data["version"]) is int and data["version"] == FORMAT_VERSION and isinstance(devices, dict)
              and all(isinstance(k, str) and isinstance(v, dict) for k, v in devices.items())
              and all(isinstance(c, str) and isinstance(e, str) for v in devices.values() for c, e in v.items()))
    except (ValueError, TypeError, KeyError, AttributeError):
        ok = False
    if not ok:
        _warn_once(path, "format", f"hgrn_cupy: the tuning cache {path} is not a version {FORMAT_VERSION} "
                                   "cache file; ignoring it (the next decision replaces it)")
        return {}
    return devices


def _load(path, again=False):
    """Read the file into memory (once per path, or again when ``again``); entries in memory win."""
    with _lock:
        if path in _loaded and not again:
            return
    devices = _read(path)
    with _lock:
        _loaded.add(path)
        for dev, classes in devices.items():
            for cls, engine in classes.items():
                _memory.setdefault((dev, cls), engine)


@contextlib.contextmanager
def _file_lock(path):
    """Exclusive lock on ``path + ".lock"`` (the data file itself is replaced, so it cannot hold one)."""
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write(path, dev, cls, engine, keep):
    """Merge one decision into the file under the lock; return the decision the file holds after it
    (an entry already there is kept when it is in ``keep``)."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    with _file_lock(path):
        devices = _read(path)
        classes = devices.setdefault(dev, {})
        if classes.get(cls) not in keep:
            classes[cls] = engine
        text = json.dumps({"version": FORMAT_VERSION, "devices": devices}, indent=1, sort_keys=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tuning.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # readers see the old file or the new one, never a part
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return classes[cls]


def _store(dev, cls, engine, keep):
    """Keep a decision in memory and, where allowed, in the file; return the decision that holds.

    A decision already stored (in memory, else in the file, which the lock makes the one place
    processes and threads agree on) is kept when it is in ``keep``, so every caller of a class gets the
    same engine; ``keep=()`` replaces it.
    """
    with _lock:
        current = _memory.get((dev, cls))
    if current in keep:
        return current
    path = cache_path()
    if _on_disk() and path not in _memory_only:
        try:
            engine = _write(path, dev, cls, engine, keep)
        except OSError as e:
            with _lock:
                _memory_only.add(path)
            _warn_once(path, "write", f"hgrn_cupy: cannot write the tuning cache {path} ({e}); "
                                      "decisions are kept in memory only")
    with _lock:
        current = _memory.get((dev, cls))
        if current in keep:
            return current
        _memory[dev, cls] = engine
    return engine


def stored(device) -> dict:
    """The decisions in memory for ``device`` (an index or a :func:`device_key`), taken here or read from the
    file: ``{shape class (:func:`shape_class`'s tuple): launch}``, less file classes no call can match."""
    dev, out = _device(device), {}
    with _lock:
        items = [(cls, name) for (d, cls), name in _memory.items() if d == dev]
    for cls, name in items:
        with contextlib.suppress(ValueError, SyntaxError, TypeError):
            key = ast.literal_eval(cls)
            if isinstance(key, tuple):
                out[key] = name
    return out


def forget():
    """Clear the in-memory decisions, device keys and warnings given; the file is left as it is."""
    with _lock:
        _memory.clear()
        _device_keys.clear()
        _loaded.clear()
        _warned.clear()
        _memory_only.clear()


# ----------------------------------------------------------------------------------------------
# measuring and choosing

def _time_all(candidates, run, measure, device=None, stream_ptr=None):
    """({engine: seconds}, the fastest; ties go to the earliest in ``candidates``).  ``measure`` None: the
    queued measurement on ``device`` (None: the current one) and ``stream_ptr`` (None: CuPy's current)."""
    if measure is None:
        with queued(device, stream_ptr, settings.repeats) as measure:  # one flush buffer for all candidates
            return _time_all(candidates, run, measure)
    times = {name: float(measure(lambda name=name: run(name))) for name in candidates}
    best = min(candidates, key=lambda name: (times[name], candidates.index(name)))
    return times, best


def choose(device, key, candidates, run, default, allow_timing, measure=None, stream_ptr=None,
           on_default=None) -> str:
    """The engine for one call, measured once per (device, shape class) and then kept.

    Args:
        device: CUDA device index (its :func:`device_key` names the decision), or a device key string.
        key: the call's :func:`shape_class`.
        candidates: engine names to try, in order of preference (ties go to the earlier one).
        run: ``run(name)`` launches engine ``name`` once on the stream ``measure`` times.
        default: the engine returned, and not stored, when nothing is stored and timing is not allowed.
        allow_timing: False inside CUDA-graph capture or JAX tracing, where launching to measure is
            impossible or would be recorded.
        measure: ``measure(fn) -> seconds`` for a callable launching once; default
            :func:`hgrn_cupy.measure.queued` on ``device`` (an index) and ``stream_ptr``.
        stream_ptr: the stream ``run`` launches on (None: CuPy's current stream).
        on_default: called (no arguments) the first time, per device and class, that ``default`` is
            returned for want of timing (again after :func:`forget`).

    Returns:
        A stored decision when there is one (in memory, else in the cache file) and it is among the
        candidates; else ``default`` when timing is not allowed; else the fastest candidate, stored.
    """
    candidates = tuple(candidates)
    dev, cls = _device(device), repr(tuple(key))
    with _lock:
        hit = _memory.get((dev, cls))
    if hit in candidates:
        return hit
    path = cache_path()
    if _on_disk():
        _load(path, again=allow_timing)  # another process may have decided since the last read
        with _lock:
            hit = _memory.get((dev, cls))
        if hit in candidates:
            return hit
    if not allow_timing:
        if on_default is not None and _first((dev, cls), "default"):
            on_default()
        return default
    _, best = _time_all(candidates, run, measure, None if isinstance(device, str) else device, stream_ptr)
    return _store(dev, cls, best, keep=candidates)


# ----------------------------------------------------------------------------------------------
# ahead-of-time tuning

def _random(cupy, shape, dtype, rng, gate=False):
    a = rng.standard_normal(shape, dtype="float32")
    if gate:
        a = -cupy.logaddexp(0.0, -a)  # log(sigmoid) <= 0: a decaying recurrence
    if dtype == "bfloat16":
        import ml_dtypes

        # round to nearest even on the bit pattern: bfloat16 keeps the top 16 bits of a float32
        bits = a.view(cupy.uint32)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.astype(cupy.uint16).view(ml_dtypes.bfloat16)
    return a.astype(dtype)


def tune(shapes, dtypes=("bfloat16",), directions=(0, 1), device=None, measure=None):
    """Measure the candidates a first call would (both engines, and the launch variants that apply:
    ``dispatch.candidates``) for every shape, dtype and direction on the current CuPy device and store
    each winner under the key :func:`choose` uses (a dense call, ``reverse=False``), replacing what was
    stored.

    Args:
        shapes: ``(B, T, D)`` tuples.
        dtypes: dtype names, used for both x and g.
        directions: 0 forward (``chunk_hgrn`` / ``fused_recurrent_hgrn``), 1 backward
            (``hgrn_backward`` with ``engine=``).
        device: device index or key under which to store (default: the current CuPy device).
        measure: as in :func:`choose`.

    Returns:
        ``[(shape, dtype, direction, chosen name, {candidate name: seconds})]``.
    """
    import cupy

    from . import dispatch, plans

    dev = _device(cupy.cuda.Device().id if device is None else device)
    rng = cupy.random.default_rng(0)
    results = []
    for shape in shapes:
        B, T, D = (int(n) for n in shape)
        for dtype in dtypes:
            x, g, do = (_random(cupy, (B, T, D), dtype, rng, gate=i == 1) for i in range(3))
            o = None
            for direction in directions:
                if direction == 0:
                    run = lambda name: plans.forward(name, x, g, None, False, None, False)  # noqa: E731
                else:
                    o = o if o is not None else plans.forward("chunk", x, g, None, False, None, False)[0]
                    run = lambda name: plans.backward(name, g, o, do, None, None, None, False)  # noqa: E731
                names = dispatch.candidates(B, T, D, (dtype, dtype), direction)
                times, best = _time_all(names, run, measure)
                cls = repr(shape_class(direction, (dtype, dtype), B, T, D, False))
                results.append(((B, T, D), dtype, direction, _store(dev, cls, best, keep=()), times))
            x = g = do = o = None  # this shape's arrays go before the next shape's come
    return results
