"""Turn the raw results of a run into side-by-side tables, JSON and a chart."""

from __future__ import annotations

import json
from pathlib import Path

# Rows are (label, ours, reference, format, bar) where bar is (">=" | "<=", limit)
# on ours / reference, None for figures shown for context, or NO_RATIO where a
# ratio means nothing (how busy the machine was).
NO_RATIO = False


def _ratio(ours, ref):
    if ours is None or ref is None or ref == 0:
        return None
    return ours / ref


def _verdict(ratio, bar):
    if not bar:
        return ""
    op, limit = bar
    if ratio is None:
        return f"{op}{limit:g}  n/a"
    ok = ratio >= limit if op == ">=" else ratio < limit if op == "<" else ratio <= limit
    return f"{op}{limit:g}  {'PASS' if ok else 'FAIL'}"


def _cell(value, fmt):
    return "-" if value is None else format(value, fmt)


def table(title: str, rows: list[tuple[str, object, object, str, tuple | None]]) -> str:
    """rows: (label, ours, reference, format, bar)."""
    header = ("", "ours", "reference", "ratio", "bar")
    lines = []
    body = []
    for label, ours, ref, fmt, bar in rows:
        ratio = None if bar is NO_RATIO else _ratio(ours, ref)
        body.append((label, _cell(ours, fmt), _cell(ref, fmt), _cell(ratio, ".2f"), _verdict(ratio, bar)))
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(5)]
    lines.append(title)
    fmt_line = "  ".join(f"{{:<{widths[0]}}}" if i == 0 else f"{{:>{widths[i]}}}" for i in range(5))
    lines.append(fmt_line.format(*header))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(fmt_line.format(*r) for r in body)
    return "\n".join(lines)


def markdown_table(rows: list[tuple[str, object, object, str, tuple | None]]) -> str:
    out = ["| | ours | reference | ratio | bar |", "|---|---:|---:|---:|---|"]
    for label, ours, ref, fmt, bar in rows:
        ratio = None if bar is NO_RATIO else _ratio(ours, ref)
        out.append(
            f"| {label} | {_cell(ours, fmt)} | {_cell(ref, fmt)} | {_cell(ratio, '.2f')} | {_verdict(ratio, bar)} |"
        )
    return "\n".join(out)


def _get(d, *path):
    for key in path:
        if d is None:
            return None
        d = d.get(key) if isinstance(d, dict) else None
    return d


def best_round(result: dict, *path):
    """The lowest value of `path` over a result's rounds (the result itself
    when it had one round): the bar on CPU per update is on each server's
    best round, the others having been disturbed more."""
    values = [_get(r, *path) for r in result.get("rounds") or [result]] if result else []
    values = [v for v in values if v is not None]
    return min(values) if values else None


def common_steps(ours: dict, ref: dict) -> set[int]:
    """The offered loads at which both servers met the latency bar (p99
    under the limit, nothing lost or misrouted)."""
    from bench.records_bench import P99_LIMIT_MS

    def passed(result):
        return {
            s["step"]
            for s in result.get("steps", [])
            if s["lost"] == 0 and s["misrouted"] == 0 and s["p99_ms"] is not None and s["p99_ms"] < P99_LIMIT_MS
        }

    return passed(ours) & passed(ref)


def common_step(ours: dict, ref: dict) -> int | None:
    """The highest offered load at which both servers met the latency bar, so
    CPU per delivery is compared at the same load."""
    both = common_steps(ours, ref)
    return max(both) if both else None


def median_cpu(result: dict, steps: set[int]):
    values = sorted(
        s["cpu_us_per_delivery"] for s in result.get("steps", [])
        if s["step"] in steps and s.get("cpu_us_per_delivery") is not None
    )
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def cpu_at(result: dict, rate) -> tuple[float | None, int]:
    """CPU per delivery at one offered load: the mean over every round that
    ran it (the best round alone is one short step, and this figure is what
    a near-saturated step disturbs most), and how many rounds that was."""
    rounds = result.get("rounds") or [result]
    values = [
        s["cpu_us_per_delivery"]
        for run in rounds
        for s in run.get("steps", [])
        if s.get("target_per_s") == rate and s.get("cpu_us_per_delivery") is not None
    ]
    if not values:
        return None, 0
    return sum(values) / len(values), len(values)


