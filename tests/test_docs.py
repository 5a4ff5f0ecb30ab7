"""The README is a user's guide and the docs' measured tables are artefacts of their CSVs."""

from __future__ import annotations

import re

import pytest

from moyu_exp import tables
from tests.conftest import ROOT

DOCS = sorted((ROOT / "docs").rglob("*.md"))


def test_the_readme_is_a_guide_of_at_most_300_lines_with_two_setup_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    setup = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"```bash\n(.*?)```", setup, re.S) == ["make run\n", "make test\n"]
    assert len(blocks) >= 3  # the examples too
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "a dated measurement belongs in docs/"


@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_every_generated_table_is_what_its_command_prints(page) -> None:
    """A table under a `python -m moyu_exp.tables ...` line is that command's output (the CSV
    and the page cannot drift apart; `python -m moyu_exp.tables --refresh` rewrites them)."""
    assert not tables.refresh(page, write=False), f"run python -m moyu_exp.tables --refresh {page}"


def test_the_results_pages_generate_their_tables() -> None:
    for page in sorted((ROOT / "docs" / "results").glob("*.md")):
        commands = [m for m in page.read_text().splitlines() if tables.COMMAND.match(m)]
        assert commands, f"{page.name} has no generated table"


def test_a_changed_csv_changes_the_table(tmp_path) -> None:
    csv = tmp_path / "s.csv"
    csv.write_text("label,sparsity,piqa/acc,piqa/acc_stderr\na,0.5,0.61,0.02\n")
    page = tmp_path / "p.md"
    page.write_text(f"`python -m moyu_exp.tables {csv} --columns label piqa/acc±piqa/acc_stderr`\n")
    assert tables.refresh(page) and "| a | 0.610 ± 0.020 |" in page.read_text()
    assert not tables.refresh(page, write=False)
    csv.write_text("label,sparsity,piqa/acc,piqa/acc_stderr\na,0.5,0.63,0.02\n")
    assert tables.refresh(page, write=False)


