"""Evaluation pipeline (`ediffi_jax.eval`): resumable generation, FID / CLIP score of folders, the FID–CLIP curve
on the shapes data with the committed tiny model, COCO caption drawing, bad input, and `ediffi-eval` itself.

Real Inception / CLIP weights cannot be downloaded here: the tests write random Inception weights in pytorch-fid's
.pth layout and a tiny random CLIPModel (`ediffi_jax.eval.smoke`), and run Inception at 75² (`inception_size`), so
the numbers only show that the pipeline runs and is deterministic, not image quality.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")

from multidevice import Background, multidevice_env  # noqa: E402

from ediffi_jax.eval import captions as cap  # noqa: E402
from ediffi_jax.eval.commands import Options, parse_guidance, run_command  # noqa: E402
from ediffi_jax.eval.fid import (  # noqa: E402
    compute_statistics,
    frechet_distance,
    frechet_distance_eigh,
    save_statistics,
)
from ediffi_jax.eval.folder import image_name, read_captions  # noqa: E402
from ediffi_jax.eval.generate import generate_folder, load_generator  # noqa: E402
from ediffi_jax.eval.reference import ShapesReference, TFDSReference  # noqa: E402
from ediffi_jax.eval.run import EvalConfig, Evaluator, run_scales  # noqa: E402
from ediffi_jax.eval.smoke import write_random_clip, write_random_inception  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TINY = os.path.join(REPO, "assets", "tiny_shapes")
CLI = os.path.join(os.path.dirname(sys.executable), "ediffi-eval")
NUM, BATCH, STEPS, SIZE = 8, 4, 2, 75  # 8 images in 2 batches of 4, 2 Heun steps, Inception at 75²


def _write_weights(d: str) -> tuple[str, str]:
    """Random Inception (.pth) and tiny CLIP, seeded: every call writes the same numbers."""
    inc = write_random_inception(os.path.join(d, "pt_inception-random.pth"))
    texts = [cap.shapes_examples(_data_config(), 64)[i]["caption"] for i in range(64)]
    return inc, write_random_clip(os.path.join(d, "clip"), texts)


def _curve_args(weights: tuple[str, str], out: str, guidance: str) -> list[str]:
    return [CLI, "curve", "--workdir", TINY, "--shapes_captions", f"--num={NUM}", f"--guidance={guidance}",
            f"--steps={STEPS}", f"--batch_size={BATCH}", f"--inception_weights={weights[0]}",
            f"--inception_size={SIZE}", f"--clip_dir={weights[1]}", f"--out={out}", "--fid_method=eigh",
            "--noprogress"]


_TWO_PROCESSES = """
import socket, subprocess, sys
s = socket.socket(); s.bind(("localhost", 0)); port = s.getsockname()[1]; s.close()
args, logs = ARGS, LOGS
procs = [subprocess.Popen(args + ["--distributed", f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                  f"--process_id={i}"], stdout=open(logs[i], "w"), stderr=subprocess.STDOUT)
         for i in range(2)]
