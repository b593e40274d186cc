"""``hgrn_cupy.torch.use_in_fla``: fla's HGRN layer module takes our functions and gives its own back.

CPU: against a stand-in ``fla.layers.hgrn`` module (the names fla's layer calls), so the switch is
tested without fla.  GPU with fla installed: ``examples/fla_hgrn.py`` trains fla's layer both ways and
compares the losses.
"""
import importlib.util
import os
import subprocess
import sys
import types

import pytest
from conftest import REPO

torch = pytest.importorskip("torch")
import hgrn_cupy.torch as htorch  # noqa: E402


@pytest.fixture
def fake_fla(monkeypatch):
    """A module at ``fla.layers.hgrn`` holding fla's two names, as fla's layer imports them."""
    def theirs_chunk(*args, **kwargs):
        return "fla-chunk"

    def theirs_fused(*args, **kwargs):
        return "fla-fused"
    pkgs = {name: types.ModuleType(name) for name in ("fla", "fla.layers", "fla.layers.hgrn")}
    pkgs["fla.layers.hgrn"].chunk_hgrn = theirs_chunk
    pkgs["fla.layers.hgrn"].fused_recurrent_hgrn = theirs_fused
    for name, mod in pkgs.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return pkgs["fla.layers.hgrn"], theirs_chunk, theirs_fused


def test_switch_and_back(fake_fla):
    """Both of fla's names run hgrn (the device's measured engine) by default, their namesakes with
    engine="named"; fla's own come back whatever was switched in between, and a bad engine is refused."""
    layer, theirs_chunk, theirs_fused = fake_fla
    assert htorch.use_in_fla() is layer
    assert layer.chunk_hgrn is htorch.hgrn and layer.fused_recurrent_hgrn is htorch.hgrn
    htorch.use_in_fla(engine="named")  # twice: fla's own are still what comes back
    assert layer.chunk_hgrn is htorch.chunk_hgrn and layer.fused_recurrent_hgrn is htorch.fused_recurrent_hgrn
    htorch.use_in_fla(False)
    assert layer.chunk_hgrn is theirs_chunk and layer.fused_recurrent_hgrn is theirs_fused
    with pytest.raises(ValueError, match="engine"):
        htorch.use_in_fla(engine="chunk")
    assert layer.chunk_hgrn is theirs_chunk


def test_switched_layer_calls_compute_hgrn(fake_fla):
    """The keyword arguments fla's layer passes reach our function and give the reference."""
    layer, _, _ = fake_fla
    htorch.use_in_fla()
    g = torch.nn.functional.logsigmoid(torch.randn(2, 7, 3, dtype=torch.float64))
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    o, ht = layer.chunk_hgrn(x=x, g=g, initial_state=None, output_final_state=True)
    import hgrn_cupy as hc

    o_ref, ht_ref = hc.naive_recurrent_hgrn(x.numpy(), g.numpy(), None, True)
    assert torch.allclose(o, torch.from_numpy(o_ref), rtol=1e-12, atol=0)
    assert torch.allclose(ht, torch.from_numpy(ht_ref), rtol=1e-12, atol=0)
    htorch.use_in_fla(False)


def test_without_fla_it_says_so(monkeypatch):
    if importlib.util.find_spec("fla") is not None:
        pytest.skip("fla is installed")
    with pytest.raises(ImportError):
        htorch.use_in_fla()


@pytest.mark.gpu
def test_fla_layer_trains_alike_on_both_kernels():
    if importlib.util.find_spec("fla") is None:
        pytest.skip("fla is not installed (carry fla-core and flash-linear-attention wheels)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))  # this tree's
    run = subprocess.run([sys.executable, os.path.join(REPO, "examples", "fla_hgrn.py")], capture_output=True,
                         text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
