"""Looking at a built image–text dataset: its counts, a contact sheet of random samples, caption lengths; and the
training pipeline's throughput over it. The logic behind ``ediffi-data inspect`` / ``ediffi-data bench``.

docs/data_contact_sheet.png is the contact sheet of the COCO-layout test data (tests/test_data_builders.py)::

    .venv/bin/python -c "import sys; sys.path.insert(0, 'tests'); \\
        from test_data_builders import make_coco_tree; make_coco_tree('/tmp/coco')"
    .venv/bin/python -m ediffi_jax.cli.data build --layout coco --path /tmp/coco --data_dir /tmp/tfds
    .venv/bin/python -m ediffi_jax.cli.data inspect --dataset_dir <the dataset_dir build printed> \\
        --split train --num 12 --seed 0 --sheet docs/data_contact_sheet.png
"""

from __future__ import annotations

import io
import math
import os
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np

from ediffi_jax.data import image_text as it

SPLIT_ORDER = ("train", "validation")


def open_dataset(dataset_dir: str) -> Any:
    """The prepared dataset at `dataset_dir` (the directory ``ediffi-data build`` prints), read TF-free."""
    import tensorflow_datasets as tfds

    if not os.path.isfile(os.path.join(os.fspath(dataset_dir), "dataset_info.json")):
        raise ValueError(f"{dataset_dir!r} is not a prepared dataset directory (no dataset_info.json; give the "
                         "dataset_dir that `ediffi-data build` printed)")
    return tfds.builder_from_directory(os.fspath(dataset_dir))


def splits_of(builder: Any) -> list[str]:
    """The dataset's split names, train and validation first."""
    names = list(builder.info.splits.keys())
    return sorted(names, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s))


def default_split(builder: Any, split: str | None) -> str:
    """`split`, checked; or the first of the dataset's splits."""
    names = splits_of(builder)
    if split is None:
        return names[0]
    if split not in names:
        raise ValueError(f"unknown split {split!r} (the dataset has {', '.join(names)})")
    return split


def format_counts(counts: dict[str, dict[str, Any]]) -> str:
    """One line per split: "train: 30 of 37 records kept: dropped 4 missing_caption, 3 unreadable_image"."""
    if not counts:
        return "(no counts recorded in this dataset's metadata)"
    return "\n".join(f"{split}: {it.summary(c)}" for split, c in counts.items())


def sample_indices(size: int, num: int, seed: int = 0) -> list[int]:
    """`num` distinct indices of ``range(size)`` (all when fewer), drawn with ``default_rng(seed)``, ascending."""
    if size <= 0:
        return []
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(size, size=min(num, size), replace=False))


def _text(value: Any) -> str:
    return bytes(value).decode("utf-8", errors="replace") if isinstance(value, (bytes, np.bytes_)) else str(value)


