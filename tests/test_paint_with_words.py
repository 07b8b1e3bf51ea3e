"""Paint-with-words and style transfer (eDiff-I §5): the bias against NumPy for every weight function, the
phrase → token map of T5 and CLIP tokenizers, masks at odd sizes on every cross-attention size, bitwise identity
with zero masks, the user formats (colour map + phrase specs) and their one-line errors, the sampling CLI."""

import logging
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from multidevice import Background
from PIL import Image

from ediffi_jax import paint_with_words as pww
from ediffi_jax.models.attention import dot_product_attention
from ediffi_jax.tokenizers import load_tokenizer, train_clip_bpe, train_sentencepiece

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------- the bias vs NumPy


def _np_weight(name, logits, sigma, w):
    """Independent NumPy statement of each weight function (see paint_with_words' docstring)."""
    ls = np.log(1.0 + sigma)[:, None, None, None]
    if name == "paper":
        return w * ls * logits.max(axis=(1, 2, 3), keepdims=True)
    if name == "global_max":
        return w * ls * logits.max()
    if name == "row_max":
        return w * ls * logits.max(axis=-1, keepdims=True)
    if name == "std":
        return w * ls * logits.std(axis=(1, 2, 3), keepdims=True)
    if name == "constant":
        return np.full((logits.shape[0], 1, 1, 1), w)
    raise AssertionError(name)


@pytest.mark.parametrize("name", sorted(pww.WEIGHT_FUNCTIONS))
def test_bias_equals_numpy_for_every_weight_function(name):
    rng = np.random.default_rng(0)
    b, lq, lk, h, d = 3, 12, 7, 2, 8
    q, k, v = (rng.normal(size=(b, n, h, d)).astype(np.float32) for n in (lq, lk, lk))
    a = (rng.uniform(size=(b, lq, lk)) > 0.6).astype(np.float32) * rng.uniform(0.5, 2.0, (b, 1, lk))
    sigma = np.array([0.01, 1.3, 80.0], np.float32)
    w = 0.7
    logits = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k)
    want_bias = _np_weight(name, logits, sigma.astype(np.float64), w) * a[:, None]
    got_bias = pww.paint_bias(jnp.asarray(logits, jnp.float32), jnp.asarray(sigma), jnp.asarray(a), w, name)
    np.testing.assert_allclose(np.asarray(got_bias), want_bias, rtol=1e-5, atol=1e-5)
    # ... and inside the attention: softmax((QKᵀ + w·A)/√d) V.
    z = (logits + want_bias) / math.sqrt(d)
    p = np.exp(z - z.max(-1, keepdims=True))
    want = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)
    got = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                bias_fn=lambda lg: pww.paint_bias(lg, jnp.asarray(sigma), jnp.asarray(a), w, name))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_unknown_weight_function_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown paint-with-words weight function 'softmax'"):
        pww.weight_fn("softmax")


# ----------------------------------------------------------------------------------- phrases → tokens

PROMPT = "Red circle, a blue  square and a red circle"
CORPUS = [PROMPT.lower(), "a red circle and a blue square", "blue square, red circle", "a rabbit mage and clouds",
          "the clouds above a rabbit mage", "red circle red circle blue square"] * 4


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("pww_tok")
    train_sentencepiece(CORPUS, str(d / "t5"), vocab_size=60)
    train_clip_bpe(CORPUS, str(d / "clip"), vocab_size=600)
    return {"t5": load_tokenizer(str(d / "t5"), 24), "clip": load_tokenizer(str(d / "clip"), 24)}


@pytest.mark.parametrize("phrase,occ,spans", [
    ("red circle", None, [(0, 10), (33, 43)]),      # start of the prompt (capitalised) and end of it
    ("red circle", 2, [(33, 43)]),                  # an explicit occurrence of a repeated phrase
    ("BLUE square", None, [(14, 26)]),              # case and a run of two spaces
    ("circle", 1, [(4, 10)]),                       # next to punctuation
])
def test_phrase_spans(phrase, occ, spans):
    assert pww.phrase_spans(PROMPT, phrase, occ) == spans


@pytest.mark.parametrize("tok", ["t5", "clip"])
@pytest.mark.parametrize("phrase,occ", [("red circle", None), ("red circle", 2), ("blue square", None),
                                        ("circle", 1), ("Red", None)])
