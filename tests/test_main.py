"""``python -m hgrn_cupy``: the self-check runs (GPU kernels where a GPU is visible, the CPU path
otherwise), prints its table and exits 0."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_python_m_hgrn_cupy():
    run = subprocess.run([sys.executable, "-m", "hgrn_cupy"], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    print(run.stdout, run.stderr)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "hgrn_cupy:" in out and "NumPy:" in out
    assert "pass" in out and "FAIL" not in out
