"""The impossible trinity, measured: accuracy x speed x generality of every method at a few
speedup levels (``+sweep=trinity``; ``python -m moyu_exp.report --trinity DIR``).

A trinity sweep runs in two passes (:mod:`hydra_plugins.moyu_exp_launcher.trinity`): a **speed
pass** (each method on each model at a coarse sparsity grid, bench only) and an **evaluation
pass** at the sparsity where each method's own speed curve crosses each level
(:func:`crossing`), plus the dense model once per model. This module holds what both the
sweeper and the report need: the crossings, and the report itself, read from nothing but the
sweep's ``results.json`` files (so the report of a sweep is the report of its folder).

Per method, level and model the report gives the suite's accuracy retention (the mean of the
tasks' accuracies over the dense model's, with its standard error), the measured paired speedup
at that sparsity and its bytes-bound ideal; per method and level the spread of retention across
models (min, max and the worst model), and where the method fails a corner:

- **speed**: its curve does not reach the level on any model;
- **accuracy**: its retention is below the target by more than ``Z`` standard errors on every
  model where it reaches the level;
- **generality**: it holds the level and the target on some models, not on all of them.

A method that fails none "holds all three" at that level, within its errors.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moyu_exp import runs

AXES = ("speedup", "ideal_speedup")  # what a level is read on: measured, or bytes-bound ideal
Z = 2.0  # standard errors that make a retention significantly below the target
DIGITS = 3  # the crossing's sparsity, rounded (a stable point key and a readable folder)


# --------------------------------------------------------------------------- crossings
def crossing(curve: list[tuple[float, float]], level: float, switch: bool = False) -> float | None:
    """The lowest sparsity at which a (sparsity, speedup) curve reaches ``level``: linear
    between its points, from the dense model (sparsity 0, speedup 1); None if it never does.
    For a method whose sparsity only switches it on (``switch``, e.g. CETT: its own knob sets
    how much it skips) there is nothing between its points: the first one that reaches it."""
    if switch:
        return next((s for s, v in sorted(curve) if v >= level), None)
    points = [(0.0, 1.0), *sorted(p for p in curve if p[0] > 0)]
    for (s0, v0), (s1, v1) in itertools.pairwise(points):
        if v0 >= level:
            return round(s0, DIGITS)
        if v1 >= level:
            return round(s0 + (level - v0) / (v1 - v0) * (s1 - s0), DIGITS)
    return None


def is_switch(keys: list[str]) -> bool:
    """Whether a speed pass's points at different sparsities are one point (one key): the
    method's sparsity only switches it on (it takes two grid values to tell)."""
    return len(keys) > 1 and len(set(keys)) == 1


def speed_of(payload: dict[str, Any], axis: str) -> float | None:
    """A point's speed on ``axis``: its own (the evaluation's meter) or else its bench's."""
    value = payload.get(axis)
    if value is None:
        value = (payload.get("bench") or {}).get(axis)
    return None if value is None else float(value)


# --------------------------------------------------------------------------- the report
@dataclass
class Cell:
    """One method at one level on one model."""

    sparsity: float | None = None  # the crossing (None: the level is not reached)
    reach: float | None = None  # the curve's highest speed (when not reached)
    retention: float | None = None
    retention_se: float | None = None
    speedup: float | None = None  # measured at the crossing, by the evaluated point's bench
    speedup_iqr: float | None = None
    ideal: float | None = None  # bytes-bound, of the sets the bench decoded with (at the
    # crossing; when the level is not reached, at the curve's fastest point)
    tasks: dict[str, tuple[float, float]] = field(default_factory=dict)
    se_kind: str | None = None  # "paired" (item by item) or "bound" (errors as if independent)
    protocol: str | None = None  # the evaluation's ``strategy.prefill``
    sparse_share: float | None = None  # mean over tasks of the scored positions run sparse
    switch: bool = False  # the method's sparsity only switches it on (:func:`is_switch`)

    @property
    def reached(self) -> bool:
        return self.sparsity is not None

    def holds(self, target: float) -> bool | None:
        """Retention not significantly below ``target`` (None: not evaluated)."""
        if self.retention is None:
            return None
        return self.retention + Z * (self.retention_se or 0.0) >= target


