"""CLIP score (`ediffi_jax.eval.clip_score`) against transformers' PyTorch CLIPModel and CLIPImageProcessor on a
tiny random checkpoint (written by `ediffi_jax.eval.smoke.write_random_clip`)."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ediffi_jax.data.shapes import ShapesSource  # noqa: E402
from ediffi_jax.eval.clip_score import CLIPScorer, clip_resize_crop  # noqa: E402
from ediffi_jax.eval.smoke import write_random_clip  # noqa: E402

CAPTIONS = [ShapesSource(0, 64, 32)[i]["caption"] for i in range(64)]
LONG = " and ".join(CAPTIONS[:12])  # far beyond 77 tokens: truncated, EOS kept
SIZES = [(32, 32), (48, 40), (20, 36), (100, 64), (33, 90)]  # (H, W): up- and downscaling, both orientations


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("clip"))
    write_random_clip(d, CAPTIONS, seed=3)
    # A processor config that differs from the defaults (shortest side 36, crop 32): it must be honoured.
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 36},
                                                   crop_size={"height": 32, "width": 32})
    processor.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def scorer(clip_dir):
    return CLIPScorer.from_pretrained(clip_dir)


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        # smooth random images (bicubic resampling of noise is dominated by clipping otherwise)
        base = rng.integers(0, 256, (4, 4, 3)).astype(np.float64)
        ys, xs = np.linspace(0, 3, h)[:, None], np.linspace(0, 3, w)[None, :]
        img = np.stack([base[np.round(ys).astype(int), np.round(xs).astype(int), c] for c in range(3)], -1)
        img = img + rng.normal(0, 20, (h, w, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def test_preprocessing_matches_hf_image_processor(clip_dir, scorer):
    processor = transformers.CLIPImageProcessorPil.from_pretrained(clip_dir)
    assert (scorer.size, scorer.crop) == (36, 32)
    images = _images(len(SIZES))
    ref = processor(images=images, return_tensors="np")["pixel_values"]  # NCHW float32
    ours = scorer.pixel_values(images)
    err = np.abs(ours.transpose(0, 3, 1, 2) - ref).max()
    print(f"pixel values vs CLIPImageProcessorPil: max|d| = {err:.2e}")
    assert ours.shape == (len(SIZES), 32, 32, 3) and err <= 1e-5
    assert clip_resize_crop(images[1], 36, 32).shape == (32, 32, 3)


def test_clip_score_matches_torch_clipmodel(clip_dir, scorer):
    images = _images(10, seed=1)
    captions = [CAPTIONS[i] for i in range(9)] + [LONG]
    ours = scorer.scores(zip(images, captions), batch_size=4, progress=False)  # 4 + 4 + 2 (padded)

    hf = transformers.CLIPModel.from_pretrained(clip_dir).eval()
    tok = scorer.tokenizer(captions)
    assert tok["ids"].shape == (10, 77) and tok["mask"][-1].all()  # the long caption fills all 77 positions
    assert tok["ids"][-1, -1] == scorer.tokenizer.eos_id  # truncated with its EOS kept
    with torch.no_grad():
        img = hf.get_image_features(pixel_values=torch.from_numpy(scorer.pixel_values(images).transpose(0, 3, 1, 2)))
        txt = hf.get_text_features(input_ids=torch.from_numpy(tok["ids"].astype(np.int64)),
                                   attention_mask=torch.from_numpy(tok["mask"].astype(np.int64)))
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    img = img / img.norm(p=2, dim=-1, keepdim=True)  # torchmetrics' _clip_score
    txt = txt / txt.norm(p=2, dim=-1, keepdim=True)
    ref = (100 * (img * txt).sum(axis=-1)).numpy()
    ref_score = float(np.maximum(ref, 0).mean())
    our_score = float(np.maximum(ours, 0).mean())
    print(f"per-pair 100cos: max|d| = {np.abs(ours - ref).max():.2e}; CLIP score ours {our_score:.6f} "
          f"torch {ref_score:.6f}")
    assert ours.shape == (10,) and (ref > 0).any() and (ref < 0).any()  # clamping is exercised
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    assert abs(our_score - ref_score) <= 1e-4 * abs(ref_score)
    assert scorer.score(images, captions, batch_size=4, progress=False) == pytest.approx(our_score, rel=1e-6)


def test_info_and_errors(scorer, tmp_path):
    assert scorer.info["context_length"] == 77 and "ViT-L/14" in scorer.info["note"]
    with pytest.raises(ValueError, match="does-not-exist"):
        CLIPScorer.from_pretrained(str(tmp_path / "does-not-exist"))
    with pytest.raises(ValueError, match="--clip_dir is required"):
        CLIPScorer.from_pretrained(None)
    with pytest.raises(ValueError, match="uint8 RGB"):
        scorer.preprocess(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        scorer.score(_images(3), CAPTIONS[:2])
    d = tmp_path / "no_tokenizer"
    d.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.link(os.path.join(scorer.info["dir"], name), d / name)
    with pytest.raises(ValueError, match="tokenizer"):
        CLIPScorer.from_pretrained(str(d))
    with open(os.path.join(scorer.info["dir"], "config.json")) as f:
        assert json.load(f)["text_config"]["max_position_embeddings"] == 77
