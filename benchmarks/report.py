"""The tables, as Markdown text from the results' plain dicts (no torch): the pass tables and their
summary, decode, host time per training step (and its options), the two JAX tables and the launches the
tuner stored.

Every time is shown with its ratio to the practical floor (``torch.add(x, g, out=o)`` with the
forward's traffic, timed the same way, scaled by bytes), and every table shows the practical floor's
own ratio to the copy floor (minimal bytes over the measured copy bandwidth) next to ours."""
from __future__ import annotations

from hgrn_cupy.tuning import bucket_counts

from .plan import IMPLS, OURS, OURS_BEST

PROBE_MARGIN_US = 5.0  # how far ours-auto may sit above the minimal probe's host time per step
# A cell is host-bound where it reads more than HOST_EDGE times the same timing with the host queued ahead
# (``timing.Timer.queued``, measured where the host takes half the L2 flush's time or more to queue a call):
# what it adds is the host's.  Such a cell times the host (torch's autograd, Python, launches), not the
# kernels, and its order between implementations follows the lent machine's CPU.  Such cells are marked,
# with the queued figure.  (A host quicker than the flush does not make one: do_bench queues each call
# behind its L2 flush.)
HOST_EDGE = 1.05
HOST_NOTE = (f"`*` host-bound: the cell read over {HOST_EDGE:.2f}x its own timing with the host queued ahead (`dev`: the "
             "same flushed calls, CUDA events, queued behind a wait), so it times the host (torch's autograd "
             "included), not the kernels; compare kernels by `dev`, as the best cells and speed-ups do.")


def fmt_ms(ms):
    if ms is None:
        return "-"
    return f"{ms:.3g}" if ms < 0.1 else f"{ms:.3f}" if ms < 100 else f"{ms:.1f}"


def ratio(t, floor):
    return f"{t / floor:.2f}x" if t is not None and floor else "?"


def cell_text(c, practical_ms):
    st = c.get("status")
    if st == "ok":
        return f"{fmt_ms(c['ms'])} ({ratio(c['ms'], practical_ms)}){mark(c)}"
    return {"mismatch": "MISMATCH", "error": "ERROR"}.get(st, "n/a")


def host_bound(c):
    if c.get("status") != "ok" or c.get("device_ms") is None:
        return False
    return c["ms"] > HOST_EDGE * c["device_ms"]


def mark(c):
    """`` *``, with the device's time per call, on a host-bound cell; else nothing."""
    return f" * dev {fmt_ms(c['device_ms'])}" if host_bound(c) else ""


def kernel_ms(c):
    """What a cell says of the kernels: its queued figure where it is host-bound, else its own time."""
    return c["device_ms"] if host_bound(c) else c["ms"]


def summarize_row(row):
    """Best of ours, best peer, and the speed-up of one over the other, by what the cells say of the
    kernels (``kernel_ms``): a host-bound cell would rank the lent machine's CPU."""
    ok = {n: kernel_ms(c) for n, c in row["results"].items() if c.get("status") == "ok"}
    ours = {n: ms for n, ms in ok.items() if n in OURS_BEST}
    peers = {n: ms for n, ms in ok.items() if n not in OURS}
    row["ours_best"] = min(ours, key=ours.get) if ours else None
    row["peer_best"] = min(peers, key=peers.get) if peers else None
    row["speedup"] = (peers[row["peer_best"]] / ours[row["ours_best"]]) if ours and peers else None


def host_note(cells):
    """The footnote of a table showing ``cells``, where one of them is host-bound, else an empty string."""
    return "\n\n" + HOST_NOTE if any(host_bound(c) for c in cells) else ""


def floor_cells(row, unit="ms"):
    """[copy floor, practical floor (x copy floor)] of a row, in ms or us."""
    k = 1e3 if unit == "us" else 1.0
    fmt = (lambda v: f"{v * k:.1f}") if unit == "us" else fmt_ms
    prac = row.get("practical_ms")
    return [fmt(row["floor_ms"]), "-" if prac is None else f"{fmt(prac)} ({ratio(prac, row['floor_ms'])})"]


