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


def test_self_check_on_a_plain_install():
    """numpy alone (no CuPy, ml_dtypes, torch or JAX importable): the CPU checks run in float32 and pass."""
    code = ("import sys, runpy\n"
            "for name in ('cupy', 'cupy_backends', 'ml_dtypes', 'torch', 'jax'):\n"
            "    sys.modules[name] = None\n"
            "sys.argv = ['hgrn_cupy']\n"
            "runpy.run_module('hgrn_cupy', run_name='__main__')\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "float32" in run.stdout and "FAIL" not in run.stdout, run.stdout
