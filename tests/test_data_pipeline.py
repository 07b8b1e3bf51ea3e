"""Real image–text input pipeline: resize / crop, caption cleanup, bad records (skipped, counted exactly, never
repeated), determinism, host sharding, exact resume (threads and worker processes), keyed embeddings, sources."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from ediffi_jax import sr
from ediffi_jax.data import pipeline, records, sources, throughput
from ediffi_jax.data.keyed_embeddings import KeyedEmbeddings, write_keyed_embeddings
from ediffi_jax.data.records import BadRecord, Preprocess, clean_caption

N_GOOD = 24


def _smooth(h, w, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:h, :w] / max(h, w)
    c = rng.uniform(0.5, 4, (3, 2))
    img = np.stack([np.sin(c[k, 0] * 6 * y + c[k, 1] * 6 * x + k) for k in range(3)], -1)
    return ((img + 1) * 127.5).round().astype(np.uint8)


def _jpeg(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


class _Source:
    """Random-access records; reading index `raise_at` fails (as a TFDS feature that cannot be decoded)."""

    def __init__(self, recs, raise_at=()):
        self.recs, self.raise_at = recs, set(raise_at)

    def __len__(self):
        return len(self.recs)

    def __getitem__(self, i):
        if i in self.raise_at:
            raise OSError(f"cannot read record {i}")
        return self.recs[i]


# The bad records: reason -> how many the source holds.
BAD = {"missing_field": 2, "unreadable_record": 1, "empty_image": 1, "undecodable_image": 2, "caption_not_text": 2,
       "empty_caption": 1, "missing_embedding": 0}


@pytest.fixture(scope="module")
def data():
    """24 good JPEG records of 64–96 px (non-square) and 9 bad ones interleaved: (source, good keys)."""
    good = []
    for i in range(N_GOOD):
        h, w = 64 + 8 * (i % 5), 96 - 8 * (i % 4)
        good.append({"image": _jpeg(_smooth(h, w, i)), "caption": f"  photo  number\n{i} ", "key": f"g{i:02d}"})
    jpeg = good[0]["image"]
    bad = [
        {"caption": "no image", "key": "b0"},                                   # missing_field
        {"image": jpeg, "key": "b1"},                                           # missing_field
        {"image": jpeg, "caption": "read fails", "key": "b2"},                  # unreadable_record (raise_at)
        {"image": b"", "caption": "zero bytes", "key": "b3"},                   # empty_image
        {"image": jpeg[: len(jpeg) // 2], "caption": "truncated", "key": "b4"},  # undecodable_image
        {"image": b"not an image at all", "caption": "junk", "key": "b5"},      # undecodable_image
        {"image": jpeg, "caption": 17, "key": "b6"},                            # caption_not_text
        {"image": jpeg, "caption": b"\xff\xfe bad utf8", "key": "b7"},          # caption_not_text
        {"image": jpeg, "caption": " \t\n ", "key": "b8"},                      # empty_caption
    ]
    recs = list(good)
    for j, b in enumerate(bad):
        recs.insert(3 * j + 1, b)
    raise_at = [i for i, r in enumerate(recs) if r.get("key") == "b2"]
    return _Source(recs, raise_at), sorted(r["key"] for r in good)


def _iter(src, **kw):
    args = dict(preprocess=Preprocess(32), batch_size=5, seed=3)
    args.update(kw)
    return pipeline.make_image_text_iterator(src, **args)


def _same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


# ---------------------------------------------------------------- records: captions, resize, crops


def test_caption_cleanup_is_exact():
    assert clean_caption("  a\tcat \n\n on  a\u00a0mat  ") == "a cat on a mat"
    assert clean_caption(b"caf\xc3\xa9  au lait") == "café au lait"
    assert clean_caption(np.array(b"x  y")) == "x y"
    assert clean_caption("hello wonderful world", max_chars=13) == "hello"  # cut inside a word: back to a space
    assert clean_caption("hello wonderful world", max_chars=15) == "hello wonderful"  # cut at a space
    assert clean_caption("abcdefghij", max_chars=4) == "abcd"  # one long word: a hard cut
    assert clean_caption("x" * 5000) == "x" * records.DEFAULT_MAX_CAPTION_CHARS
    for bad, reason in [("  \n", "empty_caption"), (3, "caption_not_text"), (b"\xff", "caption_not_text"),
                        (None, "caption_not_text")]:
        with pytest.raises(BadRecord) as e:
            clean_caption(bad)
        assert e.value.reason == reason


def test_resize_short_side_then_center_and_random_crops():
    arr = _smooth(60, 90, 0)  # landscape: short side 60 -> 32, long 90 -> 48
    rec = {"image": _jpeg(arr), "caption": "c", "key": "k"}
    want = np.asarray(Image.open(io.BytesIO(rec["image"])).convert("RGB").resize((48, 32), Image.BICUBIC))
    center = Preprocess(32, crop="center", jpeg_draft=False)(rec, None)
    assert center["image"].shape == (32, 32, 3) and center["image"].dtype == np.uint8
    np.testing.assert_array_equal(center["image"], want[:, 8:40])
    offsets = set()
    for s in range(12):
        u8 = Preprocess(32, jpeg_draft=False)(rec, np.random.default_rng(s))["image"]
        x = [x for x in range(17) if np.array_equal(want[:, x:x + 32], u8)]
        assert len(x) == 1
        offsets.add(x[0])
    assert len(offsets) > 3
    portrait = Preprocess(24, crop="center")({"image": _smooth(80, 50, 1), "caption": "c"}, None)["image"]
    assert portrait.shape == (24, 24, 3)
    small = Preprocess(48)({"image": _smooth(20, 30, 2), "caption": "c"}, np.random.default_rng(0))["image"]
    assert small.shape == (48, 48, 3)  # upscaled
    grey = Preprocess(16, crop="center")({"image": Image.fromarray(_smooth(40, 40, 3)).convert("LA"), "caption": "c"},
                                         None)["image"]
    assert grey.shape == (16, 16, 3) and np.allclose(grey[..., 0], grey[..., 2])
    # JPEG draft decoding (DCT downscale to >= 2R) is visually the full decode.
    big = {"image": _jpeg(_smooth(200, 256, 4)), "caption": "c"}
    a = Preprocess(32, crop="center")(big, None)["image"]
    b = Preprocess(32, crop="center", jpeg_draft=False)(big, None)["image"]
    assert np.abs(a.astype(float) - b).mean() < 2  # of 255
    with pytest.raises(ValueError, match="crop must be one of"):
        Preprocess(32, crop="left")
    with pytest.raises(ValueError, match="resize_filter must be one of"):
        Preprocess(32, resize_filter="nearest")


def test_sr_pairs_are_aligned(data):
    src, _ = data
    it = _iter(src, transform=sr.pair_transform(2, crop=16), batch_size=6)
    b = next(it)
    assert b["image"].shape == (6, 16, 16, 3) and b["lowres"].shape == (6, 8, 8, 3)
    np.testing.assert_allclose(b["lowres"], sr.downsample(b["image"], 2), atol=1e-6)


# ---------------------------------------------------------------- bad records, determinism, hosts


def test_bad_records_are_skipped_counted_exactly_and_never_repeated(data):
    src, good = data
    it = _iter(src, num_epochs=1, drop_remainder=False)
    batches = list(it)
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == good  # every good record once, no bad one, none twice
    assert [len(b["image"]) for b in batches] == [5, 5, 5, 5, 4]  # batches of surviving records
    assert it.bad_records == BAD
    assert set(batches[0]["caption"]) <= {f"photo number {i}" for i in range(N_GOOD)}
    assert batches[0]["image"].shape == (5, 32, 32, 3) and batches[0]["caption"].dtype == object
    assert batches[0]["image"].dtype == np.float32 and -1 <= batches[0]["image"].min() < batches[0]["image"].max() <= 1
    # Two epochs, reshuffled: every good record once per epoch, each bad record counted once per epoch.
    it = _iter(src, batch_size=8, num_epochs=2, drop_remainder=False)
    keys = [k for b in it for k in b["key"]]
    assert sorted(keys[:24]) == sorted(keys[24:]) == good and keys[:24] != keys[24:]
    assert it.bad_records == {k: 2 * v for k, v in BAD.items()}


def test_same_seed_same_batches(data):
    src, _ = data
    a, b, c = _iter(src), _iter(src), _iter(src, seed=4)
    for _ in range(4):
        x, y, z = next(a), next(b), next(c)
        _same(x, y)
    assert list(x["key"]) != list(z["key"])


@pytest.mark.parametrize("split_batches", [False, True])
def test_two_hosts_see_disjoint_shards_covering_the_set(data, split_batches):
    src, good = data
    seen = []
    for host in range(2):
        it = _iter(src, shard_index=host, shard_count=2, num_epochs=1, drop_remainder=False, batch_size=4,
                   split_batches=split_batches)
        seen.append([k for b in it for k in b["key"]])
    assert set(seen[0]).isdisjoint(seen[1])
    if split_batches:  # one epoch is cut to whole global batches (32 of 33 records): the same as on one host
        one = _iter(src, num_epochs=1, drop_remainder=False, batch_size=8, split_batches=True)
        good = sorted(k for b in one for k in b["key"])
        assert len(good) >= N_GOOD - 1
    assert sorted(seen[0] + seen[1]) == good


def test_split_batches_give_the_same_global_batches_on_one_and_two_hosts(data):
    src, _ = data
    clean = [r for r in src.recs if r["key"][0] == "g"]
    one = _iter(clean, batch_size=8, split_batches=True)
    hosts = [_iter(clean, batch_size=4, split_batches=True, shard_index=h, shard_count=2) for h in range(2)]
    for _ in range(4):  # across the epoch boundary
        a, b0, b1 = next(one), next(hosts[0]), next(hosts[1])
        assert list(a["key"]) == list(b0["key"]) + list(b1["key"])
        np.testing.assert_array_equal(a["image"], np.concatenate([b0["image"], b1["image"]]))


def test_field_view_renames_tfds_fields():
    recs = [{"img": b"x", "captions": {"text": np.array([b"first", b"second"])}, "id": b"a"},
            {"img": b"y", "captions": {}}]
    view = sources.FieldView(recs, image_key="img", caption_key="captions.text", key_key="id")
    assert len(view) == 2 and view[0] == {"image": b"x", "caption": b"first", "key": b"a"}
    assert view[1] == {"image": b"y", "key": "1"}  # no caption: the pipeline counts it as missing_field


def _check_resume(src, make, cuts, n_after=4):
    for cut in cuts:
        it = make()
        for _ in range(cut):
            next(it)
        state = json.loads(json.dumps(it.get_state()))  # what the Orbax checkpoint stores
        expected = [next(it) for _ in range(n_after)]
        counts = it.bad_records
        it.close()
        resumed = make()
        resumed.set_state(state)
        assert resumed.get_state() == state
        got = [next(resumed) for _ in range(n_after)]
        for a, b in zip(expected, got):
            _same(a, b)
        assert resumed.bad_records == counts
        resumed.close()


def test_resume_continues_with_the_exact_next_batch(data):
    src, _ = data
    # batch 5 out of chunks of 5 records with bad ones: cuts fall mid-chunk and across the epoch boundary.
    _check_resume(src, lambda: _iter(src, transform=sr.pair_transform(2, crop=16)), cuts=(0, 1, 3, 5, 6))


def test_worker_processes_give_the_same_batches_and_resume_exactly(data):
    src, _ = data
    threads = _iter(src)
    expected = [next(threads) for _ in range(7)]
    workers = _iter(src, num_workers=2)
    try:
        for e in expected:
            _same(e, next(workers))
        assert workers.bad_records == threads.bad_records
        state = json.loads(json.dumps(workers.get_state()))
        after = [next(workers) for _ in range(2)]
    finally:
        workers.close()
    resumed = _iter(src, num_workers=2)
    try:
        resumed.set_state(state)
        for a in after:
            _same(a, next(resumed))
    finally:
        resumed.close()


# ---------------------------------------------------------------- keyed embeddings, throughput, sources


def test_keyed_embeddings_are_joined_by_key(data, tmp_path):
    src, good = data
    keys = good[1:]  # "g00" has none
    emb = np.arange(len(keys) * 6, dtype=np.float16).reshape(len(keys), 3, 2)
    pooled = np.arange(len(keys), dtype=np.float32)[::-1].copy()
    write_keyed_embeddings(str(tmp_path / "emb"), keys[::-1], {"t5_tokens": emb[::-1], "clip_text_pooled":
                                                               pooled[::-1]})
    store = KeyedEmbeddings(str(tmp_path / "emb"))
    assert len(store) == len(keys) and "g05" in store and "g00" not in store
    it = _iter(src, embeddings=store, num_epochs=1, drop_remainder=False)
    batches = list(it)
    assert it.bad_records == {**BAD, "missing_embedding": 1}
    for b in batches:
        for j, k in enumerate(b["key"]):
            i = keys.index(k)
            np.testing.assert_array_equal(b["t5_tokens"][j], emb[i])
            assert b["clip_text_pooled"][j] == pooled[i]
    with pytest.raises(ValueError, match="duplicate keys"):
        write_keyed_embeddings(str(tmp_path / "dup"), ["a", "a"], {"x": np.zeros((2, 1))})


def test_measure_pipeline_reports_examples_per_second(data):
    src, _ = data
    r = throughput.measure_pipeline(src, resolution=16, batch_size=4, num_workers=0, num_batches=3)
    assert r["batches"] == 3 and r["examples"] == 12 and r["examples_per_s"] > 0 and r["seconds"] > 0
    d = throughput.measure_decode([r for r in src.recs if r["key"][0] == "g"][:4], resolution=16, num_examples=8)
    assert d["examples"] == 8 and d["examples_per_s"] > 0


def test_sources_tfds_by_directory_and_validate(tmp_path):
    from ediffi_jax.config import tiny_config
    from ediffi_jax.data.shapes_tfds import build_shapes
    from ediffi_jax.train import loop

    builder = build_shapes(str(tmp_path / "tfds"), 16, 8, 0, 0)
    c = tiny_config()
    c.data.update(dict(name="tfds", path=builder.data_dir, resolution=32))
    c.model.image_size = 32
    loop.validate(c)
    train, val = loop.load_data(c)
    assert val is None and len(train) == 8 and set(train[0]) == {"image", "caption", "key"}
    it = pipeline.make_image_text_iterator(train, preprocess=Preprocess(32), batch_size=4, seed=0)
    b = next(it)
    assert b["image"].shape == (4, 32, 32, 3) and all(isinstance(x, str) for x in b["caption"])
    for field, value, match in [("name", "laion", "one of shapes, folder"), ("val_examples", 0, "val_examples"),
                                ("crop", "top", "crop must be one of"), ("precomputed", "/p", "data.embeddings")]:
        bad = c.copy_and_resolve_references()
        bad.data.update({"val_split": "train", "embeddings": "/x", field: value})
        with pytest.raises(ValueError, match=match):
            loop.validate(bad)
    ok = c.copy_and_resolve_references()
    ok.data.update(dict(val_split="train", embeddings="/x"))
    loop.validate(ok)  # real data: a validation split and a keyed embedding store (checked when opened)
    with pytest.raises(ValueError, match="needs data.path"):
        sources.build(_with(c.data, name="folder", path=""))


def _with(d, **kw):
    d = d.copy_and_resolve_references()
    d.update(kw)
    return d



def test_sources_folder_builder_feeds_the_pipeline(data, tmp_path):
    from ediffi_jax.config import tiny_config
    from ediffi_jax.train import loop

    src, _ = data
    folder = tmp_path / "imgs"
    folder.mkdir()
    for r in src.recs[:12]:
        if r["key"][0] == "g":
            (folder / f"{r['key']}.jpg").write_bytes(r["image"])
            (folder / f"{r['key']}.txt").write_text(r["caption"])
    c = tiny_config()
    c.data.update(dict(name="folder", path=str(folder), data_dir=str(tmp_path / "tfds")))
    loop.validate(c)
    train, val = loop.load_data(c)
    assert val is None and len(train) == 8
    it = pipeline.make_image_text_iterator(train, preprocess=Preprocess(32), batch_size=8, seed=0, num_epochs=1)
    b = next(it)
    assert sorted(b["key"]) == sorted(f"{r['key']}.jpg" for r in src.recs[:12] if r["key"][0] == "g")
    assert b["image"].shape == (8, 32, 32, 3) and sum(it.bad_records.values()) == 0
