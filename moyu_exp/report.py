"""Comparing runs: ``python -m moyu_exp.report DIR [DIR ...]``.

Collects every ``results.json`` under the given folders (any mix of runs and sweeps), keeps one
row per point (the newest; ``ok`` before ``failed``), writes ``summary.csv``, ``tradeoff.png``
(each headline metric against achieved sparsity, one line per strategy, dense as a reference
line) and ``pareto.png`` (the first headline metric against the measured paired speedup of
kernel-mode points and against the bytes-bound ideal speedup of every point, each with its
frontier), and prints the table. When the points span several models (``+sweep=generality``),
labels name the model and ``generality.png`` / ``generality.txt`` put each method's numbers on
every model side by side; points that measured generation fidelity (``eval.generation``) get
``generation.png``, their KL and top-1 agreement against the distance along the generated text.
The same code aggregates a sweep when it ends (:mod:`moyu_exp.sweep`).
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import math
import re
import sys
from pathlib import Path
from typing import Any

from moyu_exp.runs import collect, labels, short

# The metric that heads each task's column, in order of preference.
HEADLINE = ("acc", "word_perplexity", "perplexity", "kl")
FIXED = ["label", "strategy", "sparsity", "achieved_sparsity", "site_sparsity"]
SPEED = [
    "speedup",
    "speedup_iqr",
    "ideal_speedup",
    "efficiency",
    "matched_speedup",
    "weight_bytes_per_token",
    "decode_tokens_per_s",
    "dense_tokens_per_s",
    "prefill_ms",
]
TAIL = [*SPEED, "status", "error", "model", "run_dir", "point_key"]
# The speed axes of pareto.png: (column, axis label).
SPEED_AXES = (
    ("speedup", "measured decode speedup over dense (paired, kernel mode)"),
    ("ideal_speedup", "bytes-bound ideal speedup (weights a kernel skips)"),
)
# The speeds --levels can read, the same two and the measured speed matched to the evaluation.
LEVEL_AXES = (
    *SPEED_AXES,
    ("matched_speedup", "measured kernel efficiency x the evaluated sets' ideal speedup"),
)


def rows(payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per point, labelled by strategy (and its parameters where they differ)."""
    out = []
    models = [(p.get("config") or {}).get("model", {}).get("name") for p in payloads]
    several = len(set(models)) > 1  # a generality sweep: the label names the model instead
    names = labels(payloads, ignore=("model.",) if several else ())
    for payload, label, model in zip(payloads, names, models, strict=True):
        row: dict[str, Any] = {
            "label": f"{label} @ {model}" if several else label,
            "method": label,
            "strategy": payload.get("strategy"),
            "sparsity": payload.get("sparsity"),
            "achieved_sparsity": payload.get("achieved_sparsity"),
            "site_sparsity": payload.get("site_sparsity"),
        }
        for task, metrics in sorted((payload.get("eval") or {}).items()):
            for metric, value in sorted(metrics.items()):
                row[f"{task}/{metric}"] = value
        bench = payload.get("bench") or {}
        for key in SPEED:  # the point's own ideal (from its evaluation) unless only bench has it
            if key != "matched_speedup":  # derived from two of the others, below
                row[key] = payload.get(key) if payload.get(key) is not None else bench.get(key)
        row["matched_speedup"] = matched_speedup(row)
        row["status"] = payload.get("status")
        row["error"] = payload.get("error")
        row["model"] = model
        row["run_dir"] = payload.get("run_dir")
        row["point_key"] = payload.get("point_key")
        out.append(row)
    return sorted(out, key=lambda r: (str(r["label"]), r["sparsity"] or 0.0))


def matched_speedup(row: dict[str, Any]) -> float | None:
    """The measured speed carried to the sets the evaluation scored: the bench's efficiency
    (its paired speedup over the ideal of the sets it decoded with) times the evaluation's
    bytes-bound ideal. Where a strategy's sets depend on the prompt (TDA's sizes, thresholds),
    the bench prompt can skip more or fewer bytes than the evaluation did; this pairs each KL
    with the speed of the sets that produced it."""
    efficiency, ideal = row.get("efficiency"), row.get("ideal_speedup")
    return None if efficiency is None or ideal is None else efficiency * ideal


