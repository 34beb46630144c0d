"""Turn pytest-benchmark JSON into a Markdown table (medians, ratios to the reference) and a PNG bar chart.

Usage: python -m bench.report results/bench.json [--png results/bench.png]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any


def _label(bench: dict[str, Any]) -> str:
    return bench["extra_info"].get("path") or bench["name"].split("[", 1)[-1].rstrip("]")


def _baseline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The group's reference path (its name starts with 'reference'), else its slowest entry."""
    for row in rows:
        if _label(row).startswith("reference"):
            return row
    return max(rows, key=lambda r: r["stats"]["median"])


def markdown(results: dict[str, Any]) -> str:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for bench in results["benchmarks"]:
        groups[bench["group"] or bench["name"]].append(bench)
    info = results.get("machine_info", {})
    cpu = info.get("cpu", {}).get("brand_raw", "unknown CPU")
    lines = [f"Machine: {cpu}, {info.get('cpu', {}).get('count', '?')} cores; "
             f"{results.get('datetime', '')[:10]}. Medians; ratio = speed-up over the group's reference. GFLOP/s "
             "counts the direct convolutions' FLOPs (fastvae/flops.py): paths with the Winograd layer do fewer, so "
             "theirs is effective and can pass the matmul ceiling.", ""]
    for group, rows in groups.items():
        base = _baseline(rows)["stats"]["median"]
        lines += [f"**{group}**", "",
                  "| path | median ms | q3 ms | ratio | items/s | GFLOP/s | of matmul |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for row in sorted(rows, key=lambda r: r["stats"]["median"], reverse=True):
            stats, extra = row["stats"], row["extra_info"]
            q3 = stats["q3"]
            lines.append(
                f"| {_label(row)} | {stats['median'] * 1e3:.3f} | {q3 * 1e3:.3f} | {base / stats['median']:.2f}x | "
                f"{extra.get('items_per_s', '')} | {extra.get('gflops', '')} | {extra.get('fraction_of_matmul', '')} |"
            )
        lines.append("")
    return "\n".join(lines)


def bar_chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for bench in results["benchmarks"]:
        groups[bench["group"] or bench["name"]].append(bench)
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 1.2 + 0.45 * len(results["benchmarks"])), squeeze=False)
    for ax, (group, rows) in zip(axes[:, 0], groups.items(), strict=True):
        base = _baseline(rows)["stats"]["median"]
        ax.barh([_label(r) for r in rows], [base / r["stats"]["median"] for r in rows], color="tab:blue")
        ax.axvline(1.0, color="gray", linewidth=0.8)
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("speed-up over reference (median)", fontsize=8)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("json", type=Path, help="pytest --benchmark-json output")
    parser.add_argument("--png", type=Path, help="bar chart to write (default: beside the JSON)")
    args = parser.parse_args(argv)
    results = json.loads(args.json.read_text())
    print(markdown(results))
    png = args.png or args.json.with_suffix(".png")
    bar_chart(results, png)
    print(f"\n(chart: {png})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
