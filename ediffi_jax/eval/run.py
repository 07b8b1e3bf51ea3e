"""Evaluation runs behind ``ediffi-eval``: FID of a folder, CLIP score of a folder, and generate-then-measure
over one guidance scale (COCO FID-30K) or several (the FID–CLIP curve), with a JSON report.

Output layout of `run_scales` (``out``)::

    guidance_<s>/                 the generated images of scale s (`ediffi_jax.eval.generate`, resumable)
    reference_stats.npz (+ .json) the cached reference statistics (unless --ref_stats names another file)
    report.json                   settings, per-scale {fid, clip_score, num, ...}, notes; rewritten after each scale
    curve.png                     FID vs CLIP score, points labelled with the scale (`ediffi_jax.eval.report`)

Both metrics read the images back from the folder (lossless PNGs: the arrays that were generated), so a run
that was interrupted and resumed measures exactly the same set as an uninterrupted one. Each scale's folder keeps
its measured values in ``metrics.json`` with what they depend on (a fingerprint — name, size, mtime — of the
measured image files and captions, the reference statistics' SHA-256, the Inception weights' SHA-256 and input
size, the FID method, the CLIP checkpoint); a re-run whose scale folder is unchanged reuses them instead of
extracting the features again, and anything changed recomputes.

FID method: ``"sqrtm"`` (default) is `ediffi_jax.eval.fid.frechet_distance`, pytorch-fid's computation digit
for digit; ``"eigh"`` is `frechet_distance_eigh`, the same quantity from symmetric eigenvalues (with the
generated features when they are fewer than 2048: an N×N problem), equal to ~1e-6 relative on well-conditioned
statistics and much faster on a CPU (a 2048² ``sqrtm`` takes tens of seconds there).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np
from flax import nnx

from ediffi_jax.eval import distributed
from ediffi_jax.eval.features import file_sha256, image_features, image_statistics, inception_info, load_inception
from ediffi_jax.eval.fid import compute_statistics, frechet_distance, frechet_distance_eigh
from ediffi_jax.eval.folder import CAPTIONS_FILE, CaptionedImages, ImageFolder, image_name, read_captions
from ediffi_jax.eval.generate import Generator, generate_folder
from ediffi_jax.eval.reference import reference_statistics
from ediffi_jax.eval.report import plot_curve, write_report

if TYPE_CHECKING:
    from ediffi_jax.eval.clip_score import CLIPScorer

__all__ = ["EvalConfig", "Evaluator", "run_scales", "scale_key", "run_data_config", "REPORT_FILE", "CURVE_FILE",
           "REF_STATS_FILE"]

REPORT_FILE = "report.json"
CURVE_FILE = "curve.png"
REF_STATS_FILE = "reference_stats.npz"
METRICS_FILE = "metrics.json"
FID_METHODS = ("sqrtm", "eigh")


@dataclasses.dataclass
class EvalConfig:
    """Settings of the metric models: pytorch-fid Inception weights (and input size, 299 = FID), a CLIP
    directory, the feature batch size, progress bars, where one-line messages go, and the FID method (see the
    module docstring)."""

    inception_weights: str | None = None
    inception_size: int = 299
    clip_dir: str | None = None
    batch_size: int = 32
    progress: bool = True
    log: Callable[[str], None] = print
    fid_method: str = "sqrtm"


class Evaluator:
    """Loads each metric model once, when first needed (`inception`, `clip`)."""

    def __init__(self, config: EvalConfig):
        if config.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {config.batch_size}")
        if config.fid_method not in FID_METHODS:
            raise ValueError(f"--fid_method must be one of {FID_METHODS}, got {config.fid_method!r}")
        self.config = config
        self._inception = None
        self._clip = None

    def inception(self) -> nnx.Module:
        """The FID InceptionV3, loaded on first use."""
        if self._inception is None:
            self._inception = load_inception(self.config.inception_weights, self.config.inception_size)
        return self._inception

    def inception_info(self) -> dict[str, Any]:
        self.inception()
        info = inception_info(self.config.inception_weights, self.config.inception_size)
        return {**info, "fid_method": self.config.fid_method}

    def clip(self) -> CLIPScorer:
        """The CLIP-score model, loaded on first use."""
        if self._clip is None:
            from ediffi_jax.eval.clip_score import CLIPScorer

            self._clip = CLIPScorer.from_pretrained(self.config.clip_dir)
        return self._clip

    def reference(self, path: str | None, source: Any | None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """(μ, Σ, info) of the reference, cached at ``path`` (see `reference_statistics`); ``path`` None with a
        source computes them without caching."""
        c = self.config
        if path is None:
            if source is None:
                raise ValueError("no reference: give --ref_stats (a .npz) or reference images (--ref_dir, --ref_tfds "
                                 "or --ref_shapes)")
            mu, sigma, n = image_statistics(self.inception(), source, c.batch_size,
                                            progress=c.progress)
            note = source.note()
            if note:
                c.log(note)
            return mu, sigma, {"source": source.info, "num": n, "cached": False, **({"skipped": note} if note else {})}
        return reference_statistics(path, source, self.inception, input_size=c.inception_size,
                                    batch_size=c.batch_size, progress=c.progress, log=c.log)

    def fid_folder(self, folder: str, reference: tuple[np.ndarray, np.ndarray], num: int | None = None
                   ) -> dict[str, Any]:
        """FID of the first ``num`` readable images of ``folder`` (all without ``num``) against ``reference``
        (μ, Σ). Unreadable files are skipped, counted and logged in one line; fewer readable images than ``num``
        is a ValueError. Returns ``{"fid", "num", "skipped"}``."""
        images = ImageFolder(folder, num, what="generated images")
        feats = image_features(self.inception(), images, self.config.batch_size,
                               progress=self.config.progress)
        if images.skipped_line():
            self.config.log(images.skipped_line())
        mu, sigma = compute_statistics(feats)
        if self.config.fid_method == "eigh":
            fid = frechet_distance_eigh(mu, sigma, *reference[:2], features1=feats)
        else:
            fid = frechet_distance(mu, sigma, *reference[:2])
        return {"fid": fid, "num": int(feats.shape[0]), "skipped": len(images.skipped)}

    def clip_folder(self, folder: str, num: int | None = None, captions_path: str | None = None) -> dict[str, Any]:
        """CLIP score of the (image, caption) pairs of ``folder``'s ``captions.jsonl`` (or ``captions_path``):
        the first ``num`` pairs whose image reads (all without ``num``); missing or unreadable images are skipped,
        counted and logged in one line; fewer readable pairs than ``num`` is a ValueError. Returns
        ``{"clip_score", "num", "skipped"}``."""
        path = captions_path or os.path.join(folder, CAPTIONS_FILE)
        pairs = read_captions(path)
        if num is not None and len(pairs) < num:
            raise ValueError(f"{path}: lists {len(pairs)} images but {num} were requested (--num)")
        source = CaptionedImages(folder, pairs)
        out = self.clip().scores(source, batch_size=self.config.batch_size, need=num, progress=self.config.progress,
                                 result=True)
        scores, skipped = out.outputs, [pairs[i][0] for i in out.skipped]
        if skipped:
            names = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
            self.config.log(f"skipped {len(skipped)} missing or unreadable image file(s) in {folder}: {names}")
        if num is not None and len(scores) < num:
            raise ValueError(f"{folder}: only {len(scores)} readable images of the {len(pairs)} in {CAPTIONS_FILE} "
                             f"but {num} were requested (--num; {len(skipped)} skipped)")
        return {"clip_score": float(np.mean(np.maximum(scores, 0.0))), "num": int(len(scores)),
                "skipped": len(skipped)}


def scale_key(scale: float) -> str:
    """The report key / folder suffix of a guidance scale: 3.0 → "3", 1.5 → "1.5"."""
    return f"{float(scale):g}"


def run_data_config(workdir: str | None = None, cascade: str | None = None) -> ml_collections.ConfigDict:
    """``config.data`` of a run (of stage 1 of a cascade), read from its config.json without loading the model."""
    if cascade:
        if not os.path.isfile(cascade):
            raise ValueError(f"cascade config {cascade!r} is not a file")
        with open(cascade) as f:
            stages = json.load(f).get("stages") or [{}]
        workdir = stages[0].get("workdir")
    path = os.path.join(workdir or "", "config.json")
    if not workdir or not os.path.isfile(path):
        raise ValueError(f"run directory {workdir!r} has no config.json (needed for the shapes data)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f)["data"])


def _fingerprint(folder: str, n: int) -> str:
    """SHA-1 of (name, size, mtime) of images 0..n-1 and of captions.jsonl's bytes: changes when any is rewritten."""
    h = hashlib.sha1()
    for name in [image_name(i) for i in range(n)]:
        path = os.path.join(folder, name)
        st = os.stat(path) if os.path.isfile(path) else None
        h.update(f"{name}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1};".encode())
    cap = os.path.join(folder, CAPTIONS_FILE)
    if os.path.isfile(cap):
        with open(cap, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _read_metrics(folder: str) -> dict[str, Any]:
    try:
        with open(os.path.join(folder, METRICS_FILE)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def _write_metrics(folder: str, metrics: dict[str, Any]) -> None:
    if not distributed.is_writer():
        return
    path = os.path.join(folder, METRICS_FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=2)
    os.replace(tmp, path)


def run_scales(generator: Generator, captions: Sequence[str], scales: Sequence[float], out: str,
               evaluator: Evaluator, *, ref_stats: str | None = None, ref_source: Any | None = None, seed: int = 0,
               gen_batch_size: int | None = None, metrics: Sequence[str] = ("fid", "clip_score"),
               command: str = "curve", captions_info: dict[str, Any] | None = None, plot: bool = True
               ) -> dict[str, Any]:
    """For each guidance scale: generate ``captions`` into ``out/guidance_<s>/`` (resuming), then measure
    ``metrics`` ("fid" against the reference of ``ref_stats`` / ``ref_source``, "clip_score" of the pairs). The
    report (returned, and written to ``out/report.json`` after every scale) has per scale ``{"fid",
    "clip_score", "num", ...}`` under ``results``; with both metrics and ``plot``, ``out/curve.png`` is drawn.
    The metric models load before any image is generated, so a bad weights file fails at once."""
    c = evaluator.config
    if not scales:
        raise ValueError("no guidance scales given (--guidance)")
    unknown = sorted(set(metrics) - {"fid", "clip_score"})
    if unknown:
        raise ValueError(f"unknown metrics {unknown}")
    captions = list(captions)
    n = len(captions)
    os.makedirs(out, exist_ok=True)
    report: dict[str, Any] = {"command": command, "num": n, "seed": seed, "generator": generator.info,
                              "captions": captions_info or {}, "results": {}, "notes": []}
    if "fid" in metrics:
        report["inception"] = evaluator.inception_info()
        report["notes"] += report["inception"].pop("notes")
        ref = evaluator.reference(ref_stats or os.path.join(out, REF_STATS_FILE), ref_source)
        report["reference"] = ref[2]
        if ref[2].get("num") is not None and ref[2]["num"] < n:
            report["notes"].append(f"the reference holds {ref[2]['num']} images, fewer than the {n} generated")
    if "clip_score" in metrics:
        report["clip"] = evaluator.clip().info
        if "note" in report["clip"]:
            report["notes"].append(report["clip"].pop("note"))
    depends: dict[str, Any] = {}  # what each metric's value depends on, besides the images
    if "fid" in metrics:
        depends["fid"] = {"reference_sha256": file_sha256(ref[2]["stats"]) if ref[2].get("stats") else None,
                          "inception_sha256": report["inception"]["sha256"],
                          "input_size": report["inception"]["input_size"], "method": c.fid_method}
    if "clip_score" in metrics:
        weights = [os.path.join(c.clip_dir, f) for f in sorted(os.listdir(c.clip_dir))
                   if f.endswith((".safetensors", ".bin", ".json", ".txt"))]
        depends["clip_score"] = {"dir": os.path.abspath(c.clip_dir),
                                 "files": [[os.path.basename(w), os.stat(w).st_size, os.stat(w).st_mtime_ns]
                                           for w in weights]}
    path = os.path.join(out, REPORT_FILE)
    for s in scales:
        key = scale_key(s)
        folder = os.path.join(out, f"guidance_{key}")
        c.log(f"guidance {key}: generating {n} images into {folder}")
        counts = generate_folder(generator, captions, folder, seed=seed, guidance=float(s),
                                 batch_size=gen_batch_size or c.batch_size, progress=c.progress)
        entry: dict[str, Any] = {"guidance": float(s), "folder": os.path.abspath(folder), "num": n, **counts,
                                 "skipped": 0, "reused": []}
        stored = _read_metrics(folder)
        images_fp = _fingerprint(folder, n)
        for m in metrics:
            want = json.loads(json.dumps({**depends[m], "num": n, "images": images_fp}))
            if stored.get(m, {}).get("depends") == want:
                result = stored[m]["result"]
                entry["reused"].append(m)
            else:
                result = (evaluator.fid_folder(folder, ref[:2], num=n) if m == "fid"
                          else evaluator.clip_folder(folder, num=n))
                stored[m] = {"depends": want, "result": result}
                _write_metrics(folder, stored)
            entry[m] = result[m]
            entry["skipped"] = max(entry["skipped"], result["skipped"])
        report["results"][key] = entry
        reused = f"; reused from {METRICS_FILE}: {', '.join(entry['reused'])}" if entry["reused"] else ""
        c.log(f"guidance {key}: " + ", ".join(f"{m} {entry[m]:.4f}" for m in metrics) + f" ({n} images{reused})")
        write_report(path, report)
    if plot and {"fid", "clip_score"} <= set(metrics):
        pts = [(r["clip_score"], r["fid"], r["guidance"]) for r in report["results"].values()]
        report["plot"] = plot_curve(pts, os.path.join(out, CURVE_FILE),
                                    title=f"FID vs CLIP score over guidance ({n} images)")
    write_report(path, report)
    if distributed.is_writer():
        c.log(f"wrote {path}" + (f" and {report['plot']}" if "plot" in report else ""))
    return report
