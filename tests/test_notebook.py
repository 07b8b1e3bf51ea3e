"""notebooks/quickstart.ipynb runs top to bottom: executed with tiny parameters (injected after its `parameters`
cell, papermill-style) in a Jupyter kernel of this Python (the .venv), so it cannot rot.

The execution is a background run of the session's lane (tests/conftest.py: it starts when the session does and
uses the spare core while other tests compile): `python tests/test_notebook.py DIR` runs the notebook with nbclient
and writes DIR/quickstart_executed.ipynb (outputs included), which the test then checks. With
EDIFFI_SAVE_NOTEBOOK=1 the test also copies it to docs/quickstart_executed.ipynb. The notebook must equal what
notebooks/build_quickstart.py writes.
"""

import importlib.util
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("torch")  # the notebook's stand-in CLIP is written with transformers' PyTorch CLIPModel

from multidevice import Background  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")
BUILDER = os.path.join(REPO, "notebooks", "build_quickstart.py")
SAVED_COPY = os.path.join(REPO, "docs", "quickstart_executed.ipynb")
EXECUTED = "quickstart_executed.ipynb"
KERNEL = "ediffi-test-venv"

# Tiny settings: 1 image per prompt, 8 Heun steps, 8 evaluation images per guidance scale, Inception at 75²
# (its smallest input), the random stand-in Inception / CLIP weights.
TINY = dict(TRAIN_STEPS=0, USE_SR=True, HEUN_STEPS=8, NUM_PER_PROMPT=1, NUM_EVAL=8, GUIDANCE_SCALES=[1.0, 3.0],
            EVAL_BATCH=8, INCEPTION_WEIGHTS="", INCEPTION_SIZE=75, CLIP_DIR="")


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_quickstart", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kernel_env(directory: Path) -> dict[str, str]:
    """The environment of a run whose kernel spec KERNEL starts this interpreter (the .venv), found through
    JUPYTER_PATH; Jupyter's and IPython's runtime and profile files stay in `directory`."""
    spec_dir = directory / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ediffi-jax test (.venv)", "language": "python"}))
    env = dict(os.environ, JUPYTER_PATH=str(directory / "jupyter"), JUPYTER_RUNTIME_DIR=str(directory / "runtime"),
               IPYTHONDIR=str(directory / "ipython"), JUPYTER_PLATFORM_DIRS="1")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".jax_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _inject(nb, params: dict) -> None:
    """Inserts a cell assigning `params` right after the cell tagged `parameters`."""
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        raise ValueError("the notebook needs exactly one cell tagged 'parameters'")
    unknown = [k for k in params if f"\n{k} =" not in "\n" + nb.cells[tagged[0]].source]
    if unknown:
        raise ValueError(f"not parameters of the notebook: {unknown}")
    src = "# Parameters injected by tests/test_notebook.py\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(src)
    cell.metadata["tags"] = ["injected-parameters"]
    cell["id"] = "injected-parameters"
    nb.cells.insert(tagged[0] + 1, cell)


def execute(directory: Path) -> None:
    """Runs the notebook with TINY parameters (outputs under directory/work) and writes directory/EXECUTED, also
    when a cell fails (nbclient then raises, naming the cell)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    if any(c.get("outputs") for c in nb.cells if c.cell_type == "code"):
        raise ValueError(f"{NOTEBOOK} holds outputs: rebuild it with notebooks/build_quickstart.py")
    _inject(nb, {**TINY, "WORK_DIR": str(directory / "work")})
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=600,
                                     resources={"metadata": {"path": str(directory)}})
    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        client.execute()
    finally:
        nbformat.write(nb, str(directory / EXECUTED))
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"notebook executed in {time.perf_counter() - t0:.1f} s wall, kernel CPU "
          f"{cpu.ru_utime - cpu0.ru_utime + cpu.ru_stime - cpu0.ru_stime:.1f} s")


def _start(directory: Path) -> Background:
    return Background([sys.executable, os.path.abspath(__file__), str(directory)], env=_kernel_env(directory))


# Started at the beginning of the session (tests/conftest.py).
BACKGROUND = {"quickstart_notebook": _start}


def _outputs(nb) -> tuple[str, int]:
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text.append(out["text"])
            data = out.get("data", {})
            images += "image/png" in data
            if "text/plain" in data:
                text.append(data["text/plain"])
    return "".join(text), images


def test_notebook_is_in_sync_with_its_builder():
    with open(NOTEBOOK) as f:
        assert f.read() == _load_builder().render(), \
            "notebooks/quickstart.ipynb differs from its builder: run .venv/bin/python notebooks/build_quickstart.py"


def test_quickstart_runs_top_to_bottom(lane):
    run = lane["quickstart_notebook"]
    res = run.result(timeout=900)
    assert res.returncode == 0, f"{res.stdout[-2000:]}\n{res.stderr[-6000:]}"
    print(res.stdout.strip(), f"(run {run.seconds:.1f} s)")
    executed = run.directory / EXECUTED
    if os.environ.get("EDIFFI_SAVE_NOTEBOOK") == "1":
        shutil.copyfile(executed, SAVED_COPY)

    nb = nbformat.read(str(executed), as_version=4)
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    text, images = _outputs(nb)
    assert images >= 7, text  # grid, experts, colour map + paint, reference + style, curve
    assert "identical experts give the single model's pixels: True" in text
    work = run.directory / "work"
    for name in ("grid.png", "experts.png", "paint.png", "style.png"):
        assert (work / name).is_file(), name
    with open(work / "eval" / "report.json") as f:
        report = json.load(f)
    assert sorted(r["guidance"] for r in report["results"].values()) == TINY["GUIDANCE_SCALES"]
    for r in report["results"].values():
        assert r["num"] == TINY["NUM_EVAL"] and np.isfinite(r["fid"]) and 0 <= r["clip_score"] <= 100
    assert report["inception"]["input_size"] == TINY["INCEPTION_SIZE"]


if __name__ == "__main__":
    execute(Path(sys.argv[1]))
