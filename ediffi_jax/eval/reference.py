"""FID reference statistics: computed once from a source of real images and cached as ``.npz``.

Sources: a folder of images (`FolderReference`, e.g. COCO val2014 images, optionally centre-cropped and resized),
the synthetic shapes data of a run (`ShapesReference`) and a split of a TFDS dataset directory
(`TFDSReference`, read TF-free with ``tfds.builder_from_directory(dir).as_data_source(split)``, records with an
``image`` feature). `reference_statistics` returns (μ, Σ) from the cache file when it exists, and otherwise
extracts the features of the source, writes the cache (the pytorch-fid / clean-fid layout: ``mu``, ``sigma``)
and a sidecar ``<file>.json`` describing the source and the feature extractor. A cache whose sidecar names
another source or Inception input size is refused (a ValueError naming both) instead of silently compared with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from flax import nnx

from ediffi_jax.eval import distributed
from ediffi_jax.eval.features import image_statistics
from ediffi_jax.eval.fid import load_statistics, save_statistics
from ediffi_jax.eval.folder import ImageFolder, center_crop_resize
from ediffi_jax.models.inception import FEATURE_DIM

__all__ = ["FolderReference", "ShapesReference", "TFDSReference", "reference_statistics"]


class FolderReference:
    """The first ``num`` readable images (by name) of a folder; unreadable files are skipped and counted."""

    def __init__(self, folder: str, num: int | None = None, resize: int | None = None):
        self.images = ImageFolder(folder, num, resize, what="reference images")
        self.info = {"kind": "folder", "path": os.path.abspath(folder), "num": num, "resize": resize}
        self.need, self.load, self.name, self.account = num, self.images.load, self.images.name, self.images.account

    def __len__(self) -> int:
        return len(self.images)

    def note(self) -> str | None:
        return self.images.skipped_line()


class ShapesReference:
    """Images of examples ``num_train ..`` of a run's shapes data (`ediffi_jax.eval.captions.shapes_examples`)."""

    def __init__(self, data_config: Any, num: int):
        from ediffi_jax.eval.captions import shapes_examples

        self.source = shapes_examples(data_config, num)
        self.info = {"kind": "shapes", "seed": self.source.seed, "start": self.source.start, "num": num,
                     "resolution": self.source.resolution}

    def __len__(self) -> int:
        return len(self.source)

    def load(self, i: int) -> np.ndarray:
        return self.source[i]["image"]

    def name(self, i: int) -> str:
        return f"shapes example {self.source.start + i}"

    def note(self) -> str | None:
        return None


class TFDSReference:
    """The first ``num`` records of ``split`` of a TFDS dataset directory (a ``dataset_info.json`` folder)."""

    def __init__(self, data_dir: str, split: str = "validation", num: int | None = None, resize: int | None = None):
        import tensorflow_datasets as tfds

        if not os.path.isdir(data_dir):
            raise ValueError(f"TFDS dataset directory {data_dir!r} does not exist")
        try:
            builder = tfds.builder_from_directory(data_dir)
        except Exception as e:  # TFDS raises many kinds: one line naming the directory instead
            raise ValueError(f"{data_dir}: not a TFDS dataset directory ({type(e).__name__}: {e})") from None
        if split not in builder.info.splits:
            raise ValueError(f"{data_dir}: no split {split!r} (has {sorted(builder.info.splits)})")
        self.source = builder.as_data_source(split)
        total = len(self.source)
        if num is not None and num > total:
            raise ValueError(f"{data_dir}: split {split!r} holds {total} records but {num} reference images were "
                             "requested (--ref_num)")
        self.num, self.resize = (total if num is None else num), resize
        self.info = {"kind": "tfds", "path": os.path.abspath(data_dir), "split": split, "num": self.num,
                     "resize": resize}

    def __len__(self) -> int:
        return self.num

    def load(self, i: int) -> np.ndarray:
        from ediffi_jax.data.pipeline import decode_image

        image = decode_image(self.source[i]["image"])
        return center_crop_resize(image, self.resize) if self.resize else image

    def name(self, i: int) -> str:
        return f"{self.info['path']} {self.info['split']}[{i}]"

    def note(self) -> str | None:
        return None


def _sidecar(path: str) -> str:
    return f"{path}.json"


def reference_statistics(path: str, source: Any | None, model_fn: Callable[[], nnx.Module], *,
                         input_size: int, batch_size: int = 32, progress: bool = True,
                         log: Callable[[str], None] = print) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(μ, Σ, info) of the reference: read from ``path`` when it exists (checked to be 2048-d and, when its
    sidecar and ``source`` both exist, to describe the same source and input size), else computed from
    ``source`` with ``model_fn()`` (the Inception, built only when needed) and cached at ``path``."""
    path = os.fspath(path)
    if os.path.isfile(path):
        mu, sigma = load_statistics(path, FEATURE_DIM)
        info: dict[str, Any] = {"stats": os.path.abspath(path), "cached": True}
        if os.path.isfile(_sidecar(path)):
            with open(_sidecar(path)) as f:
                stored = json.load(f)
            info.update(source=stored.get("source"), input_size=stored.get("input_size"), num=stored.get("num"))
            if source is not None and stored.get("source") != json.loads(json.dumps(source.info)):
                raise ValueError(f"cached reference statistics {path} were computed from {stored.get('source')}, "
                                 f"not {source.info}: delete the file or pass another --ref_stats")
            if stored.get("input_size") not in (None, input_size):
                raise ValueError(f"cached reference statistics {path} use Inception input size "
                                 f"{stored.get('input_size')}, not {input_size}: delete the file or pass another "
                                 "--ref_stats")
        log(f"reference statistics: {path} (cached)")
        return mu, sigma, info
    if source is None:
        raise ValueError(f"reference statistics file {path!r} not found and no reference images given to compute "
                         "it from (--ref_dir, --ref_tfds or --ref_shapes)")
    log(f"reference statistics: computing from {source.info}")
    mu, sigma, n = image_statistics(model_fn(), source, batch_size, progress=progress)
    note = source.note()
    if note:
        log(note)
    meta = {"source": source.info, "num": n, "input_size": input_size, "dim": int(mu.shape[0])}
    if distributed.is_writer():
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_statistics(path, mu, sigma)
        with open(_sidecar(path), "w") as f:
            json.dump(meta, f, indent=2)
    distributed.barrier("ediffi_jax:reference_statistics")
    if distributed.is_writer():
        log(f"reference statistics: wrote {path} ({n} images)")
    return mu, sigma, {"stats": os.path.abspath(path), "cached": False, **meta,
                       **({"skipped": note} if note else {})}
