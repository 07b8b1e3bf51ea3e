"""Image–text TFDS builders (folder / WebDataset tars / COCO captions): exact drop counts per reason, TF-free
read-back equal to what was written, filters, configs that do not collide, `ediffi-data` logic.

Each layout's data is generated here (a few dozen small images, with deliberately broken records); the expected
counts are spelled out next to the data that produces them. `make_coco_tree` also makes the data of
docs/data_contact_sheet.png (see the docstring of `ediffi_jax.data.inspect`).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from ediffi_jax.data import image_text as it
from ediffi_jax.data import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def picture(index: int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """A shapes scene (caption in `shapes_caption`) resized to `size` = (width, height), in `mode`."""
    arr = shapes.example(7, index, 32)["image"]
    im = Image.fromarray(arr).resize(size, Image.BILINEAR)
    if mode == "RGBA":
        im = im.convert("RGBA")
        im.putalpha(200)
        return im
    return im.convert(mode)


def shapes_caption(index: int) -> str:
    return shapes.example(7, index, 32)["caption"]


def encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def jpeg(index: int, size: tuple[int, int] = (32, 32)) -> bytes:
    return encode(picture(index, size), "JPEG")


def write(path: str, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


# --------------------------------------------------------------------------------------------- folder layouts

# (relative path, size, format, mode): kept without filters; 12x12 ones are too_small at min_size=16, 64x16 ones
# bad_aspect at max_aspect=2. RGBA / CMYK / WebP / 16-bit are re-encoded as PNG, the rest stored as written.
FOLDER_GOOD = [(f"img{i:02d}.jpg", (32, 32), "JPEG", "RGB") for i in range(8)] + [
    (f"sub/img{i:02d}.png", (40, 24), "PNG", "RGB") for i in range(8, 12)] + [
    ("small0.jpg", (12, 12), "JPEG", "RGB"), ("sub/small1.png", (12, 20), "PNG", "RGB"),
    ("wide0.jpg", (64, 16), "JPEG", "RGB"), ("wide1.png", (16, 64), "PNG", "RGB"),
    ("gray.png", (32, 32), "PNG", "L"), ("alpha.png", (32, 32), "PNG", "RGBA"),
    ("cmyk.jpg", (32, 32), "JPEG", "CMYK"), ("pic.webp", (32, 32), "WEBP", "RGB"),
]
FOLDER_COUNTS = {"seen": 32, "kept": 21, "dropped": {
    "bad_caption": 4, "empty_caption": 1, "empty_file": 1, "missing_caption": 2, "missing_image": 1,
    "unreadable_image": 2}}
FOLDER_FILTERED = {"seen": 32, "kept": 17, "dropped": {**FOLDER_COUNTS["dropped"], "bad_aspect": 2, "too_small": 2}}


def make_sidecar_folder(root: str) -> dict[str, dict]:
    """Sidecar layout; returns the expected records by key."""
    expected = {}
    for i, (rel, size, fmt, mode) in enumerate(FOLDER_GOOD):
        data = encode(picture(i, size, mode), fmt)
        write(f"{root}/{rel}", data)
        write(f"{root}/{os.path.splitext(rel)[0]}.txt", f"  {shapes_caption(i)}\n\n with   extra  space\t")
        expected[rel] = {"data": data, "caption": f"{shapes_caption(i)} with extra space", "size": size,
                         "same_bytes": mode in ("RGB", "L") and fmt != "WEBP"}
    write(f"{root}/jsongood.jpg", jpeg(30))
    write(f"{root}/jsongood.json", json.dumps({"caption": "  a  json\n caption ", "url": "x"}))
    expected["jsongood.jpg"] = {"data": jpeg(30), "caption": "a json caption", "size": (32, 32), "same_bytes": True}
    broken = {
        "zero.jpg": (b"", "a caption"),  # empty_file
        "trunc.jpg": (jpeg(31)[:300], "a caption"),  # unreadable_image
        "notimg.png": (b"this is not a png at all", "a caption"),  # unreadable_image
        "badutf.jpg": (jpeg(32), b"caf\xe9 \xff caption"),  # bad_caption (latin-1, not UTF-8)
        "blank.jpg": (jpeg(33), " \n\t "),  # empty_caption
    }
    for rel, (data, caption) in broken.items():
        write(f"{root}/{rel}", data)
        write(f"{root}/{os.path.splitext(rel)[0]}.txt", caption)
    for stem, caption in [("jsonnum", "42"), ("jsonlist", '["a", "b"]'), ("jsonnull", '{"caption": null}'),
                          ("jsonnofield", '{"url": "http://x"}')]:  # 3 bad_caption, 1 missing_caption
        write(f"{root}/sub/{stem}.jpg", jpeg(34))
        write(f"{root}/sub/{stem}.json", caption)
    write(f"{root}/nocap.jpg", jpeg(35))  # missing_caption
    write(f"{root}/orphan.txt", "a caption without its image")  # missing_image
    return expected


JSONL_COUNTS = {"seen": 19, "kept": 10, "dropped": {
    "bad_caption": 2, "duplicate_key": 1, "malformed_entry": 2, "missing_caption": 2, "missing_image": 1,
    "empty_file": 1}}
CSV_COUNTS = {"seen": 7, "kept": 4, "dropped": {"empty_caption": 1, "missing_image": 1, "missing_caption": 1}}


def make_listing_folders(root: str) -> tuple[str, str]:
    """A captions.jsonl folder and a captions.csv folder."""
    jl = f"{root}/jsonl"
    lines = []
    for i in range(10):
        write(f"{jl}/images/{i:03d}.png", encode(picture(i, (24, 24)), "PNG"))
        lines.append(json.dumps({"file_name": f"images/{i:03d}.png", "caption": f"  caption {i} "}))
    for name in ("numcap", "badutf", "nocap", "unlisted"):
        write(f"{jl}/images/{name}.png", encode(picture(40, (24, 24)), "PNG"))
    write(f"{jl}/images/empty.png", b"")
    lines += [
        "",  # blank: skipped, not counted
        json.dumps({"file_name": "images/absent.png", "caption": "no such file"}),  # missing_image
        json.dumps({"file_name": "images/003.png", "caption": "again"}),  # duplicate_key
        "{not json",  # malformed_entry
        json.dumps({"caption": "no file field"}),  # malformed_entry
        json.dumps({"file_name": "images/numcap.png", "caption": 3}),  # bad_caption
        json.dumps({"file_name": "images/nocap.png"}),  # missing_caption
        json.dumps({"file_name": "images/empty.png", "text": "an empty file"}),  # empty_file
    ]  # images/unlisted.png: missing_caption
    text = "\n".join(lines).encode() + b'\n{"file_name": "images/badutf.png", "caption": "caf\xe9"}\n'  # bad_caption
    write(f"{jl}/captions.jsonl", text)
    cs = f"{root}/csv"
    rows = ["file_name,caption"]
    for i in range(4):
        write(f"{cs}/{i}.jpg", jpeg(i))
        rows.append(f'{i}.jpg,"caption, number {i}"')
    write(f"{cs}/blank.jpg", jpeg(5))
    write(f"{cs}/extra.jpg", jpeg(6))  # missing_caption
    rows += ["blank.jpg,   ", "gone.jpg,missing"]  # empty_caption, missing_image
    write(f"{cs}/captions.csv", "\n".join(rows) + "\n")
    return jl, cs


# --------------------------------------------------------------------------------------------- tar shards

WDS_COUNTS = {"seen": 28, "kept": 21, "dropped": {
    "bad_caption": 2, "duplicate_key": 1, "empty_file": 1, "missing_caption": 1, "missing_image": 1,
    "unreadable_image": 1, "unreadable_shard": 2}}
WDS_FILTERED = {"seen": 28, "kept": 18, "dropped": {**WDS_COUNTS["dropped"], "bad_aspect": 1, "too_small": 2}}


def make_tar(path: str, members: list[tuple[str, bytes]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_shards(root: str) -> dict[str, tuple[bytes, str]]:
    """Four shards (one cut short, one not a tar); returns the expected (image bytes, caption) by key."""
    expected: dict[str, tuple[bytes, str]] = {}
    m0: list[tuple[str, bytes]] = []
    for i in range(10):  # 2 of them 12x12 (too_small at 16), 1 48x16 (bad_aspect at 2)
        size = (12, 12) if i in (3, 7) else (48, 16) if i == 5 else (32, 32)
        key, img = f"000{i:03d}", jpeg(i, size)
        m0 += [(f"{key}.jpg", img), (f"{key}.txt", f" {shapes_caption(i)} ".encode())]
        expected[key] = (img, shapes_caption(i))
    expected["000010"] = (jpeg(10), "from json")
    m0 += [("000010.jpg", jpeg(10)), ("000010.json", b'{"caption": "from  json", "width": 32}'),
           ("000011.jpg", jpeg(11)),  # missing_caption
           ("000012.txt", b"no image"),  # missing_image
           ("000013.jpg", b""), ("000013.txt", b"empty image"),  # empty_file
           ("000014.cls", b"3"),  # neither image nor caption: ignored, not counted
           ("000015.png", b"\x89PNG garbage"), ("000015.txt", b"bad png"),  # unreadable_image
           ("000016.jpg", jpeg(16)), ("000016.json", b"17")]  # bad_caption
    make_tar(f"{root}/shard-000.tar", m0)
    m1: list[tuple[str, bytes]] = []
    for i in range(8):
        key, img = f"001{i:03d}", jpeg(20 + i)
        m1 += [(f"./{key}.jpg", img), (f"./{key}.txt", f"caption {key}".encode())]
        expected[key] = (img, f"caption {key}")
    m1 += [("000002.jpg", jpeg(2)), ("000002.txt", b"dup"),  # duplicate_key
           ("001100.jpg", jpeg(3)), ("001100.txt", b"\xff\xfe\x00bad")]  # bad_caption
    make_tar(f"{root}/shard-001.tar", m1)
    m2 = []
    for i in range(4):
        key, img = f"002{i:03d}", encode(picture(50 + i, (32, 32)), "PNG")
        m2 += [(f"{key}.png", img), (f"{key}.txt", f"caption {key}".encode())]
    make_tar(f"{root}/nested/shard-002.tar", m2)
    data = open(f"{root}/nested/shard-002.tar", "rb").read()
    cut = data.index(b"002002.png") + 512 + 100  # inside the third sample's image: samples 0 and 1 survive
    write(f"{root}/nested/shard-002.tar", data[:cut])  # unreadable_shard
    for i in range(2):
        key = f"002{i:03d}"
        expected[key] = (dict(m2)[f"{key}.png"], f"caption {key}")
    write(f"{root}/shard-003.tar", b"not a tar file" * 100)  # unreadable_shard
    return expected


# --------------------------------------------------------------------------------------------- COCO

COCO_TRAIN = {"seen": 36, "kept": 24, "dropped": {
    "bad_caption": 1, "duplicate_key": 1, "empty_caption": 1, "malformed_entry": 1, "missing_caption": 2,
    "missing_image": 3, "unreadable_image": 3}}
COCO_VAL = {"seen": 40, "kept": 40, "dropped": {}}


def coco_file(split: str, image_id: int) -> str:
    return f"COCO_{split}2014_{image_id:012d}.jpg"


def make_coco_tree(root: str) -> dict[str, dict[str, tuple[int, str]]]:
    """COCO 2014 layout (annotations/, train2014/, val2014/): val 16 images x 2-3 clean captions; train 12 images
    x 2 captions plus the broken entries commented below. Returns the expected {key: (image_id, caption)}."""
    expected: dict[str, dict[str, tuple[int, str]]] = {"train": {}, "validation": {}}
    rng = np.random.default_rng(0)
    for split, prefix, n_images in (("validation", "val", 16), ("train", "train", 14)):
        images, anns = [], []
        for k in range(n_images):
            image_id = 100 + 7 * k
            w, h = [(64, 48), (48, 64), (56, 56)][k % 3]
            images.append({"id": image_id, "file_name": coco_file(prefix, image_id), "width": w, "height": h})
            write(f"{root}/{prefix}2014/{coco_file(prefix, image_id)}", jpeg(60 + k, (w, h)))
            words = shapes_caption(60 + k)
            for c in range(3 if (split == "validation" and k % 2 == 0) else 2):
                ann_id = 5000 + 10 * k + c
                text = [f"{words}", f"A picture of {words}.", f"there is {words} here"][c]
                anns.append({"image_id": image_id, "id": ann_id, "caption": f" {text}\n"})
                expected[split][f"{image_id}/{ann_id}"] = (image_id, text)
        if split == "train":
            # image 100 + 7*12: truncated file -> its 2 annotations unreadable_image; image 100 + 7*13: file
            # absent -> 2 missing_image; (one more truncated image id 300 below: 1 annotation, unreadable)
            for k, ann_id in ((12, 5120), (12, 5121), (13, 5130), (13, 5131)):
                expected[split].pop(f"{100 + 7 * k}/{ann_id}")
            write(f"{root}/train2014/{coco_file('train', 184)}", jpeg(1)[:200])
            os.remove(f"{root}/train2014/{coco_file('train', 191)}")
            images += [{"id": 300, "file_name": coco_file("train", 300)}, {"id": 400, "file_name": "lonely.jpg"}]
            write(f"{root}/train2014/{coco_file('train', 300)}", b"\xff\xd8\xff garbage")  # unreadable_image
            write(f"{root}/train2014/lonely.jpg", jpeg(2))  # image without annotations: missing_caption
            anns += [
                {"image_id": 300, "id": 9001, "caption": "a broken jpeg"},
                {"image_id": 999, "id": 9002, "caption": "image id not in images"},  # missing_image
                {"image_id": 100, "id": 9003},  # missing_caption
                {"image_id": 100, "id": 9004, "caption": [1, 2]},  # bad_caption
                {"image_id": 107, "id": 5000, "caption": "repeated annotation id"},  # duplicate_key
                {"id": 9005, "caption": "no image id"},  # malformed_entry
                {"image_id": 107, "id": 9006, "caption": "   "},  # empty_caption
            ]
        write(f"{root}/annotations/captions_{prefix}2014.json",
              json.dumps({"info": {}, "images": [images[i] for i in rng.permutation(len(images))],
                          "annotations": anns}))
    return expected


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("image_text"))


@pytest.fixture(scope="module")
def tfds_dir(data_root):
    return f"{data_root}/tfds"


@pytest.fixture(scope="module")
def folder_data(data_root, tfds_dir):
    expected = make_sidecar_folder(f"{data_root}/folder")
    return expected, it.build_dataset("folder", f"{data_root}/folder", tfds_dir)


@pytest.fixture(scope="module")
def wds_data(data_root, tfds_dir):
    expected = make_shards(f"{data_root}/shards")
    return expected, it.build_dataset("webdataset", f"{data_root}/shards", tfds_dir)


@pytest.fixture(scope="module")
def coco_data(data_root, tfds_dir):
    expected = make_coco_tree(f"{data_root}/coco")
    return expected, it.build_dataset("coco", f"{data_root}/coco", tfds_dir)


def read_back(dataset_dir: str, split: str = "train") -> list[dict]:
    import tensorflow_datasets as tfds

    source = tfds.builder_from_directory(dataset_dir).as_data_source(split)
    return [source[i] for i in range(len(source))]


# --------------------------------------------------------------------------------------------- tests


def test_folder_sidecar_counts_and_read_back(folder_data):
    expected, result = folder_data
    assert result.counts == {"train": FOLDER_COUNTS}
    records = read_back(result.dataset_dir)
    assert [r["key"].decode() for r in records] == sorted(expected, key=lambda k: os.path.splitext(k)[0])
    for r in records:
        want = expected[r["key"].decode()]
        assert isinstance(r["image"], bytes) and r["caption"].decode() == want["caption"]
        assert (int(r["width"]), int(r["height"])) == want["size"]
        if want["same_bytes"]:
            assert r["image"] == want["data"]
        else:  # re-encoded as PNG, RGB
            with Image.open(io.BytesIO(r["image"])) as im:
                assert (im.format, im.mode, im.size) == ("PNG", "RGB", want["size"])
    assert "tensorflow" not in sys.modules  # built and read without TensorFlow


def test_counts_persist_and_prepared_builds_are_reused(folder_data, data_root, tfds_dir):
    import tensorflow_datasets as tfds

    _, result = folder_data
    assert it.read_counts(tfds.builder_from_directory(result.dataset_dir)) == {"train": FOLDER_COUNTS}
    meta = json.load(open(f"{result.dataset_dir}/metadata.json"))
    assert meta["counts"]["train"] == FOLDER_COUNTS and meta["source"] == os.path.realpath(f"{data_root}/folder")
    again = it.build_dataset("folder", f"{data_root}/folder", tfds_dir)  # already prepared: read, not rebuilt
    assert again.dataset_dir == result.dataset_dir and again.counts == result.counts


def test_filters_and_config_names_do_not_collide(folder_data, data_root, tfds_dir):
    _, plain = folder_data
    filtered = it.build_dataset("folder", f"{data_root}/folder", tfds_dir, min_size=16, max_aspect=2)
    assert filtered.counts == {"train": FOLDER_FILTERED}
    assert filtered.dataset_dir != plain.dataset_dir
    keys = {r["key"].decode() for r in read_back(filtered.dataset_dir)}
    assert not keys & {"small0.jpg", "sub/small1.png", "wide0.jpg", "wide1.png"} and len(keys) == 17
    from ediffi_jax.data import folder_tfds

    names = {folder_tfds.make_config(f"{data_root}/folder", min_size=m).name for m in (0, 16)}
    names.add(folder_tfds.make_config(f"{data_root}/folder/sub").name)
    assert len(names) == 3 and all(n.startswith("folder_") for n in names)


def test_listing_layouts(data_root, tfds_dir):
    jl, cs = make_listing_folders(f"{data_root}/listings")
    result = it.build_dataset("folder", jl, tfds_dir)
    assert result.builder.builder_config.captions == "jsonl" and result.counts == {"train": JSONL_COUNTS}
    records = read_back(result.dataset_dir)
    assert [(r["key"].decode(), r["caption"].decode()) for r in records] == [
        (f"images/{i:03d}.png", f"caption {i}") for i in range(10)]
    assert records[4]["image"] == open(f"{jl}/images/004.png", "rb").read()
    result = it.build_dataset("folder", cs, tfds_dir)
    assert result.builder.builder_config.captions == "csv" and result.counts == {"train": CSV_COUNTS}
    assert [r["caption"].decode() for r in read_back(result.dataset_dir)] == [f"caption, number {i}" for i in range(4)]


def test_webdataset_counts_and_read_back(wds_data, data_root, tfds_dir):
    expected, result = wds_data
    assert result.counts == {"train": WDS_COUNTS}
    records = read_back(result.dataset_dir)
    assert [r["key"].decode() for r in records] == list(expected)
    for r in records:
        img, caption = expected[r["key"].decode()]
        assert r["image"] == img and r["caption"].decode() == caption
        assert (int(r["width"]), int(r["height"])) == Image.open(io.BytesIO(img)).size
    filtered = it.build_dataset("webdataset", f"{data_root}/shards", tfds_dir, min_size=16, max_aspect=2)
    assert filtered.counts == {"train": WDS_FILTERED}
    single = it.build_dataset("webdataset", f"{data_root}/shards/shard-001.tar", tfds_dir)
    assert single.counts == {"train": {"seen": 10, "kept": 9, "dropped": {"bad_caption": 1}}}  # 000002: no dup


def test_coco_counts_read_back_and_fid_prompts(coco_data, data_root):
    from ediffi_jax.data.coco_tfds import image_id_of
    from ediffi_jax.eval.captions import coco_captions

    expected, result = coco_data
    assert result.counts == {"train": COCO_TRAIN, "validation": COCO_VAL}
    for split in ("train", "validation"):
        records = read_back(result.dataset_dir, split)
        assert [r["key"].decode() for r in records] == sorted(
            expected[split], key=lambda k: tuple(map(int, k.split("/"))))
        prefix = "train" if split == "train" else "val"
        for r in records:
            image_id, caption = expected[split][r["key"].decode()]
            assert r["caption"].decode() == caption and image_id_of(r["key"].decode()) == image_id
            assert r["image"] == open(f"{data_root}/coco/{prefix}2014/{coco_file(prefix, image_id)}", "rb").read()
    # FID-30K prompts drawn from the val JSON name images and captions that the validation split holds
    val = {(image_id_of(r["key"].decode()), r["caption"].decode()) for r in read_back(result.dataset_dir, "validation")}
    drawn = coco_captions(f"{data_root}/coco/annotations/captions_val2014.json", 10, seed=3)
    assert all((d["image_id"], d["caption"]) in val for d in drawn)


def test_one_coco_parser_counts_for_the_builder_and_raises_for_the_prompt_draw(tmp_path):
    from ediffi_jax.data.coco_annotations import parse_annotations
    from ediffi_jax.eval.captions import coco_captions

    data = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": "2"}],
            "annotations": [{"image_id": 1, "id": 10, "caption": "a cat"}, {"image_id": 1, "id": 10, "caption": "x"},
                            {"image_id": 1, "caption": "no id"}, {"image_id": 1, "id": 11}]}
    dropped = []
    files, anns = parse_annotations(data, "f.json", drop=lambda *a: dropped.append(a[0]))
    assert files == {1: "a.jpg"} and anns == {1: [(10, "a cat"), (11, None)]}
    assert dropped == ["malformed_entry", "duplicate_key", "malformed_entry"]
    with pytest.raises(ValueError, match=r"^f\.json: images entry \{'id': '2'\}: needs 'id' and 'file_name'$"):
        parse_annotations(data, "f.json")
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({**data, "images": data["images"][:1]}))
    with pytest.raises(ValueError, match=r"captions_val2014\.json: annotation 10: annotation id seen before$"):
        coco_captions(str(path), 1)
    path.write_text(json.dumps({"images": data["images"][:1], "annotations": data["annotations"][-1:]}))
    with pytest.raises(ValueError, match=r"annotation 11 has no text 'caption' \(None\)$"):
        coco_captions(str(path), 1)


def test_bad_input_errors(data_root, tfds_dir):
    with pytest.raises(ValueError, match="does not exist"):
        it.build_dataset("folder", f"{data_root}/nowhere", tfds_dir)
    with pytest.raises(ValueError, match="unknown layout 'lmdb'"):
        it.build_dataset("lmdb", data_root, tfds_dir)
    with pytest.raises(ValueError, match="unknown caption layout 'xml'"):
        it.build_dataset("folder", f"{data_root}/folder", tfds_dir, captions="xml")
    with pytest.raises(ValueError, match="no captions_train2014.json or captions_val2014.json"):
        it.build_dataset("coco", f"{data_root}/folder", tfds_dir)
    bad = f"{data_root}/all_bad"
    write(f"{bad}/a.jpg", b"")
    write(f"{bad}/a.txt", "caption")
    write(f"{bad}/b.jpg", jpeg(1))
    with pytest.raises(ValueError, match=r"0 of 3 records kept: dropped 1 empty_file, 1 missing_caption, "
                                         r"1 missing_image"):
        write(f"{bad}/c.txt", "orphan")
        it.build_dataset("folder", bad, tfds_dir)


def test_gs_paths_go_through_epath(data_root, tfds_dir, monkeypatch):
    from etils import epath

    assert isinstance(it.to_path("gs://bucket/laion"), epath.Path)
    assert str(it.to_path("gs://bucket/laion")) == "gs://bucket/laion"
    assert it.resolved("gs://bucket/laion/") == "gs://bucket/laion"
    local = f"{data_root}/shards"
    seen = []

    def fake_gcs(path):  # every file access of the builders goes through it.to_path
        seen.append(str(path))
        return epath.Path(str(path).replace("gs://bucket/shards", local))

    monkeypatch.setattr(it, "to_path", fake_gcs)
    result = it.build_dataset("webdataset", "gs://bucket/shards", f"{tfds_dir}_gcs")
    assert result.counts == {"train": WDS_COUNTS} and result.builder.builder_config.path == "gs://bucket/shards"
    assert seen and all(s.startswith("gs://bucket/shards") for s in seen)


def test_inspect_contact_sheet_histogram_and_counts(coco_data, tmp_path):
    from ediffi_jax.data import inspect

    _, result = coco_data
    report = inspect.inspect_dataset(result.dataset_dir, split="validation", num=12, out=str(tmp_path))
    assert report["counts"] == {"train": COCO_TRAIN, "validation": COCO_VAL} and report["size"] == 40
    sheet = report["sheet"]
    assert sheet.width == 4 * 160 and sorted(os.listdir(tmp_path)) == [
        "caption_lengths_validation.txt", "contact_sheet_validation.png"]
    with Image.open(tmp_path / "contact_sheet_validation.png") as im:
        assert im.size == sheet.size and len(np.unique(np.asarray(im).reshape(-1, 3), axis=0)) > 20
    assert report["histogram"].startswith("caption length (words), 40 captions: min 6,")
    assert inspect.format_counts(report["counts"]).splitlines() == [
        "train: 24 of 36 records kept: dropped 3 missing_image, 3 unreadable_image, 2 missing_caption, "
        "1 bad_caption, 1 duplicate_key, 1 empty_caption, 1 malformed_entry", "validation: 40 of 40 records kept"]
    assert inspect.length_histogram(["a b", "a b c", "one two"]).splitlines()[1:] == [
        "        2 | ######################################## 2", "        3 | ####################" + " " * 20 + " 1"]
    broken = inspect.contact_sheet([{"image": b"junk", "caption": "x " * 200, "key": "k", "width": 1, "height": 1}])
    assert broken.size[0] == 4 * 160  # an undecodable record is drawn as a note, not an error
    with pytest.raises(ValueError, match="unknown split 'test'"):
        inspect.inspect_dataset(result.dataset_dir, split="test")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ediffi_jax.cli.data", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_build_and_errors(data_root, tfds_dir):
    done = run_cli("build", "--layout", "folder", "--path", f"{data_root}/folder", "--data_dir", tfds_dir,
                   "--min_size", "16", "--max_aspect", "2")
    assert done.returncode == 0, done.stderr
    assert "train: 17 of 32 records kept: dropped 4 bad_caption" in done.stdout
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["counts"] == {"train": FOLDER_FILTERED} and os.path.isdir(summary["dataset_dir"])
    bad = f"{data_root}/cli_bad"
    write(f"{bad}/x.txt", "orphan caption")
    done = run_cli("build", "--layout", "folder", "--path", bad, "--data_dir", tfds_dir)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "data.py: error: train of " + os.path.realpath(bad) + \
        ": 0 of 1 records kept: dropped 1 missing_image"


@pytest.mark.skipif(importlib.util.find_spec("ediffi_jax.data.throughput") is None,
                    reason="ediffi_jax.data.throughput (part B of issue 10) not there yet")
def test_bench_runs_the_pipeline(wds_data):
    from ediffi_jax.data import inspect

    _, result = wds_data
    out = inspect.bench(result.dataset_dir, resolution=16, batch_size=4, num_workers=0, num_batches=2)
    assert out["batches"] == 2 and out["examples_per_s"] > 0


def test_probe_image_and_caption_rules():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: displayed 20 wide, 40 high
    buf = io.BytesIO()
    picture(1, (40, 20)).save(buf, format="JPEG", exif=exif.tobytes())
    assert it.probe_image(buf.getvalue()) == (buf.getvalue(), 20, 40)
    for im, fmt in [(picture(2, (30, 10), "RGBA"), "PNG"), (picture(2, (30, 10), "P"), "GIF"),
                    (Image.fromarray(np.full((10, 30), 40000, np.uint16)), "PNG")]:
        data, w, h = it.probe_image(encode(im, fmt))
        with Image.open(io.BytesIO(data)) as out:
            assert (out.format, out.mode, out.size, w, h) == ("PNG", "RGB", (30, 10), 30, 10)
    for data, reason in [(b"", "empty_file"), (b"GIF89a", "unreadable_image"), (jpeg(3)[:-40], "unreadable_image")]:
        with pytest.raises(it.Dropped) as e:
            it.probe_image(data)
        assert e.value.reason == reason
    assert it.caption_text(b"\xef\xbb\xbf a\xc2\xa0b \n c ") == "a b c"  # BOM, non-breaking space, newline
    assert it.caption_from_json(b'"  plain string "') == "plain string"
    assert it.caption_from_json(b'{"text": "t", "url": 1}') == "t"
    for raw, reason in [(b"{bad", "bad_caption"), (b"[]", "bad_caption"), (b'{"caption": 3}', "bad_caption"),
                        (b"{}", "missing_caption"), (b'{"caption": "\\n"}', "empty_caption")]:
        with pytest.raises(it.Dropped) as e:
            it.caption_from_json(raw)
        assert e.value.reason == reason
    checker = it.RecordChecker("train", it.Filters())
    assert checker.record("caf\udce9.jpg", jpeg(1), "a caption") is None  # name not UTF-8: not a crash
    assert checker.counts() == {"seen": 1, "kept": 0, "dropped": {"malformed_entry": 1}}
    with pytest.raises(ValueError, match="max_aspect must be 0"):
        it.Filters(max_aspect=0.5)
