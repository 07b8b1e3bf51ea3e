"""Evaluation reports: a JSON file, and the FID–CLIP-score curve drawn as a PNG with PIL (no matplotlib).

The plot follows the eDiff-I / Imagen figures: CLIP score on x, FID on y, one point per guidance scale joined in
order of the scale, each labelled with its scale; axes with ticks and labels, a title.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["write_report", "plot_curve", "nice_ticks"]


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def write_report(path: str, report: Mapping[str, Any]) -> str:
    """Writes ``report`` (plus ``created`` time and the software versions) as indented JSON, atomically (on
    process 0 only; every process returns ``path``)."""
    import flax
    import jax

    if jax.process_index() != 0:
        return path

    full = {**report, "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "versions": {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
                         "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(_jsonable(full), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2, 5 × 10^k steps) covering [lo, hi]."""
    if not hi > lo:
        lo, hi = lo - 1.0, hi + 1.0
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 10))
    return ticks


def _fmt(v: float) -> str:
    return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def plot_curve(points: Sequence[tuple[float, float, float]], path: str, *, title: str = "FID vs CLIP score",
               width: int = 720, height: int = 520) -> str:
    """Draws (clip_score, fid, guidance) points as a PNG: x = CLIP score, y = FID, points joined in order of
    guidance, each annotated ``s=<guidance>`` (on process 0 only). Returns ``path``."""
    import jax

    pts = sorted(((float(c), float(f), float(g)) for c, f, g in points), key=lambda p: p[2])
    pts = [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]
    if not pts:
        raise ValueError("plot_curve needs at least one point with a finite FID and CLIP score")
    if jax.process_index() != 0:
        return path
    font = ImageFont.load_default(size=14)  # FreeType when Pillow has it, else the small bitmap font
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 80, 30, 50, 70
    x0, x1, y0, y1 = left, width - right, top, height - bottom  # plot area (pixels; y grows downwards)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    pad_x = (max(xs) - min(xs)) * 0.1 or max(abs(xs[0]) * 0.05, 0.5)
    pad_y = (max(ys) - min(ys)) * 0.1 or max(abs(ys[0]) * 0.05, 0.5)
    xt, yt = nice_ticks(min(xs) - pad_x, max(xs) + pad_x), nice_ticks(min(ys) - pad_y, max(ys) + pad_y)
    xlo, xhi, ylo, yhi = xt[0], xt[-1], yt[0], yt[-1]

    def px(x: float, y: float) -> tuple[float, float]:
        return (x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0))

    for t in xt:  # grid and ticks
        x, _ = px(t, ylo)
        d.line([(x, y0), (x, y1)], fill=(230, 230, 230))
        d.line([(x, y1), (x, y1 + 5)], fill="black")
        label = _fmt(t)
        d.text((x - d.textlength(label, font=font) / 2, y1 + 8), label, fill="black", font=font)
    for t in yt:
        _, y = px(xlo, t)
        d.line([(x0, y), (x1, y)], fill=(230, 230, 230))
        d.line([(x0 - 5, y), (x0, y)], fill="black")
        label = _fmt(t)
        d.text((x0 - 8 - d.textlength(label, font=font), y - 8), label, fill="black", font=font)
    d.rectangle([x0, y0, x1, y1], outline="black")
    xlabel = "CLIP score (higher is better)"
    d.text(((x0 + x1) / 2 - d.textlength(xlabel, font=font) / 2, y1 + 32), xlabel, fill="black", font=font)
    ylabel = "FID (lower is better)"
    tw = int(d.textlength(ylabel, font=font)) + 4
    label_img = Image.new("RGB", (tw, 18), "white")
    ImageDraw.Draw(label_img).text((2, 1), ylabel, fill="black", font=font)
    label_img = label_img.rotate(90, expand=True)
    img.paste(label_img, (12, int((y0 + y1) / 2 - tw / 2)))
    d.text((width / 2 - d.textlength(title, font=font) / 2, 18), title, fill="black", font=font)

    line = [px(c, f) for c, f, _ in pts]
    if len(line) > 1:
        d.line(line, fill=(31, 119, 180), width=2)
    for (_, _, g), (x, y) in zip(pts, line):
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(214, 39, 40), outline="black")
        d.text((x + 7, y - 18), f"s={_fmt(g)}", fill="black", font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path, format="PNG")
    return path