def test_token_map_covers_exactly_the_phrase(tokenizers, tok, phrase, occ):
    t = tokenizers[tok]
    spans = pww.phrase_spans(PROMPT, phrase, occ)
    col = pww.token_strengths(PROMPT, [pww.Region(phrase, np.ones((2, 2)), 1.5, occ)], t)[:, 0]
    offsets = t.offsets(PROMPT)
    flagged = {i for i in range(len(offsets)) if col[i]}
    assert set(np.unique(col[col != 0])) == {1.5}
    want = {i for i, (s, e) in enumerate(offsets) if e > s and any(s < pe and e > ps for ps, pe in spans)}
    assert flagged == want and flagged
    covered = {c for i in flagged for c in range(*offsets[i])}
    for ps, pe in spans:  # every non-space character of each occurrence is on a flagged token, nothing else is
        assert {c for c in range(ps, pe) if not PROMPT[c].isspace()} <= covered
    assert covered <= {c for ps, pe in spans for c in range(ps - 1, pe)}  # (SentencePiece's "▁" may start 1 early)


def test_clip_token_map_by_position(tokenizers):
    t = tokenizers["clip"]
    ids = t([PROMPT])["ids"][0]
    words = [t.tokenizer.convert_ids_to_tokens(int(i)).replace("</w>", "") for i in ids]
    assert words[:12] == ["<|startoftext|>", "red", "circle", ",", "a", "blue", "square", "and", "a", "red",
                          "circle", "<|endoftext|>"]
    regs = [pww.Region("red circle", np.ones((1, 1))), pww.Region("square", np.ones((1, 1)), 0.5),
            pww.Region("red circle", np.ones((1, 1)), 2.0, occurrence=1)]
    m = pww.token_strengths(PROMPT, regs, t)
    assert np.nonzero(m[:, 0])[0].tolist() == [1, 2, 9, 10]
    assert np.nonzero(m[:, 1])[0].tolist() == [6] and m[6, 1] == 0.5
    assert np.nonzero(m[:, 2])[0].tolist() == [1, 2]


def test_phrase_not_in_prompt_is_one_clear_error(tokenizers):
    with pytest.raises(ValueError, match=r"phrase 'green star' does not occur in the prompt 'Red circle"):
        pww.token_strengths(PROMPT, [pww.Region("green star", np.ones((2, 2)))], tokenizers["clip"])
    with pytest.raises(ValueError, match="occurs 2 time.* occurrence 3"):
        pww.phrase_spans(PROMPT, "red circle", 3)
    with pytest.raises(ValueError, match="'red' does not occur"):
        pww.phrase_spans("a reddish circle", "red")  # whole words only


# ----------------------------------------------------------------------------------- masks and sizes