def md_table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def shape_text(row):
    return f"{row['B']}x{row['T']}x{row['D']}"


def speedup_text(row):
    if not row.get("speedup"):
        return "-"
    return f"{row['speedup']:.2f}x ({row['ours_best'][5:]} vs {row['peer_best']})"


def notes_text(rows, impl_names, where=lambda r: f"{shape_text(r)} {r['dtype']} {r.get('pass', '')}".rstrip()):
    """One line per (implementation, status, note) that left cells out, with where."""
    notes = {}
    for r in rows:
        for n in impl_names:
            c = r["results"].get(n, {})
            if c.get("status") in ("skip", "mismatch", "error") and c.get("note"):
                key = (n, c["status"], c["note"] if c["status"] != "mismatch" else "")
                notes.setdefault(key, []).append(where(r) + (f" ({c['note']})" if c["status"] == "mismatch" else ""))
    lines = []
    for (n, st, note), places in notes.items():
        text = "; ".join(places[:4]) + (f"; +{len(places) - 4} more" if len(places) > 4 else "")
        lines.append(f"- {n} {st}" + (f": {note}" if note else "") + f" [{text}]")
    return "\n".join(lines)


def used_impls(rows, order=IMPLS):
    seen = set()
    for r in rows:
        seen.update(r["results"])
    return [n for n in order if n in seen]


def section_table(rows, impl_names):
    headers = (["shape", "dtype", "pass", "copy floor ms", "practical floor ms (x copy)"] + list(impl_names)
               + ["ours best vs best peer"])
    body = []
    for r in rows:
        cells = [shape_text(r), r["dtype"], r["pass"]] + floor_cells(r)
        cells += [cell_text(r["results"].get(n, {}), r.get("practical_ms")) for n in impl_names]
        body.append(cells + [speedup_text(r)])
    notes = notes_text(rows, impl_names)
    shown = (r["results"].get(n, {}) for r in rows for n in impl_names)
    return md_table(headers, body) + host_note(shown) + ("\n\n" + notes if notes else "")


def compact_table(rows):
    headers = ["shape", "dtype", "pass", "copy floor ms", "practical floor ms (x copy)", "ours best (x practical)",
               "column", "auto (x best)", "direct (x auto)", "best peer (x practical)", "peer", "speed-up"]
    body, shown = [], []
    for r in rows:
        res, prac = r["results"], r.get("practical_ms")
        ob, pb = r.get("ours_best"), r.get("peer_best")
        ob_ms = res[ob]["ms"] if ob else None
        auto, direct = res.get("ours-auto", {}), res.get("ours-auto-direct", {})
        auto_ok = auto.get("status") == "ok"
        shown += [auto] + [res[n] for n in (ob, pb) if n]
        auto_txt = (f"{fmt_ms(auto['ms'])} ({kernel_ms(auto) / kernel_ms(res[ob]):.2f}x){mark(auto)}"
                    if auto_ok and ob_ms else cell_text(auto, prac) if auto else "-")
        direct_txt = (f"{fmt_ms(direct['ms'])} ({direct['ms'] / auto['ms']:.2f}x)"
                      if auto_ok and direct.get("status") == "ok" else "-")
        body.append([shape_text(r), r["dtype"], r["pass"]] + floor_cells(r) + [
            f"{fmt_ms(ob_ms)} ({ratio(ob_ms, prac)}){mark(res[ob])}" if ob else "-", ob[5:] if ob else "-",
            auto_txt, direct_txt,
            f"{fmt_ms(res[pb]['ms'])} ({ratio(res[pb]['ms'], prac)}){mark(res[pb])}" if pb else "-", pb or "-",
            f"{r['speedup']:.2f}x" if r.get("speedup") else "-"])
    return md_table(headers, body) + host_note(shown)


