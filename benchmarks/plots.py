"""The sweep plots: achieved bandwidth (minimal bytes / time) against T and against channels, one panel
per pass and dtype, with the copy bandwidth as a line and torch.add (the practical floor) as a series.
matplotlib is optional: without it the run says so in one line and draws nothing."""
from __future__ import annotations

from .context import log, one_line
from .plan import OURS, PASSES
from .report import used_impls


def plot_sweep(results, rows, xkey, xlabel, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        log(f"no plot {path.name}: {one_line(e)}")
        return
    passes = [p for p in PASSES if any(r["pass"] == p for r in rows)]
    dtypes = [d for d in ("bfloat16", "float32") if any(r["dtype"] == d for r in rows)]
    if not passes:
        return
    fig, axes = plt.subplots(len(dtypes), len(passes), figsize=(6.5 * len(passes), 4.8 * len(dtypes)),
                             squeeze=False)
    copy_bw = (results.get("copy") or {}).get("gbps")
    panels = [(axes[i][j], p, d) for i, d in enumerate(dtypes) for j, p in enumerate(passes)]
    for ax, p, d in panels:
        prow = [r for r in rows if r["pass"] == p and r["dtype"] == d]
        if not prow:
            ax.set_visible(False)
            continue
        for name in used_impls(prow):
            pts = sorted((xkey(r), r["min_bytes"] / (r["results"][name]["ms"] * 1e-3) / 1e9) for r in prow
                         if r["results"].get(name, {}).get("status") == "ok")
            if pts:
                style = "-o" if name in OURS else "--s" if name.startswith("fla") else ":^"
                ax.plot([a for a, _ in pts], [b for _, b in pts], style, label=name, markersize=4)
        add = sorted((xkey(r), r["min_bytes"] / (r["practical_ms"] * 1e-3) / 1e9) for r in prow
                     if r.get("practical_ms"))
        if add:
            ax.plot([a for a, _ in add], [b for _, b in add], "-", color="gray", linewidth=2, alpha=0.6,
                    label="torch.add (practical floor)")
        if copy_bw:
            ax.axhline(copy_bw, color="black", linewidth=1, label=f"copy {copy_bw:.0f} GB/s")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("achieved bandwidth, minimal bytes / time (GB/s)")
        ax.set_title(f"{p} ({d})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{results['meta']['device'].get('device')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
