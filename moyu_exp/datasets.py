"""Named text sources (the ``dataset`` config group): calibration text, and probe inputs.

Each loader returns a list of documents (strings).

- ``embedded``: this project's own English prose, shipped in ``moyu_exp/data/`` and identical on
  every machine: its ``calibration`` split (~1.8K SmolLM2 tokens), and its ``evaluation`` split,
  the text of ``eval=embedded`` (never used for calibration).
- ``pydoc``: CPython's own documentation as this Python has it: the language reference topics
  of ``pydoc_data``, then the docstrings of a fixed list of standard-library modules (~1M
  characters, ~220K SmolLM2 tokens; its exact text follows the Python version).
- ``default`` (the default calibration source): the embedded calibration prose first, then the
  same CPython documentation as frozen in ``data/cpython_docs.json.gz`` (from CPython 3.11.7;
  PSF licence), so that ``calibration.tokens`` (16,384) is really reached, disjoint from the
  evaluation text, and identical on every Python version (which the shipped greedy paths of the
  built-in models need: :mod:`moyu_exp.shipped`). ``python -m moyu_exp.datasets --freeze``
  rewrites the snapshot from the running Python.
- ``wikitext2``: WikiText-2 test documents from a local ``data_dir``.
"""

from __future__ import annotations

import gzip
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


# Standard-library modules whose docstrings extend the pydoc topics (no GUI, no side effects).
STDLIB_MODULES = (
    "builtins", "collections", "itertools", "functools", "os", "re", "json", "pathlib",
    "datetime", "string", "textwrap", "typing", "dataclasses", "statistics", "decimal",
    "fractions", "random", "math", "argparse", "logging", "subprocess", "threading", "asyncio",
    "unittest", "email", "http.client", "urllib.request", "xml.etree.ElementTree", "csv",
    "sqlite3", "zipfile", "tarfile", "shutil", "tempfile", "io", "contextlib", "enum", "heapq",
    "bisect", "array", "struct", "codecs", "calendar", "time", "socket", "hashlib", "hmac",
    "secrets", "uuid", "pickle", "copy", "pprint", "difflib", "inspect", "ast", "dis",
    "tokenize", "importlib", "pkgutil", "traceback", "warnings", "weakref", "gc", "abc",
    "numbers", "operator", "queue", "sched", "selectors", "signal", "locale", "gettext",
    "base64", "binascii", "html", "html.parser", "mimetypes", "smtplib", "imaplib", "wave",
    "colorsys", "cmd", "shlex", "configparser", "fileinput", "glob", "fnmatch", "filecmp",
    "stat", "platform", "sysconfig", "zipapp", "doctest", "pdb", "timeit", "trace", "pstats",
)  # fmt: skip


def pydoc_topics(name: str = "pydoc", max_documents: int | None = None) -> list[str]:
    """CPython's own documentation: the pydoc topics, then one document per standard-library
    module (its docstring and its public members'), the first ``max_documents`` of them."""
    from pydoc_data.topics import topics

    documents = [topics[key].strip() for key in sorted(topics)]
    for module_name in STDLIB_MODULES:
        if max_documents is not None and len(documents) >= max_documents:
            break
        text = _module_docs(module_name)
        if text:
            documents.append(text)
    return documents[:max_documents]


def _module_docs(module_name: str) -> str:
    import importlib
    import inspect

    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return ""
    docs = [inspect.getdoc(module) or ""]
    for member_name, member in sorted(vars(module).items()):
        if member_name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
            continue
        doc = inspect.getdoc(member)
        if doc:
            docs.append(f"{member_name}: {doc}")
    return "\n\n".join(d for d in docs if d).strip()


FROZEN_DOCS = DATA / "cpython_docs.json.gz"


def frozen_pydoc() -> list[str]:
    """:func:`pydoc_topics` as frozen in the package (the same text on every Python)."""
    with gzip.open(FROZEN_DOCS, "rt", encoding="utf-8") as f:
        return json.load(f)["documents"]


def freeze_pydoc() -> None:
    """Rewrite the frozen snapshot from this Python's documentation (a maintainer's step: it
    changes the default calibration tokens, so the shipped calibration must be regenerated)."""
    import sys

    payload = {
        "source": f"CPython {sys.version.split()[0]}: pydoc_data.topics, then the docstrings "
        "of moyu_exp.datasets.STDLIB_MODULES",
        "documents": pydoc_topics(),
    }
    with gzip.GzipFile(FROZEN_DOCS, "wb", mtime=0) as f:
        f.write(json.dumps(payload, ensure_ascii=False).encode())


def calibration_text(name: str = "default") -> list[str]:
    """The default calibration source: the embedded calibration prose, then CPython's
    documentation as frozen in the package (documents are taken in order until the token
    budget is met)."""
    return embedded(split="calibration") + frozen_pydoc()


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


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m moyu_exp.datasets")
    parser.add_argument("--freeze", action="store_true", help=freeze_pydoc.__doc__)
    if parser.parse_args().freeze:
        freeze_pydoc()
        print(f"wrote {FROZEN_DOCS}")
