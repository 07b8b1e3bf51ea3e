"""Synthetic shapes data: generation, captions, alignment metric, TFDS builder and grain pipeline."""

import dataclasses
import json
import sys

import numpy as np
import pytest

from ediffi_jax.data import pipeline, shapes


def _examples(seed, n, res, start=0):
    return [shapes.example(seed, start + i, res) for i in range(n)]


# ----------------------------------------------------------------------------------------------------
# Generation and captions.
# ----------------------------------------------------------------------------------------------------
def test_example_is_deterministic_per_seed_and_index():
    a, b = shapes.example(0, 5, 32), shapes.example(0, 5, 32)
    assert a["image"].dtype == np.uint8 and a["image"].shape == (32, 32, 3)
    assert a["image"].tobytes() == b["image"].tobytes() and a["caption"] == b["caption"]
    other_seed = [shapes.example(1, i, 32) for i in range(10)]
    same_seed = _examples(0, 10, 32)
    n_diff = sum(x["image"].tobytes() != y["image"].tobytes() for x, y in zip(same_seed, other_seed))
    assert n_diff == 10
    # Different indices of one seed differ too.
    assert len({e["image"].tobytes() for e in same_seed}) == 10


def test_render_resolutions_and_palette():
    scene = shapes.sample_scene(np.random.default_rng(3))
    for res in (16, 32, 64, 256):
        img = shapes.render(scene, res)
        assert img.shape == (res, res, 3) and img.dtype == np.uint8
        colours = {tuple(c) for c in img.reshape(-1, 3)}
        assert colours == {shapes.BACKGROUND} | {shapes.COLORS[o.color] for o in scene.objects}
    aa = shapes.render(scene, 32, supersample=4)
    assert aa.shape == (32, 32, 3) and len({tuple(c) for c in aa.reshape(-1, 3)}) > len(scene.objects) + 1
    with pytest.raises(ValueError, match="resolution must be >= 8, got 4"):
        shapes.render(scene, 4)


def test_scenes_are_valid_and_cover_the_vocabulary():
    rng = np.random.default_rng(0)
    scenes = [shapes.sample_scene(rng) for _ in range(500)]
    counts = [len(s.objects) for s in scenes]
    assert set(counts) == {1, 2}
    for s in scenes:
        assert len({o.color for o in s.objects}) == len(s.objects)
        assert len({o.position for o in s.objects}) == len(s.objects)
        if len(s.objects) == 2:
            assert not shapes._overlaps(s.objects[0], s.objects[1], gap=0.0)
        for o in s.objects:
            assert shapes.classify_position(*o.center) == o.position
    objs = [o for s in scenes for o in s.objects]
    assert {o.color for o in objs} == set(shapes.COLORS)
    assert {o.shape for o in objs} == set(shapes.SHAPES)
    assert {o.position for o in objs} == set(shapes.POSITIONS)
    assert all(len(shapes.sample_scene(rng, max_objects=1).objects) == 1 for _ in range(20))


def test_caption_parse_round_trip():
    rng = np.random.default_rng(1)
    for _ in range(300):
        scene = shapes.sample_scene(rng)
        text = shapes.caption(scene)
        parsed = shapes.parse_caption(text)
        assert [(o.color, o.shape, o.position) for o in parsed] == [
            (o.color, o.shape, o.position) for o in scene.objects
        ]
        assert shapes.caption(shapes.Scene(tuple(parsed))) == text
    two = shapes.Scene(
        (shapes.SceneObject("red", "circle", "left"), shapes.SceneObject("blue", "square", "bottom"))
    )
    assert shapes.caption(two) == "a red circle on the left and a blue square at the bottom"
    assert shapes.parse_caption("A green triangle in the center.")[0].shape == "triangle"