def decode_table(dec):
    dshape = 'x'.join(map(str, dec['device_shape']))
    headers = ["impl", f"host us/call ({'x'.join(map(str, dec['host_shape']))}, state in+out)",
               f"device ms per call ({dshape}, state in+out)", f"device ms per step, back to back ({dshape})"]
    body = []
    prac = dec.get("practical_ms")
    b2b = any("b2b_ms" in r for r in dec["impls"].values())
    for name, r in dec["impls"].items():
        host = (f"{r['host_us']:.1f}" if "host_us" in r else "-" if name.startswith("(") else
                r.get("status", "?").upper() + (f" ({r['note'][:60]})" if r.get("note") else ""))
        dev = (f"{fmt_ms(r['device_ms'])} ({ratio(r['device_ms'], prac)})" if "device_ms" in r
               else "ERROR" if "device_note" in r else "-")
        row = [name, host, dev]
        if b2b:
            row.append(f"{fmt_ms(r['b2b_ms'])} ({ratio(r['b2b_ms'], prac)})" if "b2b_ms" in r else "-")
        body.append(row)
    if not b2b:
        headers = headers[:3]
    fl = dec["device_floor_ms"]
    note = (f"\n\nCopy floor {fmt_ms(fl)} ms ({dec['device_min_bytes'] / 1e6:.2f} MB: x, g, o in {dec['dtype']} "
            f"+ float32 state in and out); practical floor {fmt_ms(prac)} ms ({ratio(prac, fl)} the copy floor: "
            f"torch.add of x, g into o, scaled to those bytes); device cells read `ms (x practical)`. "
            f"{dec['calls']} calls per host figure, synchronised once at the end.")
    if b2b:
        note += (" Per call: the timer's median with L2 flushed before each call, which includes a fixed cost "
                 "per launch (the empty kernel's row, `torch.cuda._sleep(0)`). Back to back: CUDA events around "
                 "batches of calls on rotating inputs, queued behind a spin so they run without host gaps, as "
                 "in a decode loop.")
    return md_table(headers, body) + note


def step_cell(c, practical_ms):
    """``host us (x practical) / device us (x practical)`` of one training-step cell."""
    st = c.get("status")
    if st != "ok" or "host_us" not in c:
        return {"mismatch": "MISMATCH", "error": "ERROR"}.get(st, "n/a")
    prac_us = practical_ms * 1e3 if practical_ms else None
    dev = (f"{c['device_us']:.1f} ({ratio(c['device_us'], prac_us)})" + ("" if c.get("device_method") in
                                                                          (None, "graph") else "*")
           if "device_us" in c else "-")
    return f"{c['host_us']:.1f} ({ratio(c['host_us'], prac_us)}) / {dev}"


PROBE_HEADER = ("ours-auto - probe, host us (paired blocks: median [quartiles]; fastest blocks; CPU time; "
                "step by step: median [quartiles])")


def _over(us):
    """The mark of a difference to the probe beyond the 5 us the eager path is held to."""
    return "" if us <= PROBE_MARGIN_US else " (over 5 us)"


def probe_text(row):
    diff = row.get("autograd_minus_probe_us")
    if diff is None:
        return "-"
    iqr, fastest = row.get("autograd_minus_probe_iqr_us"), row.get("autograd_minus_probe_fastest_us")
    cpu = row.get("autograd_minus_probe_cpu_us")
    spread = f" [{iqr[0]:+.1f}, {iqr[1]:+.1f}]" if iqr else ""
    fast = f"; fastest {fastest:+.1f}" if fastest is not None else ""
    cpu_text = f"; CPU {cpu:+.1f}" if cpu is not None else ""
    step, step_iqr = row.get("autograd_minus_probe_step_us"), row.get("autograd_minus_probe_step_iqr_us")
    step_text = "" if step is None else (f"; step by step {step:+.1f} [{step_iqr[0]:+.1f}, {step_iqr[1]:+.1f}]"
                                         + _over(step))
    return f"{diff:+.1f}{spread}{_over(diff)}{fast}{cpu_text}{step_text}"