def records_rows(ours: dict, ref: dict, polling: bool = False) -> list:
    """The records table; `polling`: the long-polling scenario, whose bars
    are the reference's rate and 0.7x its CPU (issue 14), with no memory bar."""
    step = common_step(ours, ref)
    both = common_steps(ours, ref)

    def at(result, key):
        if step is None:
            return _get(result, "headline", key)
        return next((s[key] for s in result.get("steps", []) if s["step"] == step), None)

    rate = at(ref, "target_per_s")
    cpu_ours, n_ours = cpu_at(ours, rate)
    cpu_ref, n_ref = cpu_at(ref, rate)
    rounds = f", mean of {n_ours}+{n_ref} rounds" if max(n_ours, n_ref) > 1 else ""

    def kib(result):
        value = _get(result, "memory", "per_client_bytes")
        return None if value is None else value / 1024

    def max_rate(result):
        return max((s["deliveries_per_s"] for s in result.get("steps", [])), default=None)

    # The headline compares offered rates: a step either is sustained (p99
    # under the limit, nothing lost) or not, and what a 4 s window counted as
    # delivered differs from the offered rate by its edges, not by capacity.
    return [
        ("deliveries/s offered, highest step with p99 < 100 ms, no loss", _get(ours, "headline", "target_per_s"),
         _get(ref, "headline", "target_per_s"), ".0f", (">=", 1.0 if polling else 1.25)),
        ("  delivered in that step (/s)", _get(ours, "headline", "deliveries_per_s"),
         _get(ref, "headline", "deliveries_per_s"), ".0f", None),
        ("  p50 at that rate (ms)", _get(ours, "headline", "p50_ms"), _get(ref, "headline", "p50_ms"), ".1f", None),
        ("  p99 at that rate (ms)", _get(ours, "headline", "p99_ms"), _get(ref, "headline", "p99_ms"), ".1f", None),
        (f"CPU per delivery (µs) at {rate or '-'}/s offered{rounds}", cpu_ours, cpu_ref, ".1f", ("<=", 0.7)),
        (f"  same, median over the {len(both)} loads both sustained", median_cpu(ours, both),
         median_cpu(ref, both), ".1f", None),
        ("memory per idle connection (KiB)", kib(ours), kib(ref), ".1f", None if polling else ("<=", 0.5)),
        ("highest delivery rate reached, any latency", max_rate(ours), max_rate(ref), ".0f", None),
        ("connect all clients (s)", _seconds(_get(ours, "connect", "ms")), _seconds(_get(ref, "connect", "ms")),
         ".1f", None),
        ("other processes on the machine, mean (cores)", mean_others(ours), mean_others(ref), ".2f", NO_RATIO),
    ]


def mean_others(result: dict):
    values = [s["other_processes_cores"] for s in result.get("steps", []) if "other_processes_cores" in s]
    return sum(values) / len(values) if values else None


def _seconds(ms):
    return None if ms is None else ms / 1000


def collab_rows(ours: dict, ref: dict) -> list:
    def kib(result, key):
        value = _get(result, "memory", key)
        return None if value is None else value / 1024

    return [
        ("update propagation p50 (ms)", _get(ours, "edit", "p50"), _get(ref, "edit", "p50"), ".1f", None),
        ("update propagation p99 (ms)", _get(ours, "edit", "p99"), _get(ref, "edit", "p99"), ".1f", ("<=", 1.0)),
        ("update propagation max (ms)", _get(ours, "edit", "max"), _get(ref, "edit", "max"), ".1f", None),
        ("updates lost", _get(ours, "edit", "lost"), _get(ref, "edit", "lost"), "d", None),
        ("server CPU per update (µs)", _get(ours, "edit", "cpu_us_per_update"),
         _get(ref, "edit", "cpu_us_per_update"), ".0f", None),
        ("  same, each server's best round (µs)", best_round(ours, "edit", "cpu_us_per_update"),
         best_round(ref, "edit", "cpu_us_per_update"), ".0f", ("<=", 0.8)),
        ("memory per loaded document (KiB)", kib(ours, "per_doc_loaded_bytes"), kib(ref, "per_doc_loaded_bytes"),
         ".1f", ("<=", 0.15)),
        ("  same, after the edit phase (KiB)", kib(ours, "per_doc_edited_bytes"),
         kib(ref, "per_doc_edited_bytes"), ".1f", None),
        ("sync 100 KB document to a new client (ms)", _get(ours, "bigsync", "median"),
         _get(ref, "bigsync", "median"), ".1f", None),
        ("load all documents, 2 providers each (s)", _seconds(_get(ours, "load", "ms")),
         _seconds(_get(ref, "load", "ms")), ".1f", None),
        ("other processes on the machine (cores)", _get(ours, "edit", "other_processes_cores"),
         _get(ref, "edit", "other_processes_cores"), ".2f", NO_RATIO),
        # The load generator's own GC pauses every update in flight to it: the
        # floor under the p99 whichever server runs.
        ("load generator GC pauses during edits (ms)", _get(ours, "edit", "gc", "totalMs"),
         _get(ref, "edit", "gc", "totalMs"), ".0f", NO_RATIO),
        ("  longest (ms)", _get(ours, "edit", "gc", "maxMs"), _get(ref, "edit", "gc", "maxMs"), ".1f", NO_RATIO),
    ]


