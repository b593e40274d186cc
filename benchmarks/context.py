"""Run-wide state: the arguments, torch and the device, the versions, the clock and the time
budget, the seconds spent per section and per implementation, and recovery after an error."""
from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.metadata
import platform
import subprocess
import sys
import time

from .plan import BUDGET_NOTE


def log(msg: str) -> None:
    print(msg, flush=True)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = next((ln.strip() for ln in text if ln.strip()), "")
    return f"{type(e).__name__}: {first}"[:200]


def revision(repo) -> str:
    """HEAD's short hash with ``+changes`` when tracked files differ from it, else ``unknown``.

    A copied tree can carry git metadata older than its files (the device's copy does), so the hash
    alone may name a commit that is not what ran."""
    git = ["git", "-C", str(repo)]
    try:
        head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        changed = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+changes" if changed else "")


def version_of(dist, module):
    try:
        return importlib.metadata.version(dist)
    except Exception:
        mod = sys.modules.get(module)
        return getattr(mod, "__version__", "?") if mod else "?"


class Context:
    def __init__(self, args, t0):
        self.args = args
        self.t0 = t0
        self.versions = {"python": platform.python_version()}
        self.results = {"sections": {}, "decode": None, "hoststep": None, "jax": None, "seconds": {},
                        "seconds_by_impl": {}}
        self.impls, self.missing = {}, {}
        self.hc = self.hct = self.fla = self.probe = self.probe_opts = None
        self.broken = False
        self.budget_spent = False
        self.budget_offset = 0.0  # seconds not counted against --budget (waiting for a peer's build)
        import numpy
        self.versions["numpy"] = numpy.__version__
        try:
            import torch
        except Exception as e:
            raise SystemExit(f"torch does not import ({one_line(e)}); nothing to benchmark")
        self.torch = torch
        self.versions["torch"] = torch.__version__
        if args.cpu_smoke:
            self.device = "cpu"
        else:
            if not torch.cuda.is_available():
                raise SystemExit("no CUDA device visible to torch (use --dry-run to see the plan)")
            self.device = "cuda"
        for mod in ("cupy", "triton"):
            with contextlib.suppress(Exception):
                self.versions[mod] = importlib.import_module(mod).__version__

    def elapsed(self):
        return time.perf_counter() - self.t0

    def phase_done(self, name, since):
        """Record and log the seconds of one section of the run (``since``: its perf_counter start)."""
        dt = time.perf_counter() - since
        self.results["seconds"][name] = self.results["seconds"].get(name, 0.0) + dt
        log(f"[{self.elapsed():6.0f}s] {name}: {dt:.1f} s")

    def account(self, name, check_s=0.0, timing_s=0.0):
        """Seconds spent per implementation: checks (first calls, so compile and autotuning,
        included) and timing."""
        acc = self.results["seconds_by_impl"].setdefault(name, {"check": 0.0, "timing": 0.0})
        acc["check"] += check_s
        acc["timing"] += timing_s

    def over_budget(self):
        """True once --budget seconds have passed: peer cells not yet started are skipped."""
        if not self.args.budget or self.elapsed() - self.budget_offset <= self.args.budget:
            return False
        if not self.budget_spent:
            self.budget_spent = True
            log(f"[{self.elapsed():6.0f}s] --budget {self.args.budget:g} s spent: peer cells not started yet are "
                f"skipped ({BUDGET_NOTE})")
        return True

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def after_error(self):
        """After a failure: free what we can and make sure the CUDA context still works."""
        gc.collect()
        if self.device != "cuda":
            return
        try:
            self.torch.cuda.synchronize()
            (self.torch.ones(1, device="cuda") + 1).item()
            self.torch.cuda.empty_cache()
        except Exception as e:
            log(f"CUDA context is unusable after an error ({one_line(e)}); stopping, results so far are saved")
            self.broken = True

    def free(self):
        gc.collect()
        if self.device == "cuda":
            with contextlib.suppress(Exception):
                self.torch.cuda.empty_cache()
        if self.hc is not None and "cupy" in sys.modules:
            with contextlib.suppress(Exception):
                sys.modules["cupy"].get_default_memory_pool().free_all_blocks()

    def drop_impl(self, name, why):
        """An implementation that turned out unusable after loading (a build that failed late): one
        line, and no more cells."""
        if self.impls.pop(name, None) is not None or name not in self.missing:
            self.missing[name] = why
            log(f"skipping {name}: {why}")


def device_info(ctx):
    """The GPU (its name as torch.cuda.get_device_name gives it) and the versions under it."""
    torch = ctx.torch
    info = {"device": "cpu" if ctx.device == "cpu" else torch.cuda.get_device_name()}
    if ctx.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(sm_count=p.multi_processor_count, memory_gb=round(p.total_memory / 2 ** 30, 1),
                    l2_mb=round(getattr(p, "L2_cache_size", 50 << 20) / 2 ** 20, 1),
                    capability=f"{p.major}.{p.minor}", torch_cuda=torch.version.cuda)
        with contextlib.suppress(Exception):
            import cupy
            info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
            info["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
            info["nvrtc"] = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
    return info
