"""Markdown tables for the docs, generated from sweep CSVs: ``python -m moyu_exp.tables CSV``.

Every measured table in ``docs/`` is an artefact of its CSV (a sweep's ``summary.csv``): the
page shows, right above the table, the command that prints it::

    `python -m moyu_exp.tables docs/zoo_summary.csv --columns label piqa/acc±piqa/acc_stderr`

A column is ``name``, ``name±error`` (a value and its standard error) or either followed by
``:Header``; ``name%.1f`` (any format spec; ``%d`` a whole number) sets how it prints.
``--where key=value`` keeps matching rows (``key=a|b``: either), ``--spread KEY --by COL...``
gives one row per ``--by`` values with the columns repeated for each value of KEY
("efficiency @ 0.5"), ``--levels`` reads each
method's KL and piqa where its speed curve crosses the given speedups (as ``python -m
moyu_exp.report --levels`` does on run folders), on each ``--speed`` axis given.
``--refresh FILE...`` rewrites every such table in the files from its command; ``--check
FILE...`` exits 1 when one differs (the test suite runs it on docs/).
"""

from __future__ import annotations

import argparse
import csv
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from moyu_exp import report

COMMAND = re.compile(r"^`(python -m moyu_exp\.tables [^`]+)`\s*$")


def read_csv(path: Path) -> list[dict[str, Any]]:
    """A summary CSV's rows, numbers as floats and empty cells as None."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: _value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _value(text: str) -> Any:
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def cell(value: Any, error: Any = None) -> str:
    """A number to three decimals (four significant digits past 100), with its error."""
    if value is None:
        return "-"
    if not isinstance(value, float):
        return str(value)
    text = f"{value:.4g}" if abs(value) >= 100 else f"{value:.3f}"
    return text if error is None else f"{text} ± {error:.3f}"


def markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """The rows as a markdown table of ``columns`` (see the module docstring)."""
    heads, cells = [], []
    specs = []
    for column in columns:
        value, error, form, head = _column(column)
        specs.append((value, error, form))
        heads.append(head)
    for row in rows:
        cells.append([_cell(row, v, e, f) for v, e, f in specs])
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines)


def _column(column: str) -> tuple[str, str | None, str | None, str]:
    """A column's parts: value, error, format spec and header (see the module docstring)."""
    spec, _, head = column.partition(":")
    spec, _, form = spec.partition("%")
    value, _, error = spec.partition("±")
    return value, error or None, form or None, head or spec


def _cell(row: dict[str, Any], value: str, error: str | None, form: str | None) -> str:
    """One table cell: :func:`cell`'s format, or the column's own (``form``) for a number."""
    number, spread = row.get(value), row.get(error) if error else None
    if form is None or not isinstance(number, float):
        return cell(number, spread)
    text = format(int(number) if form == "d" else number, form)
    return text if spread is None else f"{text} ± {format(spread, form)}"


def build(argv: list[str]) -> str:
    """The table a command line (without ``python -m moyu_exp.tables``) describes."""
    args = _parser().parse_args(argv)
    rows = read_csv(args.csv)
    for condition in args.where or []:
        key, _, wanted = condition.partition("=")
        rows = [r for r in rows if any(_matches(r.get(key), w) for w in wanted.split("|"))]
    if args.levels:
        rows, columns = _at_levels(rows, args.levels, args.speed, args.columns)
    elif args.spread:
        rows, columns = _spread(rows, args.spread, args.by or [], args.columns or [])
    else:
        columns = args.columns or ["label", "sparsity", "achieved_sparsity"]
    if args.sort:
        rows = sorted(rows, key=lambda r: (r.get(args.sort) is None, r.get(args.sort)))
    return markdown(rows, columns)


AXIS_NAMES = {"speedup": "measured", "ideal_speedup": "ideal", "matched_speedup": "matched"}


