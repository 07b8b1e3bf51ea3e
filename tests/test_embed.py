"""ediffi-embed: stored embeddings equal the encoders' output, training on them equals training on captions,
a multi-device CLI run writes the same records, and bad input is one clear line."""

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest
from conftest import micro_config
from multidevice import Background, with_devices

from ediffi_jax.data.embedded import MANIFEST, flatten_embeddings, load_embedded
from ediffi_jax.data.pipeline import decode_caption, decode_image
from ediffi_jax.encoders import setup_encoders
from ediffi_jax.precompute import embed
from ediffi_jax.train.events import read_scalars
from ediffi_jax.train.loop import load_data, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
BIN = os.path.dirname(sys.executable)
FIELDS = ("clip_text_tokens", "clip_text_mask", "clip_text_pooled", "t5_tokens", "t5_mask", "clip_image_pooled")


def small_config(data_dir):
    c = micro_config(data_dir)
    c.data.update(dict(num_train=64, num_val=16))
    return c


@pytest.fixture(scope="module")
def embedded(data_dir, tmp_path_factory):
    """The micro dataset embedded once in-process (one device; 64 = 24 + 24 + 16 and 16 → padded batches)."""
    config = small_config(data_dir)
    out = str(tmp_path_factory.mktemp("embedded") / "out")
    result = embed(config, out, batch_size=24)
    assert result == {"skipped": False, "counts": {"train": 64, "validation": 16}}
    return config, out


def stored(src, field):
    return np.stack([src[i][field] for i in range(len(src))])


def test_records_equal_direct_encoding(embedded):
    config, out = embedded
    train_src, val_src = load_embedded(out, config)
    raw_train, raw_val = load_data(config)
    encoders = setup_encoders(config, os.path.join(out, "encoders"))
    assert encoders.names == ("clip_text", "t5", "clip_image")
    for emb, raw in ((train_src, raw_train), (val_src, raw_val)):
        assert len(emb) == len(raw)
        records, sources = [emb[i] for i in range(len(emb))], [raw[i] for i in range(len(raw))]
        captions = [decode_caption(r["caption"]) for r in sources]
        assert [decode_caption(r["caption"]) for r in records] == captions  # order and captions preserved
        for r, s in zip(records, sources):
            np.testing.assert_array_equal(decode_image(r["image"]), decode_image(s["image"]))
        batch = encoders.tokenize(captions)
        batch["image"] = np.stack([decode_image(s["image"]) for s in sources]).astype(np.float32) / 127.5 - 1.0
        expected = jax.device_get(flatten_embeddings(jax.jit(encoders.encode)(encoders.params, batch)))
        assert sorted(expected) == sorted(FIELDS)
        for k, want in expected.items():
            got = np.stack([r[k] for r in records])
            assert got.shape == want.shape
            if k.endswith("_mask"):
                assert got.dtype == bool
                np.testing.assert_array_equal(got, want)
            else:
                assert got.dtype == np.float32
                assert np.abs(got - want).max() <= 1e-6, k


def test_float16_storage(embedded, tmp_path):
    config, out = embedded
    out16 = str(tmp_path / "out16")
    embed(config, out16, batch_size=32, dtype="float16")
    half, full = load_embedded(out16, config)[0], load_embedded(out, config)[0]
    for k in ("clip_text_tokens", "clip_text_pooled", "t5_tokens", "clip_image_pooled"):
        h, f = stored(half, k), stored(full, k)
        assert h.dtype == np.float16
        np.testing.assert_allclose(h.astype(np.float32), f, rtol=1e-2, atol=1e-4 * np.abs(f).max())
    np.testing.assert_array_equal(stored(half, "t5_mask"), stored(full, "t5_mask"))


def test_rerun_on_complete_output_is_a_noop(embedded):
    config, out = embedded
    before = os.path.getmtime(os.path.join(out, MANIFEST))
    assert embed(config, out, batch_size=8) == {"skipped": True, "counts": {"train": 64, "validation": 16}}
    assert os.path.getmtime(os.path.join(out, MANIFEST)) == before