def directions(payloads: list[dict[str, Any]]) -> dict[str, bool]:
    """{"task/metric": higher is better}, as lm-eval (and the fidelity metrics) declare it."""
    out: dict[str, bool] = {}
    for payload in payloads:
        for task, detail in (payload.get("eval_details") or {}).items():
            for metric, higher in (detail.get("higher_is_better") or {}).items():
                out[f"{task}/{metric}"] = bool(higher)
    return out


def headline_metrics(table: list[dict[str, Any]]) -> list[str]:
    """``task/metric`` columns to plot: each task's first metric in :data:`HEADLINE`."""
    tasks = sorted({c.split("/")[0] for r in table for c in r if "/" in c})
    chosen = []
    for task in tasks:
        for metric in HEADLINE:
            if any(f"{task}/{metric}" in r for r in table):
                chosen.append(f"{task}/{metric}")
                break
    return chosen


def columns(table: list[dict[str, Any]]) -> list[str]:
    metrics = sorted({c for r in table for c in r if "/" in c})
    return FIXED + metrics + TAIL


def csv_bytes(table: list[dict[str, Any]]) -> bytes:
    cols = columns(table)
    lines: list[list[Any]] = [cols] + [[_csv(r.get(c)) for c in cols] for r in table]
    buffer = io.StringIO()
    csv.writer(buffer).writerows(lines)
    return buffer.getvalue().encode()


def _csv(value: Any) -> Any:
    return "" if value is None else value


def format_table(table: list[dict[str, Any]]) -> str:
    """A fixed-width text table of the headline columns."""
    metrics = headline_metrics(table)
    cols = ["label", "sparsity", "site_sparsity", "achieved_sparsity", *metrics, "speedup"]
    cols += ["ideal_speedup", "decode_tokens_per_s", "status"]
    heads = ["strategy", "target", "site", "model", *metrics, "speedup", "ideal", "tok/s"]
    heads += ["status"]
    cells = [[_fmt(r.get(c)) for c in cols] for r in table]
    return _text_table(heads, cells)


# What the generality table puts side by side for each model (with the headline metrics).
GENERALITY = ("achieved_sparsity", "fidelity/top1_agreement")


def generality(table: list[dict[str, Any]]) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """The models, the metrics and one row per (method, target sparsity) with ``<model>:
    <metric>`` cells: the same method on every model side by side (empty when one model)."""
    models = sorted({str(r["model"]) for r in table if r.get("status") == "ok"})
    if len(models) < 2:
        return models, [], []
    metrics = [*headline_metrics(table), *GENERALITY]
    metrics = [m for m in dict.fromkeys(metrics) if any(r.get(m) is not None for r in table)]
    wide: dict[tuple[str, Any], dict[str, Any]] = {}
    for r in table:
        if r.get("status") != "ok":
            continue
        key = (r["method"], None if r.get("strategy") == "dense" else r.get("sparsity"))
        row = wide.setdefault(key, {"method": key[0], "sparsity": key[1]})
        for metric in metrics:
            row[f"{r['model']}: {metric}"] = r.get(metric)
    return models, metrics, sorted(wide.values(), key=lambda r: (r["method"], r["sparsity"] or 0))


def format_generality(models: list[str], metrics: list[str], wide: list[dict[str, Any]]) -> str:
    """The generality rows as a fixed-width text table, one column per (metric, model)."""
    cols = [f"{m}: {metric}" for metric in metrics for m in models]
    heads = ["strategy", "target", *cols]
    cells = [[str(r["method"]), _fmt(r["sparsity"]), *(_fmt(r.get(c)) for c in cols)] for r in wide]
    return _text_table(heads, cells)


# What the frontier table reads at each speedup level (KL, then the accuracy and its error).
FRONTIER = ("fidelity/kl", "piqa/acc", "piqa/acc_stderr")


def at_speedups(
    table: list[dict[str, Any]], levels: list[float], speed: str = "speedup"
) -> list[dict[str, Any]]:
    """Each method's :data:`FRONTIER` metrics at each level of the ``speed`` column (the
    measured paired speedup, ``ideal_speedup`` or ``matched_speedup``), interpolated along its own
    sparsity curve (from the dense model, speedup 1 and KL 0, to its sparsest point): the first
    segment whose speedups span the level; None where none does."""
    ok = [r for r in table if r.get("status") == "ok" and r.get(speed)]
    ok = [r | {"speedup": r[speed]} for r in ok]
    dense = next((r for r in ok if r.get("strategy") == "dense"), None)
    anchor = {"speedup": 1.0, "fidelity/kl": 0.0}
    if dense is not None:
        anchor |= {m: dense.get(m) for m in FRONTIER[1:]}
    out = []
    for label in sorted({r["label"] for r in ok if r.get("strategy") != "dense"}):
        curve = [anchor, *sorted((r for r in ok if r["label"] == label), key=_sparsity)]
        row: dict[str, Any] = {"method": label}
        for level in levels:
            for metric in FRONTIER:
                row[f"{metric} @ {level:g}x"] = _interpolate(curve, level, metric)
        out.append(row)
    return out