def contact_sheet(records: Sequence[dict], *, columns: int = 4, cell: int = 160, caption_lines: int = 4,
                  title: str | None = None) -> Any:
    """A PIL image: each record's image fitted into a ``cell`` x ``cell*3/4`` box, its key / size and caption
    (wrapped, at most ``caption_lines`` lines) drawn under it with PIL's default font."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(probe.textbbox((0, 0), "Ag", font=font)[3]) + 3
    char_w = max(1.0, probe.textlength("abcdefghijklmnopqrstuvwxyz", font=font) / 26)
    wrap = max(8, int((cell - 8) / char_w))
    box_h = cell * 3 // 4
    cell_h = box_h + 6 + line_h * (caption_lines + 1) + 6
    rows = max(1, math.ceil(len(records) / columns))
    title_lines = textwrap.wrap(title, int((columns * cell - 8) / char_w)) if title else []
    top = line_h * len(title_lines) + (8 if title_lines else 0)
    sheet = Image.new("RGB", (columns * cell, top + rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(title_lines):
        draw.text((4, 4 + i * line_h), line, fill=(0, 0, 0), font=font)
    for n, record in enumerate(records):
        x0, y0 = (n % columns) * cell, top + (n // columns) * cell_h
        draw.rectangle((x0 + 2, y0 + 2, x0 + cell - 3, y0 + box_h - 1), fill=(235, 235, 235))
        try:
            with Image.open(io.BytesIO(bytes(record["image"]))) as im:
                im = im.convert("RGB")
            scale = min((cell - 6) / im.width, (box_h - 4) / im.height)
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
            sheet.paste(im, (x0 + (cell - im.width) // 2, y0 + 2 + (box_h - 2 - im.height) // 2))
        except Exception as e:  # a record that does not decode: say so in the cell, keep the sheet
            draw.text((x0 + 6, y0 + 6), f"undecodable: {type(e).__name__}", fill=(200, 0, 0), font=font)
        size = f"{int(record.get('width', 0))}x{int(record.get('height', 0))}"
        key = textwrap.shorten(_text(record.get("key", "")), wrap - len(size) - 1, placeholder="...")
        y = y0 + box_h + 4
        draw.text((x0 + 4, y), f"{key} {size}", fill=(120, 120, 120), font=font)
        lines = textwrap.wrap(_text(record.get("caption", "")), wrap) or [""]
        if len(lines) > caption_lines:
            lines = lines[:caption_lines - 1] + [textwrap.shorten(" ".join(lines[caption_lines - 1:]), wrap,
                                                                  placeholder=" ...")]
        for j, line in enumerate(lines):
            draw.text((x0 + 4, y + (j + 1) * line_h), line, fill=(0, 0, 0), font=font)
    return sheet


def length_histogram(captions: Sequence[str], *, bins: int = 12, width: int = 40) -> str:
    """Text histogram of caption lengths in words (and their min / median / mean / max)."""
    lengths = np.array([len(c.split()) for c in captions], dtype=np.int64)
    if lengths.size == 0:
        return "caption length (words): no captions"
    step = max(1, math.ceil((int(lengths.max()) + 1) / bins))
    edges = np.arange(0, int(lengths.max()) + step + 1, step)
    hist, _ = np.histogram(lengths, bins=edges)
    lines = [f"caption length (words), {lengths.size} captions: min {lengths.min()}, median "
             f"{float(np.median(lengths)):g}, mean {lengths.mean():.1f}, max {lengths.max()}"]
    top = max(int(hist.max()), 1)
    for lo, n in zip(edges[:-1], hist):
        if n == 0 and (lo < lengths.min() or lo > lengths.max()):
            continue
        label = f"{lo}" if step == 1 else f"{lo}-{lo + step - 1}"
        lines.append(f"{label:>9} | {'#' * max(int(n > 0), round(width * int(n) / top)):<{width}} {n}")
    return "\n".join(lines)


def inspect_dataset(dataset_dir: str, *, split: str | None = None, num: int = 16, seed: int = 0,
                    out: str | None = None, sheet: str | None = None, hist_num: int = 2000,
                    columns: int = 4) -> dict[str, Any]:
    """Counts of every split; for `split` (default: the first), a contact sheet of `num` random records (written
    to `sheet`, or ``<out>/contact_sheet_<split>.png``) and the caption-length histogram of up to `hist_num`
    random records (``<out>/caption_lengths_<split>.txt``). Returns {"counts", "split", "size", "histogram",
    "sheet", "files"}."""
    if num < 1 or hist_num < 1:
        raise ValueError(f"--num and --hist_num must be >= 1, got {num} and {hist_num}")
    builder = open_dataset(dataset_dir)
    split = default_split(builder, split)
    source = builder.as_data_source(split)
    records = [source[i] for i in sample_indices(len(source), num, seed)]
    counts = it.read_counts(builder)
    histogram = length_histogram([_text(source[i]["caption"]) for i in sample_indices(len(source), hist_num, seed)])
    config = builder.info.config_name or builder.info.name
    c = counts.get(split)
    title = f"{builder.info.name} / {config} / {split}: " + (it.summary(c) if c else f"{len(source)} records")
    image = contact_sheet(records, columns=columns, title=title)
    files = []
    sheet = sheet or (os.path.join(out, f"contact_sheet_{split}.png") if out else None)
    if sheet:
        os.makedirs(os.path.dirname(os.path.abspath(sheet)), exist_ok=True)
        image.save(sheet, optimize=True)
        files.append(sheet)
    if out:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, f"caption_lengths_{split}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(histogram + "\n")
        files.append(path)
    return {"counts": counts, "split": split, "size": len(source), "histogram": histogram, "sheet": image,
            "files": files}


def bench(dataset_dir: str, *, split: str | None = None, resolution: int = 64, batch_size: int = 32,
          num_workers: int = 0, num_batches: int = 20, seed: int = 0) -> dict[str, float]:
    """Examples/s of the training input pipeline over a built dataset on this host
    (`ediffi_jax.data.throughput.measure_pipeline`)."""
    try:
        from ediffi_jax.data.throughput import measure_pipeline
    except ModuleNotFoundError as e:
        if e.name != "ediffi_jax.data.throughput":
            raise
        raise ValueError("bench needs ediffi_jax.data.throughput (the training pipeline's measure_pipeline), "
                         "which this checkout lacks") from None

    builder = open_dataset(dataset_dir)
    source = builder.as_data_source(default_split(builder, split))
    return measure_pipeline(source, resolution=resolution, batch_size=batch_size, num_workers=num_workers,
                            num_batches=num_batches, seed=seed)
