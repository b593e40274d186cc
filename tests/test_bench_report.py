"""The pass tables' text without a GPU: the summary's picks of ours best, the best peer and the speed-up,
and the marks of host-bound cells."""
from benchmarks import report


def test_best_cells_and_speed_up_go_by_the_kernels():
    """Ours best is the fastest of the engines' columns and hgrn()'s, each through autograd as the peers.
    A host-bound cell counts by its queued figure when the summary picks the best cells and the
    speed-up: accelerated-scan read 25.7 us through a slow host against ours at 14.5, and 13.1 on the
    device (H200, 4x2048x512 bf16 forward), so it is the best peer and ours is slower, not 1.78x faster.
    A cell within the edge counts by its own time."""
    def ok(ms, device=None):
        return dict(status="ok", ms=ms, host_ms=0.02, device_ms=device)

    row = dict(results={"ours-chunk": ok(0.0145), "ours-fused": ok(0.0864), "ours-auto": ok(0.0148),
                        "fla-chunk": ok(0.171, 0.111), "ascan-triton": ok(0.0257, 0.0131),
                        "ascan-triton+T": ok(0.105)})
    report.summarize_row(row)
    assert (row["ours_best"], row["peer_best"]) == ("ours-chunk", "ascan-triton")
    assert abs(row["speedup"] - 0.0131 / 0.0145) < 1e-12
    row["results"]["ascan-triton"]["device_ms"] = 0.0257 / report.HOST_EDGE * 1.001  # within the edge
    report.summarize_row(row)
    assert abs(row["speedup"] - 0.0257 / 0.0145) < 1e-12
    row["results"]["ours-chunk"].update(ms=0.09, device_ms=0.0140)  # ours host-bound: its dev, and still best
    report.summarize_row(row)
    assert row["ours_best"] == "ours-chunk" and abs(row["speedup"] - 0.0257 / 0.0140) < 1e-12
    row["results"]["ours-auto-direct"] = ok(0.0100)  # no autograd, so not timed as the peers are: never best
    row["results"]["ours-auto"].update(ms=0.0139)  # hgrn() ahead of both engines' columns (a tuned launch)
    report.summarize_row(row)
    assert row["ours_best"] == "ours-auto" and abs(row["speedup"] - 0.0257 / 0.0139) < 1e-12


def test_host_bound_cells_are_marked_and_explained():
    """A cell reads ``*`` and its queued figure (``dev``) in the pass table and the summary, with the
    footnote, where it reads over HOST_EDGE times its timing with the host queued ahead; not within that,
    a host slower than the device included (the flush hides it), nor without a queued figure (not
    measured: the host was under half the flush's time, or a CPU run)."""
    def ok(ms, host, device):
        return dict(status="ok", ms=ms, host_ms=host, device_ms=device)

    edge = 0.103 * report.HOST_EDGE
    row = dict(B=8, T=4096, D=1024, dtype="bfloat16", **{"pass": "fwdbwd"}, floor_ms=0.1, practical_ms=0.1,
               results={"ours-auto": ok(0.227, 0.21, 0.149), "ours-chunk": ok(0.140, 0.07, None),
                        "ours-auto-direct": ok(0.152, 0.08, 0.151), "fla-chunk": ok(edge * 1.01, 0.095, 0.103),
                        "ascan-triton": ok(edge * 0.99, 0.095, 0.103), "fla-fused": ok(0.0047, 0.024, 0.0045)})
    report.summarize_row(row)
    assert row["ours_best"] == "ours-chunk"  # hgrn()'s dev, 0.149, is behind it
    table = report.section_table([row], list(row["results"]))
    body = [c.strip() for c in table.splitlines()[2].split("|")[6:-2]]
    assert [" * dev " in c for c in body] == [True, False, False, True, False, False], body
    assert body[0] == "0.227 (2.27x) * dev 0.149" and body[1] == "0.140 (1.40x)"
    assert report.HOST_NOTE in table
    summary = report.compact_table([row])
    line = summary.splitlines()[2].split("|")
    assert [c.strip() for c in line[6:9]] == ["0.140 (1.40x)", "chunk", "0.227 (1.06x) * dev 0.149"], line  # by dev
    assert report.HOST_NOTE in summary
    row["results"]["ours-auto"]["device_ms"] = 0.2201  # the cell within the edge
    # the marked fla-chunk cell is in the pass table, not in the summary (ours best, auto, best peer)
    assert report.HOST_NOTE in report.section_table([row], list(row["results"]))
    assert report.HOST_NOTE not in report.compact_table([row])
    row["results"]["fla-chunk"]["ms"] = edge * 0.99
    assert report.HOST_NOTE not in report.section_table([row], list(row["results"])) + report.compact_table([row])