def _sparsity(row: dict[str, Any]) -> float:
    return row.get("sparsity") or 0.0


def _interpolate(curve: list[dict[str, Any]], level: float, metric: str) -> float | None:
    for a, b in itertools.pairwise(curve):
        low, high = sorted((a["speedup"], b["speedup"]))
        if low <= level <= high and a.get(metric) is not None and b.get(metric) is not None:
            if high == low:
                return min(a[metric], b[metric])
            t = (level - a["speedup"]) / (b["speedup"] - a["speedup"])
            return a[metric] + t * (b[metric] - a[metric])
    return None


def format_frontier(rows: list[dict[str, Any]], levels: list[float]) -> str:
    """The frontier rows as a fixed-width text table: per level, KL and piqa (+- its error)."""
    heads = ["method", *(f"{h} @ {lv:g}x" for lv in levels for h in ("KL", "piqa"))]
    cells = []
    for r in rows:
        cell = [str(r["method"])]
        for level in levels:
            kl, acc, err = (r.get(f"{m} @ {level:g}x") for m in FRONTIER)
            cell.append(_fmt(kl))
            cell.append("-" if acc is None else f"{acc:.3f} +/- {err or 0:.3f}")
        cells.append(cell)
    return _text_table(heads, cells)


def _text_table(heads: list[str], cells: list[list[str]]) -> str:
    """Left-aligned columns under a header and a rule."""
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) >= 100 else f"{value:.4f}"
    return str(value)


FIGURES = ("tradeoff.png", "pareto.png")  # drawn for every comparison


def figures(table: list[dict[str, Any]]) -> list[str]:
    """The figures :func:`summarize` draws for these rows (generation.png: when some point
    measured generation fidelity)."""
    generation = any(key.startswith("generation/") for row in table for key in row)
    return [*FIGURES, *(["generation.png"] if generation else [])]


def generation_edges(table: list[dict[str, Any]]) -> tuple[int, ...]:
    """The distances that end the generation buckets but the last (columns generation/kl_1_16,
    generation/kl_17_64, ...: 16, 64)."""
    highs = {
        int(key.rsplit("_", 1)[1])
        for row in table
        for key in row
        if re.fullmatch(r"generation/kl_\d+_\d+", key)
    }
    return tuple(sorted(highs))[:-1]


