"""Read an offline W&B run back from the file ``wandb sync`` uploads (``run-<id>.wandb``: LevelDB-log
framing of W&B's own protobuf records), not from the SDK objects the code wrote to."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def records(path: Path) -> Iterator[Any]:
    """The protobuf records of a ``.wandb`` file (7-byte header, 32 KiB blocks, 7-byte chunk headers:
    crc32, little-endian length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def finished_run_file(folder: Path, timeout_s: float = 10.0) -> Path:
    """The one ``offline-run-*/run-*.wandb`` under ``folder``, once it is complete (its exit record is
    there), waiting at most ``timeout_s``: the W&B service writes it asynchronously (``wandb.teardown()``
    stops the service)."""
    deadline = time.monotonic() + timeout_s
    while True:
        files = list(Path(folder).glob("offline-run-*/run-*.wandb"))
        if files and any(r.WhichOneof("record_type") == "exit" for r in records(files[0])):
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(files) == 1, f"one W&B run file under {folder}, not {files}"
    return files[0]


def summary_and_runs(path: Path) -> tuple[dict[str, Any], list[Any]]:
    """The run's summary as W&B holds it (nested keys joined with ``/``) and its run records."""
    summary, runs = {}, []
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in rec.summary.update})
        elif kind == "run":
            runs.append(rec.run)
    return summary, runs
