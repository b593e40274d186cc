"""The peers' adapters on CPU: stand-ins for fla, accelerated-scan and fpscan (pure PyTorch loops with
each peer's signature, layout and gate convention, written here) go through a --cpu-smoke run, so
each adapter's mapping onto our op (layouts, exp of the gates, d/dg from d/da) meets the reference
check; one stand-in is wrong on purpose and must read MISMATCH, untimed.  Also fpscan's build: a
failing or hanging build is one skip line, and the sdist is found in the forms --fpscan-src takes."""
import json
import os
import subprocess
import sys
import tarfile
import time
import types

import pytest

from conftest import REPO

from benchmarks.extbuild import last_error
from benchmarks.impls import fpscan

SCAN_BDT = '''
import torch


def scan(gates, tokens):
    """h[t] = gates[t] * h[t-1] + tokens[t] along the last axis of [B, D, T], in float32."""
    a, x = gates.float(), tokens.float()
    h, outs = torch.zeros_like(x[..., 0]), []
    for t in range(x.shape[-1]):
        h = a[..., t] * h + x[..., t]
        outs.append(h)
    return torch.stack(outs, -1).to(tokens.dtype)
'''

FLA_HGRN = '''
import os

import torch


def _run(x, g, initial_state, output_final_state, wrong):
    a = g.float() if wrong else torch.exp(g.float())  # the wrong one forgets that gates are in log space
    h = x.new_zeros(x.shape[0], x.shape[2], dtype=torch.float32) if initial_state is None else initial_state.float()
    outs = []
    for t in range(x.shape[1]):
        h = a[:, t] * h + x[:, t].float()
        outs.append(h)
    return torch.stack(outs, 1).to(x.dtype), (h if output_final_state else None)


def chunk_hgrn(x, g, initial_state=None, output_final_state=False):
    return _run(x, g, initial_state, output_final_state, False)


def fused_recurrent_hgrn(x, g, initial_state=None, output_final_state=False):
    return _run(x, g, initial_state, output_final_state, os.environ.get("FAKE_FLA_FUSED_WRONG") == "1")
'''


def write(root, files):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    root = tmp_path_factory.mktemp("peers")
    write(root, {"fla/__init__.py": "", "fla/ops/__init__.py": "", "fla/ops/hgrn/__init__.py": FLA_HGRN,
                 "accelerated_scan/__init__.py": "", "accelerated_scan/scalar.py": SCAN_BDT,
                 "fpscan/__init__.py": SCAN_BDT + "\n\npscan = scan\n__version__ = '0.0-fake'\n"})
    return root


def run(out, *argv, pythonpath=(), env=None):
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join([REPO, *map(str, pythonpath), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "benchmarks", "--out", str(out), "--quick", "--cpu-smoke",
                           "--warmup-ms", "0", "--rep-ms", "1", "--host-steps", "10", *argv],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=env)


