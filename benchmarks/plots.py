"""PNG plots of a benchmark report (matplotlib, Agg backend: no display needed).

``write_plots(report, json_path)`` writes ``<stem>-memory.png`` (RSS and anonymous memory over time,
one panel per process, load phases marked) and ``<stem>-latency.png`` (p50/p90/p99 per scenario, log
scale) next to the JSON report and returns their paths.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DPI = 100
WIDTH_IN = 10.0
PANEL_HEIGHT_IN = 2.2
LATENCY_SIZE_IN = (10.0, 4.5)

MEMORY_TARGETS_MB = {
    "search": {"RSS target": 300.0, "anon target": 200.0},
    "all": {"RSS target": 450.0},
}
"""Issue 13's memory targets, drawn as dotted lines on the panels they apply to."""

LATENCY_SCENARIOS = (
    ("search, 20 req/s", ("search", "open_loop_20rps")),
    ("search, closed loop", ("search", "closed_loop")),
    ("all, 20 req/s during burst", ("all", "open_loop_20rps_during_burst")),
    ("seed, 20 req/s", ("seed_baseline", "open_loop_20rps")),
    ("seed, closed loop", ("seed_baseline", "closed_loop")),
)


def latency_rows(report: dict) -> list[tuple[str, dict]]:
    """(label, loadgen summary) for every latency scenario present in ``report``, families' after the main run's."""
    rows = []
    for label, (section, key) in LATENCY_SCENARIOS:
        summary = (report.get(section) or {}).get(key)
        if summary:
            rows.append((label, summary))
    for name, fam in (report.get("families") or {}).items():
        for role, key in (("search", "open_loop_20rps"), ("all", "open_loop_20rps_during_burst")):
            summary = (fam.get(role) or {}).get(key)
            if summary:
                rows.append((f"{name}: {role}", summary))
    return rows


def memory_plot(report: dict, path: Path) -> Path:
    timelines = report.get("timelines") or {}
    if not timelines:
        raise ValueError("report has no timelines")
    fig, axes = plt.subplots(len(timelines), 1, figsize=(WIDTH_IN, PANEL_HEIGHT_IN * len(timelines)), dpi=DPI, squeeze=False)
    top = max(max(tl["rss_mb"], default=0.0) for tl in timelines.values()) * 1.15 or 1.0
    for ax, (label, tl) in zip(axes[:, 0], timelines.items(), strict=True):
        ax.plot(tl["t_s"], tl["rss_mb"], label="RSS", color="tab:blue")
        ax.plot(tl["t_s"], tl["anon_mb"], label="anonymous", color="tab:orange")
        for name, y in MEMORY_TARGETS_MB.get(label, {}).items():
            ax.axhline(y, linestyle=":", color="tab:red", linewidth=1)
            ax.text(0, y, f" {name} {y:.0f}", color="tab:red", fontsize=7, va="bottom")
        for k, (name, t) in enumerate((tl.get("marks") or {}).items()):
            ax.axvline(t, linestyle="--", color="grey", linewidth=0.8)
            ax.text(t, top * (0.97 - 0.1 * (k % 2)), f" {name}", fontsize=7, va="top", color="dimgrey")
        ax.set_ylim(0, top)
        ax.set_ylabel("MB")
        ax.set_title(f"{label}: peak RSS {max(tl['rss_mb'], default=0):.0f} MB, anon {max(tl['anon_mb'], default=0):.0f} MB", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="lower right", fontsize=8)
    axes[-1, 0].set_xlabel("seconds since process start")
    fig.suptitle(f"memory per process, {report.get('products', '?')} products ({report.get('created', '')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def latency_plot(report: dict, path: Path) -> Path:
    rows = latency_rows(report)
    if not rows:
        raise ValueError("report has no latency scenarios")
    fig, ax = plt.subplots(figsize=LATENCY_SIZE_IN, dpi=DPI)
    width = 0.27
    for k, pct in enumerate(("p50_ms", "p90_ms", "p99_ms")):
        xs = [i + (k - 1) * width for i in range(len(rows))]
        ax.bar(xs, [max(summary.get(pct) or 0.0, 0.1) for _, summary in rows], width, label=pct.removesuffix("_ms"))
    ax.set_xticks(range(len(rows)), [label for label, _ in rows], rotation=25, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("request -> reply (ms)")
    ax.axhline(100, linestyle=":", color="tab:red", linewidth=1)
    ax.axhline(200, linestyle=":", color="tab:red", linewidth=1)
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("latency percentiles per scenario (targets: search p99 <= 100 ms, all during burst p99 <= 200 ms)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def write_plots(report: dict, json_path: Path) -> list[Path]:
    """Both plots next to ``json_path``; a plot whose data is absent from the report is skipped."""
    out = []
    if report.get("timelines"):
        out.append(memory_plot(report, json_path.with_name(f"{json_path.stem}-memory.png")))
    if latency_rows(report):
        out.append(latency_plot(report, json_path.with_name(f"{json_path.stem}-latency.png")))
    return out
