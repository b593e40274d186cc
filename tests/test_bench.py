"""The benchmark package (``python -m benchmarks``) without a GPU: the plan of --quick and of the full
run's pieces, the Triton precompile plan, --dry-run without torch, a --cpu-smoke run end to end
(practical floors, the host-step table and its options, JAX when it imports), the decode and host-step
tables' text, and the probe's gradients against hgrn_cupy.torch's and an independent float64 loop's.
The host-time measurements (test_bench_timing.py) and the pass tables' summary and marks
(test_bench_report.py) have tests of their own."""
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import types

import pytest

from conftest import REPO

from benchmarks import cli, plan as P, precompile, report
from benchmarks.impls.ascan import ASCAN_TRITON_BLOCK, Ascan
from benchmarks.impls.base import Impl


def plan_of(*argv):
    args = cli.parse_args(["--out", "unused", *argv])
    return args, P.build_plan(args), P.extras_plan(args)


def shapes(cases, dtype=None):
    return [(c["B"], c["T"], c["D"]) for c in cases if dtype in (None, c["dtype"])]


def run_module(*argv, timeout=600, pythonpath=None):
    paths = [str(pythonpath)] if pythonpath else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [REPO, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "benchmarks", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def test_quick_plan_keeps_the_headline_and_small_sweeps():
    args, plan, extras = plan_of("--quick")
    head = plan["headline"]
    assert shapes(head, "bfloat16") == P.HEADLINE_SHAPES
    assert all(c["passes"] == ["fwd", "bwd", "fwdbwd"] for c in head if c["dtype"] == "bfloat16")
    assert [(shapes([c])[0], c["passes"]) for c in head if c["dtype"] == "float32"] == \
        [((8, 4096, 2048), ["fwd", "fwdbwd"])]
    assert 2 <= len(plan["tsweep"]) <= 3 and 2 <= len(plan["channels"]) <= 3
    # the sweeps and the host step reuse the headline's D values (fla tunes per D) and T classes
    head_d = {c["D"] for c in head}
    assert {c["D"] for c in plan["tsweep"] + plan["channels"]} <= head_d
    assert {D for _, _, D in extras["hoststep"]} <= head_d
    assert all(c["T"] % 16 == 0 for c in plan["tsweep"] + plan["channels"])
    assert extras["hoststep"] == [(4, 2048, 512), (8, 2048, 1024), (4, 4096, 1024), (1, 32768, 1024),
                                  (8, 4096, 2048), (1, 262144, 256)]
    assert extras["hoststep-options"] == [(4, 2048, 512)] and extras["decode"]
    assert extras["jax-step"] and set(extras["jax-step"]) <= set(extras["hoststep"])
    assert (args.warmup_ms, args.rep_ms, args.budget, args.jax_reps) == (5.0, 25.0, P.QUICK_BUDGET_S, 10)
    assert P.plan_skip_reason(args, "fla-fused", "tsweep") and not P.plan_skip_reason(args, "fla-fused", "headline")
    assert not P.plan_skip_reason(args, "fla-chunk", "hoststep")
    assert P.run_sections(plan, extras) == list(P.RUN_ORDER)


def readme_pieces():
    """The full run's pieces as benchmarks/README.md lists them (argv after ``-m benchmarks``)."""
    with open(os.path.join(REPO, "benchmarks", "README.md")) as f:
        lines = [ln.strip() for ln in f if ln.strip().startswith("python -m benchmarks --out DIR/")]
    return [shlex.split(ln)[3:] for ln in lines]


def test_full_run_pieces_cover_the_full_plan():
    _, full, full_extras = plan_of()
    argvs = readme_pieces()
    assert len(argvs) == 5 and all("--time-limit" in a for a in argvs)
    pieces = [(None, P.build_plan(a), P.extras_plan(a)) for a in map(cli.parse_args, argvs)]
    merged, extras = {}, {}
    for _, piece, piece_extras in pieces:
        for section, cases in piece.items():
            merged.setdefault(section, []).extend(cases)
        for k, v in piece_extras.items():
            assert k not in extras  # each extra section in exactly one piece
            extras[k] = v
    key = lambda c: (c["B"], c["T"], c["D"], c["dtype"], tuple(c["passes"]))  # noqa: E731
    assert {s: sorted(map(key, cs)) for s, cs in merged.items()} == {s: sorted(map(key, cs)) for s, cs in full.items()}
    assert extras == full_extras and set(extras) >= {"hoststep", "decode", "jax-step"}
    assert plan_of("--only", "hoststep")[1] == {} and list(plan_of("--only", "fwd")[2]) == []
    assert cli.parse_args(["--out", "x"]).budget == 0.0
    with pytest.raises(SystemExit):
        plan_of("--dtypes", "float16")
    with pytest.raises(SystemExit):
        plan_of("--only", "headlines")
    with pytest.raises(SystemExit):
        cli.parse_args(["--quick"])  # --out is required unless --dry-run


def test_full_sweeps_cover_both_dtypes_and_every_pass():
    _, full, _ = plan_of("--only", "tsweep,channels")
    for section, count in (("tsweep", len(P.TSWEEP["full"])), ("channels", len(P.CHANNELS["full"]))):
        cases = full[section]
        assert sorted({c["dtype"] for c in cases}) == ["bfloat16", "float32"]
        assert len(cases) == 2 * count and all(c["passes"] == ["fwd", "bwd", "fwdbwd"] for c in cases)
    assert max(c["T"] for c in full["tsweep"]) == 1 << 20
    assert {c["B"] * c["D"] for c in full["channels"]} == {256 << k for k in range(11)}
    _, f32, _ = plan_of("--only", "tsweep", "--sweep-dtypes", "float32")
    assert {c["dtype"] for c in f32["tsweep"]} == {"float32"}
    _, quick, _ = plan_of("--quick", "--only", "tsweep,channels")
    assert all(c["dtype"] == "bfloat16" and c["passes"] == ["fwd", "fwdbwd"] for s in quick.values() for c in s)


def test_precompile_plan_of_quick_names_each_tuning_key_once():
    args, plan, extras = plan_of("--quick")
    groups = precompile.precompile_plan(args, plan, extras)
    fla = [k for grp in groups for k in grp.get("fla", ())]
    ascan = [k for grp in groups for k in grp.get("ascan", ())]
    heads = {D for _, _, D in P.HEADLINE_SHAPES}
    assert {D for e, D, dt, st in fla if e == "chunk" and dt == "bfloat16"} == heads
    assert ["fused", 256, "bfloat16", False] not in fla  # only at T = 2^18: over --fla-fused-max-t
    assert ["fused", 1024, "bfloat16", True] in fla and ["fused", 4096, "bfloat16", True] in fla
    assert ["chunk", 2048, "float32", False] in fla and len(fla) == len({tuple(k) for k in fla}) == 13
    assert sorted(map(tuple, ascan)) == [("bfloat16", 1), ("bfloat16", 16), ("float32", 16)]
    assert precompile.precompile_plan(cli.parse_args(["--out", "x", "--impls", "ours"]), plan, extras) == []
    # the host step alone still precompiles what it runs
    args, plan, extras = plan_of("--quick", "--only", "hoststep")
    fla = [k for grp in precompile.precompile_plan(args, plan, extras) for k in grp.get("fla", ())]
    assert ["chunk", 512, "bfloat16", False] in fla and ["fused", 256, "bfloat16", False] not in fla


def test_compile_only_autotuners_never_cache_their_fake_timings(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    from triton.runtime.autotuner import Autotuner

    pkg = tmp_path / "fake_fla_ops"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import triton\nimport triton.language as tl\n\n\n"
        "@triton.heuristics({'B': lambda args: 1})\n"
        "@triton.autotune(configs=[triton.Config({'BD': 32}), triton.Config({'BD': 64})], key=['D'])\n"
        "@triton.jit\ndef wrapped(x, D: tl.constexpr, BD: tl.constexpr, B: tl.constexpr):\n    pass\n\n\n"
        "@triton.autotune(configs=[triton.Config({'BD': 32})], key=['D'])\n"
        "@triton.jit\ndef plain(x, D: tl.constexpr, BD: tl.constexpr):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("fake_fla_ops")
    precompile.compile_only_autotuners("fake_fla_ops")
    calls = []
    for tuner in (mod.wrapped.fn, mod.plain):
        assert isinstance(tuner, Autotuner)
        assert tuner.cache_results is False
        assert tuner.do_bench(lambda: calls.append(1), quantiles=(0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
        assert tuner.check_disk_cache(("D",), [], lambda: calls.append(2)) is False
    assert calls == [1, 2, 1, 2]


def test_dry_run_prints_the_plan_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['jax'] = None; sys.argv[0] = 'benchmarks'; "
            "from benchmarks.cli import main; sys.exit(main(['--dry-run', '--quick']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert f"budget for peers {P.QUICK_BUDGET_S:g} s" in out and "[tsweep] without fla-chunk, fla-fused" in out
    assert "triton precompile: fla 13 tuning keys" in out
    assert "[hoststep] bfloat16 4x2048x512, 8x2048x1024, 4x4096x1024, 1x32768x1024, 8x4096x2048, 1x262144x256" in out
    assert "ours-auto, ours-probe, ours-auto-direct, fla-chunk" in out and "[jax]" in out and "[decode]" in out
    assert out.index("[headline]") < out.index("[hoststep]") < out.index("[decode]") < out.index("[tsweep]")


def test_cpu_smoke_runs_every_section_and_skips_peers_after_the_budget(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "out"
    run = run_module("--out", str(out), "--quick", "--cpu-smoke", "--budget", "0.001", "--warmup-ms", "0",
                     "--rep-ms", "1", "--decode-calls", "5", "--decode-warmup", "1", "--host-steps", "12",
                     "--jax-reps", "2")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    rows = [r for rows in res["sections"].values() for r in rows]
    assert rows and all(r["results"]["ours-chunk"]["status"] == "ok" for r in rows)
    assert all(r["results"]["ours-auto-direct"]["status"] == "ok" for r in rows)
    assert all(r["practical_ms"] > 0 and r["floor_ms"] > 0 for r in rows)
    fwd = {(r["B"], r["T"], r["D"], r["dtype"]): r["practical_ms"] for r in rows if r["pass"] == "fwd"}
    for r in rows:  # one add per shape, scaled by bytes
        k = (r["B"], r["T"], r["D"], r["dtype"])
        assert r["practical_ms"] == pytest.approx(fwd[k] * {"fwd": 1, "bwd": 5 / 3, "fwdbwd": 8 / 3}[r["pass"]])
    assert all(r["results"]["torch-loop"]["note"] == P.BUDGET_NOTE for r in rows)
    assert res["decode"]["impls"]["torch-eager"]["note"] == P.BUDGET_NOTE and res["decode"]["practical_ms"] > 0
    hs = res["hoststep"]
    assert [(r["B"], r["T"], r["D"]) for r in hs["rows"]] == [(2, 64, 16), (1, 256, 8)]
    for r in hs["rows"]:
        assert r["practical_ms"] > 0
        for name in ("ours-auto", "ours-probe", "ours-auto-direct"):
            cell = r["results"][name]
            assert cell["status"] == "ok" and cell["host_us"] > 0 and cell["device_us"] > 0, (name, cell)
            assert 10 <= cell["steps"] <= 12
        assert "autograd_minus_probe_us" in r and "autograd_minus_probe_step_us" in r
    assert [r["option"] for r in hs["options"]] == list(P.HOSTSTEP_OPTIONS)
    for r in hs["options"]:
        for name in ("ours-auto", "ours-probe"):
            assert r["results"][name]["status"] == "ok" and r["results"][name]["err"] < P.TOL["bfloat16"], r
    if importlib.util.find_spec("jax") is not None:
        jx = res["jax"]
        assert jx["fwdbwd"][0]["results"]["jax-auto"]["status"] == "ok"
        assert jx["fwdbwd"][0]["results"]["jax-assoc-scan"]["note"] == P.BUDGET_NOTE
        step = jx["step"][0]["results"]["jax-auto"]
        assert step["status"] == "ok" and step["host_us"] > 0 and step["device_us"] > 0
    else:
        assert res["jax"] is None and "jax" in res["not_run"]
    assert list(res["seconds"])[-6:] == ["headline", "hoststep", "decode", "tsweep", "channels", "jax"]
    assert res["wall_s"] >= sum(res["seconds"].values()) - 1e-6
    md = (out / "results.md").read_text()
    assert md.startswith("# hgrn_cupy benchmark (cpu-smoke) on cpu") and "copy bandwidth" in md
    assert "## Host us per training step" in md and "practical floor ms (x copy)" in md
    if importlib.util.find_spec("matplotlib") is not None:  # plots are optional (CI installs no matplotlib)
        assert (out / "bw_vs_T.png").exists() and (out / "bw_vs_channels.png").exists()
    assert f"torch-loop {P.BUDGET_NOTE}" in run.stdout
    assert run.stdout.rstrip().splitlines()[-1].startswith("total wall time:")
    again = run_module("--render", str(out / "results.json"), "--out", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "again" / "results.md").read_text() == md  # the run's own tables, from its numbers


def test_without_jax_the_jax_section_is_one_skip_line(tmp_path):
    pytest.importorskip("torch")
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['jax'] = None  # as if not installed\n")
    out = tmp_path / "out"
    run = run_module("--out", str(out), "--cpu-smoke", "--only", "jax", pythonpath=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    skips = [ln for ln in run.stdout.splitlines() if "jax" in ln.lower() and "skip" in ln]
    assert len(skips) == 1 and skips[0].startswith("skipping jax: ") and "import of jax halted" in skips[0]
    res = json.loads((out / "results.json").read_text())
    assert res["jax"] is None and "jax" in res["not_run"] and "## JAX" not in (out / "results.md").read_text()


def test_decode_table_shows_back_to_back_device_time_and_both_floors():
    dec = {"host_shape": [1, 1, 1024], "device_shape": [64, 1, 4096], "dtype": "bfloat16", "calls": 10,
           "device_min_bytes": 3670016, "device_floor_ms": 0.001, "practical_ms": 0.002,
           "impls": {"(empty kernel)": {"status": "ok", "device_ms": 0.004, "b2b_ms": 0.0012},
                     "ours-fused": {"status": "ok", "host_us": 11.5, "device_ms": 0.0062, "b2b_ms": 0.0031},
                     "fla-fused": {"status": "skip", "note": P.BUDGET_NOTE}}}
    table = report.decode_table(dec)
    header = table.splitlines()[0]
    assert "per call" in header and "back to back" in header
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()[2:]
            if line.startswith("|")}
    assert rows["ours-fused"] == ["11.5", "0.0062 (3.10x)", "0.0031 (1.55x)"]
    assert rows["(empty kernel)"][0] == "-" and rows["(empty kernel)"][2] == "0.0012 (0.60x)"
    assert rows["fla-fused"][0].startswith("SKIP") and rows["fla-fused"][2] == "-"
    assert "practical floor 0.002 ms (2.00x the copy floor" in table
    for r in dec["impls"].values():  # without back-to-back figures (CPU runs) the column is left out
        r.pop("b2b_ms", None)
    assert "back to back" not in report.decode_table(dec).splitlines()[0]


def test_host_step_table_reads_host_and_device_against_the_practical_floor():
    def ok(host, dev, how="graph"):
        return dict(status="ok", host_us=host, device_us=dev, device_method=how, steps=300)

    row = dict(B=4, T=2048, D=512, dtype="bfloat16", floor_ms=0.0224, practical_ms=0.04, results={
        "ours-auto": ok(61.0, 44.0), "ours-probe": ok(54.0, 44.0), "ours-auto-direct": ok(50.0, 40.0, "do_bench"),
        "fla-chunk": dict(status="mismatch", note="rel err 1e-1"), "fpscan": dict(status="skip", note="T")},
        autograd_minus_probe_us=7.0)
    table = report.hoststep_table({"rows": [row], "options": []})
    head, _, body = table.splitlines()[:3]
    cells = dict(zip([c.strip() for c in head.split("|")[1:-1]], [c.strip() for c in body.split("|")[1:-1]]))
    assert cells["practical floor us (x copy)"] == "40.0 (1.79x)" and cells["copy floor us"] == "22.4"
    assert cells["ours-auto"] == "61.0 (1.52x) / 44.0 (1.10x)"
    assert cells["ours-auto-direct"] == "50.0 (1.25x) / 40.0 (1.00x)*"  # not from a graph: marked
    assert cells["fla-chunk"] == "MISMATCH" and cells["fpscan"] == "n/a"
    assert cells[report.PROBE_HEADER] == "+7.0 (over 5 us)"
    row.update(autograd_minus_probe_us=4.0, autograd_minus_probe_iqr_us=[-1.5, 6.25],
               autograd_minus_probe_fastest_us=-2.0, autograd_minus_probe_cpu_us=1.5)
    body = report.hoststep_table({"rows": [row], "options": []}).splitlines()[2]
    assert body.split("|")[-2].strip() == "+4.0 [-1.5, +6.2]; fastest -2.0; CPU +1.5"
    row.update(autograd_minus_probe_step_us=5.5, autograd_minus_probe_step_iqr_us=[4.0, 7.25])
    body = report.hoststep_table({"rows": [row], "options": []}).splitlines()[2]
    assert body.split("|")[-2].strip() == ("+4.0 [-1.5, +6.2]; fastest -2.0; CPU +1.5; step by step +5.5 [+4.0, "
                                           "+7.2] (over 5 us)")


def test_ascan_triton_backward_is_skipped_where_it_reads_out_of_bounds():
    ctx = types.SimpleNamespace(torch=None)
    tri, warp = Ascan(ctx, None, "triton", False), Ascan(ctx, None, "warp", False)
    assert (tri.name, Ascan(ctx, None, "warp", True).name) == ("ascan-triton", "ascan-warp+T")
    for pazz in ("bwd", "fwdbwd"):
        for T in (1, 16, 256, ASCAN_TRITON_BLOCK // 2):
            assert "past the end" in tri.pass_skip_reason(pazz, T)
        for T in (ASCAN_TRITON_BLOCK, 4 * ASCAN_TRITON_BLOCK):
            assert tri.pass_skip_reason(pazz, T) is None
        assert warp.pass_skip_reason(pazz, 256) is None
    assert tri.pass_skip_reason("fwd", 256) is None
    assert Impl(ctx).pass_skip_reason("bwd", 256) is None
    assert warp.skip_reason(1, 16, 8, "bfloat16") and tri.skip_reason(1, 16, 8, "bfloat16") is None


@pytest.mark.parametrize("option", P.HOSTSTEP_OPTIONS)
def test_probe_gradients_equal_ours_autograd_and_a_float64_loop(option):
    torch = pytest.importorskip("torch")
    import hgrn_cupy
    import hgrn_cupy.torch as hct

    from benchmarks.checks import loop_hgrn
    from benchmarks.impls.ours import option_steps, probe_functions

    probe, probe_opts = probe_functions(torch, hgrn_cupy)
    ctx = types.SimpleNamespace(torch=torch, hct=hct, probe=probe, probe_opts=probe_opts)
    gen = torch.Generator().manual_seed(1)
    B, T, D = 3, 37, 5
    s = {"x": torch.randn(B, T, D, generator=gen), "do": torch.randn(B, T, D, generator=gen),
         "g": torch.nn.functional.logsigmoid(torch.randn(B, T, D, generator=gen))}
    steps, grads, inputs = option_steps(ctx, s, option)
    ours, by_probe = grads("ours-auto"), grads("ours-probe")
    final = inputs["dht"] is not None
    assert len(ours) == len(by_probe) == (5 if final else 3)
    x, g = (inputs[k].double().requires_grad_(True) for k in ("x", "g"))
    h0 = inputs["h0"].double().requires_grad_(True) if final else None
    o, ht = loop_hgrn(torch, x, g, h0, inputs["cu"], inputs["reverse"])
    outs, cot = ((o, ht), (inputs["do"], inputs["dht"])) if final else ((o,), (inputs["do"],))
    ref = outs + torch.autograd.grad(outs, (x, g) + ((h0,) if final else ()), tuple(c.double() for c in cot))
    for a, b, r in zip(ours, by_probe, ref):
        assert a.shape == b.shape == r.shape
        torch.testing.assert_close(b.double(), a.double(), rtol=1e-6, atol=1e-6)  # probe == hgrn_cupy.torch
        torch.testing.assert_close(a.double(), r.detach(), rtol=1e-4, atol=1e-4)  # both == the loop
    if option in ("varlen", "all"):
        assert inputs["x"].shape == (1, B * T, D) and inputs["cu"].tolist()[-1] == B * T
        assert len(set(torch.diff(inputs["cu"]).tolist())) > 1  # uneven lengths
    for step in steps.values():  # the timed callables run and return the gradients
        assert len(step()) == (3 if final else 2)


def test_results_name_no_folder_of_the_machine_that_ran():
    """results.json's argv keeps path-valued options' last component alone (either spelling), the rest as given."""
    argv = ["--out", "/a/b/bench/", "--quick", "--fpscan-src=/c/fpscan.tar.gz", "--fpscan-build-dir", "/e/f"]
    assert cli.portable_argv(argv) == ["--out", "bench", "--quick", "--fpscan-src=fpscan.tar.gz", "--fpscan-build-dir", "f"]


def test_revision_marks_a_tree_whose_tracked_files_differ_from_head(tmp_path):
    from benchmarks.context import revision

    assert revision(tmp_path) == "unknown"  # not a repository
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    (tmp_path / "a.txt").write_text("one\n")
    subprocess.run(git + ["add", "a.txt"], check=True)
    subprocess.run(git + ["commit", "-qm", "one"], check=True)
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    (tmp_path / "untracked.txt").write_text("ignored by the mark\n")
    assert revision(tmp_path) == head
    (tmp_path / "a.txt").write_text("two\n")
    assert revision(tmp_path) == head + "+changes"
