"""Writes notebooks/quickstart.ipynb (outputs empty) from the cells below: edit here, then run

    .venv/bin/python notebooks/build_quickstart.py

tests/test_notebook.py executes the notebook top to bottom with tiny parameters (its `parameters` cell is
overridden by an injected cell, papermill-style) and checks that it is in sync with this script.
"""

from __future__ import annotations

import os
import sys

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO_URL = "https://github.com/ediffi-jax/ediffi-jax"
NOTEBOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.ipynb")
COLAB_URL = "https://colab.research.google.com/github/ediffi-jax/ediffi-jax/blob/main/notebooks/quickstart.ipynb"

CELLS: list[tuple[str, str] | tuple[str, str, list[str]]] = [
    ("md", f"""\
# eDiff-I in JAX: quickstart

[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({COLAB_URL})

A tour of `ediffi_jax` on the tiny *coloured shapes* models committed in the repository (`assets/tiny_shapes`,
a 32² base model, and `assets/tiny_shapes_sr`, a 32² → 64² super-resolution stage). It is meant for a free Colab
runtime (CPU, one GPU or a TPU) or any CPU: the test suite executes it, with smaller settings, on 2 CPU cores.
In order:

1. install, then train or load the base model;
2. sample a grid of prompts through the 2-stage cascade and score it (the *shape-score*);
3. sample with an ensemble of expert denoisers (eDiff-I §4);
4. paint-with-words from a colour map drawn here (eDiff-I §5);
5. style transfer from a reference image (the CLIP image embedding);
6. a small FID / CLIP-score evaluation over guidance scales.

Every image below comes from the package's own API (`TextToImage`, `Cascade`, `ediffi_jax.eval`, ...); the
notebook only draws inputs and displays outputs. Each section says which config field or file to change for a
real run: the paper-size configs are `configs/base64.py`, `configs/sr256.py` and `configs/sr1024.py`.
"""),
    ("md", """\
## Parameters

With these defaults the notebook took 12 minutes on 2 busy CPU cores, half of it in the evaluation (lower
`NUM_EVAL`, or `INCEPTION_SIZE = 75`, for a quicker look). The test suite (`tests/test_notebook.py`) executes it
with smaller values, injected after this cell, in about 2 minutes.
"""),
    ("code", """\
TRAIN_STEPS = 0            # 0: load the committed tiny model; > 0: train configs/tiny.py here (6000 = the asset's run)
EXPERT_STEPS = 500         # with TRAIN_STEPS > 0: then fine-tune 2 experts from it, this many steps each
USE_SR = True              # add the 32² → 64² super-resolution stage (assets/tiny_shapes_sr)
HEUN_STEPS = None          # Heun sampler steps; None = each model's config.sample.num_steps (18 base, 12 SR)
NUM_PER_PROMPT = 4         # images per prompt in the grid
SEED = 0
NUM_EVAL = 64              # images generated and measured per guidance scale (FID-30K uses 30,000)
GUIDANCE_SCALES = [1.0, 3.0]  # one FID / CLIP-score point per scale
EVAL_BATCH = 32
INCEPTION_WEIGHTS = ""     # pytorch-fid's pt_inception-2015-12-05-6726825d.pth; "" = random stand-in weights
INCEPTION_SIZE = 299       # Inception input size: 299 is FID's; 75 (the smallest) is quicker, not comparable
CLIP_DIR = ""              # a CLIP checkpoint directory (openai/clip-vit-large-patch14 layout); "" = tiny random CLIP
WORK_DIR = "~/ediffi_quickstart"  # runs, images and reports (on Colab, a Drive folder keeps them)
ZOOM = 4                   # nearest-neighbour zoom of the tiny images when shown
""", ["parameters"]),
    ("md", f"""\
## Install

On Colab (or anywhere `ediffi_jax` is not importable yet) this clones the repository — the tiny models live in
its `assets/` folder — and installs it with its pinned dependencies (`pip install -e`). Where the package is
already installed (a checkout after `make test`), the cell does nothing. If Colab asks to restart the runtime after
the install, restart and run from the top (the cell is then skipped).

For a GPU runtime, also install JAX's CUDA build of the pinned version (`pip install "jax[cuda12]==<version in
setup.py>"`); for a TPU runtime, `jax[tpu]` (see `launch/README.md`). Repository: {REPO_URL}.
"""),
    ("code", f"""\
import importlib.util
import os
import subprocess
import sys

REPO_URL = "{REPO_URL}"
if importlib.util.find_spec("ediffi_jax") is None:
    subprocess.run(["git", "clone", "-q", "--depth", "1", REPO_URL, "ediffi-jax"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "ediffi-jax"], check=True)
    sys.path.insert(0, os.path.abspath("ediffi-jax"))
"""),
    ("code", """\
import time

import jax
import numpy as np
from IPython.display import display
from PIL import Image

from ediffi_jax.cli.common import quiet_logs
from ediffi_jax.cli.demo import ASSET, PROMPTS, SR_ASSET

quiet_logs()
WORK_DIR = os.path.abspath(os.path.expanduser(WORK_DIR))
os.makedirs(WORK_DIR, exist_ok=True)
print("JAX", jax.__version__, "on", jax.devices())


def show(image, zoom=ZOOM):
    \"\"\"Displays a uint8 [H, W, 3] array or an image file inline, zoomed (nearest neighbour).\"\"\"
    im = Image.open(image) if isinstance(image, str) else Image.fromarray(np.asarray(image))
    display(im.resize((im.width * zoom, im.height * zoom), Image.NEAREST))
"""),
    ("md", """\
## Train or load the base model

With `TRAIN_STEPS = 0` this loads the committed export `assets/tiny_shapes` (the run of
`ediffi-train --config configs/tiny.py`, 6000 steps, about an hour on 2 CPU cores). With `TRAIN_STEPS > 0` it
runs the real trainer (`ediffi_jax.train.loop.train`) on the same config for that many steps: it builds the shapes
data set first and resumes from the last checkpoint when re-run.

*Real run:* `ediffi-train --config configs/base64.py --workdir RUN` (T5-XXL + CLIP-L/14: set
`config.encoders.*.pretrained_dir` to local Hugging Face checkpoints). On a TPU the train step is sharded over
`config.mesh` (`data=-1` fills the devices; raise `fsdp` when the state does not fit; `ediffi-plan` prints the
bytes per device); pod slices are launched with `launch/tpu_pod.sh`. Keep `--workdir` on a mounted Drive
(`/content/drive/MyDrive/...`) or bucket (gcsfuse) so checkpoints survive the runtime; `gs://` URLs are refused.
"""),
    ("code", """\
from ediffi_jax.text_to_image import TextToImage

if TRAIN_STEPS > 0:
    from ediffi_jax.config import tiny_config
    from ediffi_jax.train.loop import train

    config = tiny_config()
    config.train.num_steps = TRAIN_STEPS
    config.expert.layout = "2"  # this run is the root of a 2-expert tree (see "Experts" below)
    BASE = os.path.join(WORK_DIR, "experts", "root")
    t0 = time.perf_counter()
    train(config, BASE)
    print(f"trained {TRAIN_STEPS} steps in {time.perf_counter() - t0:.0f} s")
else:
    BASE = ASSET

pipe = TextToImage.from_workdir(BASE)
sr_pipe = TextToImage.from_workdir(SR_ASSET) if USE_SR else None
print(f"base: {BASE} (step {pipe.step}, {pipe.config.model.image_size}²)")
if sr_pipe is not None:
    print(f"SR:   {SR_ASSET} (step {sr_pipe.step}, x{sr_pipe.config.sr.factor})")
"""),
    ("md", """\
## A grid of prompts through the cascade

`Cascade` chains the stages: the base model samples 32² images, the SR stage samples 64² ones conditioned on them
(and on the same text). Each row is one prompt; every cell shows stage 1 (nearest-upsampled) next to stage 2.

The **shape-score** checks each image against its prompt by colour segmentation (`ediffi_jax.data.shapes.score_batch`):
the fraction of the named objects found with the right colour, shape and position (`overall` = all three).

*Real run:* a cascade config JSON (see `ediffi_jax/cascade.py`) with `runs/base64`, `runs/sr256` and `runs/sr1024`,
sampled with `ediffi-sample --cascade cascade.json`; steps and guidance per stage.
"""),
    ("code", """\
from ediffi_jax.cascade import Cascade, Stage, side_by_side
from ediffi_jax.data import shapes
from ediffi_jax.text_to_image import save_grid

stages = [Stage(pipe, steps=HEUN_STEPS, name="base")]
if sr_pipe is not None:
    stages.append(Stage(sr_pipe, steps=HEUN_STEPS, name="sr"))
cascade = Cascade(stages)
prompts = [p for p in PROMPTS for _ in range(NUM_PER_PROMPT)]
t0 = time.perf_counter()
outs = cascade.generate(prompts, seed=SEED)
print(f"{len(prompts)} images through {len(stages)} stage(s) in {time.perf_counter() - t0:.1f} s")
for p in PROMPTS:
    print(" ", p)
show(save_grid(side_by_side(outs), os.path.join(WORK_DIR, "grid.png"), ncols=NUM_PER_PROMPT), zoom=max(ZOOM // 2, 1))
for st, images in zip(stages, outs):
    score = shapes.score_batch(images, prompts)
    print(f"{st.name} {images.shape[1]}²: shape-score " + " ".join(f"{k}={v:.2f}" for k, v in score.items()))
"""),
    ("md", """\
## Sampling with expert denoisers

eDiff-I trains an ensemble: experts start from one model and are fine-tuned on intervals of the noise level σ;
the sampler runs, at each step, only the expert that owns that σ. `ensemble.json` holds the tree.

* With `TRAIN_STEPS > 0` and `EXPERT_STEPS > 0`, the run above is the tree's root and
  `train_expert_tree` fine-tunes the two children (low σ, high σ) from it — what `ediffi-expert-tree` does —
  and assembles them.
* Otherwise (the default, and the test) this builds a 2-expert ensemble whose experts are **both the loaded
  model**: it shows the mechanics (the tree, the σ routing, saving and loading an ensemble), and the images must
  equal the single model's pixel for pixel. It is not a trained ensemble.

*Real run:* `ediffi-expert-tree --config configs/base64.py --config.expert.layout=3-paper --root_dir RUNS`
(see `launch/train_expert_tree.sh`), then sample `RUNS/ensemble` like any run.
"""),
    ("code", """\
import json
import shutil

from ediffi_jax.config import default_config
from ediffi_jax.ensemble import ENSEMBLE_JSON, load_ensemble, save_ensemble
from ediffi_jax.experts import tree_from_config

base_heun = Stage(pipe, steps=HEUN_STEPS).heun()
if TRAIN_STEPS > 0 and EXPERT_STEPS > 0:
    from ediffi_jax.train.expert_tree import train_expert_tree

    ensemble_dir = train_expert_tree(config, os.path.join(WORK_DIR, "experts"), child_steps=EXPERT_STEPS)
    identical = False
else:
    ensemble_dir = os.path.join(WORK_DIR, "ensemble_same_model")
    shutil.rmtree(ensemble_dir, ignore_errors=True)
    two = pipe.config.copy_and_resolve_references()
    if "expert" not in two:  # assets/tiny_shapes predates the config's expert section
        two.expert = default_config().expert
    two.expert.layout = "2"
    save_ensemble(ensemble_dir, two, pipe.encoders, tree_from_config(two), [pipe.params, pipe.params],
                  [pipe.step] * 2, [BASE, BASE])
    identical = True

ensemble = load_ensemble(ensemble_dir)
with open(os.path.join(ensemble_dir, ENSEMBLE_JSON)) as f:
    manifest = json.load(f)
for i, leaf in enumerate(manifest["leaves"]):
    lo, hi = ensemble.tree.interval(leaf["path"])
    print(f"expert {i} (leaf {leaf['path']!r}, step {leaf['step']} of {leaf['source']}) owns σ in [{lo:.3g}, {hi:.3g})")

single = pipe.generate(PROMPTS, seed=SEED, heun=base_heun)
experts = ensemble.generate(PROMPTS, seed=SEED, heun=base_heun)
print("top: the single model; bottom: the ensemble")
show(save_grid(np.concatenate([single, experts]), os.path.join(WORK_DIR, "experts.png"), ncols=len(PROMPTS)))
if identical:
    print("identical experts give the single model's pixels:", bool(np.array_equal(single, experts)))
print(f"shape-score overall: single {shapes.score_batch(single, PROMPTS)['overall']:.2f}, "
      f"ensemble {shapes.score_batch(experts, PROMPTS)['overall']:.2f}")
"""),
    ("md", """\
## Paint-with-words

Draw a colour map, name each colour with a phrase of the prompt, and the cross-attention of those tokens is
biased towards the painted pixels (eDiff-I Eq. 4, `ediffi_jax.paint_with_words`). Every colour of the map needs a
phrase: here the gray background names the word "and" with strength 0 (no bias). The prompt names the two
objects without positions; the map says where they go.

On this 1.5M-parameter toy the effect is small: it was trained on captions that always state positions and often
draws a position-free prompt's objects wrongly, which no attention bias can fix (`docs/benchmarks.md` measures the
overlap of painted masks and sampled objects: mean IoU 0.048 without, 0.095 with paint-with-words).

*Real run:* `ediffi-sample --workdir RUN --prompt ... --paint map.png --phrase "#ff0000=rabbit mage,1.0" ...`;
the bias strength is `config.sample.paint_weight` (or `paint_weight=`), its form `config.sample.paint_fn`.
"""),
    ("code", """\
from PIL import ImageDraw

from ediffi_jax.paint_with_words import regions_from_color_map

R = int(pipe.config.model.image_size)
canvas = Image.new("RGB", (R, R), (128, 128, 128))
draw = ImageDraw.Draw(canvas)
draw.ellipse([R * 0.08, R * 0.08, R * 0.42, R * 0.42], fill=(255, 0, 0))    # the red circle, top left
draw.rectangle([R * 0.56, R * 0.56, R * 0.9, R * 0.9], fill=(0, 0, 255))    # the blue square, bottom right
color_map = np.asarray(canvas)

paint_prompt = "a red circle and a blue square"
regions = regions_from_color_map(color_map, {"#ff0000": "red circle", "#0000ff": "blue square", "#808080": "and,0"})
n = len(PROMPTS)  # the batch size of the samples above: the plain samples reuse their compiled sampler
plain = pipe.generate([paint_prompt] * n, seed=SEED, heun=base_heun)
painted = pipe.generate([paint_prompt] * n, seed=SEED, heun=base_heun, regions=regions, paint_weight=2.0)
print(f"{paint_prompt!r}: the colour map; then {n} samples without (top) and with (bottom) paint-with-words")
show(color_map)
show(save_grid(np.concatenate([plain, painted]), os.path.join(WORK_DIR, "paint.png"), ncols=n))
"""),
    ("md", """\
## Style transfer from a reference image

The base model also conditions on the CLIP image embedding of a reference image (dropped 90% of the time in
training); passing `images=` to `generate` adds it, guided with `image_guidance_scale`. The reference here is a
scene of the shapes data set. On this toy the image embedding (a random 2-layer CLIP ViT, seen in 10% of the
training steps) changes the samples only a little; with CLIP-L/14 it carries the reference's style.

*Real run:* `ediffi-sample --workdir RUN --prompt ... --style ref.jpg --style_scale 3` (the CLIP image encoder is
`config.encoders.clip`: set its `pretrained_dir` to a local CLIP-L/14).
"""),
    ("code", """\
reference = shapes.example(seed=7, index=3, resolution=R)
print("reference:", reference["caption"])
show(reference["image"])
refs = np.repeat(reference["image"][None], len(PROMPTS), axis=0)
styled = pipe.generate(PROMPTS, seed=SEED, heun=base_heun, images=refs, image_guidance_scale=3.0)
print("top: text only (as above); bottom: text + reference image")
show(save_grid(np.concatenate([single, styled]), os.path.join(WORK_DIR, "style.png"), ncols=len(PROMPTS)))
"""),
    ("md", """\
## A small FID / CLIP-score evaluation

`ediffi-eval curve` as a library call: generate `NUM_EVAL` images from captions of the shapes data at each
guidance scale, then FID against the shapes images of the same captions and the CLIP score of each
(image, caption) pair; `report.json` and `curve.png` land in the output folder (re-running reuses the images and
the numbers).

Without `INCEPTION_WEIGHTS` / `CLIP_DIR` the notebook writes **random stand-in weights**
(`ediffi_jax.eval.smoke`): the pipeline runs, the numbers mean nothing. The package never downloads weights:
for real numbers download pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (from
`ediffi_jax.models.inception.FID_WEIGHTS_URL`) and a CLIP checkpoint directory (e.g. `openai/clip-vit-large-patch14`
with `huggingface_hub.snapshot_download`) and set the two parameters; keep `INCEPTION_SIZE = 299`.

*Real run:* `ediffi-eval coco30k --cascade cascade.json --coco_captions captions_val2014.json --ref_dir val2014/
--inception_weights ... --clip_dir ...` (COCO FID-30K), or `ediffi-eval curve ... --guidance 1,2,3,5`.
"""),
    ("code", """\
from ediffi_jax.eval.captions import shapes_examples
from ediffi_jax.eval.commands import Options, run_command
from ediffi_jax.eval.smoke import write_random_clip, write_random_inception

weights = os.path.join(WORK_DIR, "stand_in_weights")
inception = INCEPTION_WEIGHTS or os.path.join(weights, "inception-random.npz")
if not os.path.isfile(inception):
    write_random_inception(inception)
clip_dir = CLIP_DIR or os.path.join(weights, "clip-random")
if not os.path.isfile(os.path.join(clip_dir, "config.json")):
    captions = shapes_examples(pipe.config.data, 256)
    write_random_clip(clip_dir, [captions[i]["caption"] for i in range(len(captions))])

t0 = time.perf_counter()
report = run_command(Options(
    "curve", workdir=BASE, shapes_captions=True, num=NUM_EVAL, steps=HEUN_STEPS, guidance=GUIDANCE_SCALES,
    out=os.path.join(WORK_DIR, "eval"), inception_weights=inception, inception_size=INCEPTION_SIZE,
    clip_dir=clip_dir, batch_size=EVAL_BATCH, progress=False,
    fid_method="eigh"))  # "eigh": pytorch-fid's sqrtm value to ~1e-6, much faster on a CPU
print(f"evaluated in {time.perf_counter() - t0:.0f} s")
for key, r in report["results"].items():
    print(f"guidance {key}: FID {r['fid']:.2f}  CLIP score {r['clip_score']:.2f}  ({r['num']} images)")
show(report["plot"], zoom=1)
"""),
    ("md", """\
## Next steps

* Paper-size models: `configs/base64.py` (64² base), `configs/sr256.py` and `configs/sr1024.py` (SR stages), with
  pretrained T5-XXL / CLIP-L/14 (`config.encoders.*.pretrained_dir`, `ediffi-embed` to precompute embeddings).
* Many devices: `config.mesh` (data / fsdp / tensor axes), `ediffi-plan` for memory per device, `launch/` for TPU
  pods, multi-slice and SLURM GPU clusters.
* Checkpoints: every `--workdir` is an Orbax checkpoint directory; `ediffi-export` writes an inference-only copy
  that `TextToImage.from_workdir` loads (as here). On Colab put them on a mounted Drive
  (`from google.colab import drive; drive.mount("/content/drive")`), on TPU VMs on a gcsfuse-mounted bucket.
"""),
]


def build() -> nbformat.NotebookNode:
    nb = new_notebook()
    for kind, source, *tags in CELLS:
        cell = new_markdown_cell(source.rstrip("\n")) if kind == "md" else new_code_cell(source.rstrip("\n"))
        if tags:
            cell.metadata["tags"] = tags[0]
        nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):  # stable ids: rebuilding without edits gives the same file
        cell["id"] = f"cell-{i:02d}"
    nb.metadata.update({
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
    })
    return nb


def render() -> str:
    return nbformat.writes(build()) + "\n"


if __name__ == "__main__":
    with open(NOTEBOOK, "w") as f:
        f.write(render())
    print(f"wrote {NOTEBOOK}", file=sys.stderr)