def test_peer_adapters_agree_with_the_reference_and_a_wrong_peer_is_not_timed(tmp_path, fakes):
    pytest.importorskip("torch")
    out = tmp_path / "out"
    proc = run(out, "--only", "headline,hoststep", "--dtypes", "bfloat16", "--budget", "0",
               "--impls", "ours-chunk,fla,ascan-triton,fpscan", pythonpath=[fakes],
               env={"FAKE_FLA_FUSED_WRONG": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    rows = {(r["B"], r["T"], r["D"], r["pass"]): r["results"] for r in res["sections"]["headline"]}
    for pazz in ("fwd", "bwd", "fwdbwd"):  # T = 64: every adapter that takes it agrees with ours
        cells = rows[(2, 64, 32, pazz)]
        for name in ("fla-chunk", "fpscan", "fpscan+T") + (("ascan-triton", "ascan-triton+T") if pazz == "fwd" else ()):
            assert cells[name]["status"] == "ok" and cells[name]["ms"] > 0, (name, pazz, cells[name])
        assert cells["fla-fused"]["status"] == "mismatch" and "ms" not in cells["fla-fused"]
    assert "past the end" in rows[(2, 64, 32, "bwd")]["ascan-triton"]["note"]
    assert rows[(1, 200, 16, "fwd")]["fpscan"]["note"] == "T not a power of two"
    assert rows[(3, 1, 8, "fwd")]["fpscan+T"]["status"] == "skip"
    step = res["hoststep"]["rows"][0]["results"]
    for name in ("fla-chunk", "fpscan", "fpscan+T"):
        assert step[name]["status"] == "ok" and step[name]["host_us"] > 0, (name, step[name])
    assert step["fla-fused"]["status"] == "mismatch" and "host_us" not in step["fla-fused"]
    assert res["meta"]["versions"]["fpscan"] == "0.0-fake"


def test_a_failing_fpscan_build_is_one_skip_line(tmp_path):
    pytest.importorskip("torch")
    bad = tmp_path / "src" / "fpscan-0.0"
    write(bad, {"setup.py": "raise SystemExit('error: nvcc not found here')\n"})
    proc = run(tmp_path / "out", "--only", "headline", "--impls", "ours-chunk,fpscan", "--fpscan-src",
               str(bad.parent), "--fpscan-build-dir", str(tmp_path / "builds"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("skipping fpscan")]
    assert lines == [f"skipping {n}: fpscan build failed (exit 1): error: nvcc not found here" for n in
                     ("fpscan", "fpscan+T")]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "nvcc not found" in res["not_run"]["fpscan"]
    assert all("fpscan" not in r["results"] for r in res["sections"]["headline"])
    assert all(r["results"]["ours-chunk"]["status"] == "ok" for r in res["sections"]["headline"])
    assert not any((tmp_path / "builds").glob("fpscan-*/built"))  # nothing half-built is kept



def test_a_hanging_fpscan_build_is_stopped_at_its_time_limit(tmp_path):
    src = tmp_path / "fpscan-0.0"
    write(src, {"setup.py": "import time\ntime.sleep(600)\n"})
    args = types.SimpleNamespace(fpscan_src=str(src), fpscan_build_dir=str(tmp_path / "builds"), fpscan_timeout=3.0)
    build = fpscan.Build(args)
    t0 = time.perf_counter()
    with pytest.raises(fpscan.Unavailable, match=r"fpscan build took more than 3 s \(--fpscan-timeout\)"):
        build.wait()
    assert time.perf_counter() - t0 < 30
    assert not list((tmp_path / "builds").iterdir())  # the half-built folder is gone
    with pytest.raises(fpscan.Unavailable, match="took more than"):
        build.wait()  # asked again (fpscan+T): the same reason, no second build


def test_fpscan_source_is_found_in_each_form_and_keyed_by_its_contents(tmp_path):
    sdist = tmp_path / "dl" / "fpscan-0.1.2"
    write(sdist, {"setup.py": "# v1\n", "fpscan/__init__.py": "", "build/junk.o": "x"})
    assert fpscan.find_source(sdist) == sdist
    assert fpscan.find_source(sdist.parent) == sdist
    archive = tmp_path / "only-archive" / "fpscan-0.1.2.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(sdist, arcname="fpscan-0.1.2")
    assert fpscan.find_source(archive.parent) == archive == fpscan.find_source(archive)
    with pytest.raises(fpscan.Unavailable):
        fpscan.find_source(tmp_path / "missing")
    with pytest.raises(fpscan.Unavailable):
        fpscan.find_source(tmp_path)
    key = fpscan.source_key(sdist)
    (sdist / "build" / "junk.o").write_text("changed build output")
    assert fpscan.source_key(sdist) == key  # build leftovers are not sources
    (sdist / "setup.py").write_text("# v2\n")
    assert fpscan.source_key(sdist) != key


def test_build_log_reason_is_the_first_compiler_error():
    log = ("building 'fpscan._C'\nscan.cu(12): error: identifier \"x\" is undefined\nscan.cu(20): error: more\n"
           "error: command '/usr/bin/nvcc' failed with exit code 1\n  error: subprocess-exited-with-error\n"
           "note: This error originates from a subprocess\n")
    assert last_error(log) == 'scan.cu(12): error: identifier "x" is undefined'
    assert last_error("ok\nerror: command 'nvcc' failed\n") == "error: command 'nvcc' failed"
    assert last_error("") == "no output"
