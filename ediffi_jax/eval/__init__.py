"""Evaluation metrics: FID with pytorch-fid's InceptionV3 (`ediffi_jax.eval.fid`)."""

from ediffi_jax.eval.fid import (
    compute_statistics,
    data_mesh,
    extract_features,
    fid_from_statistics_files,
    frechet_distance,
    load_statistics,
    save_statistics,
)

__all__ = ["compute_statistics", "data_mesh", "extract_features", "fid_from_statistics_files", "frechet_distance",
           "load_statistics", "save_statistics"]