def test_the_config_layer_imports_no_plug_in() -> None:
    """``import moyu_exp.config`` (what everything imports) loads no strategy, probe or family;
    schemas.py, above the plug-ins, registers their schemas."""
    import subprocess
    import sys

    code = (
        "import sys, moyu_exp.config; "
        "print(sorted(m for m in sys.modules if m.startswith('moyu_exp.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    loaded = out.stdout
    assert out.returncode == 0, out.stderr
    for layer in ("strategies", "probes", "families", "kernels", "models", "runner"):
        assert f"moyu_exp.{layer}" not in loaded, loaded


def test_levels_on_several_speed_axes_and_either_of_several_values(tmp_path) -> None:
    """``--speed`` with several axes gives a column group each; ``--where key=a|b`` keeps both."""
    csv = tmp_path / "f.csv"
    csv.write_text(
        "label,strategy,sparsity,status,speedup,ideal_speedup,fidelity/kl\n"
        "a,a,0.5,ok,1.2,1.4,0.2\n"
        "b,b,0.5,ok,1.4,1.4,0.4\n"
        "c,c,0.5,ok,1.4,1.4,0.1\n"
    )
    table = tables.build(
        [str(csv), "--where", "label=a|b", "--levels", "1.2", "--speed", "speedup", "ideal_speedup"]
    )
    assert table.splitlines()[0] == "| method | KL @ 1.2x | KL @ 1.2x (ideal) |"
    # along each curve from dense (speedup 1, KL 0): a at 1.2x is its point, at ideal 1.2x half
    # of it; b reaches 1.2x at half its KL on both axes; c is not kept
    assert table.splitlines()[2:] == ["| a | 0.200 | 0.100 |", "| b | 0.200 | 0.200 |"]
    rows = [{"layer": 3.0, "s": 87.25}]
    assert tables.markdown(rows, ["layer%d", "s%.1f:sec"]).splitlines()[2] == "| 3 | 87.2 |"


def test_spread_gives_a_column_group_per_value(tmp_path) -> None:
    """``--spread sparsity --by label strategy``: one row per label and strategy, the columns
    repeated per sparsity in ascending order, a missing point left empty."""
    csv = tmp_path / "k.csv"
    csv.write_text(
        "label,strategy,sparsity,efficiency,efficiency_iqr\n"
        "old,teal,0.5,0.7,0.05\n"
        "old,teal,0.3,0.8,0.04\n"
        "new,teal,0.3,0.9,0.02\n"
    )
    spread = ["--spread", "sparsity", "--by", "label", "strategy"]
    table = tables.build([str(csv), *spread, "--columns", "efficiency±efficiency_iqr%.2f:eff"])
    assert table.splitlines() == [
        "| label | strategy | eff @ 0.3 | eff @ 0.5 |",
        "|---|---|---|---|",
        "| old | teal | 0.80 ± 0.04 | 0.70 ± 0.05 |",
        "| new | teal | 0.90 ± 0.02 | - |",
    ]


# Tables that are not measurements (what exists, who owns what), by their header line.
REFERENCE_TABLES = (
    "| piece | owns | is handed | knows nothing of |",
    "| `model=` | what | weights | kernel mode |",
    "| family | transformers classes |",
)
# Measured tables still written by hand (their runs' folders were not kept, so they have no CSV
# yet): this list may only shrink; a new measured table comes with its CSV and command.
HAND_WRITTEN = {
    ("findings.md", "| probe | wall time (s) | headline |"),
    ("findings.md", "| T, mode | recall d = 1-4 | d = 5-16 | d = 17-64 | d = 65-256 |"),
    ("findings.md", "| source | Gini of f (s = 0.5) | hottest 10% share (s = 0.5) |"),
    ("findings.md", "| probe | wall time (s) | Gemma 3 270M | SmolLM2-135M |"),
    ("findings.md", "| SmolLM2, s = 0.5 | model-level sparsity | KL 1-16 |"),
    ("findings.md", "| Gemma 3, s = 0.5 | model-level sparsity | KL 1-16 |"),
    ("findings.md", "| method | 1.2x: s*, piqa | 1.4x: s*, piqa | 1.7x: s*, piqa |"),
    ("findings.md", "| method | 1.1x: s*, piqa | 1.2x: s*, piqa | 1.3x: s*, piqa |"),
    ("generality.md", "| method | Gemma 3: piqa | SmolLM2: piqa | Gemma 3: KL |"),
    ("generality.md", "| strategy | target | achieved (sites) | dense tok/s | sparse tok/s |"),
    ("generality.md", "| family | topk: model-level sparsity, wall time |"),
}


# Pages generated whole by a report command (their first line); checked against their CSV below.
WHOLE_PAGES = ("trinity.md",)


def test_every_measured_table_in_the_docs_is_generated_or_listed_as_hand_written() -> None:
    hand = []
    for page in DOCS:
        if page.name in WHOLE_PAGES:
            continue
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("|") or (i and lines[i - 1].startswith("|")):
                continue
            before = [x for x in lines[max(0, i - 2) : i] if x.strip()]
            if (before and tables.COMMAND.match(before[-1])) or line.startswith(REFERENCE_TABLES):
                continue
            listed = [h for p, h in HAND_WRITTEN if p == page.name and line.startswith(h)]
            assert listed, f"{page.name}: a table without its command above it: {line[:80]}"
            hand.append((page.name, listed[0]))
    assert sorted(hand) == sorted(HAND_WRITTEN), (
        "a hand-written table is gone: drop it from the list"
    )


TRINITY_PAGES = sorted(p for p in DOCS if p.name == "trinity.md")


def test_the_trinity_pages_are_found() -> None:
    assert ROOT / "docs" / "trinity.md" in TRINITY_PAGES


@pytest.mark.parametrize("path", TRINITY_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_trinity_page_is_what_its_csv_gives(path) -> None:
    """A trinity.md, as ``python -m moyu_exp.report --trinity`` wrote it, holds exactly the
    tables and verdicts that the trinity.csv written beside it gives."""
    from moyu_exp import trinity

    page = path.read_text()
    assert page.splitlines()[1].startswith("`python -m moyu_exp.report --trinity")
    axis = page.split("Levels read on `")[1].split("`")[0]
    target = float(page.split("reaches ")[1].split(".\n")[0])
    t = trinity.from_csv(path.with_suffix(".csv"), axis, target)
    rebuilt = trinity.markdown(t, [])
    body = page[page.index("| model | dense suite accuracy |") :]
    assert body == rebuilt[rebuilt.index("| model | dense suite accuracy |") :]