def test_interrupted_output_is_redone(embedded, tmp_path):
    """An incomplete output of the same config (manifest not final, partial shards) is rewritten in place."""
    config, out = embedded
    redo = tmp_path / "redo"
    shutil.copytree(out, redo)
    with open(redo / MANIFEST) as f:
        manifest = json.load(f)
    with open(redo / MANIFEST, "w") as f:
        json.dump({"format": manifest["format"], "complete": False, "source": manifest["source"]}, f)
    (redo / "tfds.partial").mkdir()
    (redo / "tfds.partial" / "ediffi_embedded-train.array_record-00000-of-00001").write_bytes(b"torn")
    assert embed(config, str(redo), batch_size=16)["skipped"] is False
    assert sorted(os.listdir(redo)) == ["embedded.json", "encoders", "tfds"]
    for a, b in zip(load_embedded(str(redo), config), load_embedded(out, config)):
        for k in FIELDS:
            np.testing.assert_allclose(stored(a, k), stored(b, k), rtol=1e-5, atol=1e-5, err_msg=k)


def test_training_on_embeddings_equals_training_on_captions(embedded, tmp_path):
    """Same seed, same encoders (the raw run makes its own from the same seeds and captions): same losses."""
    config, out = embedded
    config = config.copy_and_resolve_references()
    # One U-Net level with cross-attention at 16² still reads every embedding and compiles in half the time.
    config.model.update(dict(channel_mult=(1,), attn_resolutions=(), cross_attn_resolutions=(16,)))
    config.train.update(dict(num_steps=2, eval_num=0, log_every=1))
    raw_dir, pre_dir = str(tmp_path / "raw"), str(tmp_path / "pre")
    train(config, raw_dir)
    config.data.precomputed = out
    train(config, pre_dir)
    raw = read_scalars(os.path.join(raw_dir, "tb"))["train/loss"]
    pre = read_scalars(os.path.join(pre_dir, "tb"))["train/loss"]
    assert [s for s, _ in raw] == [s for s, _ in pre] == [1, 2]
    print("losses from captions", raw, "from embeddings", pre)
    np.testing.assert_allclose([v for _, v in pre], [v for _, v in raw], rtol=1e-5, atol=1e-6)


def run_cli(*args, devices=4) -> Background:
    """ediffi-embed on `devices` CPU devices, in the background."""
    env = with_devices(dict(os.environ, JAX_PLATFORMS="cpu", NPROC="16"), devices)
    return Background([os.path.join(BIN, "ediffi-embed"), *args], env=env, cwd=ROOT)


def write_config_file(path, data_dir):
    path.write_text(f"import sys\nsys.path.insert(0, {TESTS!r})\nfrom test_embed import small_config\n\n\n"
                    f"def get_config():\n    return small_config({data_dir!r})\n")
    return str(path)


def _four_devices(directory):
    """The micro dataset (its own copy) embedded by the CLI on 4 devices, fsdp 2, batches of 8."""
    cfg = write_config_file(directory / "micro.py", str(directory / "data"))
    return run_cli("--config", cfg, "--out", str(directory / "out4"), "--batch_size", "8", "--fsdp", "2")


def _bad_batch(directory):
    cfg = write_config_file(directory / "micro.py", str(directory / "data"))
    return run_cli("--config", cfg, "--out", str(directory / "o"), "--batch_size", "6")


# Started at the beginning of the session (tests/conftest.py).
BACKGROUND = {"embed_four_devices": _four_devices, "embed_bad_batch": _bad_batch}