def test_bad_values_raise_clear_errors():
    with pytest.raises(ValueError, match="cannot parse shapes caption 'a purple circle on the left'"):
        shapes.parse_caption("a purple circle on the left")
    with pytest.raises(ValueError, match="cannot parse shapes caption ''"):
        shapes.parse_caption("")
    with pytest.raises(ValueError, match="unknown colour 'purple'"):
        shapes.SceneObject("purple", "circle", "left")
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        shapes.SceneObject("red", "hexagon", "left")
    with pytest.raises(ValueError, match="unknown position 'middle'"):
        shapes.SceneObject("red", "circle", "middle")
    with pytest.raises(ValueError, match="got 2 images but 1 captions"):
        shapes.score_batch(np.zeros((2, 32, 32, 3), np.uint8), ["a red circle on the left"])


# ----------------------------------------------------------------------------------------------------
# Alignment metric.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("res", [32, 64])
def test_ground_truth_scores_one(res):
    exs = _examples(11, 200, res)
    result = shapes.score_batch([e["image"] for e in exs], [e["caption"] for e in exs])
    assert result == {"color": 1.0, "shape": 1.0, "position": 1.0, "overall": 1.0}
    # The float [-1, 1] path gives the same result.
    floats = np.stack([e["image"] for e in exs[:50]]).astype(np.float32) / 127.5 - 1.0
    assert shapes.score_batch(floats, [e["caption"] for e in exs[:50]])["overall"] == 1.0


def test_ground_truth_at_16_keeps_colour_and_position():
    exs = _examples(11, 200, 16)
    result = shapes.score_batch([e["image"] for e in exs], [e["caption"] for e in exs])
    assert result["color"] == 1.0 and result["position"] == 1.0
    assert result["overall"] >= 0.7  # circles of 3-5 px are often indistinguishable from squares


def test_ground_truth_survives_mild_noise():
    rng = np.random.default_rng(0)
    exs = _examples(12, 100, 32)
    noisy = [
        np.clip(e["image"] / 127.5 - 1.0 + 0.2 * rng.standard_normal(e["image"].shape), -1, 1) for e in exs
    ]
    assert shapes.score_batch(noisy, [e["caption"] for e in exs])["overall"] == 1.0


@pytest.mark.parametrize("res", [32, 64])
def test_noise_and_blank_score_low(res):
    rng = np.random.default_rng(0)
    caps = [e["caption"] for e in _examples(13, 100, res)]
    uniform = rng.integers(0, 256, (100, res, res, 3), dtype=np.uint8)
    gauss = rng.standard_normal((100, res, res, 3)).astype(np.float32)
    blank = np.full((100, res, res, 3), 128, np.uint8)
    black = np.zeros((100, res, res, 3), np.float32) - 1.0
    for images in (uniform, gauss, blank, black):
        result = shapes.score_batch(images, caps)
        assert result["overall"] <= 0.1 and result["color"] <= 0.1, result


def _single_object_scenes(n):
    rng = np.random.default_rng(5)
    return [shapes.sample_scene(rng, max_objects=1) for _ in range(n)]


def test_score_detects_wrong_colour_shape_and_position():
    scenes = _single_object_scenes(60)
    wrong = {"color": [], "shape": [], "position": []}
    for i, scene in enumerate(scenes):
        (obj,) = scene.objects
        img = shapes.render(scene, 32)
        assert shapes.score(img, shapes.caption(scene))["overall"] == 1.0
        others = {
            "color": [c for c in shapes.COLORS if c != obj.color],
            "shape": [s for s in shapes.SHAPES if s != obj.shape],
            "position": [p for p in shapes.POSITIONS if p != obj.position],
        }
        for aspect, choices in others.items():
            bad = dataclasses.replace(obj, **{aspect: choices[i % len(choices)]})
            wrong[aspect].append(shapes.score(img, shapes.caption(shapes.Scene((bad,)))))
    mean = {a: {k: np.mean([r[k] for r in rs]) for k in rs[0]} for a, rs in wrong.items()}
    assert mean["color"] == {"color": 0.0, "shape": 0.0, "position": 0.0, "overall": 0.0}
    assert mean["shape"] == {"color": 1.0, "shape": 0.0, "position": 1.0, "overall": 0.0}
    assert mean["position"] == {"color": 1.0, "shape": 1.0, "position": 0.0, "overall": 0.0}


