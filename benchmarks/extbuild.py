"""Builds of the peers' CUDA extensions (accelerated-scan's warp scan, fpscan) in child processes under
a time limit: a build that fails or hangs costs one line and a skipped column, never the run.  A
child runs in its own process group, so a timeout kills the compilers it started too."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time


class Child:
    """A command running in the background; ``wait`` gives (ok, one-line reason on failure, seconds)."""

    def __init__(self, cmd, env=None, cwd=None, what="build"):
        self.what, self.t0 = what, time.perf_counter()
        self.out = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT, env=env, cwd=cwd, text=True,
                                     start_new_session=True)
        self.result = None

    def done(self):
        return self.result is not None or self.proc.poll() is not None

    def wait(self, timeout, timeout_hint=""):
        """Wait up to ``timeout`` seconds in all from the start; kill on expiry."""
        if self.result is not None:
            return self.result
        left = max(0.0, timeout - (time.perf_counter() - self.t0))
        try:
            self.proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            self.kill()
            self.result = (False, f"{self.what} took more than {timeout:g} s{timeout_hint}",
                           time.perf_counter() - self.t0)
            return self.result
        self.out.seek(0)
        text = self.out.read()
        self.out.close()
        seconds = time.perf_counter() - self.t0
        if self.proc.returncode != 0:
            self.result = (False, f"{self.what} failed (exit {self.proc.returncode}): {last_error(text)}", seconds)
        else:
            self.result = (True, "", seconds)
        return self.result

    def kill(self):
        with contextlib.suppress(Exception):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=30)
        with contextlib.suppress(Exception):
            self.out.close()


# pip's own framing around a failed build: never the reason itself
PIP_FRAMING = ("subprocess-exited-with-error", "metadata-generation-failed", "encountered error while",
               "did not run successfully", "this error originates", "failed-wheel-build", "failed to build",
               "could not build wheels", "see above", "note:", "hint:", "end of output")


def last_error(text):
    """The line of a build log that says most: the first compiler diagnostic (the cause; later ones
    often follow from it), else the last line naming an error, else the last line."""
    lines = [ln.strip(" \t\u2502\u2570\u2500>\u00d7") for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not any(f in ln.lower() for f in PIP_FRAMING)]
    diags = [ln for ln in lines if "fatal error" in ln.lower() or ": error" in ln.lower()]
    errs = [ln for ln in lines if "error" in ln.lower()]
    return ((diags[:1] or errs[-1:] or lines[-1:] or ["no output"])[0])[:200]