def test_cli_on_four_devices_writes_the_same_records(embedded, lane):
    config, out = embedded
    run = lane["embed_four_devices"]
    p = run.result(timeout=300)
    out4 = str(run.directory / "out4")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "wrote 64 train, 16 validation records" in p.stdout
    assert "embed train: 100%" in p.stderr  # the progress bar
    with open(os.path.join(out4, MANIFEST)) as f:
        manifest = json.load(f)
    assert (manifest["devices"], manifest["fsdp"], manifest["complete"]) == (4, 2, True)
    for a, b in zip(load_embedded(out4, config), load_embedded(out, config)):
        assert [a[i]["caption"] for i in range(len(a))] == [b[i]["caption"] for i in range(len(b))]
        for k in FIELDS:
            x, y = stored(a, k), stored(b, k)
            assert x.dtype == y.dtype and x.shape == y.shape
            # Batches of 2 per device and FSDP-gathered weights change XLA's blocking: float32 rounding only.
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5, err_msg=k)


def one_error_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    return lines[-1]


def test_batch_not_divisible_by_devices_is_one_clear_error(lane):
    run = lane["embed_bad_batch"]
    line = one_error_line(run.result(timeout=300))
    assert line == "ediffi-embed: error: --batch_size=6 is not divisible by the 4 devices"
    assert not (run.directory / "o").exists()


def test_out_with_other_files_is_refused_and_kept(data_dir, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError) as e:
        embed(small_config(data_dir), str(out), batch_size=8)
    assert str(e.value) == (f"--out {str(out)!r} is not empty (notes.txt) and is not an ediffi-embed output; "
                            "choose a new directory")
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_out_of_another_config_is_refused(embedded):
    config, out = embedded
    with pytest.raises(ValueError) as e:
        embed(config, out, batch_size=8, dtype="float16")
    assert str(e.value) == (f"--out {out!r} holds a complete ediffi-embed output of another config: "
                            "dtype='float32' there, 'float16' here")
    config = config.copy_and_resolve_references()
    config.encoders.t5.num_layers = 2
    with pytest.raises(ValueError, match=r"another config: encoders\.t5\.num_layers=1 there, 2 here$"):
        embed(config, out, batch_size=8)


def test_failed_first_run_leaves_no_output(data_dir, tmp_path):
    """An error after the output was started (here: encoder width ≠ conditioning width) undoes it."""
    config = small_config(data_dir)
    config.conditioning.embeddings.t5.dim = 48
    out = tmp_path / "o"
    with pytest.raises(ValueError, match=r"^conditioning\.embeddings\.t5\.dim=48 but the t5 encoder"):
        embed(config, str(out), batch_size=8)
    assert not out.exists()


def test_load_embedded_bad_paths_and_mismatches(embedded, tmp_path):
    config, out = embedded
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError) as e:
        load_embedded(str(tmp_path), config)
    assert str(e.value) == f"data.precomputed={str(tmp_path)!r} has no {MANIFEST}: not an ediffi-embed output"
    with pytest.raises(ValueError, match=r"^data\.precomputed='/nonexistent/emb' is not a directory$"):
        load_embedded("/nonexistent/emb", config)
    bad = config.copy_and_resolve_references()
    bad.conditioning.embeddings.t5.dim = 48
    with pytest.raises(ValueError) as e:
        load_embedded(out, bad)
    assert str(e.value) == (f"conditioning.embeddings.t5.dim=48 but data.precomputed={out!r} holds t5 "
                            "embeddings of width 32")
    bad = config.copy_and_resolve_references()
    bad.conditioning.embeddings.clip_text.pooled_dim = 24
    with pytest.raises(ValueError, match=r"clip_text\.pooled_dim=24 but .* pooled embeddings of width 16$"):
        load_embedded(out, bad)
    bad = config.copy_and_resolve_references()
    bad.encoders.clip.max_length = 30
    with pytest.raises(ValueError, match=r"^encoders\.clip\.max_length=30 but .* embedded with encoders\.clip\."
                                         r"max_length=20$"):
        load_embedded(out, bad)
    only_t5 = config.copy_and_resolve_references()
    only_t5.conditioning.order = ("t5",)
    assert len(load_embedded(out, only_t5)[0]) == 64  # a subset of the stored embeddings is fine
