"""The launches the tuner stored, as a run records them (no GPU): ``hgrn_cupy.tuning.stored`` answers the
decisions of one device, and the benchmark's results.md lists them by pass, dtypes and the ranges of T and
N x D that each shape class covers."""
import json
from pathlib import Path

import pytest

from benchmarks import cli
from benchmarks.report import bucket_text, tuner_table
from hgrn_cupy import tuning

DEV, OTHER = "Fake GPU|sm_90|driver 1|runtime 1|hgrn_cupy test", "Other GPU|sm_80|driver 1|runtime 1|hgrn_cupy test"
STORED = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "h100" / "2fde6e5" / "quick.json"


@pytest.fixture
def memory(tmp_path, monkeypatch):
    monkeypatch.setenv("HGRN_CUPY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning.settings, "on_disk", False)
    tuning.forget()
    yield
    tuning.forget()


def test_stored_answers_one_device_as_shape_class_tuples(memory):
    fwd = tuning.shape_class(0, ("bfloat16", "bfloat16"), 4, 2048, 512, False)
    bwd = tuning.shape_class(1, ("float32", "bfloat16"), 1, 300, 96, True)
    times = {"chunk": 1e-6, "fused_recurrent": 2e-6}

    def run(name):
        run.last = name

    def measure(fn):
        fn()
        return times[run.last]

    for device, key in ((DEV, fwd), (DEV, bwd), (OTHER, fwd)):
        tuning.choose(device, key, ("fused_recurrent", "chunk"), run, "fused_recurrent", True, measure=measure)
    times["chunk"] = 3e-6
    tuning.choose(OTHER, bwd, ("chunk", "fused_recurrent"), run, "chunk", True, measure=measure)
    tuning._memory[DEV, "not a class"] = tuning._memory[DEV, "[1, 2]"] = "chunk"  # as a hand-edited file may hold
    assert tuning.stored(DEV) == {fwd: "chunk", bwd: "chunk"}
    assert tuning.stored(OTHER) == {fwd: "chunk", bwd: "fused_recurrent"}
    assert tuning.stored("No such GPU") == {}


@pytest.mark.parametrize("bits, text", [(0, "0"), (1, "1"), (2, "2-3"), (12, "2048-4095")])
def test_a_bucket_reads_as_the_counts_it_holds(bits, text):
    assert bucket_text(bits) == text
    if bits:  # the first and last count of the range have that bit length
        lo, _, hi = text.partition("-")
        assert int(lo).bit_length() == bits and int(hi or lo).bit_length() == bits


def test_a_bucket_holds_exactly_the_counts_whose_bucket_it_is():
    for b in range(40):
        lo, hi = tuning.bucket_counts(b)
        assert tuning._bucket(lo) == tuning._bucket(hi) == b, (b, lo, hi)
        assert (lo == 0 or tuning._bucket(lo - 1) == b - 1) and tuning._bucket(hi + 1) == b + 1, (b, lo, hi)


def test_the_table_lists_each_class_in_order():
    rows = [[1, "bfloat16", "bfloat16", False, 12, 12, "chunk"],
            [0, "float32", "float32", True, 9, 10, "fused_recurrent"],
            [0, "bfloat16", "bfloat16", False, 13, 23, "fused_recurrent, 8-byte lanes"]]
    lines = tuner_table(rows).splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["pass", "dtypes (x / g)", "varlen", "T",
                                                                  "channels (N x D)", "launch"]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    assert cells == [
        ["fwd", "bfloat16 / bfloat16", "no", "4096-8191", "4194304-8388607", "fused_recurrent, 8-byte lanes"],
        ["fwd", "float32 / float32", "yes", "256-511", "512-1023", "fused_recurrent"],
        ["bwd", "bfloat16 / bfloat16", "no", "2048-4095", "2048-4095", "chunk"]]


def test_results_md_has_the_section_only_where_the_run_recorded_decisions(tmp_path):
    results = json.loads(STORED.read_text())
    assert "tuning" not in results  # recorded before the run kept its decisions
    cli.render(str(STORED), str(tmp_path / "before"))
    assert "## Launches the tuner stored" not in (tmp_path / "before" / "results.md").read_text()
    results["tuning"] = {"device": DEV, "decisions": [[0, "bfloat16", "bfloat16", False, 12, 12, "chunk"]]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    cli.render(str(tmp_path / "results.json"), str(tmp_path / "after"))
    md = (tmp_path / "after" / "results.md").read_text()
    section = md.split("## Launches the tuner stored", 1)[1].split("\n## ", 1)[0]
    assert DEV in section and "| fwd " in section and "| 2048-4095 " in section and "| chunk " in section
    assert md.index("## Launches the tuner stored") < md.index("## Summary (headline)")
