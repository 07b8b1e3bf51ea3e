"""Reading back the scalars of TensorBoard event files (for notebooks and tests; no TensorFlow needed).

Event files are TFRecord streams: per record a little-endian uint64 length, a uint32 masked CRC of the length,
the serialized `Event` proto, and a uint32 masked CRC of the data.
"""

from __future__ import annotations

import glob
import os
import struct
from collections import defaultdict

from tensorboardX.proto import event_pb2


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), …]} over every event file in `logdir`, sorted by step."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack_from("<Q", data, pos)
            start, end = pos + 12, pos + 12 + n
            if end + 4 > len(data):
                break  # a record still being written
            event = event_pb2.Event.FromString(data[start:end])
            for v in event.summary.value:
                out[v.tag].append((int(event.step), float(v.simple_value)))
            pos = end + 4
    return {k: sorted(v) for k, v in out.items()}
