"""benchmarks/bench.py without a GPU: the plan of --quick and of the full run's pieces, the Triton
precompile plan and its compile-only autotuners, and a --cpu-smoke run under a spent time budget."""
import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "bench.py")
sys.path.insert(0, os.path.dirname(SCRIPT))
bench = importlib.import_module("bench")


def plan_of(*argv):
    args = bench.parse_args(["--out", "unused", *argv])
    return args, bench.build_plan(args)


def shapes(cases, dtype=None):
    return [(c["B"], c["T"], c["D"]) for c in cases if dtype in (None, c["dtype"])]


def test_quick_plan_keeps_the_headline_and_small_sweeps():
    args, plan = plan_of("--quick")
    head = plan["headline"]
    assert shapes(head, "bfloat16") == bench.HEADLINE_SHAPES
    assert all(c["passes"] == ["fwd", "bwd", "fwdbwd"] for c in head if c["dtype"] == "bfloat16")
    assert [(shapes([c])[0], c["passes"]) for c in head if c["dtype"] == "float32"] == \
        [((8, 4096, 2048), ["fwd", "fwdbwd"])]
    assert 2 <= len(plan["tsweep"]) <= 3 and 2 <= len(plan["channels"]) <= 3
    # the sweeps reuse the headline's D values (fla tunes per D) and T classes (accelerated-scan)
    head_d = {c["D"] for c in head}
    assert {c["D"] for c in plan["tsweep"] + plan["channels"]} <= head_d
    assert all(c["T"] % 16 == 0 for c in plan["tsweep"] + plan["channels"])
    assert (args.warmup_ms, args.rep_ms, args.budget) == (5.0, 25.0, bench.QUICK_BUDGET_S)
    assert bench.plan_skip_reason(args, "fla-fused", "tsweep") and not bench.plan_skip_reason(args, "fla-fused",
                                                                                               "headline")


def test_full_run_pieces_cover_the_full_plan():
    _, full = plan_of()
    pieces = [plan_of("--only", "headline", "--dtypes", "bfloat16")[1],
              plan_of("--only", "headline", "--dtypes", "float32")[1],
              plan_of("--only", "tsweep")[1], plan_of("--only", "channels")[1]]
    merged = {}
    for piece in pieces:
        for section, cases in piece.items():
            merged.setdefault(section, []).extend(cases)
    key = lambda c: (c["B"], c["T"], c["D"], c["dtype"], tuple(c["passes"]))  # noqa: E731
    assert {s: sorted(map(key, cs)) for s, cs in merged.items()} == \
        {s: sorted(map(key, cs)) for s, cs in full.items()}
    assert bench.parse_args(["--out", "x"]).budget == 0.0
    with pytest.raises(SystemExit):
        plan_of("--dtypes", "float16")


def test_full_sweeps_cover_both_dtypes_and_every_pass():
    _, full = plan_of("--only", "tsweep,channels")
    for section, count in (("tsweep", len(bench.TSWEEP["full"])), ("channels", len(bench.CHANNELS["full"]))):
        cases = full[section]
        assert sorted({c["dtype"] for c in cases}) == ["bfloat16", "float32"]
        assert len(cases) == 2 * count and all(c["passes"] == ["fwd", "bwd", "fwdbwd"] for c in cases)
    assert max(c["T"] for c in full["tsweep"]) == 1 << 20
    assert {c["B"] * c["D"] for c in full["channels"]} == {256 << k for k in range(11)}
    _, f32 = plan_of("--only", "tsweep", "--sweep-dtypes", "float32")
    assert {c["dtype"] for c in f32["tsweep"]} == {"float32"}
    _, quick = plan_of("--quick", "--only", "tsweep,channels")
    assert all(c["dtype"] == "bfloat16" and c["passes"] == ["fwd", "fwdbwd"] for s in quick.values() for c in s)