codes = [p.wait() for p in procs]
print(codes)
sys.exit(max(codes))
"""


def _two_processes(directory) -> Background:
    """`ediffi-eval curve --distributed` as 2 processes x 2 CPU devices (jax.distributed on localhost)."""
    weights = _write_weights(str(directory))
    args = _curve_args(weights, str(directory / "out"), "1")
    logs = [str(directory / f"process_{i}.log") for i in range(2)]
    code = f"ARGS, LOGS = {args!r}, {logs!r}\n" + _TWO_PROCESSES
    return Background([sys.executable, "-c", code], env=multidevice_env(2))


BACKGROUND = {"eval_two_processes": _two_processes}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return _write_weights(str(tmp_path_factory.mktemp("weights")))


def _data_config():
    from ediffi_jax.eval.run import run_data_config

    return run_data_config(TINY)


@pytest.fixture(scope="module")
def generator():
    return load_generator(TINY, steps=STEPS)


@pytest.fixture(scope="module")
def logs():
    return []


@pytest.fixture(scope="module")
def evaluator(weights, logs):
    return Evaluator(EvalConfig(weights[0], SIZE, weights[1], BATCH, progress=False, log=logs.append,
                                fid_method="eigh"))


@pytest.fixture(scope="module")
def curve(generator, evaluator, tmp_path_factory):
    """The library run behind `ediffi-eval curve` on 8 shapes captions at guidance 1 and 3."""
    out = str(tmp_path_factory.mktemp("curve"))
    captions = [cap.shapes_examples(generator.data_config, NUM)[i]["caption"] for i in range(NUM)]
    report = run_scales(generator, captions, [1, 3], out, evaluator,
                        ref_source=ShapesReference(generator.data_config, NUM))
    return report, out, captions


def test_curve_report_and_plot(curve):
    report, out, _ = curve
    with open(os.path.join(out, "report.json")) as f:
        on_disk = json.load(f)
    assert set(on_disk["results"]) == {"1", "3"}
    for key, r in on_disk["results"].items():
        assert {"fid", "clip_score", "num"} <= set(r) and r["num"] == NUM and r["guidance"] == float(key)
        assert np.isfinite(r["fid"]) and r["fid"] >= 0 and 0 <= r["clip_score"] <= 100
        assert r["generated"] == NUM and len(os.listdir(r["folder"])) == NUM + 3  # + captions, generation, metrics
    assert on_disk["results"]["1"]["fid"] != on_disk["results"]["3"]["fid"]
    assert on_disk["reference"]["source"]["kind"] == "shapes" and not on_disk["reference"]["cached"]
    assert any("not meaningful" in n for n in on_disk["notes"]) and any("75x75" in n for n in on_disk["notes"])
    assert not on_disk["inception"]["pytorch_fid_weights"]
    with Image.open(os.path.join(out, "curve.png")) as im:
        assert im.format == "PNG" and im.size == (720, 520)
    print({k: (round(r["fid"], 3), round(r["clip_score"], 3)) for k, r in on_disk["results"].items()})


def test_rerun_resumes_and_reuses_reference(curve, generator, evaluator):
    report, out, captions = curve
    again = run_scales(generator, captions, [1, 3], out, evaluator,
                       ref_source=ShapesReference(generator.data_config, NUM))
    assert again["reference"]["cached"]
    for key in ("1", "3"):
        a, b = report["results"][key], again["results"][key]
        assert (b["generated"], b["existing"]) == (0, NUM) and b["reused"] == ["fid", "clip_score"]
        assert (a["fid"], a["clip_score"]) == (b["fid"], b["clip_score"])


def test_generation_resumes_bitwise(curve, generator, tmp_path):
    _, out, captions = curve
    first = os.path.join(out, "guidance_1")
    folder = str(tmp_path / "resume")
    shutil.copytree(first, folder)
    stat = {i: os.stat(os.path.join(folder, image_name(i))).st_mtime_ns for i in range(NUM)}
    for i in (5, 6, 7):  # the last few
        os.remove(os.path.join(folder, image_name(i)))
    calls = []
    fn = generator.fn
    generator.fn = lambda prompts, seed, g: calls.append(len(prompts)) or fn(prompts, seed, g)
    try:
        counts = generate_folder(generator, captions, folder, seed=0, guidance=1.0, batch_size=BATCH, progress=False)
    finally:
        generator.fn = fn
    assert counts == {"generated": 3, "existing": NUM - 3}
    assert calls == [BATCH]  # only the batch holding 5..7 (images 4..7) ran again
    for i in range(NUM):
        with open(os.path.join(first, image_name(i)), "rb") as a, open(os.path.join(folder, image_name(i)), "rb") as b:
            assert a.read() == b.read(), f"image {i} differs from the first run"
        if i < 5:
            assert os.stat(os.path.join(folder, image_name(i))).st_mtime_ns == stat[i]  # not rewritten
    assert [c for _, c in read_captions(os.path.join(folder, "captions.jsonl"))] == captions
    with pytest.raises(ValueError, match="seed=0, not 1"):
        generate_folder(generator, captions, folder, seed=1, guidance=1.0, batch_size=BATCH, progress=False)
    with pytest.raises(ValueError, match="image 0 was generated for the caption"):
        generate_folder(generator, ["a red circle on the left"] * NUM, folder, seed=0, guidance=1.0,
                        batch_size=BATCH, progress=False)


@pytest.mark.parametrize("n", [20, 500], ids=["low-rank", "full-rank"])
def test_eigh_fid_equals_sqrtm_fid(n):
    rng = np.random.default_rng(n)
    d = 64
    x1 = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / np.sqrt(d) + rng.standard_normal(d)
    x2 = rng.standard_normal((n, d)) + 0.3
    s1, s2 = compute_statistics(x1), compute_statistics(x2)
    ref = frechet_distance(*s1, *s2)
    assert frechet_distance_eigh(*s1, *s2) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance_eigh(*s1, *s2, features1=x1) == pytest.approx(ref, rel=1e-6)


def test_fid_and_clip_score_commands_on_a_folder(curve, weights):
    report, out, _ = curve
    kw = dict(inception_weights=weights[0], inception_size=SIZE, clip_dir=weights[1], batch_size=BATCH,
              progress=False, fid_method="eigh")
    folder = os.path.join(out, "guidance_1")
    fid = run_command(Options("fid", folder=folder, ref_stats=os.path.join(out, "reference_stats.npz"), **kw),
                      log=lambda s: None)
    clip = run_command(Options("clip-score", folder=folder, **kw), log=lambda s: None)
    assert fid["fid"] == pytest.approx(report["results"]["1"]["fid"], rel=1e-9) and fid["num"] == NUM
    assert clip["clip_score"] == pytest.approx(report["results"]["1"]["clip_score"], rel=1e-6)


def test_unreadable_images_are_skipped_and_counted(curve, evaluator, logs, tmp_path):
    _, out, _ = curve
    folder = tmp_path / "mixed"
    shutil.copytree(os.path.join(out, "guidance_1"), folder)
    (folder / "000008.png").write_bytes(b"not a png")
    (folder / "000009.jpg").write_bytes(b"")
    ref = evaluator.reference(os.path.join(out, "reference_stats.npz"), None)
    result = evaluator.fid_folder(str(folder), ref)
    assert (result["num"], result["skipped"]) == (NUM, 2)
    assert logs[-1] == f"skipped 2 unreadable image file(s) in {folder}: 000008.png, 000009.jpg"
    os.remove(folder / image_name(0))
    with pytest.raises(ValueError, match=rf"only {NUM - 1} readable generated images but {NUM} were requested "
                                         r"\(--num; 2 unreadable file\(s\) skipped\)"):
        evaluator.fid_folder(str(folder), ref, num=NUM)


def test_bad_input_is_one_clear_line(curve, weights, tmp_path):
    _, out, _ = curve
    folder = os.path.join(out, "guidance_1")
    kw = dict(inception_weights=weights[0], inception_size=SIZE, batch_size=BATCH, progress=False, fid_method="eigh")
    quiet = dict(log=lambda s: None)

    def error(opts: Options) -> str:
        with pytest.raises(ValueError) as info:
            run_command(opts, **quiet)
        msg = str(info.value)
        assert "\n" not in msg
        return msg

    missing = str(tmp_path / "nope" / "pt_inception.pth")
    ref = os.path.join(out, "reference_stats.npz")
    msg = error(Options("fid", folder=folder, ref_stats=ref, **{**kw, "inception_weights": missing}))
    assert missing in msg and "not found" in msg

    bad = str(tmp_path / "stats64.npz")
    save_statistics(bad, np.zeros(64), np.eye(64))
    msg = error(Options("fid", folder=folder, ref_stats=bad, **kw))
    assert bad in msg and "64-d" in msg and "2048-d" in msg

    msg = error(Options("fid", folder=folder, num=20, ref_stats=ref, **kw))
    assert folder in msg and f"holds {NUM} image files but 20" in msg

    msg = error(Options("fid", folder=folder, ref_stats=ref, ref_shapes=True, ref_num=4, workdir=TINY,
                        **kw))  # the cache was made from 8 shapes images, not 4
    assert "were computed from" in msg and "'num': 4" in msg

    msg = error(Options("fid", folder=folder, ref_stats=str(tmp_path / "absent.npz"), **kw))
    assert "absent.npz" in msg and "--ref_dir" in msg
    assert "exactly one of --workdir and --cascade" in error(Options("curve", shapes_captions=True, num=8, out="o"))
    assert "needs --guidance" in error(Options("curve", workdir=TINY, shapes_captions=True, num=8, out="o"))
    assert "unknown command 'fidd'" in error(Options("fidd"))
    assert "--num must be >= 1" in error(Options("fid", folder=folder, num=0))
    with pytest.raises(ValueError, match="'x' is not a number"):
        parse_guidance("1,x")
    assert parse_guidance(["1", "2.5"]) == [1.0, 2.5]


def _coco_json(path, captions):
    images = [{"id": 100 + i, "file_name": f"COCO_val2014_{100 + i:012d}.jpg"} for i in range(len(captions))]
    anns = [{"image_id": 100 + i, "id": 1000 + 2 * i + k, "caption": f"  {c}  " if k == 0 else c}
            for i, c in enumerate(captions) for k in range(2)]
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns}, f)
    return str(path)


def test_coco_caption_draw(curve, tmp_path):
    path = _coco_json(tmp_path / "captions_val2014.json", [f"caption number {i}" for i in range(20)])
    a, b = cap.coco_captions(path, 10, seed=0), cap.coco_captions(path, 10, seed=0)
    assert a == b and len({r["image_id"] for r in a}) == 10  # deterministic, distinct images
    assert a != cap.coco_captions(path, 10, seed=1)
    assert all(r["caption"] == f"caption number {r['image_id'] - 100}" for r in a)  # whitespace collapsed
    assert a[0]["file_name"].startswith("COCO_val2014_")
    with pytest.raises(ValueError, match="cannot draw 21 distinct images: it has 20"):
        cap.coco_captions(path, 21)
    with pytest.raises(ValueError, match="not found"):
        cap.coco_captions(str(tmp_path / "missing.json"), 1)


def test_coco30k_command(curve, weights, generator, tmp_path):
    _, out, captions = curve
    path = _coco_json(tmp_path / "captions_val2014.json", captions)
    report = run_command(Options("coco30k", workdir=TINY, steps=STEPS, coco_captions=path, num=NUM, guidance=[2.0],
                                 out=str(tmp_path / "coco"), ref_stats=os.path.join(out, "reference_stats.npz"),
                                 inception_weights=weights[0], inception_size=SIZE, clip_dir=weights[1],
                                 batch_size=BATCH, progress=False, fid_method="eigh"), log=lambda s: None,
                         generator=generator)
    assert report["guidance"] == 2.0 and set(report["results"]) == {"2"}
    assert np.isfinite(report["fid"]) and report["clip_score"] == report["results"]["2"]["clip_score"]
    assert report["captions"]["source"] == "coco" and report["num"] == NUM
    assert sorted(c for _, c in read_captions(os.path.join(report["results"]["2"]["folder"], "captions.jsonl"))) \
        == sorted(captions)


def test_tfds_reference_reads_the_split(tmp_path):
    from ediffi_jax.data.shapes import ShapesSource
    from ediffi_jax.data.shapes_tfds import build_shapes

    builder = build_shapes(str(tmp_path / "tfds"), 16, 4, 6, 0)
    ref = TFDSReference(builder.data_dir, "validation", num=5)
    images = [ref.load(i) for i in range(len(ref))]
    want = ShapesSource(0, 5, 16, start=4)
    assert len(images) == 5 and all(np.array_equal(im, want[i]["image"]) for i, im in enumerate(images))
    with pytest.raises(ValueError, match="holds 6 records but 7"):
        TFDSReference(builder.data_dir, "validation", num=7)
    with pytest.raises(ValueError, match="no split 'test'"):
        TFDSReference(builder.data_dir, "test")


def test_cli_curve_subprocess(curve, weights):
    """`ediffi-eval curve` in a fresh process on the same --out: scales 1 and 3 resume (no image generated, the
    same numbers as in this process), scale 5 is generated; report.json and curve.png hold all three."""
    report, out, _ = curve
    proc = subprocess.run(_curve_args(weights, out, "1,3,5"), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "report.json")) as f:
        cli = json.load(f)
    assert set(cli["results"]) == {"1", "3", "5"} and cli["reference"]["cached"]
    for key in ("1", "3"):
        assert cli["results"][key]["generated"] == 0 and cli["results"][key]["reused"] == ["fid", "clip_score"]
        assert cli["results"][key]["fid"] == pytest.approx(report["results"][key]["fid"], rel=1e-6)
        assert cli["results"][key]["clip_score"] == pytest.approx(report["results"][key]["clip_score"], rel=1e-6)
    assert cli["results"]["5"]["generated"] == NUM and {"fid", "clip_score", "num"} <= set(cli["results"]["5"])
    assert "guidance 5: fid" in proc.stdout and os.path.isfile(os.path.join(out, "curve.png"))


def test_cli_bad_weights_exits_2_with_one_line(curve, tmp_path):
    _, out, _ = curve
    missing = str(tmp_path / "missing.pth")
    proc = subprocess.run([CLI, "fid", f"--folder={os.path.join(out, 'guidance_1')}",
                           f"--ref_stats={os.path.join(out, 'reference_stats.npz')}",
                           f"--inception_weights={missing}", f"--inception_size={SIZE}"], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ediffi-eval")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("ediffi-eval: error: FID Inception weights file") and missing in lines[0]


def test_two_processes_evaluate_like_one(curve, lane):
    """`ediffi-eval curve --distributed`, 2 processes x 2 devices: each generated one of the two batches (images
    bitwise those of the one-process run), Inception and CLIP ran over the 4 devices with each process decoding
    its rows; FID and CLIP score equal the one-device numbers, and only process 0 wrote the report."""
    report, out, _ = curve
    run = lane["eval_two_processes"]
    proc = run.result(timeout=900)
    logs = {i: (run.directory / f"process_{i}.log").read_text() for i in range(2)}
    assert proc.returncode == 0, proc.stdout + "\n".join(v[-3000:] for v in logs.values())
    two = run.directory / "out"
    a, b = (np.stack([np.asarray(Image.open(os.path.join(d, "guidance_1", image_name(i)))) for i in range(NUM)])
            .astype(np.int32) for d in (out, two))
    diff = np.abs(a - b)
    print(f"generated images, 2 processes vs 1: max |diff| {diff.max()}, mean {diff.mean():.4f} (uint8 levels)")
    assert diff.max() <= 4 and diff.mean() < 0.01  # same batches and seeds; float rounding of another XLA setup
    with open(two / "report.json") as f:
        result = json.load(f)["results"]["1"]
    print(f"2 processes vs 1: FID {result['fid']:.6f} vs {report['results']['1']['fid']:.6f}, CLIP score "
          f"{result['clip_score']:.6f} vs {report['results']['1']['clip_score']:.6f} ({run.seconds:.0f} s)")
    assert result["num"] == NUM and result["generated"] == NUM
    assert result["fid"] == pytest.approx(report["results"]["1"]["fid"], rel=1e-3)
    assert result["clip_score"] == pytest.approx(report["results"]["1"]["clip_score"], rel=1e-4)
    assert "wrote" in logs[0] and "wrote" not in logs[1]
