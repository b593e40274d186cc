"""fpscan (a CUDA first-order scan for PyTorch, published as a source distribution that builds with
torch's cpp_extension and nvcc): ``fpscan.pscan(gates, tokens)``, differentiable, on [B, D, T] with
linear gates, T a power of two from 32 to 65536, float32 / float16 / bfloat16.  Mapped onto our op as
accelerated-scan is (``LinearGateScan``): fpscan on its own layout with a = exp(g) prepared before
timing, fpscan+T with the exp and the transposes in and out counted.

``--fpscan-src`` names an unpacked sdist, a folder holding one (or its .tar.gz), or the archive.  It
is built while the run starts up, in a child process under ``--fpscan-timeout``: ``pip install
--no-build-isolation --no-deps --target`` into a cache folder keyed by the sources, Python and torch
(``--fpscan-build-dir``; a later run or piece on the same machine reuses it).  Without the option,
an installed fpscan is used if one imports."""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import platform
import shutil
import sys
from pathlib import Path

from ..context import log, one_line
from ..extbuild import Child
from .base import LinearGateScan, Unavailable, linear_scan_skip

NAMES = ("fpscan", "fpscan+T")
SKIP_DIRS = {"build", "dist", "__pycache__", ".git"}


class FpScan(LinearGateScan):
    family = "fpscan"

    def skip_reason(self, B, T, D, dtype):
        return linear_scan_skip(B, T, D, dtype, 32, 65536)


def find_source(path):
    """The sdist to build: a folder with setup.py or pyproject.toml, such a folder ``fpscan-*`` inside
    ``path``, or an ``fpscan-*.tar.gz`` (``path`` itself or inside it)."""
    p = Path(path).expanduser()
    if p.is_file() and p.name.endswith((".tar.gz", ".zip")):
        return p
    if not p.is_dir():
        raise Unavailable(f"--fpscan-src {path}: no such folder or archive")
    if (p / "setup.py").exists() or (p / "pyproject.toml").exists():
        return p
    inner = sorted(d for d in p.glob("fpscan-*") if d.is_dir() and (d / "setup.py").exists())
    archives = sorted(p.glob("fpscan-*.tar.gz"))
    if inner or archives:
        return (inner or archives)[-1]
    raise Unavailable(f"--fpscan-src {path}: no setup.py / pyproject.toml, fpscan-*/ or fpscan-*.tar.gz there")


def source_key(src):
    """Hash of the sources, Python, torch and the arch list: a changed input never reuses a build."""
    h = hashlib.sha256()
    if src.is_file():
        h.update(src.read_bytes())
    else:
        for f in sorted(src.rglob("*")):
            rel = f.relative_to(src)
            if f.is_file() and not (set(rel.parts) & SKIP_DIRS) and not rel.parts[0].endswith(".egg-info"):
                h.update(str(rel).encode() + b"\0" + f.read_bytes())
    try:
        torch_version = importlib.metadata.version("torch")
    except Exception:
        torch_version = "?"
    h.update(f"{platform.python_version()} {torch_version} {os.environ.get('TORCH_CUDA_ARCH_LIST', '')}".encode())
    return h.hexdigest()[:16]


class Build:
    """One fpscan build: started in the background at start-up, awaited before the first section."""

    def __init__(self, args):
        self.args, self.child, self.error, self.site = args, None, None, None
        try:
            src = find_source(args.fpscan_src)
            root = Path(args.fpscan_build_dir or Path.home() / ".cache" / "hgrn_cupy-bench").expanduser()
            final = root / f"fpscan-{source_key(src)}"
            self.site = final / "site"
            if (final / "built").exists():
                return  # built by an earlier run
            tmp = root / f"{final.name}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            target = src
            if src.is_dir():  # build a copy: an in-tree build would leave objects for the next one to reuse
                target = tmp / "src"
                shutil.copytree(src, target, ignore=shutil.ignore_patterns(*SKIP_DIRS, "*.egg-info"))
            env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
            env.setdefault("MAX_JOBS", "4")
            cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                   "--no-cache-dir", "--target", str(tmp / "site"), str(target)]
            self.child = Child(cmd, env=env, what="fpscan build")
            self.tmp, self.final = tmp, final
            log(f"fpscan: building {src.name} in a child process (at most {args.fpscan_timeout:g} s)")
        except Exception as e:
            self.error = e.args[0] if isinstance(e, Unavailable) else one_line(e)

    def wait(self):
        """The folder to import fpscan from; raises Unavailable when the build failed or timed out."""
        if self.error:
            raise Unavailable(self.error)
        if self.child is not None:
            ok, why, seconds = self.child.wait(self.args.fpscan_timeout, " (--fpscan-timeout)")
            if not ok:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.error = why
                raise Unavailable(why)
            log(f"fpscan: built in {seconds:.0f} s")
            shutil.rmtree(self.tmp / "src", ignore_errors=True)
            (self.tmp / "built").write_text("")
            if self.final.exists():  # another run finished the same build first
                shutil.rmtree(self.tmp, ignore_errors=True)
            else:
                self.tmp.rename(self.final)
            self.child = None
        return self.site

    def stop(self):
        if self.child is not None and not self.child.done():
            self.child.kill()
            shutil.rmtree(self.tmp, ignore_errors=True)


def load(ctx, want, build):
    """The selected fpscan implementations, after ``build`` (None: an installed fpscan)."""
    if build is not None:
        site = str(build.wait())
        if site not in sys.path:
            sys.path.insert(0, site)
    try:
        mod = importlib.import_module("fpscan")
    except ImportError as e:
        raise Unavailable(f"not installed ({one_line(e)}; --fpscan-src DIR builds its sdist)") from e
    torch = ctx.torch
    gates = torch.ones(1, 1, 32, device=ctx.device)
    out = mod.pscan(gates, torch.ones_like(gates))  # the extension loads on first call: fail here, once
    if abs(float(out[0, 0, -1]) - 32.0) > 1e-3:
        raise Unavailable(f"a 32-step scan of ones returned {float(out[0, 0, -1]):g}, not 32")
    try:
        ctx.versions["fpscan"] = importlib.metadata.version("fpscan")
    except Exception:
        ctx.versions["fpscan"] = getattr(mod, "__version__", "?")
    return {n: FpScan(ctx, mod.pscan, "", n.endswith("+T")) for n in want}
