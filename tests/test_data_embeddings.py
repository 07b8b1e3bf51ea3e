"""Real data with precomputed keyed embeddings: ediffi-embed writes one keyed store per split (the encoders' own
numbers), reruns are no-ops, another config is one line; training on the store equals encoding in the step, a key
without an embedding is skipped and counted; the validation loss on data.val_split is deterministic."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import one_level_config

from ediffi_jax.data import embedded, pipeline, shapes
from ediffi_jax.data.keyed_embeddings import KeyedEmbeddings, write_keyed_embeddings
from ediffi_jax.encoders import setup_encoders
from ediffi_jax.precompute import embed
from ediffi_jax.train import validation
from ediffi_jax.train.events import read_scalars
from ediffi_jax.train.loop import load_data, train, validate

TEXT_FIELDS = ("clip_text_tokens", "clip_text_mask", "clip_text_pooled", "t5_tokens", "t5_mask")
N = 64


@pytest.fixture(scope="module")
def folder_config(data_dir, tmp_path_factory):
    """A folder of the 64 images and captions of the shapes set that the suite's small runs train on (so the run
    that encodes captions in the step shares their tokenizers, encoders and compiled step), captions padded with
    whitespace, and the one-level micro config training on it (batches of 8)."""
    shapes_src, _ = load_data(one_level_config(data_dir))
    folder = tmp_path_factory.mktemp("keyed") / "photos"
    folder.mkdir()
    for i in range(len(shapes_src)):
        (folder / f"img{i:02d}.png").write_bytes(shapes.encode_png(shapes_src[i]["image"]))
        (folder / f"img{i:02d}.txt").write_text(f"  {shapes_src[i]['caption'].decode()}\n ")
    config = one_level_config(data_dir)
    config.data.update(dict(name="folder", path=str(folder)))
    return config


@pytest.fixture(scope="module")
def embedded_out(folder_config, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("emb") / "out")
    assert embed(folder_config, out, batch_size=8) == {"skipped": False, "counts": {"train": N}}
    return out


def test_embed_writes_the_encoders_outputs_by_key(folder_config, embedded_out):
    out = embedded_out
    with open(os.path.join(out, embedded.MANIFEST)) as f:
        manifest = json.load(f)
    assert manifest["layout"] == "keyed" and manifest["complete"] and manifest["names"] == ["clip_text", "t5"]
    assert manifest["embeddings"]["t5"] == {"dim": 32, "length": 20, "pooled_dim": 0}
    assert sorted(os.listdir(out)) == ["embedded.json", "encoders", "split_train"]
    store = KeyedEmbeddings(os.path.join(out, "split_train"))
    assert store.meta["names"] == ["clip_text", "t5"] and sorted(store.fields) == sorted(TEXT_FIELDS)
    src, _ = load_data(folder_config)
    keys = [src[i]["key"].decode() for i in range(len(src))]
    assert sorted(keys) == [f"img{i:02d}.png" for i in range(N)] and len(store) == N
    # The frozen encoders on the cleaned captions, all in one batch (the store encoded batches of 8, in key order).
    encoders = setup_encoders(folder_config, os.path.join(out, "encoders"))
    text = dataclasses.replace(encoders, names=("clip_text", "t5"))
    captions = [" ".join(src[i]["caption"].decode().split()) for i in range(len(src))]
    assert all(c and c == c.strip() and "  " not in c for c in captions)
    want = embedded.flatten_embeddings(jax.device_get(jax.jit(text.encode)(encoders.params,
                                                                           text.tokenize(captions))))
    for i, key in enumerate(keys):
        got = store.lookup(key)
        for k in TEXT_FIELDS:
            assert got[k].shape == want[k][i].shape, k
            if k.endswith("_mask"):
                np.testing.assert_array_equal(got[k], want[k][i])
            else:
                assert got[k].dtype == np.float32 and np.abs(got[k] - want[k][i]).max() <= 1e-5, (key, k)
    assert want["t5_mask"][0].sum() > 3  # real tokens, not all padding

    # A rerun of the same config: nothing to do, nothing touched. Another config: one line, output kept.
    before = os.path.getmtime(os.path.join(out, embedded.MANIFEST))
    assert embed(folder_config, out, batch_size=4) == {"skipped": True, "counts": {"train": N}}
    other = folder_config.copy_and_resolve_references()
    other.data.max_caption_chars = 10
    with pytest.raises(ValueError) as e:
        embed(other, out, batch_size=8)
    assert str(e.value) == (f"--out {out!r} holds a complete ediffi-embed output of another config: "
                            "data.max_caption_chars=1024 there, 10 here")
    with pytest.raises(ValueError, match=r"another config: dtype='float32' there, 'float16' here$"):
        embed(folder_config, out, batch_size=8, dtype="float16")
    assert os.path.getmtime(os.path.join(out, embedded.MANIFEST)) == before


def test_interrupted_embed_is_redone(folder_config, embedded_out, tmp_path):
    redo = tmp_path / "redo"
    shutil.copytree(embedded_out, redo)
    with open(redo / embedded.MANIFEST) as f:
        manifest = json.load(f)
    with open(redo / embedded.MANIFEST, "w") as f:  # as left by a run stopped while writing the split
        json.dump({"format": manifest["format"], "complete": False, "source": manifest["source"]}, f)
    shutil.rmtree(redo / "split_train")
    (redo / "split_train.partial").mkdir()
    (redo / "split_train.partial" / "t5_tokens.npy").write_bytes(b"torn")
    assert embed(folder_config, str(redo), batch_size=8) == {"skipped": False, "counts": {"train": N}}
    assert sorted(os.listdir(redo)) == ["embedded.json", "encoders", "split_train"]
    a, b = KeyedEmbeddings(str(redo / "split_train")), KeyedEmbeddings(os.path.join(embedded_out, "split_train"))
    for key in ("img00.png", "img63.png"):
        for k, v in a.lookup(key).items():
            np.testing.assert_allclose(v, b.lookup(key)[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_store_must_match_the_run(folder_config, embedded_out, tmp_path):
    def error(**changes):
        c = folder_config.copy_and_resolve_references()
        c.data.embeddings = embedded_out
        for dotted, value in changes.items():
            *parents, leaf = dotted.split("__")
            node = c
            for p in parents:
                node = node[p]
            node[leaf] = value
        validate(c)
        with pytest.raises(ValueError) as e:
            embedded.load_keyed(c.data.embeddings, c)
        assert "\n" not in str(e.value)
        return str(e.value)

    what = f"data.embeddings={embedded_out!r}"
    assert error(conditioning__embeddings__t5__dim=48) == (
        f"conditioning.embeddings.t5.dim=48 but {what} holds t5 embeddings of width 32")
    assert error(conditioning__embeddings__clip_text__pooled_dim=24) == (
        f"conditioning.embeddings.clip_text.pooled_dim=24 but {what} holds clip_text pooled embeddings of width 16")
    assert error(encoders__t5__max_length=30) == (
        f"encoders.t5.max_length=30 but {what} was embedded with encoders.t5.max_length=20")
    assert error(data__path="/elsewhere") == (
        f"data.path='/elsewhere' but {what} was embedded from data.path={folder_config.data.path!r}")
    assert error(data__val_split="validation").startswith(f"{what} holds no split 'validation' (has train)")
    assert error(data__embeddings=str(tmp_path)) == (
        f"data.embeddings={str(tmp_path)!r} has no embedded.json: not an ediffi-embed output")
    shapes = folder_config.copy_and_resolve_references()
    shapes.data.update(dict(name="shapes", embeddings=embedded_out))
    with pytest.raises(ValueError) as e:
        validate(shapes)
    assert str(e.value) == (f"data.embeddings={embedded_out!r} joins real data by record key; data.name='shapes' is "
                            "not one of folder, webdataset, coco, tfds")


def _losses(workdir):
    return read_scalars(os.path.join(workdir, "tb"))["train/loss"]


@pytest.fixture(scope="module")
def runs(folder_config, embedded_out, tmp_path_factory):
    """Two runs on the folder: encoding captions in the step (2 steps, with the store's encoders), and on a copy of
    the store that lacks the key of the 17th record of the training stream (3 steps; step 3 meets it), validating
    on the first 8 records of the split at every step, each evaluation done twice."""
    root = tmp_path_factory.mktemp("runs")
    config = folder_config.copy_and_resolve_references()
    config.train.update(dict(num_steps=2, ckpt_every=3))
    shutil.copytree(os.path.join(embedded_out, "encoders"), root / "raw" / "encoders")  # the same (and no set-up)
    train(config, str(root / "raw"))

    src, _ = load_data(config)
    blocks = pipeline.record_order(len(src), batch_size=8, seed=config.seed, split_batches=True)
    missing = src[int(blocks[2][0])]["key"].decode()  # first record of the third batch
    pruned = str(root / "pruned")
    shutil.copytree(embedded_out, pruned)
    store_dir = os.path.join(pruned, "split_train")
    store = KeyedEmbeddings(store_dir)
    keys = [str(k) for k in np.load(os.path.join(store_dir, "keys.npy")) if k != missing]
    fields = {f: np.stack([store.lookup(k)[f] for k in keys]) for f in store.fields}
    shutil.rmtree(store_dir)
    write_keyed_embeddings(store_dir, keys, fields, store.meta)

    evaluations = []
    call = validation.ValidationLoss.__call__

    def twice(self, state):
        a, b = call(self, state), call(self, state)
        evaluations.append((a, b, self.bad_records))
        return a

    config.data.update(dict(embeddings=pruned, val_split="train", val_examples=8))
    config.train.update(dict(num_steps=3, eval_every=1))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(validation.ValidationLoss, "__call__", twice)
        metrics = train(config, str(root / "keyed"))
    return str(root / "raw"), str(root / "keyed"), metrics, evaluations, missing


def test_training_on_the_store_equals_encoding_in_the_step(runs, embedded_out):
    raw_dir, keyed_dir, _, _, missing = runs
    raw, keyed = _losses(raw_dir), _losses(keyed_dir)
    print("losses encoding in the step", raw, "from the keyed store", keyed)
    assert [s for s, _ in raw] == [1, 2] and [s for s, _ in keyed] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in keyed[:2]], [v for _, v in raw], rtol=1e-5, atol=1e-6)
    # Step 3's batch met the record without an embedding: skipped, counted, logged.
    scalars = read_scalars(os.path.join(keyed_dir, "tb"))
    assert scalars["data/bad_missing_embedding"] == [(3, 1.0)]
    assert sum(v for k, s in scalars.items() if k.startswith("data/bad_") for _, v in s) == 1.0
    # The run's encoders are the store's (copied): sampling later sees what training saw. Only the text towers
    # ran at embed time; the CLIP image tower was the only encoder the keyed run loaded.
    assert sorted(os.listdir(os.path.join(keyed_dir, "encoders", "clip"))) == ["clip_image", "clip_text",
                                                                                 "tokenizer"]


def test_val_loss_is_deterministic_and_logged(runs):
    _, keyed_dir, metrics, evaluations, missing = runs
    assert len(evaluations) == 3  # steps 1, 2 (periodic) and 3 (final)
    for a, b, bad in evaluations:
        assert a == b and np.isfinite(a["val_loss"]) and a["val_loss"] > 0  # the same state: the same number
        assert bad["missing_embedding"] == int(missing < "img08.png")  # the first 8 records of the split
    assert metrics["eval_val_loss"] == evaluations[-1][0]["val_loss"]
    assert len({e[0]["val_loss"] for e in evaluations}) == 3  # the model changed between them
    scalars = read_scalars(os.path.join(keyed_dir, "tb"))
    assert [s for s, _ in scalars["eval/val_loss"]] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in scalars["eval/val_loss"]], [e[0]["val_loss"] for e in evaluations],
                               rtol=1e-6)


def test_sigma_grid_is_the_mid_quantiles():
    from ediffi_jax.edm import LogNormalSigma

    grid = validation.sigma_grid(LogNormalSigma(-1.2, 1.2))
    assert grid.shape == (8,) and np.all(np.diff(grid) > 0)
    np.testing.assert_allclose(grid[3] * grid[4], np.exp(-2.4), rtol=1e-5)  # symmetric about the median
    expert = validation.sigma_grid(LogNormalSigma(-1.2, 1.2, lo=1.0, hi=5.0))
    assert 1.0 < expert.min() and expert.max() < 5.0