def hoststep_table(res):
    rows = res["rows"]
    names = used_impls(rows, order=IMPLS + ("ours-probe",))
    names = [n for n in ("ours-auto", "ours-probe", "ours-auto-direct") if n in names] + \
        [n for n in names if n not in OURS]
    headers = (["shape", "copy floor us", "practical floor us (x copy)"] + names
               + [PROBE_HEADER])
    body = [[shape_text(r)] + floor_cells(r, "us") + [step_cell(r["results"].get(n, {}), r["practical_ms"])
                                                      for n in names] + [probe_text(r)] for r in rows]
    notes = notes_text(rows, names, where=shape_text)
    return md_table(headers, body) + ("\n\n" + notes if notes else "")


def options_table(res):
    names = ("ours-auto", "ours-probe")
    headers = ["shape", "option", "practical floor us (x copy)"] + list(names) + [PROBE_HEADER,
                                                                                 "rel err (auto / probe)"]
    body = []
    for r in res["options"]:
        errs = [r["results"].get(n, {}).get("err") for n in names]
        body.append([shape_text(r), r["option"], floor_cells(r, "us")[1]]
                    + [step_cell(r["results"].get(n, {}), r["practical_ms"]) for n in names]
                    + [probe_text(r), " / ".join("-" if e is None else f"{e:.1e}" for e in errs)])
    notes = notes_text(res["options"], names, where=lambda r: f"{shape_text(r)} {r['option']}")
    return md_table(headers, body) + ("\n\n" + notes if notes else "")


JAX_FWDBWD = ("jax-auto", "jax-chunk", "jax-fused", "torch", "jax-assoc-scan")


def jax_fwdbwd_table(rows):
    names = [n for n in JAX_FWDBWD if any(n in r["results"] for r in rows)]
    headers = ["shape", "dtype", "copy floor ms", "practical floor ms (x copy)"] + names + ["rel err auto/chunk/fused"]
    body = []
    for r in rows:
        errs = [r["results"].get(n, {}).get("err") for n in JAX_FWDBWD[:3]]
        body.append([shape_text(r), r["dtype"]] + floor_cells(r)
                    + [cell_text(r["results"].get(n, {}), r["practical_ms"]) for n in names]
                    + ["/".join("-" if e is None else f"{e:.1e}" for e in errs)])
    notes = notes_text(rows, names, where=lambda r: f"{shape_text(r)} {r['dtype']}")
    return md_table(headers, body) + ("\n\n" + notes if notes else "")


def jax_step_table(rows):
    headers = ["shape", "copy floor us", "practical floor us (x copy)", "host us per step (x practical)",
               "device us per step (x practical)", "steps", "input sets", "rel err (dx, dg)"]
    body = []
    for r in rows:
        c, prac_us = r["results"].get("jax-auto", {}), r["practical_ms"] * 1e3
        if c.get("status") == "ok":
            dev = f"{c['device_us']:.1f} ({ratio(c['device_us'], prac_us)})" if "device_us" in c else "ERROR"
            cells = [f"{c['host_us']:.1f} ({ratio(c['host_us'], prac_us)})", dev, str(c["steps"]),
                     str(c["input_sets"]), f"{c['err']:.1e}"]
        else:
            cells = [c.get("status", "?").upper(), "-", "-", "-", f"{c['err']:.1e}" if "err" in c else "-"]
        body.append([shape_text(r)] + floor_cells(r, "us") + cells)
    return md_table(headers, body)


def bucket_text(b):
    """The counts a power-of-two bucket of ``hgrn_cupy.tuning.shape_class`` holds (its bit length ``b``)."""
    lo, hi = bucket_counts(b)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def tuner_table(decisions):
    """The tuner's decisions, rows of ``[direction, x dtype, g dtype, varlen, T bucket, N*D bucket, launch]``."""
    headers = ["pass", "dtypes (x / g)", "varlen", "T", "channels (N x D)", "launch"]
    body = [[("fwd", "bwd")[d], f"{xd} / {gd}", "yes" if varlen else "no", bucket_text(tb), bucket_text(nb), name]
            for d, xd, gd, varlen, tb, nb, name in sorted(decisions, key=lambda r: tuple(r[:6]))]
    return md_table(headers, body)
