"""Evaluation (eDiff-I §4): FID with pytorch-fid's InceptionV3 (`ediffi_jax.eval.fid`), CLIP score
(`clip_score`), and the pipeline behind ``ediffi-eval`` — resumable generation into a folder (`generate`,
`folder`), caption sets (`captions`: COCO-2014, shapes, prompt files), cached reference statistics (`reference`),
the Inception of a run (`features`), reports and the FID–CLIP plot (`report`), runs over guidance scales (`run`)
and the commands (`commands`). `smoke` writes random stand-in weights for tests."""

from ediffi_jax.eval.fid import (
    compute_statistics,
    data_mesh,
    extract_features,
    fid_from_statistics_files,
    frechet_distance,
    frechet_distance_eigh,
    load_statistics,
    save_statistics,
)

__all__ = ["compute_statistics", "data_mesh", "extract_features", "fid_from_statistics_files", "frechet_distance",
           "frechet_distance_eigh", "load_statistics", "save_statistics"]