def generation_curves(
    payloads: list[dict[str, Any]], table: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The generation-fidelity curves of the points that measured them (``eval.generation``),
    labelled as in ``table`` (with the sparsity and the decode steps' model-level sparsity), in
    the table's order."""
    by_dir = {p.get("run_dir"): p for p in payloads}
    out = []
    for row in table:
        payload = by_dir.get(row["run_dir"]) or {}
        curves = ((payload.get("eval_details") or {}).get("generation") or {}).get("by_distance")
        if row.get("status") != "ok" or not curves:
            continue
        level = row.get("generation/model_sparsity")
        shown = "" if level is None else f", model-level {level:.2f}"
        label = f"{row['method']} (s={short(row['sparsity'])}{shown})"
        out.append({"label": label, "method": row["method"], "model": row["model"], **curves})
    return out


def summarize(dirs: list[Path], out: Path) -> tuple[list[dict[str, Any]], dict[str, bool]]:
    """Write summary.csv, tradeoff.png and pareto.png (and generation.png, when some point has
    generation curves) for ``dirs`` into ``out``; return the rows and the metrics' directions.
    When the summary is unchanged and the figures exist, nothing is redrawn."""
    from moyu_exp.cache import write_bytes_atomic

    payloads = collect(dirs)
    table = rows(payloads)
    better = directions(payloads)
    summary = csv_bytes(table)
    current = out / "summary.csv"
    curves = generation_curves(payloads, table)
    outputs = ["summary.csv", *FIGURES, *(["generation.png"] if curves else [])]
    if all((out / name).is_file() for name in outputs) and current.read_bytes() == summary:
        return table, better
    from moyu_exp import plots

    metrics = headline_metrics(table)
    plots.tradeoff(table, metrics, out / "tradeoff.png", better)
    plots.pareto(table, metrics[:1], out / "pareto.png", better, SPEED_AXES)
    models, wide_metrics, wide = generality(table)
    if wide:  # several models: the same methods side by side
        plots.generality(models, wide_metrics, wide, out / "generality.png", better)
        write_bytes_atomic(
            out / "generality.txt", format_generality(models, wide_metrics, wide).encode()
        )
    if curves:
        plots.generation(curves, out / "generation.png", generation_edges(table))
    write_bytes_atomic(current, summary)
    return table, better


def main(argv: list[str] | None = None) -> int:
    from moyu_exp.trinity import AXES as trinity_axes

    parser = argparse.ArgumentParser(
        prog="python -m moyu_exp.report", description="Compare moyu_exp runs and sweeps."
    )
    parser.add_argument("dirs", nargs="+", type=Path, help="run or sweep folders")
    parser.add_argument("--out", type=Path, help="where to write (default: the first folder)")
    parser.add_argument(
        "--levels",
        type=float,
        nargs="+",
        help="speedups at which to read every method's KL and piqa (writes frontier.txt)",
    )
    parser.add_argument(
        "--speed",
        choices=[column for column, _ in LEVEL_AXES],
        default="speedup",
        help="the speed the levels are read on: measured (default), the bytes-bound ideal, or "
        "the measured efficiency applied to the evaluated sets' ideal (matched_speedup)",
    )
    parser.add_argument(
        "--trinity",
        action="store_true",
        help="the trinity report of a +sweep=trinity folder at --levels (trinity.md, .csv, .png)",
    )
    parser.add_argument(
        "--axis",
        choices=trinity_axes,
        default="speedup",
        help="--trinity: the speed its levels were crossed on (the sweep's hydra.sweeper.axis)",
    )
    parser.add_argument(
        "--target",
        type=float,
        default=0.95,
        help="--trinity: the retention a method must hold, within two standard errors",
    )
    args = parser.parse_args(argv)
    if args.trinity and not args.levels:
        parser.error("--trinity needs --levels (the sweep's hydra.sweeper.levels)")
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        print(f"moyu_exp.report: error: not a folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    out = args.out or args.dirs[0]
    if args.trinity:
        return _trinity(args, out)
    table, better = summarize(args.dirs, out)
    if not table:
        print(f"moyu_exp.report: error: no results.json under {', '.join(map(str, args.dirs))}")
        return 2
    print(format_table(table))
    models, metrics, wide = generality(table)
    if wide:
        print(f"\n{format_generality(models, metrics, wide)}")
    extra = "".join(
        f", {out / name}" for name in figures(table)[len(FIGURES) :] if (out / name).is_file()
    )
    extra += f", {out / 'generality.png'}, {out / 'generality.txt'}" if wide else ""
    if args.levels:
        from moyu_exp import plots
        from moyu_exp.cache import write_bytes_atomic

        text = format_frontier(at_speedups(table, args.levels, args.speed), args.levels)
        print(f"\nat {args.speed} levels (interpolated along each method's curve):\n{text}")
        suffix = args.speed.removesuffix("speedup").rstrip("_")  # "", "ideal", "matched"
        name = f"frontier_{suffix}" if suffix else "frontier"
        write_bytes_atomic(out / f"{name}.txt", text.encode())
        metrics = [m for m in FRONTIER[:2] if any(r.get(m) is not None for r in table)]
        axis = dict(LEVEL_AXES)[args.speed]
        plots.at_levels(
            table, metrics, out / f"{name}.png", better, args.levels, (args.speed, axis)
        )
        extra += f", {out / name}.txt, {out / name}.png"
    print(f"\nwrote {out / 'summary.csv'}, {out / 'tradeoff.png'}, {out / 'pareto.png'}{extra}")
    return 0


def _trinity(args: argparse.Namespace, out: Path) -> int:
    from moyu_exp import trinity

    result = trinity.build(args.dirs, args.levels, args.axis, args.target)
    if not result.cells:
        print(
            f"moyu_exp.report: error: no trinity speed pass under {args.dirs[0]}", file=sys.stderr
        )
        return 2
    written = trinity.write(result, out, trinity.commands(args.dirs[0], result))
    print(trinity.markdown(result, []))
    print(f"wrote {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
