"""Reading a W&B offline run (`run-<id>.wandb`) back, for tests: its history rows and config.

The file is a LevelDB-style log (W&B's own format): a 7-byte header, then 32 KiB blocks of
records, each a 7-byte header (CRC32, length, type: full / first / middle / last) and a piece of
a serialized `wandb_internal_pb2.Record`. wandb 0.31 no longer ships a Python reader.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0:  # zero padding up to the next block
            pos += left
            continue
        pending += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def history_and_config(path: Path) -> tuple[list[dict], dict]:
    """The logged rows ({key: value, '_step': n}) and the run's config ({key: value})."""
    rows, config = [], {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
        elif kind in ("config", "run"):
            update = record.config.update if kind == "config" else record.run.config.update
            config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in update})
    return rows, config
