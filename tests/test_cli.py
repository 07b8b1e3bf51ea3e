"""The command-line tools: a real sampling run, and one clear line for each kind of bad input."""

import os
import sys

import pytest
from multidevice import Background
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu")


def start(tool, *args) -> Background:
    return Background([os.path.join(BIN, tool), *args], env=_env(), cwd=ROOT)


# Runs that need nothing from other tests start at the beginning of the session (tests/conftest.py).
BACKGROUND = {
    "cli_unknown_key": lambda d: start("ediffi-train", "--config", "configs/tiny.py", "--workdir", str(d / "w"),
                                       "--config.model.channelz=8"),
    "cli_bad_value": lambda d: start("ediffi-train", "--config", "configs/tiny.py", "--workdir", str(d / "w"),
                                     "--config.train.batch_size=many"),
    "cli_sample_bad_workdir": lambda d: start("ediffi-sample", "--workdir", "/nonexistent/run", "--prompt",
                                              "a red circle on the left"),
}


def one_error_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    return lines[-1]


@pytest.fixture(scope="module")
def on_trained_run(trained_run, tmp_path_factory):
    """The command lines that read the trained run, started side by side: a sampling run, an empty prompt, and
    ediffi-train of another model on its workdir."""
    _, workdir, _ = trained_run
    tmp = tmp_path_factory.mktemp("cli")
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    runs = dict(
        grid=start("ediffi-sample", "--workdir", workdir, "--prompt", "a red circle on the left", "--prompt",
                   "a blue square at the top", "--num", "3", "--out", str(tmp / "grid.png"), "--steps", "4"),
        empty=start("ediffi-sample", "--workdir", workdir, "--prompt", " ", "--out", str(tmp / "x.png")),
        other=start("ediffi-train", "--config", "configs/tiny.py", "--workdir", workdir),
    )
    yield dict(tmp=tmp, runs=runs, checkpoints=before)
    for r in runs.values():
        r.kill()


def test_sample_cli_writes_a_grid(trained_run, on_trained_run):
    config, _, _ = trained_run
    out = on_trained_run["tmp"] / "grid.png"
    p = on_trained_run["runs"]["grid"].result(timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = config.model.image_size
    assert Image.open(out).size == (3 * r, 2 * r)
    assert "shape-score" in p.stdout
    assert "sample: 100%" in p.stderr and "4/4" in p.stderr  # the per-step progress bar


def test_empty_prompt_is_one_clear_error(on_trained_run):
    line = one_error_line(on_trained_run["runs"]["empty"].result(timeout=300))
    assert line == "ediffi-sample: error: --prompt must be non-empty, got ' '"
    assert not (on_trained_run["tmp"] / "x.png").exists()


def test_unknown_config_key_is_one_clear_error(lane):
    run = lane["cli_unknown_key"]
    line = one_error_line(run.result(timeout=300))
    assert line == "ediffi-train: error: unknown config key config.model.channelz (not defined in configs/tiny.py)"
    assert not (run.directory / "w").exists()


def test_bad_config_value_is_one_clear_error(lane):
    run = lane["cli_bad_value"]
    line = one_error_line(run.result(timeout=300))
    assert line.startswith("ediffi-train: error: flag --config.train.batch_size=many")
    assert not (run.directory / "w").exists()


def test_workdir_of_another_model_is_one_clear_error(trained_run, on_trained_run):
    _, workdir, _ = trained_run
    line = one_error_line(on_trained_run["runs"]["other"].result(timeout=300))
    assert line.startswith(f"ediffi-train: error: workdir {workdir!r} holds a checkpoint of another model: model.")
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == on_trained_run["checkpoints"]


def test_sample_bad_workdir(lane):
    msg = "workdir '/nonexistent/run' has no config.json: not an ediffi-train run"
    assert one_error_line(lane["cli_sample_bad_workdir"].result(timeout=300)) == f"ediffi-sample: error: {msg}"
