"""``python -m hgrn_cupy``: report versions and check that the kernels compute what the reference does.

With a CUDA GPU, each engine is compiled and run forward and backward (float32 and bfloat16, dense
and packed variable-length sequences, initial and final states) on CuPy arrays, and every result is
compared with the NumPy reference in float64.  Without one, the CPU path is checked the same way and
the GPU part is reported as skipped.  Exit status 1 when any check fails.

``python -m hgrn_cupy tune [BxTxD ...] [--dtype NAME ...]`` measures both engines (and the launch
variants that apply) per shape on the current GPU, caches the fastest per shape class
(:mod:`hgrn_cupy.tuning`) and prints a table.
"""
import importlib.metadata
import importlib.util
import platform
import sys

import numpy as np

from . import __version__, hgrn_backward, naive_recurrent_hgrn, naive_recurrent_hgrn_bwd, plans
from .arrays import FLOAT_DTYPES
from .naive import bf16_bits_to_float32, float32_to_bf16_bits

# Largest accepted ||out - ref|| / ||ref|| by the dtype of the output checked (tests/conftest.py
# holds the same numbers for the test suite).
TOL = {"float32": 2e-5, "bfloat16": 1.5e-2}
CASES = {  # name: (B, T, D, cu_seqlens offsets or None)
    "dense": (3, 300, 67, None),
    "varlen": (1, 300, 67, (0, 41, 41, 190, 300)),
}


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_version(v):
    return f"{v // 1000}.{v % 1000 // 10}"


def gpu_info():
    """(lines describing CuPy, CUDA and the device, cupy module or None, why the GPU part is off)."""
    try:
        import cupy
    except Exception as e:  # not installed, or broken
        return [f"CuPy: not importable ({type(e).__name__}: {e})"], None, "CuPy is not importable"
    lines = [f"CuPy: {cupy.__version__}"]
    rt = cupy.cuda.runtime
    try:
        lines.append(f"CUDA runtime: {_cuda_version(rt.runtimeGetVersion())}")
    except Exception as e:
        lines.append(f"CUDA runtime: unavailable ({type(e).__name__})")
    try:
        major, minor = cupy.cuda.nvrtc.getVersion()
        lines.append(f"NVRTC: {major}.{minor}")
    except Exception as e:
        lines.append(f"NVRTC: unavailable ({type(e).__name__}: {e})")
    try:
        driver = rt.driverGetVersion()
    except Exception:
        driver = 0
    if driver == 0:
        lines.append("CUDA driver: none found")
        return lines, None, "no CUDA driver"
    lines.append(f"CUDA driver: {_cuda_version(driver)}")
    try:
        count = rt.getDeviceCount()
    except Exception as e:
        return lines, None, f"no usable CUDA device ({type(e).__name__}: {e})"
    if count == 0:
        return lines, None, "no CUDA device"
    dev = rt.getDevice()
    props = rt.getDeviceProperties(dev)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    lines.append(f"device {dev} of {count}: {name}, compute capability {props['major']}.{props['minor']}")
    return lines, cupy, None


def framework_lines():
    out = []
    for dist in ("torch", "jax"):
        v = _version(dist) if importlib.util.find_spec(dist) is not None else None
        out.append(f"{dist}: {v or 'not installed'}")
    return out


# ----------------------------------------------------------------------------------------------
# one check: forward and backward of one engine, dtype and layout against the float64 reference

def _round(a, dtype):
    """float64 values as the kernels see them after rounding to ``dtype``."""
    if dtype == "bfloat16":
        return bf16_bits_to_float32(float32_to_bf16_bits(a.astype(np.float32))).astype(np.float64)
    return a.astype(dtype).astype(np.float64)


def _rel_err(out, ref):
    out = np.asarray(out, np.float64)
    if np.isnan(out).any():
        return float("inf")
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / den) if den > 0 else float(np.linalg.norm(out - ref))


def check(engine, dtype, case, rng, cupy=None):
    """Rows ``(quantity, rel_err, tol)`` for one engine/dtype/layout; ``cupy`` None runs the CPU path."""
    B, T, D, offsets = CASES[case]
    N = B if offsets is None else len(offsets) - 1
    x = _round(rng.standard_normal((B, T, D)), dtype)
    g = _round(-np.logaddexp(0.0, -rng.standard_normal((B, T, D))), dtype)  # log(sigmoid) <= 0
    do = _round(rng.standard_normal((B, T, D)), dtype)
    h0, dht = rng.standard_normal((N, D)), rng.standard_normal((N, D))
    h0, dht = (a.astype(np.float32).astype(np.float64) for a in (h0, dht))
    cu = None if offsets is None else np.asarray(offsets, np.int32)

    if cupy is None:
        def dev(a, dt):
            if dt == "bfloat16":  # bfloat16 NumPy arrays come from ml_dtypes, checked only where installed
                import ml_dtypes

                return a.astype(ml_dtypes.bfloat16)
            return a.astype(dt)

        def host(a):
            return np.asarray(a, dtype=np.float32).astype(np.float64) if a.dtype.name == "bfloat16" \
                else a.astype(np.float64)
    else:
        def dev(a, dt):
            if dt == "bfloat16":
                import ml_dtypes

                return cupy.asarray(float32_to_bf16_bits(a.astype(np.float32))).view(ml_dtypes.bfloat16)
            return cupy.asarray(a.astype(dt))

        def host(a):
            if a.dtype.name == "bfloat16":
                return bf16_bits_to_float32(a.view(cupy.uint16).get()).astype(np.float64)
            return cupy.asnumpy(a).astype(np.float64)

    cu_dev = None if cu is None else (cu if cupy is None else cupy.asarray(cu))
    o, ht = plans.forward(engine, dev(x, dtype), dev(g, dtype), dev(h0, "float32"), True, cu_dev, False)
    dx, dg, dh0 = hgrn_backward(dev(g, dtype), o, dev(do, dtype), dht=dev(dht, "float32"),
                                initial_state=dev(h0, "float32"), cu_seqlens=cu_dev, engine=engine)
    o_ref, ht_ref = naive_recurrent_hgrn(x, g, h0, True, cu)
    # The backward reads its states from o, so the reference is given the library's o.
    dx_ref, dg_ref, dh0_ref = naive_recurrent_hgrn_bwd(g, host(o), do, dht, h0, cu)
    # Tolerance by the dtype of the output: states (ht, dh0) are float32.
    results = (("o", o, o_ref, dtype), ("ht", ht, ht_ref, "float32"), ("dx", dx, dx_ref, dtype),
               ("dg", dg, dg_ref, dtype), ("dh0", dh0, dh0_ref, "float32"))
    return [(name, _rel_err(host(out), ref), TOL[dt]) for name, out, ref, dt in results]