@dataclass
class Trinity:
    models: list[str]
    methods: list[str]
    levels: list[float]
    axis: str
    target: float
    tasks: list[str]
    dense: dict[str, dict[str, tuple[float, float]]]  # model -> task -> (accuracy, stderr)
    cells: dict[tuple[str, float, str], Cell]  # (method, level, model)
    provenance: dict[str, str]

    def cell(self, method: str, level: float, model: str) -> Cell:
        return self.cells.get((method, level, model)) or Cell()


def headline(metrics: dict[str, float]) -> str | None:
    """A task's accuracy metric: ``acc_norm`` where the task reports it (lm-eval's length-
    normalised headline for piqa, ARC and HellaSwag), else ``acc``."""
    return next((name for name in ("acc_norm", "acc") if metrics.get(name) is not None), None)


def accuracy(payload: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """{task: (accuracy, stderr)} of the tasks with an accuracy (:func:`headline`)."""
    out = {}
    for task, metrics in sorted((payload.get("eval") or {}).items()):
        if name := headline(metrics):
            out[task] = (float(metrics[name]), float(metrics.get(f"{name}_stderr") or 0.0))
    return out


def items(payload: dict[str, Any]) -> dict[str, tuple[list[int], list[float]]]:
    """{task: (doc ids, each item's accuracy)} where the point logged its items."""
    out = {}
    for task, metrics in (payload.get("eval") or {}).items():
        logged = ((payload.get("eval_details") or {}).get(task) or {}).get("items") or {}
        name = headline(metrics)
        if name and logged.get(name) and logged.get("doc_id"):
            out[task] = (list(logged["doc_id"]), [float(v) for v in logged[name]])
    return out


def paired_se(
    sparse: dict[str, tuple[list[int], list[float]]],
    dense: dict[str, tuple[list[int], list[float]]],
    tasks: list[str],
    retention: float,
) -> float | None:
    """The standard error of retention r = S / D (suite means), item by item: S - r D is a mean
    over tasks of per-item differences s_i - r d_i on the same items, so its error counts only
    where the two disagree (delta method). None unless both logged the same items of every
    task."""
    if not tasks or any(t not in sparse or t not in dense for t in tasks):
        return None
    variance, base = 0.0, 0.0
    for task in tasks:
        (ids, s), (dense_ids, d) = sparse[task], dense[task]
        if ids != dense_ids or len(ids) < 2:
            return None
        diff = [a - retention * b for a, b in zip(s, d, strict=True)]
        mean = sum(diff) / len(diff)
        variance += sum((x - mean) ** 2 for x in diff) / (len(diff) - 1) / len(diff)
        base += sum(d) / len(d)
    base /= len(tasks)
    return math.sqrt(variance) / len(tasks) / base if base else None


def suite(tasks: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """The mean accuracy over tasks and its standard error (tasks independent)."""
    values = list(tasks.values())
    mean = sum(v for v, _ in values) / len(values)
    return mean, math.sqrt(sum(e * e for _, e in values)) / len(values)


def build(
    dirs: list[Path], levels: list[float], axis: str = "speedup", target: float = 0.95
) -> Trinity:
    """The trinity of the points under ``dirs`` (a trinity sweep's folder)."""
    # one payload per folder: a method whose sparsity only switches it on has one point key
    # in every folder of its grid (:func:`is_switch`)
    payloads = [p for p in runs.collect(dirs, unique=False) if p.get("status") == "ok"]
    labels = runs.labels(payloads, ignore=("model.", "eval.", "bench."))
    speed: dict[tuple[str, str], list[dict[str, Any]]] = {}  # the speed pass's points
    evaluated: dict[tuple[str, str, float], dict[str, Any]] = {}
    dense: dict[str, dict[str, tuple[float, float]]] = {}
    dense_items: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for payload, label in zip(payloads, labels, strict=True):
        model = str((payload.get("config") or {}).get("model", {}).get("name"))
        scores = accuracy(payload)
        if payload.get("strategy") == "dense":
            if scores:
                dense[model], dense_items[model] = scores, items(payload)
            continue
        if scores:
            evaluated[(label, model, round(_sparsity(payload), DIGITS))] = payload
        elif speed_of(payload, axis) is not None:
            speed.setdefault((label, model), []).append(payload)
    models = sorted({m for _, m in speed} | set(dense))
    methods = sorted({label for label, _ in speed})
    tasks = sorted({t for scores in dense.values() for t in scores})
    cells = {}
    for (label, model), points in speed.items():
        curve = [(_sparsity(p), speed_of(p, axis)) for p in points]
        switch = is_switch([str(p.get("point_key")) for p in points])
        for level in levels:
            crossed = crossing(curve, level, switch)
            cell = _cell(points, curve, crossed, dense.get(model), dense_items.get(model) or {},
                         evaluated.get((label, model, crossed)))  # fmt: skip
            cell.switch = switch
            cells[(label, level, model)] = cell
    return Trinity(
        models, methods, levels, axis, target, tasks, dense, cells, _provenance(payloads)
    )


def _sparsity(payload: dict[str, Any]) -> float:
    return float(payload.get("sparsity") or 0.0)


def _cell(points, curve, crossed, dense, dense_items, payload) -> Cell:
    """The cell of a curve's crossing (None: not reached; then its fastest speed and that
    point's ideal), with its evaluation (``payload``, once the evaluation pass has run)."""
    if crossed is None:
        fastest = max(range(len(curve)), key=lambda i: curve[i][1])
        return Cell(
            reach=curve[fastest][1], ideal=_ideal(points[fastest]), protocol=_prefill(points[0])
        )
    cell = Cell(sparsity=crossed, protocol=_prefill(payload or points[0]))
    if payload is None or not dense:
        return cell  # the evaluation pass has not run (yet)
    cell.tasks = accuracy(payload)
    shared = {t: cell.tasks[t] for t in dense if t in cell.tasks}
    if shared:
        mean, se = suite(shared)
        base, base_se = suite({t: dense[t] for t in shared})
        cell.retention = mean / base
        paired = paired_se(items(payload), dense_items, list(shared), cell.retention)
        # else the two errors as if independent: an upper bound, the items being the same
        bound = math.sqrt(se**2 + (cell.retention * base_se) ** 2) / base
        cell.retention_se = bound if paired is None else paired
        cell.se_kind = "bound" if paired is None else "paired"
    shares = [
        d["sparse_scored_fraction"]
        for t, d in (payload.get("eval_details") or {}).items()
        if t in shared and d.get("sparse_scored_fraction") is not None
    ]
    cell.sparse_share = sum(shares) / len(shares) if shares else None
    cell.speedup = speed_of(payload, "speedup")
    cell.speedup_iqr = (payload.get("bench") or {}).get("speedup_iqr")
    cell.ideal = _ideal(payload)
    return cell


def _ideal(payload: dict[str, Any]) -> float | None:
    """The ideal of the sets the bench decoded with, beside the speed it measured (else the
    evaluation's)."""
    bench = (payload.get("sparsity_detail") or {}).get("bench") or {}
    return bench.get("ideal_speedup") or speed_of(payload, "ideal_speedup")


def _prefill(payload: dict[str, Any]) -> str | None:
    """The point's evaluation protocol (``strategy.prefill``)."""
    return ((payload.get("config") or {}).get("strategy") or {}).get("prefill")


def _provenance(payloads: list[dict[str, Any]]) -> dict[str, str]:
    """When, at which commit and on what the points ran (as their results.json say)."""
    created = sorted(str(p.get("created")) for p in payloads if p.get("created"))
    envs = [p.get("env") or {} for p in payloads]
    commits = sorted({_short_sha(str(e["git_sha"])) for e in envs if e.get("git_sha")})
    machines = sorted(
        {f"{e.get('device')}, {e.get('cpu_count')} CPUs" for e in envs if e.get("device")}
    )
    return {
        "measured": f"{created[0][:16]} to {created[-1][:16]}" if created else "unknown",
        "commit": ", ".join(commits) or "unknown",
        "machine": "; ".join(machines) or "unknown",
    }


def _short_sha(sha: str) -> str:
    return sha[:7] + ("-dirty" if sha.endswith("-dirty") else "")


# --------------------------------------------------------------------------- verdicts
def spread(t: Trinity, method: str, level: float) -> tuple[float, float, str] | None:
    """(min, max, worst model) of the method's retention at the level across models."""
    values = [(c.retention, m) for m in t.models if (c := t.cell(method, level, m)).retention]
    if not values:
        return None
    low, worst = min(values)
    return low, max(v for v, _ in values), worst


def fails(t: Trinity, method: str, level: float) -> list[str]:
    """The corners the method misses at the level, each with the numbers that decide it
    (empty: it holds all three, or has not been evaluated: :func:`evaluated`)."""
    cells = {m: t.cell(method, level, m) for m in t.models}
    unreached = [m for m, c in cells.items() if not c.reached]
    if len(unreached) == len(cells):
        reach = ", ".join(f"{m} {_below(c.reach, level)}" for m, c in cells.items() if c.reach)
        one = any(c.switch for c in cells.values())
        where = " at its one operating point, its sparsity only switching it on" if one else ""
        return [f"speed{where} (reaches {reach})" if reach else f"speed{where}"]
    out = [
        f"generality: {m} does not reach {level:g}x ({_below(cells[m].reach, level)})"
        for m in unreached
    ]
    judged = [m for m, c in cells.items() if c.holds(t.target) is not None]
    below = {m: c for m, c in cells.items() if c.holds(t.target) is False}
    if judged and len(below) == len(judged):
        out.append("accuracy: " + ", ".join(f"{m} {_r(c)}" for m, c in below.items()))
    elif below:
        out.append("generality: " + ", ".join(f"{m} {_r(c)}" for m, c in below.items()))
    return out


def evaluated(t: Trinity, method: str, level: float) -> bool:
    """Whether every model where the method reaches the level has its evaluation."""
    cells = [t.cell(method, level, m) for m in t.models]
    return all(c.retention is not None for c in cells if c.reached)


def clearly_holds(t: Trinity, method: str, level: float) -> bool:
    """Reached everywhere and above the target by more than ``Z`` standard errors everywhere."""
    cells = [t.cell(method, level, m) for m in t.models]
    return all(
        c.retention is not None and c.retention - Z * (c.retention_se or 0.0) >= t.target
        for c in cells
    )


def ranking(t: Trinity, level: float) -> list[tuple[str, float]]:
    """Methods that reach the level on every model, by their worst model's retention."""
    scored = []
    for method in t.methods:
        cells = [t.cell(method, level, m) for m in t.models]
        if all(c.retention is not None for c in cells):
            scored.append((method, min(c.retention for c in cells)))
    return sorted(scored, key=lambda s: -s[1])


def _r(c: Cell) -> str:
    return f"{c.retention:.3f} ± {c.retention_se:.3f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _below(value: float | None, level: float) -> str:
    """A speed short of ``level``, with the digits that show it is short (1.195x, not 1.20x)."""
    if value is None:
        return "-"
    digits = next((d for d in range(2, 7) if round(value, d) < level), 6)
    return f"{value:.{digits}f}x"


def verdicts(t: Trinity) -> list[str]:
    """One paragraph per level: who comes closest to the three corners, and where each fails."""
    lines = []
    for level in t.levels:
        ranked = ranking(t, level)
        done = [m for m in t.methods if evaluated(t, m, level)]
        holding = [m for m in done if not fails(t, m, level)]
        clear = [m for m in holding if clearly_holds(t, m, level)]
        head = f"**At {level:g}x** ({t.axis}; target retention {t.target:g}, {Z:g} SE): "
        if clear:
            head += f"{_names(clear, 'holds', 'hold')} all three corners. "
        if len(holding) > len(clear):
            unsure = [m for m in holding if m not in clear]
            head += f"{_names(unsure, 'holds', 'hold')} them within their errors (not decided). "
        if not holding:
            head += "no method holds all three corners. "
        if ranked:
            best, score = ranked[0]
            worst = spread(t, best, level)
            head += f"Closest: {best} (worst model {worst[2]}, retention "
            head += f"{_r(t.cell(best, level, worst[2]))})"
            tied = [m for m, s in ranked[1:] if score - s <= Z * _pair_se(t, best, m, level)]
            head += f", within errors of {', '.join(tied)}." if tied else "."
        else:
            head += "No method is evaluated at this level on every model."
        head = head.rstrip() + mostly_dense(t, holding)
        lines.append(head)
        for method in t.methods:
            missed = fails(t, method, level)
            if missed:
                lines.append(f"- {method} fails {'; '.join(missed)}")
            elif method not in done:
                lines.append(f"- {method}: not evaluated yet (the evaluation pass has not run)")
        lines.append("")
    return lines[:-1]


def share(t: Trinity, method: str, model: str) -> float | None:
    """The share of the scored positions the method ran sparse on the model (its first
    evaluated level: the protocol, not the sparsity, decides it)."""
    shares = [t.cell(method, lv, model).sparse_share for lv in t.levels]
    return next((v for v in shares if v is not None), None)


def protocol(t: Trinity, method: str) -> str:
    """The method's evaluation protocol(s) (``strategy.prefill``) as its points recorded them."""
    found = {c.protocol for (m, _, _), c in t.cells.items() if m == method and c.protocol}
    return ", ".join(sorted(found)) or "-"


def mostly_dense(t: Trinity, methods: list[str]) -> str:
    """A sentence naming the methods whose scored positions ran sparse less than half the time
    on some model (their retention speaks for that share only); empty if none did."""
    low = {}
    for method in methods:
        values = [v for m in t.models if (v := share(t, method, m)) is not None]
        if values and min(values) < 0.5:
            low[method] = values
    if not low:
        return ""
    named = ", ".join(f"{m} {_range(v)} ({protocol(t, m)})" for m, v in low.items())
    return (
        f" Their protocols ran sparse on few of the scored positions ({named}): the retention "
        "holds for that share, not for fully sparse scoring (Protocols below)."
    )


def _range(shares: list[float]) -> str:
    low, high = f"{min(shares):.0%}", f"{max(shares):.0%}"
    return low if low == high else f"{low}-{high}"


def _names(names: list[str], one: str, many: str) -> str:
    return f"{', '.join(names)} {one if len(names) == 1 else many}"


def _pair_se(t: Trinity, a: str, b: str, level: float) -> float:
    """The standard error of the difference of two methods' worst-model retentions."""
    worst = [spread(t, m, level) for m in (a, b)]
    ses = [t.cell(m, level, w[2]).retention_se or 0.0 for m, w in zip((a, b), worst, strict=True)]
    return math.hypot(*ses)


# --------------------------------------------------------------------------- outputs
COLUMNS = (
    "model", "method", "level", "sparsity", "retention", "retention_se", "speedup", "speedup_iqr",
    "ideal_speedup", "reach", "se_kind", "protocol", "sparse_share", "switch",
)  # fmt: skip


def long_rows(t: Trinity) -> list[dict[str, Any]]:
    """One row per (model, method, level), with each task's accuracy and error."""
    out = []
    for model, method, level in itertools.product(t.models, t.methods, t.levels):
        c = t.cell(method, level, model)
        values = (model, method, level, c.sparsity, c.retention, c.retention_se, c.speedup,
                  c.speedup_iqr, c.ideal, c.reach, c.se_kind, c.protocol,
                  c.sparse_share, int(c.switch))  # fmt: skip
        row = dict(zip(COLUMNS, values, strict=True))
        for task in t.tasks:
            value, error = c.tasks.get(task, (None, None))
            row[f"{task}/acc"], row[f"{task}/acc_stderr"] = value, error
        out.append(row)
    for model in t.models:
        row = {"model": model, "method": "dense", "retention": 1.0}
        for task, (value, error) in t.dense.get(model, {}).items():
            row[f"{task}/acc"], row[f"{task}/acc_stderr"] = value, error
        out.append(row)
    return out


def csv_text(t: Trinity) -> str:
    rows = long_rows(t)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    return buffer.getvalue()


def commands(folder: Path, t: Trinity) -> list[str]:
    """The sweep's command (from its multirun.yaml) and the report command that rewrites this
    page from the sweep's folder."""
    levels = " ".join(f"{v:g}" for v in t.levels)
    out = [
        f"python -m moyu_exp.report --trinity {folder} --levels {levels} --axis {t.axis} "
        f"--target {t.target:g}"
    ]
    try:
        given = yaml.safe_load((Path(folder) / "multirun.yaml").read_text())["hydra"]["overrides"]
        out.insert(0, " ".join(["python -m moyu_exp", *given["task"], *given["hydra"]]))
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        pass
    return out


def from_csv(
    path: Path, axis: str = "speedup", target: float = 0.95, provenance: dict | None = None
) -> Trinity:
    """The trinity a ``trinity.csv`` holds (to check a page against its CSV)."""

    def number(text: str) -> float | None:
        return None if text == "" else float(text)

    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    tasks = sorted({k.removesuffix("/acc") for k in rows[0] if k.endswith("/acc")})

    def scores(row: dict[str, str]) -> dict[str, tuple[float, float]]:
        return {
            k: (float(row[f"{k}/acc"]), float(row[f"{k}/acc_stderr"]))
            for k in tasks
            if row.get(f"{k}/acc")
        }

    dense = {r["model"]: scores(r) for r in rows if r["method"] == "dense"}
    cells = {}
    for r in rows:
        if r["method"] != "dense":
            sparsity, retention, se, speedup, iqr, ideal, reach = (
                number(r[c]) for c in COLUMNS[3:10]
            )
            cells[(r["method"], float(r["level"]), r["model"])] = Cell(
                sparsity, reach, retention, se, speedup, iqr, ideal, scores(r),
                r.get("se_kind") or None, r.get("protocol") or None,
                number(r.get("sparse_share", "")), r.get("switch") == "1",
            )  # fmt: skip
    levels = sorted({level for _, level, _ in cells})
    methods = sorted({m for m, _, _ in cells})
    models = sorted({m for _, _, m in cells} | set(dense))
    tasks = [t for t in tasks if any(t in d for d in dense.values())]
    known = provenance or dict.fromkeys(("measured", "commit", "machine"), "unknown")
    return Trinity(models, methods, levels, axis, target, tasks, dense, cells, known)


def markdown(t: Trinity, commands: list[str]) -> str:
    """The page: the commands, provenance, the dense suite, one table per level, the verdicts."""
    p = t.provenance
    lines = [
        *(f"`{c}`  " for c in commands),
        "",
        f"Measured {p['measured']} UTC at {p['commit']} on {p['machine']}. Levels read on "
        f"`{t.axis}`; retention = suite mean accuracy over the dense model's (tasks: "
        f"{', '.join(t.tasks) or '-'}; acc_norm where the task has it, else acc), ± its standard "
        f"error ({se_kinds(t)}); a method holds a model when its retention + {Z:g} SE reaches "
        f"{t.target:g}.",
        "",
        "| model | dense suite accuracy | " + " | ".join(t.tasks) + " |",
        "|---|---|" + "---|" * len(t.tasks),
    ]
    for model in t.models:
        scores = t.dense.get(model)
        if not scores:
            lines.append(f"| {model} | - |" + " - |" * len(t.tasks))
            continue
        mean, se = suite(scores)
        cells = [_pm(*scores[k]) if k in scores else "-" for k in t.tasks]
        lines.append(f"| {model} | {_pm(mean, se)} | " + " | ".join(cells) + " |")
    for level in t.levels:
        lines += ["", f"### {level:g}x", ""]
        heads = ["method"]
        for model in t.models:
            heads += [f"{model}: s", "retention", "speedup (ideal)"]
        heads += ["spread (worst)", "fails"]
        lines += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        for method in t.methods:
            cells = [method]
            for model in t.models:
                c = t.cell(method, level, model)
                if not c.reached:
                    shown = f"max {_below(c.reach, level)}"
                    cells += ["-", "-", f"{shown} ({_x(c.ideal)})" if c.ideal else shown]
                    continue
                speed = f"{_x(c.speedup)} ({_x(c.ideal)})"
                shown = "-" if c.retention is None else _r(c)
                cells += ["on" if c.switch else f"{c.sparsity:.3f}", shown, speed]
            s = spread(t, method, level)
            cells.append("-" if s is None else f"{s[0]:.3f}-{s[1]:.3f} ({s[2]})")
            missed = fails(t, method, level)
            cells.append("; ".join(missed) or ("none" if evaluated(t, method, level) else "-"))
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *verdicts(t), "", *protocols(t), "", *per_task(t), ""]
    return "\n".join(lines)


def protocols(t: Trinity) -> list[str]:
    """Each method's evaluation protocol and the share of scored positions it ran sparse (the
    lm-eval bridge's count, mean over the suite's tasks): a retention is only as sparse as this."""
    lines = [
        "### Protocols",
        "",
        "Each method is evaluated under the protocol its points ran (`strategy.prefill`, its "
        "paper's unless overridden; "
        "`moyu_exp/strategies/protocol.py`); the share of the scored positions that ran sparse "
        "is the mean over tasks. A common protocol for every method is one override away "
        "(e.g. `strategy.prefill=dense`: each context dense, each continuation sparse).",
        "",
        "| method | protocol | "
        + " | ".join(f"{m}: scored positions sparse" for m in t.models)
        + " |",
        "|---|---|" + "---|" * len(t.models),
    ]
    for method in t.methods:
        cells = [f"{v:.0%}" if (v := share(t, method, m)) is not None else "-" for m in t.models]
        lines.append(f"| {method} | {protocol(t, method)} | " + " | ".join(cells) + " |")
    return lines


def se_kinds(t: Trinity) -> str:
    """How the retentions' standard errors were computed, in words."""
    kinds = {c.se_kind for c in t.cells.values() if c.retention is not None}
    paired = "paired: item by item on the same items, the delta method"
    bound = "the dense and sparse errors added as if independent, an upper bound"
    if kinds <= {"paired"}:
        return paired
    if "paired" not in kinds:
        return bound + ": the points did not log their items"
    return f"{paired}, where both points logged their items; else {bound}"


def per_task(t: Trinity) -> list[str]:
    """Each task's accuracy ± its standard error, per model, for dense and every evaluated
    (method, level)."""
    lines = ["### Per task", ""]
    for model in t.models:
        lines += [f"{model}:", "", "| method | level | " + " | ".join(t.tasks) + " |"]
        lines.append("|---|---|" + "---|" * len(t.tasks))
        dense = t.dense.get(model, {})
        lines.append("| dense | - | " + " | ".join(_task(dense, k) for k in t.tasks) + " |")
        for method, level in itertools.product(t.methods, t.levels):
            c = t.cell(method, level, model)
            if c.tasks:
                cells = " | ".join(_task(c.tasks, k) for k in t.tasks)
                lines.append(f"| {method} | {level:g}x | {cells} |")
        lines.append("")
    return lines[:-1]


def _task(scores: dict[str, tuple[float, float]], task: str) -> str:
    return _pm(*scores[task]) if task in scores else "-"


def _pm(value: float, error: float) -> str:
    return f"{value:.3f} ± {error:.3f}"


def write(t: Trinity, out: Path, commands: list[str]) -> list[Path]:
    """trinity.md, trinity.csv and trinity.png in ``out`` (atomic)."""
    from moyu_exp import plots
    from moyu_exp.cache import write_bytes_atomic

    written = [out / "trinity.md", out / "trinity.csv", out / "trinity.png"]
    write_bytes_atomic(written[0], markdown(t, commands).encode())
    write_bytes_atomic(written[1], csv_text(t).encode())
    plots.trinity(t, written[2])
    return written
