"""The experiment scripts (``benchmarks/experiments``) without a GPU: their own kernels compile with NVRTC
for sm_90, the lines they patch in the library's kernels are there, the knobs they set exist, and the
multi-GPU script's whole path runs on CPU processes over gloo.  A rename or a kernel edit that would
break a device run fails here first."""
import os
import subprocess
import sys

import pytest

from conftest import REPO

EXPERIMENTS = os.path.join(REPO, "benchmarks", "experiments")


# script -> kernels its --compile-only builds: stream_schedule.cu's own; the tile walks after common.cuh
# (the staged one after tile_walk.cu too); the two passes after the tile walk's pieces; the pipelined chunk
# forward after chunk.cu; the staged block walks and the walk fed by tensor-map copies after
# fused_block_walk.cuh; every variant and dtype.
OWN_KERNELS = {"stream_schedule.py": 62, "tile_walk.py": 16, "two_pass.py": 16, "chunk_pipe.py": 14,
               "block_pipe.py": 60, "tma_walk.py": 48, "tile_stage.py": 14}


@pytest.fixture(scope="module")
def compiles():
    """Every script's --compile-only, started at once (NVRTC runs in each process; the CPUs share them):
    ``{script: Popen}``, each test reads its own."""
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="cupy (with its NVRTC bindings) is not installed")
    procs = {script: subprocess.Popen([sys.executable, os.path.join(EXPERIMENTS, script), "--compile-only"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for script in OWN_KERNELS}
    yield procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


@pytest.mark.parametrize("script", list(OWN_KERNELS))
def test_experiment_kernels_compile(script, compiles):
    """An experiment's own kernels compile with NVRTC for sm_90 (its --compile-only), so that a device run
    of the experiment does not find them broken."""
    out, err = compiles[script].communicate(timeout=300)
    expect = f"{OWN_KERNELS[script]} kernels compiled for sm_90"
    assert compiles[script].returncode == 0 and expect in out, out + err


def test_experiment_source_patches_match_the_kernels():
    """Every line the experiments replace in the library's kernel sources (chunk_lookback's bounds,
    stream_schedule's barrier-free bound, cache_hints' access spellings, chunk_stage's staged words) is
    there as often as they expect, and each patch changes the source: a kernel edit that moves one fails
    here, not on the device."""
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="cupy (with its NVRTC bindings) is not installed")
    folder = EXPERIMENTS
    sys.path.insert(0, folder)
    try:
        import cache_hints
        import chunk_lookback
        import chunk_stage
        import stream_schedule
    finally:
        sys.path.remove(folder)
    nvrtc, chunk, _ = chunk_lookback.library()
    shipped = nvrtc.read_source(chunk.SOURCE)
    patched = [chunk_lookback.patched_source(nvrtc, chunk, name) for name in chunk_lookback.PATCHES]
    patched.append(chunk_stage.staged(chunk, 3, [chunk_lookback.NO_LOOKBACK]))
    patched.append(chunk_lookback.patched_source(nvrtc, chunk, stream_schedule.BOUND, [stream_schedule.NO_CARRY]))
    _, engines, _ = cache_hints.library()
    for replacements in (cache_hints.NC_LOADS, cache_hints.PLAIN_STORES, cache_hints.spelled()):
        patched.append(cache_hints.hinted(nvrtc, engines, replacements))
    patched.append(cache_hints.hinted(nvrtc, [chunk], [cache_hints.PREFETCH]))
    for settings in patched:
        sources = next(value for _, attribute, value in settings if attribute == "_sources")
        assert sources[chunk.SOURCE] != shipped


def test_staged_chunk_forward_compiles():
    """chunk_stage's kernels (the staged forward; the backward with its words of o in shared memory, three
    blocks a SM) compile with NVRTC for sm_90 in every dtype the script times, vector and scalar, and its
    launcher stand-in answers every name the chunk engine asks of ``hgrn_cupy.nvrtc``."""
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="cupy (with its NVRTC bindings) is not installed")
    sys.path.insert(0, EXPERIMENTS)
    try:
        import _kernels
        import chunk_stage
    finally:
        sys.path.remove(EXPERIMENTS)
    chunk, _ = chunk_stage.library()
    settings = {attribute: value for _, attribute, value in chunk_stage.staged(chunk, 3)}
    from hgrn_cupy import nvrtc

    names = [nvrtc.instantiation(kernel, dt, dt, False, vec) for kernel in chunk.KERNELS
             for dt in ("bfloat16", "float32") for vec in (1, 16 // nvrtc.ITEMSIZE[dt])]
    names += [nvrtc.instantiation(chunk.STAGED_KERNEL, dt, dt, False, 16 // nvrtc.ITEMSIZE[dt])
              for dt in ("bfloat16", "float32")]
    _kernels.compile_only(settings["_sources"][chunk.SOURCE], chunk.SOURCE, names,
                          list(nvrtc.BASE_OPTIONS) + list(settings["OPTIONS"]))
    used = {"get_function", "prefer_shared", "hold_shared", "blocks_at_once", "bind", "instantiation", "ITEMSIZE",
            "accumulation_dtype"}
    assert all(hasattr(settings["nvrtc"], name) for name in used)


def test_launch_experiments_set_what_the_library_has():
    """Every setting the chunk engine's and the block walks' experiment groups make names an attribute
    the library has (a rename fails here, not on the device), and the shared-memory kernel that
    chunk_launch's carveout-after group runs first compiles with NVRTC for sm_90."""
    nvrtc_lib = pytest.importorskip("cupy_backends.cuda.libs.nvrtc",
                                    reason="cupy (with its NVRTC bindings) is not installed")
    folder = EXPERIMENTS
    sys.path.insert(0, folder)
    try:
        import chunk_launch
        import fused_block_walk
    finally:
        sys.path.remove(folder)
    chunk, config, _, nvrtc = chunk_launch.library()
    fused, comp, _ = fused_block_walk.library()
    tables = [chunk_launch.groups(chunk, config, nvrtc), fused_block_walk.groups(fused, comp)]
    settings = [s for table in tables for group in table.values() for variant in group[1].values() for s in variant]
    assert settings and all(hasattr(obj, name) for obj, name, _ in settings)
    prog = nvrtc_lib.createProgram(chunk_launch.HOG, "hog.cu", [], [])
    try:
        nvrtc_lib.compileProgram(prog, ["--gpu-architecture=sm_90"])
    finally:
        nvrtc_lib.destroyProgram(prog)


def test_block_walk_experiment_patches_take_the_engines_arguments():
    """Under each variant of fused_block_walk's groups, the patched pieces answer the calls the engine makes
    (compile options with and without a window's steps, the kernel names of both modules), so a change of
    the engine's signatures fails here and not on the device."""
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="cupy (with its NVRTC bindings) is not installed")
    sys.path.insert(0, EXPERIMENTS)
    try:
        import _common
        import fused_block_walk
    finally:
        sys.path.remove(EXPERIMENTS)
    fused, comp, _ = fused_block_walk.library()
    for group, (_, variants, _) in fused_block_walk.groups(fused, comp).items():
        for name, settings in variants.items():
            with _common.patched(*settings):
                for dt in ("bfloat16", "float32"):
                    long, short = fused.options(dt, dt), fused.options(dt, dt, fused.SHORT_STEPS)
                    assert f"-DHC_BLOCK_STEPS={fused.SHORT_STEPS}" in short, (group, name)
                    assert f"-DHC_BLOCK_WARPS={fused.BLOCK_WARPS}" in long, (group, name)
                    assert fused.names(dt, dt), (group, name)
                    fused.short_window_names(dt, dt)  # empty where no block walk is launched


def test_multi_gpu_experiment_runs_on_cpu_processes():
    """benchmarks/experiments/cp_nccl.py --smoke: the multi-GPU script's whole path (spawned ranks, the
    context-parallel call and the single call, timing, the table) on two CPU processes over gloo; each
    rank's outputs and gradients match the single call on its slice."""
    pytest.importorskip("torch")
    script = os.path.join(EXPERIMENTS, "cp_nccl.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, script, "--smoke"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| 2x37x5 |")]
    assert [r[1].strip() for r in rows] == ["fwd", "fwd+bwd"], done.stdout
    for r in rows:
        assert all(float(e) < 1e-6 for e in r[6].split("/")), done.stdout