def test_score_two_objects_partial_credit():
    scene = shapes.Scene(
        (
            shapes.SceneObject("red", "circle", "left", (0.2, 0.5), 0.13),
            shapes.SceneObject("blue", "square", "right", (0.8, 0.5), 0.13),
        )
    )
    img = shapes.render(scene, 64)
    assert shapes.score(img, "a red circle on the left and a blue square on the right")["overall"] == 1.0
    half = shapes.score(img, "a red circle on the left and a green square on the right")
    assert half == {"color": 0.5, "shape": 0.5, "position": 0.5, "overall": 0.5}
    swapped = shapes.score(img, "a red circle on the right and a blue triangle on the right")
    assert swapped == {"color": 1.0, "shape": 0.5, "position": 0.5, "overall": 0.0}


def test_largest_component_ignores_specks():
    mask = np.zeros((20, 20), bool)
    mask[2:10, 2:10] = True  # 64 px blob
    mask[15:17, 15:18] = True  # 6 px speck
    mask[0, 19] = True
    comp = shapes.largest_component(mask)
    assert comp.sum() == 64 and comp[2:10, 2:10].all()
    ring = np.zeros((30, 30), bool)
    ring[5:25, 5:25] = True
    ring[8:22, 8:22] = False  # a ring needs many propagation steps
    assert shapes.largest_component(ring).sum() == ring.sum()


# ----------------------------------------------------------------------------------------------------
# TFDS builder.
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tfds_builder(tmp_path_factory):
    from ediffi_jax.data.shapes_tfds import build_shapes

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    return data_dir, build_shapes(data_dir, resolution=32, num_train=64, num_val=16, seed=0)


def test_tfds_build_counts_shapes_and_contents(tfds_builder):
    data_dir, builder = tfds_builder
    assert builder.info.splits["train"].num_examples == 64
    assert builder.info.splits["validation"].num_examples == 16
    train, val = builder.as_data_source("train"), builder.as_data_source("validation")
    assert len(train) == 64 and len(val) == 16
    for i in range(64):
        rec, ref = train[i], shapes.example(0, i, 32)
        assert rec["image"].dtype == np.uint8 and rec["image"].shape == (32, 32, 3)
        assert np.array_equal(rec["image"], ref["image"]) and rec["caption"].decode() == ref["caption"]
    assert [val[j]["caption"].decode() for j in range(16)] == [
        shapes.example(0, 64 + j, 32)["caption"] for j in range(16)
    ]
    assert "tensorflow" not in sys.modules


def test_tfds_variants_do_not_collide(tfds_builder):
    from ediffi_jax.data.shapes_tfds import build_shapes

    data_dir, builder = tfds_builder
    other = build_shapes(data_dir, resolution=16, num_train=8, num_val=0, seed=3)
    assert other.data_dir != builder.data_dir and other.builder_config.name == "r16_n8_v0_s3"
    src = other.as_data_source("train")
    assert len(src) == 8 and src[0]["image"].shape == (16, 16, 3)
    assert src[0]["caption"].decode() == shapes.example(3, 0, 16)["caption"]
    again = build_shapes(data_dir, resolution=32, num_train=64, num_val=16, seed=0)  # reuses files
    assert again.data_dir == builder.data_dir and len(again.as_data_source("train")) == 64


def test_pipeline_on_tfds_source(tfds_builder):
    _, builder = tfds_builder
    it = pipeline.make_train_iterator(builder.as_data_source("train"), batch_size=16, seed=0, tokenize=None)
    batches = [next(it) for _ in range(4)]  # exactly one epoch
    caps = sorted(c for b in batches for c in b["caption"])
    assert caps == sorted(shapes.example(0, i, 32)["caption"] for i in range(64))
    assert batches[0]["image"].shape == (16, 32, 32, 3) and batches[0]["image"].dtype == np.float32


# ----------------------------------------------------------------------------------------------------
# Grain pipeline.
# ----------------------------------------------------------------------------------------------------
def _fake_tokenize(captions):
    ids = np.zeros((len(captions), 8), np.int32)
    for i, c in enumerate(captions):
        words = c.split()[:8]
        ids[i, : len(words)] = [len(w) for w in words]
    return {"t5_ids": ids, "t5_mask": ids > 0}


