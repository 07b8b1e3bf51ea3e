"""Folders of images for evaluation: numbered PNGs written atomically, a ``captions.jsonl`` beside them, and
reading a folder back with unreadable files skipped and counted.

Layout of a generated folder (`ediffi_jax.eval.generate`)::

    000000.png 000001.png ...      image i is ``f"{i:06d}.png"`` (lossless, uint8 RGB)
    captions.jsonl                 one JSON object per line: {"file": "000000.png", "caption": "..."}
    generation.json                how the images were made (checked when a run resumes)

Any folder of images can be read (``.png .jpg .jpeg .webp .bmp``, sorted by name): a file that PIL cannot open
or decode (truncated, empty, not an image) is skipped and counted, and `ImageFolder.skipped_line` reports them
in one line. Images of one folder must share a size unless ``resize`` is given (centre square crop, then PIL
bicubic resize to ``resize``², the usual preparation of COCO reference images).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = ["IMAGE_SUFFIXES", "CAPTIONS_FILE", "image_name", "write_png", "list_images", "load_image",
           "center_crop_resize", "ImageFolder", "CaptionedImages", "write_captions", "read_captions"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTIONS_FILE = "captions.jsonl"


def image_name(index: int) -> str:
    """File name of generated image ``index``: ``000042.png``."""
    return f"{index:06d}.png"


def write_png(path: str, image: np.ndarray) -> str:
    """Writes uint8 [H, W, 3] ``image`` as a PNG atomically (a temporary file renamed into place), so an
    interrupted run never leaves a truncated image that a resumed run would take as done. Returns ``path``."""
    tmp = f"{path}.tmp{os.getpid()}"
    Image.fromarray(np.ascontiguousarray(image, np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def list_images(folder: str) -> list[str]:
    """Sorted names of the image files (by suffix) in ``folder``; a ValueError if it is not a directory."""
    if not os.path.isdir(folder):
        raise ValueError(f"image folder {folder!r} does not exist")
    return sorted(n for n in os.listdir(folder)
                  if n.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(folder, n)))


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """The centre square of uint8 ``image`` resized to ``size``² with PIL bicubic (antialiased when shrinking)."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = Image.fromarray(image[top:top + s, left:left + s])
    if s != size:
        square = square.resize((size, size), Image.BICUBIC)
    return np.asarray(square, np.uint8)


def load_image(path: str, resize: int | None = None) -> np.ndarray:
    """uint8 RGB [H, W, 3] of an image file (fully decoded; PIL errors propagate), optionally
    `center_crop_resize`d."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), np.uint8)
    return center_crop_resize(arr, resize) if resize else arr


class ImageFolder:
    """The image files of ``folder`` (sorted by name) as an indexed image source for `extract_features`:
    ``load(i)`` decodes file i (None when PIL cannot read it), ``need`` = ``num`` (the first ``num`` readable
    images are used), and `account` records which files were skipped after a pass.

    With ``num``, a folder that lists fewer image files raises ValueError at construction, and one whose readable
    images run out before ``num`` raises it in `account` (both messages give the counts). Without ``resize``
    every image must have the size of the first readable one (`extract_features` names the first that differs).
    """

    def __init__(self, folder: str, num: int | None = None, resize: int | None = None, what: str = "images"):
        self.folder, self.num, self.resize, self.what = folder, num, resize, what
        self.names = list_images(folder)
        if num is not None:
            if num < 1:
                raise ValueError(f"the number of images must be >= 1, got {num}")
            if len(self.names) < num:
                raise ValueError(f"{folder}: holds {len(self.names)} image files but {num} {what} were requested "
                                 f"(--num): generate or add the missing ones, or lower --num")
        if not self.names:
            raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        self.skipped: list[str] = []

    @property
    def need(self) -> int | None:
        return self.num

    def __len__(self) -> int:
        return len(self.names)

    def name(self, i: int) -> str:
        return os.path.join(self.folder, self.names[i])

    def load(self, i: int) -> np.ndarray | None:
        try:
            return load_image(os.path.join(self.folder, self.names[i]), self.resize)
        except (OSError, ValueError, SyntaxError):  # PIL: UnidentifiedImageError (an OSError), truncated data
            return None

    def account(self, kept: int, skipped: Sequence[int]) -> None:
        """Records the skipped files of a pass that read ``kept`` images; too few for ``num`` is a ValueError."""
        self.skipped = [self.names[i] for i in skipped]
        if self.num is not None and kept < self.num:
            raise ValueError(f"{self.folder}: only {kept} readable {self.what} but {self.num} were requested "
                             f"(--num; {len(self.skipped)} unreadable file(s) skipped)")

    def skipped_line(self) -> str | None:
        """One line naming the skipped files (the first five), or None when none were skipped."""
        if not self.skipped:
            return None
        names = ", ".join(self.skipped[:5]) + (", ..." if len(self.skipped) > 5 else "")
        return f"skipped {len(self.skipped)} unreadable image file(s) in {self.folder}: {names}"


class CaptionedImages:
    """(image, caption) pairs of a folder as an indexed source (see `ImageFolder`): ``pairs`` lists (file name,
    caption), e.g. `read_captions` of its ``captions.jsonl``; ``load(i)`` is None when the file is missing or
    unreadable."""

    def __init__(self, folder: str, pairs: Sequence[tuple[str, str]]):
        self.folder, self.pairs = folder, list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def name(self, i: int) -> str:
        return os.path.join(self.folder, self.pairs[i][0])

    def load(self, i: int) -> tuple[np.ndarray, str] | None:
        try:
            return load_image(self.name(i)), self.pairs[i][1]
        except (OSError, ValueError, SyntaxError):
            return None


def write_captions(folder: str, captions: Sequence[str]) -> str:
    """Writes ``captions.jsonl`` (image i ↔ caption i) atomically; returns its path."""
    path = os.path.join(folder, CAPTIONS_FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for i, caption in enumerate(captions):
            f.write(json.dumps({"file": image_name(i), "caption": caption}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_captions(path: str) -> list[tuple[str, str]]:
    """(file name, caption) pairs of a ``captions.jsonl``; a ValueError names the file and a bad line."""
    if not os.path.isfile(path):
        raise ValueError(f"captions file {path!r} not found (a generated folder has one: {CAPTIONS_FILE})")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append((str(row["file"]), str(row["caption"])))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with 'file' and 'caption', got "
                                 f"{line.strip()[:80]!r}") from None
    if not pairs:
        raise ValueError(f"captions file {path!r} is empty")
    return pairs