def test_precompile_plan_of_quick_names_each_tuning_key_once():
    args, plan = plan_of("--quick")
    groups = bench.precompile_plan(args, plan, decode=True)
    fla = [k for grp in groups for k in grp.get("fla", ())]
    ascan = [k for grp in groups for k in grp.get("ascan", ())]
    heads = {D for _, _, D in bench.HEADLINE_SHAPES}
    assert {D for e, D, dt, st in fla if e == "chunk" and dt == "bfloat16"} == heads
    assert (["fused", 256, "bfloat16", False] not in fla)  # only at T = 2^18: over --fla-fused-max-t
    assert ["fused", 1024, "bfloat16", True] in fla and ["fused", 4096, "bfloat16", True] in fla
    assert ["chunk", 2048, "float32", False] in fla and len(fla) == len({tuple(k) for k in fla})
    assert sorted(map(tuple, ascan)) == [("bfloat16", 1), ("bfloat16", 16), ("float32", 16)]
    assert bench.precompile_plan(bench.parse_args(["--out", "x", "--impls", "ours"]), plan, True) == []


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
    bench.compile_only_autotuners("fake_fla_ops")
    calls = []
    for tuner in (mod.wrapped.fn, mod.plain):
        assert isinstance(tuner, Autotuner)
        assert tuner.cache_results is False
        assert tuner.do_bench(lambda: calls.append(1), quantiles=(0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
        assert tuner.check_disk_cache(("D",), [], lambda: calls.append(2)) is False
    assert calls == [1, 2, 1, 2]


def test_dry_run_prints_the_plan_without_torch():
    run = subprocess.run([sys.executable, SCRIPT, "--out", "unused", "--quick", "--dry-run"], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "budget for peers 100 s" in run.stdout and "[tsweep] without fla-chunk, fla-fused" in run.stdout
    assert "triton precompile: fla 13 tuning keys" in run.stdout


def test_cpu_smoke_under_a_spent_budget_skips_peers_and_logs_the_time(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, SCRIPT, "--out", str(out), "--quick", "--cpu-smoke", "--budget", "0.001",
                          "--warmup-ms", "0", "--rep-ms", "1", "--decode-calls", "5", "--decode-warmup", "1"],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    rows = [r for rows in res["sections"].values() for r in rows]
    assert rows and all(r["results"]["ours-chunk"]["status"] == "ok" for r in rows)
    assert all(r["results"]["torch-loop"]["note"] == bench.BUDGET_NOTE for r in rows)
    assert res["decode"]["impls"]["torch-eager"]["note"] == bench.BUDGET_NOTE
    assert list(res["seconds"])[-4:] == ["headline", "decode", "tsweep", "channels"]
    assert res["wall_s"] >= sum(res["seconds"].values()) - 1e-6
    if importlib.util.find_spec("matplotlib") is not None:  # plots are optional (CI installs no matplotlib)
        assert (out / "bw_vs_T.png").exists() and (out / "bw_vs_channels.png").exists()
    assert f"torch-loop {bench.BUDGET_NOTE}" in run.stdout
    assert run.stdout.rstrip().splitlines()[-1].startswith("total wall time:")


def test_decode_table_shows_back_to_back_device_time_and_the_empty_kernel():
    dec = {"host_shape": [1, 1, 1024], "device_shape": [64, 1, 4096], "dtype": "bfloat16", "calls": 10,
           "device_min_bytes": 3670016, "device_floor_ms": 0.001,
           "impls": {"(empty kernel)": {"status": "ok", "device_ms": 0.004, "b2b_ms": 0.0012},
                     "ours-fused": {"status": "ok", "host_us": 11.5, "device_ms": 0.0062, "b2b_ms": 0.0031},
                     "fla-fused": {"status": "skip", "note": bench.BUDGET_NOTE}}}
    table = bench.decode_table(dec)
    header = table.splitlines()[0]
    assert "per call" in header and "back to back" in header
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()[2:]
            if line.startswith("|")}
    assert rows["ours-fused"] == ["11.5", "0.0062 (6.20x)", "0.0031 (3.10x)"]
    assert rows["(empty kernel)"][0] == "-" and rows["(empty kernel)"][2] == "0.0012 (1.20x)"
    assert rows["fla-fused"][0].startswith("SKIP") and rows["fla-fused"][2] == "-"
    # without back-to-back figures (CPU runs, older results) the column is left out
    for r in dec["impls"].values():
        r.pop("b2b_ms", None)
    assert "back to back" not in bench.decode_table(dec).splitlines()[0]


def test_ascan_triton_backward_is_skipped_where_it_reads_out_of_bounds():
    ctx = type("Ctx", (), {"torch": None})()
    tri, warp = bench.Ascan(ctx, None, "triton", False), bench.Ascan(ctx, None, "warp", False)
    block = bench.ASCAN_TRITON_BLOCK
    for pazz in ("bwd", "fwdbwd"):
        for T in (1, 16, 256, block // 2):
            assert "past the end" in tri.pass_skip_reason(pazz, T)
        for T in (block, 4 * block):
            assert tri.pass_skip_reason(pazz, T) is None
        assert warp.pass_skip_reason(pazz, 256) is None
    assert tri.pass_skip_reason("fwd", 256) is None
    assert bench.Impl(ctx).pass_skip_reason("bwd", 256) is None