def _at_levels(
    rows: list[dict[str, Any]], levels: list[float], axes: list[str], columns: list[str] | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Each method's KL (and piqa) at the levels of each speed axis: the first axis' columns
    are "KL @ 1.2x", a further axis' "KL @ 1.2x (ideal)"."""
    merged: dict[str, dict[str, Any]] = {}
    out = list(columns or ["method"])
    for n, axis in enumerate(axes):
        read = report.at_speedups(rows, levels, axis)
        tag = "" if n == 0 else f" ({AXIS_NAMES[axis]})"
        for row in read:
            target = merged.setdefault(row["method"], {"method": row["method"]})
            target.update({f"{k}{tag}": v for k, v in row.items() if k != "method"})
        for lv in [] if columns else levels:
            out.append(f"fidelity/kl @ {lv:g}x{tag}:KL @ {lv:g}x{tag}")
            if any(r.get(f"piqa/acc @ {lv:g}x") is not None for r in read):
                piqa = f"piqa/acc @ {lv:g}x{tag}"
                out.append(f"{piqa}±piqa/acc_stderr @ {lv:g}x{tag}:piqa @ {lv:g}x{tag}")
    return list(merged.values()), out


def _spread(
    rows: list[dict[str, Any]], key: str, by: list[str], columns: list[str]
) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per distinct ``by`` values, each of ``columns`` repeated for every value of
    ``key`` (in ascending order) and headed "column @ value"."""
    levels = sorted({r[key] for r in rows if r.get(key) is not None}, key=_order)
    merged: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        target = merged.setdefault(tuple(row.get(b) for b in by), {b: row.get(b) for b in by})
        target.update(
            {f"{name} @ {_text(row[key])}": v for name, v in row.items() if name not in by}
        )
    out = list(by)
    for level in levels:
        for column in columns:
            value, error, form, head = _column(column)
            tag = f" @ {_text(level)}"
            spread = value + tag + (f"±{error}{tag}" if error else "")
            head = head if ":" in column else value
            out.append(spread + (f"%{form}" if form else "") + f":{head}{tag}")
    return list(merged.values()), out


def _order(value: Any) -> tuple[bool, Any]:
    return (not isinstance(value, float), value if isinstance(value, float) else str(value))


def _text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _matches(value: Any, wanted: str) -> bool:
    if isinstance(value, float):
        try:
            return value == float(wanted)
        except ValueError:
            return False
    return str(value) == wanted


def refresh(path: Path, write: bool = True) -> bool:
    """Regenerate every table of ``path`` that follows its command; True if one changed."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[str] = []
    changed = False
    i = 0
    while i < len(lines):
        out.append(lines[i])
        match = COMMAND.match(lines[i])
        i += 1
        if not match:
            continue
        if i < len(lines) and not lines[i].strip():
            out.append(lines[i])
            i += 1
        old = []
        while i < len(lines) and lines[i].startswith("|"):
            old.append(lines[i])
            i += 1
        new = build(shlex.split(match.group(1))[3:]).splitlines()
        if i < len(lines) and lines[i].strip():
            new.append("")  # a table ends at a blank line (markdown)
        changed |= new != old
        out += new
    if changed and write:
        path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return changed


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m moyu_exp.tables",
        description="Print a markdown table from a summary CSV (or refresh the docs' tables).",
    )
    parser.add_argument("csv", type=Path, help="a sweep's summary.csv (or a docs/ copy of it)")
    parser.add_argument("--columns", nargs="+", help="name, name±error, either with :Header")
    parser.add_argument("--where", nargs="+", help="key=value conditions (value: a|b for any)")
    parser.add_argument("--sort", help="a column to order the rows by")
    parser.add_argument("--levels", type=float, nargs="+", help="speedups to read KL and piqa at")
    parser.add_argument("--spread", help="a column whose values become column groups")
    parser.add_argument("--by", nargs="+", help="with --spread: the columns that name a row")
    parser.add_argument(
        "--speed",
        nargs="+",
        default=["speedup"],
        choices=[c for c, _ in report.LEVEL_AXES],
        help="the speed axes the levels are read on (one column group each)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("--refresh", "--check"):
        files = [Path(p) for p in argv[1:]]
        stale = [p for p in files if refresh(p, write=argv[0] == "--refresh")]
        verb = "rewrote" if argv[0] == "--refresh" else "out of date"
        for path in stale:
            print(f"{verb}: {path}")
        return 1 if stale and argv[0] == "--check" else 0
    print(build(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