def run_checks(engines, dtypes, cupy, label):
    """Print one table row per output checked; True when every check passes."""
    rng = np.random.default_rng()
    ok = True
    print(f"\n{label}")
    print(f"  {'engine':<16} {'dtype':<9} {'case':<7} {'out':<4} {'rel. error':>10} {'tol':>8}  result")
    for engine in engines:
        shown = engine if cupy is not None else "numpy"
        for dtype in dtypes:
            for case in CASES:
                try:
                    rows = check(engine, dtype, case, rng, cupy)
                except Exception as e:  # a compile or launch failure is a failed check, not a crash
                    ok = False
                    print(f"  {shown:<16} {dtype:<9} {case:<7} FAIL: {type(e).__name__}: {e}")
                    continue
                for name, err, tol in rows:
                    passed = err <= tol
                    ok &= passed
                    print(f"  {shown:<16} {dtype:<9} {case:<7} {name:<4} {err:>10.2e} {tol:>8.1e}  "
                          f"{'pass' if passed else 'FAIL'}")
    return ok


# ----------------------------------------------------------------------------------------------
# tune: measure the engines per shape and cache the choice

TUNE_SHAPES = ((4, 2048, 512), (8, 2048, 1024), (4, 4096, 1024), (1, 32768, 1024), (8, 4096, 2048),
               (1, 262144, 256))


def parse_shape(text):
    """``"4x2048x512"`` -> ``(4, 2048, 512)``."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"a shape is BxTxD with positive integers, got {text!r}")
    return tuple(int(p) for p in parts)


def tune_main(argv):
    """Tune the shapes in ``argv`` (default ``TUNE_SHAPES``), print what was chosen; exit status."""
    import argparse

    from . import tuning

    parser = argparse.ArgumentParser(prog="python -m hgrn_cupy tune",
                                     description="Measure the engines and their launch variants per shape "
                                                 "and cache the fastest.")
    parser.add_argument("shapes", nargs="*", type=parse_shape, metavar="BxTxD",
                        help="default: " + " ".join("x".join(map(str, s)) for s in TUNE_SHAPES))
    parser.add_argument("--dtype", action="append", dest="dtypes", choices=FLOAT_DTYPES,
                        help="dtype of x and g, repeatable (default: bfloat16)")
    args = parser.parse_args(argv)
    lines, cupy, why_not = gpu_info()
    if cupy is None:
        print(f"tune needs a CUDA GPU: {why_not}.")
        return 1
    device = tuning.device_key(cupy.cuda.Device().id)
    print(f"device: {device}")
    rows = tuning.tune(args.shapes or TUNE_SHAPES, tuple(args.dtypes or ("bfloat16",)), device=device)
    width = max(len(name) for row in rows for name in row[4])
    print(f"{'B x T x D':<18} {'dtype':<9} {'direction':<9} {'chosen':<{width}} us per candidate")
    for shape, dtype, direction, engine, times in rows:
        print(f"{'x'.join(map(str, shape)):<18} {dtype:<9} {('forward', 'backward')[direction]:<9} "
              f"{engine:<{width}} " + ", ".join(f"{name} {t * 1e6:.1f}" for name, t in times.items()))
    print(f"cache: {tuning.cache_path() if tuning.writes_to_disk() else 'in memory only (on-disk cache off)'}")
    return 0


def main(argv=None):
    """The self-check, or ``tune`` with its arguments; anything else is refused (exit status 2)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tune"]:
        return tune_main(argv[1:])
    import argparse

    argparse.ArgumentParser(
        prog="python -m hgrn_cupy",
        description="Report versions, then check every engine forward and backward against the float64 "
                    "reference (the GPU kernels where CuPy sees a GPU, else the CPU path); exit status 1 "
                    "when a check fails.",
        epilog="python -m hgrn_cupy tune [BxTxD ...] [--dtype NAME ...]: measure the engines and their "
               "launch variants per shape on this GPU and cache the fastest (tune --help).").parse_args(argv)
    print(f"hgrn_cupy: {__version__}")
    print(f"Python: {platform.python_version()}")
    print(f"NumPy: {np.__version__}")
    lines, cupy, why_not = gpu_info()
    for line in lines + framework_lines():
        print(line)

    if cupy is None:
        dtypes = ["float32"] + (["bfloat16"] if importlib.util.find_spec("ml_dtypes") else [])
        ok = run_checks(["auto"], dtypes, None, "CPU path (NumPy arrays through the public functions):")
        print(f"\nGPU part skipped: {why_not}.")
    else:
        ok = run_checks(["chunk", "fused_recurrent"], ["float32", "bfloat16"], cupy,
                        "GPU kernels (compiled with NVRTC on first use) against the float64 reference:")
    print("\nall checks pass" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
