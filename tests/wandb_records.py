"""Read the records of an offline W&B run file (``run-*.wandb``) for assertions in tests.

The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks, each with a
4-byte checksum, a 2-byte length and a 1-byte type (1 full, 2 first, 3 middle, 4 last); a
record is the concatenation of its chunks, a serialized ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
CHUNK_HEADER = 7


def records(path: Path, wait: float = 30.0) -> list[Any]:
    """The file's records, once it ends with the run's ``exit`` record: W&B's service writes
    the file after ``run.finish()`` returns, so a test reading it at once can find only the
    header. A run that never exits (killed) is read as it is after ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        out = _read(path)
        if (out and out[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return out
        time.sleep(0.1)


def _read(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    out, pending, pos = [], b"", HEADER
    while pos + CHUNK_HEADER <= len(data):
        room = BLOCK - (pos % BLOCK)
        if room < CHUNK_HEADER:  # block trailer padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if pos + CHUNK_HEADER + length > len(data):  # being written
            break
        payload = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def summary(path: Path) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                values[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return values


def record_types(path: Path) -> list[str]:
    return [r.WhichOneof("record_type") for r in records(path)]
