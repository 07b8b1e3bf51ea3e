"""TFDS builder for the synthetic shapes dataset (array_record files; prepares and reads without TensorFlow).

Every (resolution, num_train, num_val, seed) combination is its own builder config, named
``r{resolution}_n{num_train}_v{num_val}_s{seed}``, so several variants coexist in one ``data_dir``.
Record ``i`` of the train split is ``shapes.example(seed, i, resolution)``; validation record ``j`` is
``shapes.example(seed, num_train + j, resolution)``, so the splits never share a scene draw (shuffling
on write is disabled; shuffle at read time, e.g. in `ediffi_jax.data.pipeline`).
Images are written as PNG bytes (encoded with PIL), which is what keeps generation TensorFlow-free.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from ediffi_jax.data import shapes

# One shared description so `_info` can stay config-independent apart from the image shape.
_DESCRIPTION = (
    "Synthetic text-to-image data: one or two solid coloured shapes (circle / square / triangle) at coarse "
    "positions on a gray background, with template captions such as 'a red circle on the left and a blue "
    "square at the bottom'. Generated deterministically from a seed; see ediffi_jax.data.shapes."
)


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """Resolution, split sizes and seed of one shapes dataset variant."""

    resolution: int = 32
    num_train: int = 10_000
    num_val: int = 1_000
    seed: int = 0
    max_objects: int = 2


def config_name(resolution: int, num_train: int, num_val: int, seed: int, max_objects: int = 2) -> str:
    """Builder-config name of a dataset variant, e.g. "r32_n10000_v1000_s0"."""
    name = f"r{resolution}_n{num_train}_v{num_val}_s{seed}"
    return name if max_objects == 2 else f"{name}_o{max_objects}"


def make_config(
    resolution: int, num_train: int, num_val: int, seed: int = 0, max_objects: int = 2
) -> ShapesConfig:
    """Validated `ShapesConfig` for a dataset variant."""
    if resolution < shapes.MIN_RESOLUTION:
        raise ValueError(f"resolution must be >= {shapes.MIN_RESOLUTION}, got {resolution}")
    if num_train < 1:
        raise ValueError(f"num_train must be >= 1, got {num_train}")
    if num_val < 0:
        raise ValueError(f"num_val must be >= 0, got {num_val}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 1 <= max_objects <= len(shapes.POSITIONS):
        raise ValueError(f"max_objects must be in [1, {len(shapes.POSITIONS)}], got {max_objects}")
    return ShapesConfig(
        name=config_name(resolution, num_train, num_val, seed, max_objects),
        description=f"{resolution}x{resolution}, {num_train} train / {num_val} validation, seed {seed}",
        resolution=resolution,
        num_train=num_train,
        num_val=num_val,
        seed=seed,
        max_objects=max_objects,
    )


class Shapes(tfds.core.GeneratorBasedBuilder):
    """Synthetic coloured-shapes captions/images; pass ``config=make_config(...)``."""

    name = "ediffi_shapes"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [make_config(32, 10_000, 1_000, 0)]

    # tfds 4.9.10's default `code_path` touches the `importlib_resources` backport (only installed on
    # Python < 3.9) for builders defined inside an installed package; point it at this file instead.
    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        res = self.builder_config.resolution
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(res, res, 3), encoding_format="png"),
                    "caption": tfds.features.Text(),
                }
            ),
            supervised_keys=None,
            homepage=None,
            disable_shuffling=True,  # keep record i == example i, so files match `shapes.example` exactly
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        cfg = self.builder_config
        splits = {"train": self._generate_examples(0, cfg.num_train)}
        if cfg.num_val > 0:
            splits["validation"] = self._generate_examples(cfg.num_train, cfg.num_train + cfg.num_val)
        return splits

    def _generate_examples(self, start: int, stop: int) -> Iterator[tuple[int, dict]]:
        cfg = self.builder_config
        for index in range(start, stop):
            ex = shapes.example(cfg.seed, index, cfg.resolution, max_objects=cfg.max_objects)
            yield index - start, {"image": shapes.encode_png(ex["image"]), "caption": ex["caption"]}


def build_shapes(
    data_dir: str,
    resolution: int,
    num_train: int,
    num_val: int,
    seed: int = 0,
    *,
    max_objects: int = 2,
) -> Shapes:
    """Prepares the shapes dataset variant under `data_dir` unless already there, and returns its builder.

    Read it TF-free with ``builder.as_data_source("train")`` (random access; records are
    ``{"image": uint8 [R, R, 3], "caption": bytes}``).
    """
    config = make_config(resolution, num_train, num_val, seed, max_objects)
    config = Shapes.builder_configs.get(config.name, config)  # tfds rejects equal-named custom copies
    builder = Shapes(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    if not builder.is_prepared():
        download_dir = os.path.join(os.fspath(data_dir), "downloads")
        builder.download_and_prepare(
            download_dir=download_dir,
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    return builder
