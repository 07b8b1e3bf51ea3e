"""The one parser of COCO caption annotation files (``captions_{train,val}2014.json``), for the TFDS builder
(`coco_tfds`: bad entries skipped and counted) and the FID-30K prompt draw (`eval.captions`: bad entries are
errors). No TFDS import, so `ediffi-eval` stays light.

The JSON has ``images`` ``[{id, file_name, ...}]`` and ``annotations`` ``[{image_id, id, caption}]``. Bad entries:
an images entry without an integer ``id`` and a string ``file_name``, or an annotation without integer
``image_id`` and ``id`` (``malformed_entry``); an annotation id seen before (``duplicate_key``; the first in file
order wins). Captions are returned as found (``None`` when absent): checking and cleaning them is the caller's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

# drop(reason, what, detail): called for each bad entry instead of raising.
Drop = Callable[[str, str, str], None]


def parse_json(text: str, where: Any) -> dict[str, Any]:
    """The parsed captions file (``images`` and ``annotations`` lists); ValueError naming `where` otherwise."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list) or not isinstance(
            data.get("images", []), list):
        raise ValueError(f"{where}: not a COCO captions file (needs lists 'images' of {{id, file_name}} and "
                         "'annotations' of {image_id, id, caption}, as captions_val2014.json)")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_annotations(data: dict[str, Any], where: Any, drop: Drop | None = None
                      ) -> tuple[dict[int, str], dict[int, list[tuple[int, Any]]]]:
    """({image id: file name}, {image id: [(annotation id, caption or None), ...] in file order}) of a parsed
    captions file. Each bad entry (module docstring) goes to ``drop(reason, what, detail)``; with ``drop=None`` it
    is a one-line ValueError naming `where` and the entry."""
    def bad(reason: str, what: str, detail: str) -> None:
        if drop is None:
            raise ValueError(f"{where}: {what}: {detail}")
        drop(reason, what, detail)

    files: dict[int, str] = {}
    for entry in data.get("images", []):
        if isinstance(entry, dict) and isinstance(entry.get("file_name"), str) and _is_int(entry.get("id")):
            files.setdefault(int(entry["id"]), entry["file_name"])
        else:
            bad("malformed_entry", f"images entry {str(entry)[:60]}", "needs 'id' and 'file_name'")
    by_image: dict[int, list[tuple[int, Any]]] = {}
    seen: set[int] = set()
    for entry in data["annotations"]:
        if not (isinstance(entry, dict) and _is_int(entry.get("image_id")) and _is_int(entry.get("id"))):
            bad("malformed_entry", f"annotation {str(entry)[:60]}", "needs integer 'image_id' and 'id'")
            continue
        image_id, ann_id = int(entry["image_id"]), int(entry["id"])
        if ann_id in seen:
            bad("duplicate_key", f"annotation {ann_id}", "annotation id seen before")
            continue
        seen.add(ann_id)
        by_image.setdefault(image_id, []).append((ann_id, entry.get("caption")))
    return files, by_image
