"""Caption sets to generate from: COCO-2014 captions drawn with a fixed seed, the shapes data, a prompts file.

COCO (FID-30K, the protocol of GLIDE / Imagen / eDiff-I: captions of the COCO 2014 *validation* set). The
annotations file is ``captions_val2014.json`` of ``annotations_trainval2014.zip`` (keys ``images`` and
``annotations``, each annotation ``{"image_id", "id", "caption"}``). `coco_captions` draws ``num`` *distinct
images* (without replacement, ``numpy.random.default_rng(seed)`` over the image ids sorted ascending) and one of
each image's captions (uniformly, same generator), so the same (file, seed, num) always gives the same list; the
caption text is stripped and its whitespace collapsed. The file is parsed by `ediffi_jax.data.coco_annotations`
(the TFDS builder's parser); here any malformed entry, repeated annotation id or non-text caption is an error.
val2014 has 40,504 images (~5 captions each), enough for 30,000 distinct ones.

Shapes (`shapes_examples`): the synthetic data of a run's config (`ediffi_jax.data.shapes`), examples
``num_train, num_train + 1, ...`` (the validation range of its TFDS build and, beyond ``num_val``, further
unseen examples of the same generator); the images of the same examples are the FID reference.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ediffi_jax.data.coco_annotations import parse_annotations, parse_json

__all__ = ["coco_captions", "shapes_examples", "read_prompts"]


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def coco_captions(path: str, num: int, seed: int = 0) -> list[dict[str, Any]]:
    """``num`` records ``{"image_id", "file_name", "caption"}`` drawn from a COCO captions JSON (see the module
    docstring for the rule). ValueError for a missing / malformed file or ``num`` above the number of images."""
    if not os.path.isfile(path):
        raise ValueError(f"COCO captions file {path!r} not found (captions_val2014.json of "
                         "annotations_trainval2014.zip)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    files, annotations = parse_annotations(parse_json(text, path), path)  # a bad entry is an error here
    by_image: dict[int, list[tuple[int, str]]] = {}
    for image_id, anns in annotations.items():
        for ann_id, caption in anns:
            if not isinstance(caption, str):
                raise ValueError(f"{path}: annotation {ann_id} has no text 'caption' ({caption!r:.40})")
            by_image.setdefault(image_id, []).append((ann_id, _clean(caption)))
    ids = sorted(i for i, caps in by_image.items() if any(c for _, c in caps))
    if num < 1 or num > len(ids):
        raise ValueError(f"{path}: cannot draw {num} distinct images: it has {len(ids)} images with captions")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(ids), size=num, replace=False)
    out = []
    for k in chosen:
        image_id = ids[int(k)]
        caps = sorted(c for c in by_image[image_id] if c[1])  # by annotation id: a stable order
        out.append({"image_id": image_id, "file_name": files.get(image_id, ""),
                    "caption": caps[int(rng.integers(len(caps)))][1]})
    return out


def shapes_examples(data_config: Any, num: int) -> Any:
    """`ShapesSource` of ``num`` examples of a run's shapes data (``config.data``), from index ``num_train``."""
    from ediffi_jax.data.shapes import ShapesSource

    if data_config.get("name", "shapes") != "shapes":
        raise ValueError(f"the run's data is {data_config.name!r}, not the synthetic shapes data: "
                         "--shapes_captions needs a shapes run")
    return ShapesSource(int(data_config.seed), num, int(data_config.resolution), start=int(data_config.num_train))


def read_prompts(path: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file (one prompt per line)."""
    if not os.path.isfile(path):
        raise ValueError(f"prompts file {path!r} not found")
    with open(path, encoding="utf-8") as f:
        prompts = [_clean(line) for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path!r} has no prompts")
    return prompts
