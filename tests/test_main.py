"""``python -m hgrn_cupy``: the self-check runs (GPU kernels where a GPU is visible, the CPU path
otherwise), prints its table and exits 0; ``--help`` says what it does, and arguments it does not
know are refused."""
import subprocess
import sys

from conftest import REPO


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


def test_help_and_unknown_arguments(capsys):
    """``--help`` prints what the command does and names ``tune``; a word it does not know is refused
    (argparse's exit status 2) instead of running the check."""
    import pytest

    from hgrn_cupy.__main__ import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "float64 reference" in out and "hgrn_cupy tune" in out
    with pytest.raises(SystemExit) as done:
        main(["tnue"])
    assert done.value.code == 2
    assert "unrecognized arguments: tnue" in capsys.readouterr().err


def test_tune_refuses_an_unknown_dtype(capsys):
    """``tune --dtype`` takes the float dtypes by name and refuses anything else before looking for a GPU."""
    import pytest

    from hgrn_cupy.__main__ import main

    for bad in ("fp16", "int32"):
        with pytest.raises(SystemExit) as done:
            main(["tune", "--dtype", bad])
        assert done.value.code == 2
        assert f"invalid choice: '{bad}'" in capsys.readouterr().err