def _unet_config(image_size):
    from ediffi_jax.models.unet import unet_config

    return unet_config(image_size=image_size, channels=8, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
                       attn_resolutions=(), cross_attn_resolutions=(image_size, image_size // 2, image_size // 8),
                       head_dim=8, num_groups=4, context_dim=8, pooled_dim=0, dropout=0.0)


@pytest.mark.parametrize("out_hw", [(48, 48), (40, 72)])
def test_masks_at_odd_sizes_reach_every_cross_attention_size(out_hw):
    from ediffi_jax.models.unet import UNet

    cfg = _unet_config(48)
    sizes = pww.cross_attention_sizes(cfg, *out_hw)
    h, w = out_hw
    assert sizes == [(h, w), (h // 2, w // 2), (h // 8, w // 8)]
    # The UNet calls the bias hook at exactly these sizes (abstract trace: no compute).
    seen = []
    model = UNet(cfg, rngs=nnx.Rngs(0))
    jax.eval_shape(lambda x: model(x, jnp.zeros((1,)), jnp.zeros((1, 5, 8)), None,
                                   attn_bias_fn=lambda lg, hw: seen.append(hw) or jnp.zeros(())),
                   jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32))
    assert sorted(set(seen)) == sorted(sizes)
    # A 37×53 mask (odd size, other aspect) on 3 of 6 tokens of its stream, strength 2.
    mask = np.zeros((37, 53), np.float32)
    mask[5:30, 10:40] = 1.0
    tok = np.zeros(6, np.float32)
    tok[[1, 2, 4]] = 2.0

    class _Offsets:  # a stream whose tokens 1, 2 and 4 spell the phrase "p" (token_strengths is tested above)
        def offsets(self, text):
            return [(0, 0), (0, 1), (0, 1), (0, 0), (0, 1), (0, 0)]

    maps = pww.build_maps(["p"], [[pww.Region("p", mask, 2.0)]], [("img", 1, None), ("txt", 6, _Offsets())],
                          sizes, out_hw)
    assert sorted(maps.arrays) == sorted(f"{a}x{b}" for a, b in sizes)
    for (a, b) in sizes:
        m = pww.resize_masks(mask, (a, b))
        assert m.shape == (a, b) and 0.0 <= m.min() and m.max() <= 1.0
        assert abs(m.mean() - mask.mean()) < 0.03  # area kept by the bilinear (antialiased) resize
        got = np.asarray(maps.arrays[f"{a}x{b}"])
        assert got.shape == (1, a * b, 7)
        assert not got[0, :, 0].any()  # the stream with no tokenizer (the CLIP image token): zeros
        np.testing.assert_allclose(got[0, :, 1:], np.outer(pww.resize_masks(pww.resize_masks(mask, out_hw), (a, b))
                                                            .reshape(-1), tok), rtol=1e-6)


# ----------------------------------------------------------------------------------- user formats


def _color_map(tmp_path, size=(30, 45)):
    img = np.full(size + (3,), 255, np.uint8)
    img[: size[0] // 2, : size[1] // 2] = (255, 0, 0)
    img[size[0] // 2:, size[1] // 2:] = (0, 0, 255)
    img[size[0] // 2, : size[1] // 2] = (200, 40, 40)  # an antialiased edge: near red, assigned to it
    path = str(tmp_path / "map.png")
    Image.fromarray(img).save(path)
    return path, img


def test_color_map_and_phrase_specs(tmp_path):
    path, img = _color_map(tmp_path)
    regs = pww.regions_from_specs(path, ["#ff0000=red circle,1.5", "#00f=blue square", "255,255,255=clouds,0.3,1"])
    assert [(r.phrase, r.strength, r.occurrence) for r in regs] == [
        ("red circle", 1.5, None), ("blue square", 1.0, None), ("clouds", 0.3, 1)]
    red = np.zeros(img.shape[:2], bool)
    red[:16, :22] = True
    np.testing.assert_array_equal(regs[0].mask > 0, red)
    assert regs[1].mask.sum() == 15 * 23
    assert sum(r.mask for r in regs).max() == 1.0  # every pixel in exactly one region


def test_color_map_errors(tmp_path):
    path, _ = _color_map(tmp_path)
    with pytest.raises(ValueError, match="colour #ffffff covers .* of the colour map but has no phrase"):
        pww.regions_from_specs(path, ["#ff0000=red circle", "#0000ff=blue square"])
    with pytest.raises(ValueError, match=r"colour '#00ff00' \(#00ff00\) does not occur in the colour map"):
        pww.regions_from_color_map(path, {"#ff0000": "a", "#0000ff": "b", "#ffffff": "c", "#00ff00": "d"})
    with pytest.raises(ValueError, match="cannot read colour '#ff00'"):
        pww.parse_phrase_spec("#ff00=red circle")
    with pytest.raises(ValueError, match="must read COLOUR=phrase"):
        pww.parse_phrase_spec("red circle")
    with pytest.raises(ValueError, match=r"cannot read phrase spec 'red circle,strong'"):
        pww.parse_phrase_spec("#ff0000=red circle,strong")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=f"cannot read image file '{bad}'"):
        pww.regions_from_specs(str(bad), ["#ff0000=x"])
    with pytest.raises(ValueError, match="cannot read image file '/nonexistent/map.png'"):
        pww.load_image("/nonexistent/map.png")


# ----------------------------------------------------------------------------------- on the trained micro model


@pytest.fixture(scope="module")
def pipe(trained_run):
    from ediffi_jax.text_to_image import TextToImage

    return TextToImage.from_workdir(trained_run[1])


PROMPTS = ["a red circle on the left and a blue square on the right"] * 2


def test_zero_masks_are_bitwise_plain_sampling_and_masks_change_it(pipe, caplog):
    r = pipe.config.model.image_size
    plain = pipe.generate(PROMPTS, seed=3)
    zeros = [pww.Region("red circle", np.zeros((r, r))), pww.Region("blue square", np.zeros((r, r)))]
    np.testing.assert_array_equal(pipe.generate(PROMPTS, seed=3, regions=zeros), plain)
    np.testing.assert_array_equal(pipe.generate(PROMPTS, seed=3, regions=[]), plain)
    m = np.zeros((24, 24))  # another size than the output (16²): resized, with a note
    m[:12, 12:] = 1.0
    with caplog.at_level(logging.INFO):
        painted = pipe.generate(PROMPTS, seed=3, regions=[pww.Region("red circle", m)], paint_weight=4.0)
    assert "resized to the output (16, 16)" in caplog.text
    assert np.abs(painted.astype(int) - plain).mean() > 1.0
    # Only the conditional branch is biased: at guidance 0 (the unconditional denoiser) the mask does nothing.
    np.testing.assert_array_equal(
        pipe.generate(PROMPTS, seed=3, guidance_scale=0.0, regions=[pww.Region("red circle", m)], paint_weight=4.0),
        pipe.generate(PROMPTS, seed=3, guidance_scale=0.0))


def test_generate_rejects_a_phrase_missing_from_a_prompt(pipe):
    with pytest.raises(ValueError, match="phrase 'green star' does not occur in the prompt"):
        pipe.generate(PROMPTS, regions=[pww.Region("green star", np.ones((16, 16)))])


CLI_PROMPT = "a red circle on the left and a blue square at the top"
CLI_PHRASES = ["#ff0000=red circle,1.0", "#0000ff=blue square", "#ffffff=at the top,0.2"]


def test_style_and_paint_in_process_and_through_the_cli(pipe, trained_run, tmp_path):
    """In process: a style image changes a painted sample; the CLI (--paint/--phrase/--style/--style-scale) writes
    the very same pixels as `generate` with the same inputs."""
    import dataclasses

    from ediffi_jax.sampling import HeunConfig

    path, _ = _color_map(tmp_path, (16, 16))
    ref = np.zeros((40, 24, 3), np.uint8)
    ref[:20] = (0, 200, 0)
    sq = pww.center_crop_square(ref)  # rows 8..31: the green half is rows 0..11 of the crop
    assert sq.shape == (24, 24, 3) and (sq[:12] == (0, 200, 0)).all() and (sq[12:] == 0).all()
    Image.fromarray(ref).save(tmp_path / "ref.png")
    # The command lines (the real one and two bad inputs) run while this process samples the same inputs.
    out = tmp_path / "out.png"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "ediffi_jax.cli.sample", f"--workdir={trained_run[1]}", "--num=1",
           "--prompt", CLI_PROMPT, "--paint", path] + [f"--phrase={p}" for p in CLI_PHRASES] + [
           "--style", str(tmp_path / "ref.png"), "--style-scale", "2.0", "--steps=2", f"--out={out}"]
    bad_inputs = [(["--phrase", "#00ff00=green star"], "colour '#00ff00' (#00ff00) does not occur in the colour map"),
                  (["--style", "/nonexistent/ref.png"], "cannot read image file '/nonexistent/ref.png'")]
    runs = [Background(cmd, env=env, cwd=ROOT)] + [Background(cmd + extra, env=env, cwd=ROOT)
                                                    for extra, _ in bad_inputs]
    regions = pww.regions_from_specs(path, CLI_PHRASES)
    heun = dataclasses.replace(HeunConfig.from_config(pipe.config.sample), num_steps=2)
    styled = pipe.generate([CLI_PROMPT], heun=heun, regions=regions, images=sq[None], image_guidance_scale=2.0)
    plain = pipe.generate([CLI_PROMPT], heun=heun, regions=regions)
    assert np.abs(styled.astype(int) - plain).mean() > 0.5

    res = runs[0].result(timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), styled[0])
    for run, (_, msg) in zip(runs[1:], bad_inputs):
        bad = run.result(timeout=300)
        assert bad.returncode == 2, bad.stderr[-2000:]
        assert msg in bad.stderr.strip().splitlines()[-1]
