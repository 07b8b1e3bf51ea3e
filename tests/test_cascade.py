"""The cascade: base run → SR stage in one call, stage checks with one-line errors, the --cascade CLI."""

import json
import os
import sys

import numpy as np
import pytest
from multidevice import Background

from ediffi_jax import paint_with_words as pww
from ediffi_jax.cascade import Cascade, Stage, side_by_side
from ediffi_jax.text_to_image import TextToImage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a red circle on the left and a blue square at the top"


def _sr_pipe(base: TextToImage, image_size: int, factor: int, crop: int = 0) -> TextToImage:
    """An SR stage (random weights) with the base run's conditioning and encoders."""
    from ediffi_jax.models.unet import unet_config
    from ediffi_jax.sr import sr_config
    from ediffi_jax.train.step import build_model, split_model

    c = base.config.copy_and_resolve_references()
    m = base.config.model
    c.model = unet_config(image_size=image_size, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                          attn_resolutions=(), cross_attn_resolutions=(image_size // 2,), head_dim=16, num_groups=4,
                          context_dim=m.context_dim, pooled_dim=m.pooled_dim, dropout=0.0, in_cond_channels=3,
                          extra_cond_dim=1)
    c.sr = sr_config(factor=factor, crop=crop)
    model = build_model(c, 0)
    model.unet.conv_out.kernel[...] = model.unet.conv_out.kernel[...] + 0.05  # not the zero-initialised identity
    graphdef, params = split_model(model)
    return TextToImage(c, base.encoders, graphdef, params, 0)


@pytest.fixture(scope="module")
def base_dir(trained_run):
    return trained_run[1]


@pytest.fixture(scope="module")
def base(base_dir):
    return TextToImage.from_workdir(base_dir)


@pytest.fixture(scope="module")
def sr_export(base, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sr") / "sr32")
    return _sr_pipe(base, 32, 2).export(out)


def test_cascade_runs_every_stage_with_paint_and_style(base, base_dir, sr_export):
    cascade = Cascade.from_config({"stages": [{"workdir": base_dir, "steps": 3},
                                              {"workdir": sr_export, "steps": 2, "guidance": 2.0}]})
    mask = np.zeros((20, 20))
    mask[:10] = 1.0
    outs = cascade.generate([PROMPT] * 2, seed=1, regions=[pww.Region("red circle", mask)],
                            images=np.full((2, 24, 24, 3), 120, np.uint8))
    assert [o.shape for o in outs] == [(2, 16, 16, 3), (2, 32, 32, 3)]
    # Stage 2 really is conditioned on stage 1's output: the same SR call on it reproduces the cascade.
    sr = cascade.stages[1]
    again = sr.pipe.generate([PROMPT] * 2, seed=2, lowres=outs[0], heun=sr.heun(), guidance_scale=2.0,
                             regions=[pww.Region("red circle", mask)], images=np.full((2, 24, 24, 3), 120, np.uint8))
    np.testing.assert_array_equal(again, outs[1])
    other = sr.pipe.generate([PROMPT] * 2, seed=2, lowres=np.zeros_like(outs[0]), heun=sr.heun(),
                             guidance_scale=2.0, regions=[pww.Region("red circle", mask)],
                             images=np.full((2, 24, 24, 3), 120, np.uint8))
    assert np.abs(other.astype(int) - outs[1]).mean() > 1.0
    grid = side_by_side(outs)
    assert grid.shape == (2, 32, 64, 3)
    np.testing.assert_array_equal(grid[:, ::2, :32:2], outs[0])


def test_stage_checks_are_one_line_errors(base, base_dir):
    sr4 = _sr_pipe(base, 32, 4)  # expects 8x8 inputs; the base makes 16x16
    with pytest.raises(ValueError, match=r"stage 2 \(sr4\) upsamples 8x8 inputs by 4, got a 16x16 input"):
        Cascade([Stage(base, name="base"), Stage(sr4, name="sr4")])
    with pytest.raises(ValueError, match=r"stage 1 \(sr\) is an SR model \(x2\); the first stage must be a base"):
        Cascade([Stage(_sr_pipe(base, 32, 2), name="sr")])
    with pytest.raises(ValueError, match=r"stage 2 \(b2\) is not an SR model"):
        Cascade([Stage(base, name="b"), Stage(base, name="b2")])
    crop = _sr_pipe(base, 16, 4, crop=16)  # crop-trained: runs on any size, 16 -> 64
    assert [s.factor for s in Cascade([Stage(base), Stage(crop)]).stages] == [0, 4]
    with pytest.raises(ValueError, match="stage 2: workdir '/nonexistent/sr' does not exist"):
        Cascade.from_config({"stages": [{"workdir": base_dir}, {"workdir": "/nonexistent/sr"}]})
    with pytest.raises(ValueError, match=r"stage 1: unknown field\(s\) \['step'\]"):
        Cascade.from_config({"stages": [{"workdir": base_dir, "step": 3}]})
    with pytest.raises(ValueError, match="this run is not a super-resolution stage"):
        base.generate([PROMPT], lowres=np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"this run is an SR stage \(x2\): pass lowres images"):
        _sr_pipe(base, 32, 2).generate([PROMPT])


def test_cascade_cli(base_dir, sr_export, tmp_path):
    spec = tmp_path / "cascade.json"
    spec.write_text(json.dumps({"stages": [{"workdir": base_dir, "steps": 3},
                                           {"workdir": sr_export, "steps": 2}]}))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out, stages = tmp_path / "out.png", tmp_path / "stages.png"
    cmd = [sys.executable, "-m", "ediffi_jax.cli.sample", f"--cascade={spec}", "--prompt", PROMPT, "--num=2",
           f"--out={out}", f"--stages-out={stages}"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stages": [{"workdir": base_dir}, {"workdir": "/nonexistent/sr"}]}))
    # the good and the bad command line side by side
    good_run = Background(cmd, env=env, cwd=ROOT)
    bad_run = Background([sys.executable, "-m", "ediffi_jax.cli.sample", f"--cascade={bad}", "--prompt", PROMPT],
                         env=env, cwd=ROOT)
    res = good_run.result(timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2 stages: 16x16 -> 32x32" in res.stdout
    from PIL import Image

    assert Image.open(out).size == (64, 32) and Image.open(stages).size == (128, 32)
    res = bad_run.result(timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].endswith("stage 2: workdir '/nonexistent/sr' does not exist")