def test_batch_contents_dtypes_and_ranges():
    src = shapes.ShapesSource(seed=0, length=100, resolution=32)
    it = pipeline.make_train_iterator(src, batch_size=8, seed=0, tokenize=_fake_tokenize)
    batch = next(it)
    assert set(batch) == {"image", "caption", "t5_ids", "t5_mask"}
    img = batch["image"]
    assert img.shape == (8, 32, 32, 3) and img.dtype == np.float32
    assert img.min() == -1.0 and img.max() == 1.0
    assert np.allclose(np.unique(img), np.array([0, 128, 255]) / 127.5 - 1.0, atol=1e-6)
    assert batch["caption"].dtype == object and batch["caption"].shape == (8,)
    assert all(isinstance(c, str) for c in batch["caption"])
    assert batch["t5_ids"].dtype == np.int32 and batch["t5_ids"].shape == (8, 8)
    assert batch["t5_mask"].dtype == bool
    # Images and captions stay paired: each image scores 1.0 against its caption.
    assert shapes.score_batch(img, batch["caption"])["overall"] == 1.0


def test_in_memory_source_with_png_bytes_and_byte_captions():
    exs = _examples(4, 12, 16)
    recs = [{"image": shapes.encode_png(e["image"]), "caption": e["caption"].encode()} for e in exs]
    batches = pipeline.make_eval_batches(recs, 4, 3)
    assert len(batches) == 3
    for k, b in enumerate(batches):
        for j in range(4):
            e = exs[4 * k + j]
            assert b["caption"][j] == e["caption"]
            assert np.array_equal(np.round((b["image"][j] + 1.0) * 127.5).astype(np.uint8), e["image"])
    with pytest.raises(ValueError, match="source has 12 records, fewer than 4 batches of 4"):
        pipeline.make_eval_batches(recs, 4, 4)


def _indexed_source(n):
    img = np.zeros((8, 8, 3), np.uint8)
    return [{"image": img, "caption": str(i)} for i in range(n)]


def test_sharding_is_disjoint_and_covering():
    src = _indexed_source(40)
    seen = []
    for shard in range(2):
        it = pipeline.make_train_iterator(
            src, batch_size=4, seed=7, tokenize=None, shard_index=shard, shard_count=2, num_epochs=1
        )
        seen.append([int(c) for b in it for c in b["caption"]])
    assert len(seen[0]) == len(seen[1]) == 20
    assert set(seen[0]).isdisjoint(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(40))
    assert set(seen[0]) == set(range(0, 40, 2))
    with pytest.raises(ValueError, match="need 0 <= shard_index < shard_count"):
        pipeline.make_train_iterator(src, batch_size=4, seed=0, tokenize=None, shard_index=2, shard_count=2)


def test_epochs_are_reshuffled_permutations():
    src = _indexed_source(24)
    it = pipeline.make_train_iterator(src, batch_size=6, seed=1, tokenize=None, num_epochs=2)
    order = [int(c) for b in it for c in b["caption"]]
    assert len(order) == 48
    first, second = order[:24], order[24:]
    assert sorted(first) == sorted(second) == list(range(24))
    assert first != second and first != list(range(24))
    it_again = pipeline.make_train_iterator(src, batch_size=6, seed=1, tokenize=None, num_epochs=2)
    assert [int(c) for b in it_again for c in b["caption"]] == order
    it_other = pipeline.make_train_iterator(src, batch_size=6, seed=2, tokenize=None, num_epochs=2)
    assert [int(c) for b in it_other for c in b["caption"]] != order


def test_checkpoint_resume_is_exact():
    src = shapes.ShapesSource(seed=2, length=50, resolution=16)

    def make():
        return pipeline.make_train_iterator(src, batch_size=8, seed=3, tokenize=_fake_tokenize)

    it = make()
    for _ in range(5):  # 40 examples: the next 3 batches cross the epoch boundary
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    resumed = make()
    resumed.set_state(state)
    got = [next(resumed) for _ in range(3)]
    for a, b in zip(expected, got):
        assert set(a) == set(b)
        for k in a:
            assert np.array_equal(a[k], b[k]), k
