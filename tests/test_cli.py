"""The command-line tools: a real sampling run, and one clear line for each kind of bad input."""

import os
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def run(tool, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([os.path.join(BIN, tool), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def one_error_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    return lines[-1]


def test_sample_cli_writes_a_grid(trained_run, tmp_path):
    config, workdir, _ = trained_run
    out = tmp_path / "grid.png"
    p = run("ediffi-sample", "--workdir", workdir, "--prompt", "a red circle on the left",
            "--prompt", "a blue square at the top", "--num", "3", "--out", str(out), "--steps", "4")
    assert p.returncode == 0, p.stderr[-3000:]
    r = config.model.image_size
    assert Image.open(out).size == (3 * r, 2 * r)
    assert "shape-score" in p.stdout
    assert "sample: 100%" in p.stderr and "4/4" in p.stderr  # the per-step progress bar


def test_empty_prompt_is_one_clear_error(trained_run, tmp_path):
    _, workdir, _ = trained_run
    line = one_error_line(run("ediffi-sample", "--workdir", workdir, "--prompt", " ", "--out", str(tmp_path / "x.png")))
    assert line == "ediffi-sample: error: --prompt must be non-empty, got ' '"
    assert not (tmp_path / "x.png").exists()


def test_unknown_config_key_is_one_clear_error(tmp_path):
    line = one_error_line(run("ediffi-train", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"),
                              "--config.model.channelz=8"))
    assert line == "ediffi-train: error: unknown config key config.model.channelz (not defined in configs/tiny.py)"
    assert not (tmp_path / "w").exists()


def test_bad_config_value_is_one_clear_error(tmp_path):
    line = one_error_line(run("ediffi-train", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"),
                              "--config.train.batch_size=many"))
    assert line.startswith("ediffi-train: error: flag --config.train.batch_size=many")


def test_workdir_of_another_model_is_one_clear_error(trained_run):
    _, workdir, _ = trained_run
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    line = one_error_line(run("ediffi-train", "--config", "configs/tiny.py", "--workdir", workdir))
    assert line.startswith(f"ediffi-train: error: workdir {workdir!r} holds a checkpoint of another model: model.")
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


@pytest.mark.parametrize("args,msg", [
    (["--workdir", "/nonexistent/run", "--prompt", "a red circle on the left"],
     "workdir '/nonexistent/run' has no config.json: not an ediffi-train run"),
])
def test_sample_bad_workdir(args, msg):
    assert one_error_line(run("ediffi-sample", *args)) == f"ediffi-sample: error: {msg}"
