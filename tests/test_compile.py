"""Every kernel instantiation the library can request compiles with NVRTC alone, warning-free.

Needs no GPU: NVRTC compiles for a named architecture.  Runs in CI, which has no GPU.
"""
import importlib.resources

import pytest

pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="cupy (with its NVRTC bindings) is not installed")

from hgrn_cupy import _compile, chunk, fused_recurrent  # noqa: E402

ARCHS = ("sm_80", "sm_90")
# Each engine's launcher picks its compile options per dtype pair; compile exactly those.
OPTIONS = {"chunk": chunk.options, "fused_recurrent": fused_recurrent.options}


def _kernel_files():
    return sorted((f for f in importlib.resources.files("kernels_cu").iterdir()
                   if f.name.endswith((".cu", ".cuh"))), key=lambda f: f.name)


def test_instantiation_list_covers_every_engine_and_dtype_pair():
    got = set(_compile.all_instantiations())
    want = {(e, xd, gd) for e in _compile.ENGINES for xd in _compile.DTYPES for gd in _compile.DTYPES}
    assert got == want
    assert set(OPTIONS) == set(_compile.ENGINES), "a new engine needs its compile options here"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "engine, x_dtype, g_dtype",
    [pytest.param(*inst, id=f"{inst[0]}-x_{inst[1]}-g_{inst[2]}") for inst in _compile.all_instantiations()],
)
def test_compiles_without_warnings(engine, x_dtype, g_dtype, arch):
    log = _compile.compile_for_arch(engine, x_dtype, g_dtype, arch, OPTIONS[engine](x_dtype, g_dtype))
    assert "warning" not in log.lower(), f"NVRTC warnings for {engine} ({x_dtype}, {g_dtype}) on {arch}:\n{log}"
    assert "error" not in log.lower(), log


@pytest.mark.parametrize("engine", sorted(_compile.ENGINES))
def test_folded_source_has_no_include_left(engine):
    src = _compile.read_source(_compile.ENGINES[engine][0])
    assert "#include" not in src.replace(" ", "").replace("\t", "")


@pytest.mark.parametrize("source", [pytest.param(f, id=f.name) for f in _kernel_files()])
def test_sources_need_no_cuda_headers(source):
    text = source.read_text()
    lines = [ln for ln in text.splitlines() if ln.lstrip().startswith("#") and "include" in ln and "<" in ln]
    assert not lines, f"{source.name} includes system or toolkit headers: {lines}"


def test_kernel_sources_ship():
    names = {f.name for f in _kernel_files()}
    assert {_compile.ENGINES[e][0] for e in _compile.ENGINES} <= names
    assert any(n.endswith(".cuh") for n in names)
