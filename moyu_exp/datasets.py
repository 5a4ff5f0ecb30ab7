"""Named text sources (the ``dataset`` config group): calibration text now, probe inputs later.

Each loader returns a list of documents (strings). ``embedded`` is this project's own English
prose, shipped in ``moyu_exp/data/`` and identical on every machine: its ``calibration`` split
calibrates thresholds, its ``evaluation`` split is the text of ``eval=embedded``.
"""

from __future__ import annotations

import json
from pathlib import Path

from moyu_exp.errors import ConfigError

DATA = Path(__file__).parent / "data"
EMBEDDED_SPLITS = ("calibration", "evaluation")


def embedded(name: str = "embedded", split: str = "calibration") -> list[str]:
    """The project's own prose, split into documents at lines holding only ``---``."""
    if split not in EMBEDDED_SPLITS:
        raise ConfigError(
            f"dataset.split='{split}' is unknown: accepted splits are {', '.join(EMBEDDED_SPLITS)}"
        )
    text = (DATA / f"{split}.txt").read_text(encoding="utf-8")
    return [doc.strip() for doc in text.split("\n---\n") if doc.strip()]


def pydoc_topics(name: str = "pydoc", max_documents: int = 64) -> list[str]:
    """CPython's own documentation topics (technical text; varies with the Python version)."""
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics)][:max_documents]


def wikitext2(name: str = "wikitext2", data_dir: str | None = None, max_documents: int = 16):
    """WikiText-2 test documents from a local data directory (``wikitext2_raw/``)."""
    path = require_data_file(data_dir, "wikitext2_raw/test_documents.jsonl", f"dataset={name}")
    with open(path, encoding="utf-8") as f:
        pages = [json.loads(line)["page"] for line in f if line.strip()]
    return pages[:max_documents]


def require_data_file(data_dir: str | None, relative: str, needed_by: str) -> Path:
    """``data_dir/relative``, or a one-line ConfigError naming what is missing."""
    if not data_dir:
        raise ConfigError(f"{needed_by} needs local data: set data_dir=... or MOYU_DATA_DIR")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data_dir='{data_dir}' does not exist")
    path = root / relative
    if not path.is_file():
        raise ConfigError(
            f"data_dir='{data_dir}' lacks {relative} (needed by {needed_by}; "
            "layout as in ../shared/data/README.md)"
        )
    return path