def cluster_rows(ours: dict, ref: dict) -> list:
    def kib(result):
        value = _get(result, "redis", "per_doc_bytes")
        return None if value is None else value / 1024

    return [
        ("propagation across instances p50 (ms)", _get(ours, "edit", "p50"), _get(ref, "edit", "p50"), ".1f", None),
        ("propagation across instances p99 (ms)", _get(ours, "edit", "p99"), _get(ref, "edit", "p99"), ".1f",
         ("<=", 1.0)),
        ("updates lost", _get(ours, "edit", "lost"), _get(ref, "edit", "lost"), "d", None),
        ("CPU per update, both instances (µs)", _get(ours, "edit", "cpu_us_per_update"),
         _get(ref, "edit", "cpu_us_per_update"), ".0f", None),
        ("Redis CPU per update (µs)", _get(ours, "edit", "redis_cpu_us_per_update"),
         _get(ref, "edit", "redis_cpu_us_per_update"), ".0f", ("<", 1.0)),
        ("Redis memory per document (KiB)", kib(ours), kib(ref), ".1f", None),
    ]


def trickle_rows(ours: dict, ref: dict) -> list:
    def mib(result):
        sent = _get(result, "trickle", "sent")
        return None if sent is None else sent / (1024 * 1024)

    return [
        ("server CPU per MiB received (ms)", _get(ours, "trickle", "cpu_ms_per_mib"),
         _get(ref, "trickle", "cpu_ms_per_mib"), ".1f", ("<=", 1.0)),
        ("  server CPU for the whole frame (s)", _get(ours, "trickle", "cpu_s"), _get(ref, "trickle", "cpu_s"),
         ".2f", None),
        ("  MiB sent", mib(ours), mib(ref), ".1f", NO_RATIO),
        ("  segments sent", _get(ours, "trickle", "segments"), _get(ref, "trickle", "segments"), "d", NO_RATIO),
        ("  mean time per segment, gap included (ms)", _get(ours, "trickle", "meanGapMs"),
         _get(ref, "trickle", "meanGapMs"), ".2f", NO_RATIO),
        ("other processes on the machine (cores)", _get(ours, "trickle", "other_processes_cores"),
         _get(ref, "trickle", "other_processes_cores"), ".2f", NO_RATIO),
    ]


def write_json(results: dict, path: Path) -> None:
    path.write_text(json.dumps(results, indent=2, default=str))


def chart(results: dict, path: Path) -> bool:
    """Latency against load for both servers (records), and update
    propagation (collab). Returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = results.get("records") or {}
    collab = results.get("collab") or {}
    fig, axes = plt.subplots(1, 2 if collab else 1, figsize=(13 if collab else 8, 5), squeeze=False)
    ax = axes[0][0]
    colours = {"ours": "tab:blue", "reference": "tab:orange"}
    for who, result in records.items():
        steps = [s for s in result.get("steps", []) if s["p99_ms"] is not None]
        if not steps:
            continue
        x = [s["deliveries_per_s"] for s in steps]
        ax.plot(x, [s["p50_ms"] for s in steps], "o--", color=colours.get(who), label=f"{who} p50")
        ax.plot(x, [s["p99_ms"] for s in steps], "o-", color=colours.get(who), label=f"{who} p99")
    ax.axhline(100, color="grey", linewidth=0.8, linestyle=":")
    ax.set_yscale("log")
    ax.set_xlabel("deliveries per second")
    ax.set_ylabel("latency (ms)")
    ax.set_title("records: latency against load")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    if collab:
        ax = axes[0][1]
        names = list(collab)
        for i, who in enumerate(names):
            edit = collab[who].get("edit") or {}
            values = [edit.get("p50") or 0, edit.get("p99") or 0]
            ax.bar([j + i * 0.4 for j in range(2)], values, width=0.4, color=colours.get(who), label=who)
        ax.set_xticks([0.2, 1.2], ["p50", "p99"])
        ax.set_ylabel("update propagation (ms)")
        ax.set_title("collab: editor to observer")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
