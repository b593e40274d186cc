"""Triton precompile: fla's autotuner compiles each of its 12 configs before timing it, one after the
other, for every (D, dtype) and kernel.  While the run imports, child processes compile those kernels
(and accelerated-scan's) into triton's on-disk cache, running each config once on a tiny input with
the timing replaced and the tuning result never stored; the first calls in the run then only time
the configs, on the real shapes, as before.  Nothing timed changes."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .context import log
from .extbuild import last_error
from .impls.ascan import ascan_skip_reason
from .plan import (DECODE_DEVICE_SHAPE, DECODE_HOST_SHAPE, HOSTSTEP_DTYPE, fla_skip_reason, impl_selected,
                   plan_skip_reason)

PRECOMPILE_T = 64  # T of fla's precompile calls: its kernels do not specialise on T


def precompile_plan(args, plan, extras):
    """Precompile groups, one per fla tuning key (engine, D, dtype, state in and out?) and one for
    accelerated-scan's compile keys (dtype, T class), from the cells the plan will run."""
    fla, ascan = [], []

    def add(keys, key):
        if key not in keys:
            keys.append(key)

    cases = [(section, c) for section, cs in plan.items() for c in cs]
    cases += [("hoststep", dict(B=B, T=T, D=D, dtype=HOSTSTEP_DTYPE)) for B, T, D in extras.get("hoststep", ())]
    for section, c in cases:
        for name, engine in (("fla-chunk", "chunk"), ("fla-fused", "fused")):
            if (impl_selected(args, name) and not plan_skip_reason(args, name, section)
                    and not fla_skip_reason(args, name, c["T"])):
                add(fla, [engine, c["D"], c["dtype"], False])
        if (any(impl_selected(args, n) for n in ("ascan-triton", "ascan-triton+T"))
                and not ascan_skip_reason("triton", c["B"], c["T"], c["D"], c["dtype"])):
            add(ascan, [c["dtype"], c["T"] if c["T"] == 1 or c["T"] % 16 else 16])
    if "decode" in extras and impl_selected(args, "fla-fused"):
        for _, _, D in (DECODE_HOST_SHAPE, DECODE_DEVICE_SHAPE):
            add(fla, ["fused", D, "bfloat16", True])
    return [{"fla": [k]} for k in fla] + ([{"ascan": ascan}] if ascan else [])


def start(groups):
    """Start the precompile children (at most one per spare core); returns [(process, output file)]."""
    have = {"fla": importlib.util.find_spec("fla"), "ascan": importlib.util.find_spec("accelerated_scan")}
    groups = [{k: v for k, v in grp.items() if have[k]} for grp in groups]
    groups = [grp for grp in groups if grp]
    n = min(len(groups), max(1, min(16, (os.cpu_count() or 4) - 2)))
    env = dict(os.environ, FLA_CACHE_RESULTS="0", TRITON_CACHE_AUTOTUNING="0")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from benchmarks.precompile import worker; "
            "worker(sys.argv[2])")
    repo = str(Path(__file__).resolve().parent.parent)
    procs = []
    for i in range(n):
        spec = {"fla": [], "ascan": []}
        for grp in groups[i::n]:
            for k, v in grp.items():
                spec[k] += v
        out = tempfile.TemporaryFile(mode="w+")
        procs.append((subprocess.Popen([sys.executable, "-c", code, repo, json.dumps(spec)], stdout=out,
                                       stderr=subprocess.STDOUT, env=env, start_new_session=True), out))
    return procs


def wait(procs, timeout, quiet=False):
    """Wait for the precompile children (``timeout`` seconds in all), kill those still running; one
    line per failure: their kernels then compile on first use, as without --precompile."""
    import contextlib
    import signal

    deadline = time.perf_counter() + timeout
    failed = []
    for proc, out in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(Exception):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            failed.append(f"not done after {timeout:g} s (--precompile-timeout)")
        else:
            if proc.returncode:
                out.seek(0)
                failed.append(f"exit {proc.returncode}: {last_error(out.read())}")
        out.close()
    for why in dict.fromkeys([] if quiet else failed):
        log(f"triton precompile: {failed.count(why)} of {len(procs)} processes failed ({why})")
    return len(procs) - len(failed)


def compile_only_autotuners(prefix):
    """In a precompile child: every triton autotuner in the modules under ``prefix`` runs each config
    once (which compiles it) instead of timing it, and neither reads nor writes tuning results on
    disk, so the parent still tunes on its own shapes."""
    from triton.runtime.autotuner import Autotuner

    def run_once(fn, *args, quantiles=None, **kwargs):
        fn()
        return [0.0] * len(quantiles) if quantiles else 0.0

    def no_disk_cache(tuning_key, configs, bench_fn):
        bench_fn()
        return False

    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(prefix):
            continue
        for obj in list(vars(module).values()):
            while type(obj).__module__.startswith("triton"):  # Heuristics -> Autotuner -> JITFunction
                if isinstance(obj, Autotuner):
                    obj.cache_results = False
                    obj.do_bench = run_once
                    obj.check_disk_cache = no_disk_cache
                    break
                obj = getattr(obj, "fn", None)


def worker(spec_json):
    """Body of one precompile child: the fla and accelerated-scan calls of the parent's plan on tiny
    inputs (same dtypes, D, state arguments and T class), forward and backward."""
    import torch

    from .impls.base import leaves
    from .impls.fla import import_fla_hgrn

    spec = json.loads(spec_json)
    F = torch.nn.functional

    def inputs(shape, dtype):
        dt = getattr(torch, dtype)
        x = torch.randn(shape, device="cuda", dtype=dt)
        return x, F.logsigmoid(torch.randn(shape, device="cuda", dtype=dt))

    if spec.get("fla"):
        mod, _ = import_fla_hgrn()
        compile_only_autotuners("fla.")
        for engine, D, dtype, state in spec["fla"]:
            fn = mod.chunk_hgrn if engine == "chunk" else mod.fused_recurrent_hgrn
            x, g = leaves(*inputs((1, PRECOMPILE_T, D), dtype))
            if state:
                with torch.no_grad():
                    h = torch.randn(1, D, device="cuda")
                    for _ in range(2):  # the second call takes the state in the dtype fla hands back
                        h = fn(x, g, initial_state=h, output_final_state=True)[1]
            else:
                o = fn(x, g)[0]
                torch.autograd.grad(o, (x, g), torch.randn_like(o))
    if spec.get("ascan"):
        from accelerated_scan.scalar import scan
        for dtype, T in spec["ascan"]:
            x, g = inputs((1, 4, T), dtype)
            a, x = leaves(g.exp(), x)
            h = scan(a, x)
            torch.autograd.grad(h, (a, x), torch.randn_like(h))
    torch.cuda.synchronize()
