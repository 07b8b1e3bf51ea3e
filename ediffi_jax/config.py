"""Defaults shared by every experiment config (configs/*.py override what they change).

A config is the whole experiment: model, conditioning, text encoders, data, EDM, optimiser, schedule and
sampler. Every field can be overridden on the command line, e.g. `--config.optim.lr=3e-4`.
"""

from __future__ import annotations

import ml_collections

from ediffi_jax.models.unet import unet_config
from ediffi_jax.sr import sr_config


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # The denoiser UNet (see models/unet.py for every field). Paper base-model defaults.
    c.model = unet_config()

    # Conditioning (eDiff-I §3): token embeddings concatenated in `order` for cross-attention
    # ([CLIP-text (77); T5; CLIP-image (1 token)] + the UNet's null token); pooled vectors ("given": the CLIP
    # projections) added to the time embedding; each embedding dropped independently in training with
    # `drop_prob` (CLIP-text 0.2, T5 0.25, CLIP-image 0.9).
    c.conditioning = ml_collections.ConfigDict()
    c.conditioning.order = ("clip_text", "t5", "clip_image")
    c.conditioning.embeddings = ml_collections.ConfigDict()
    c.conditioning.embeddings.clip_text = ml_collections.ConfigDict(
        dict(dim=768, pooled="given", pooled_dim=768, drop_prob=0.2))
    c.conditioning.embeddings.t5 = ml_collections.ConfigDict(
        dict(dim=4096, pooled="none", pooled_dim=0, drop_prob=0.25))
    c.conditioning.embeddings.clip_image = ml_collections.ConfigDict(
        dict(dim=768, pooled="given", pooled_dim=768, drop_prob=0.9))

    # Frozen encoders (see encoders.py). `pretrained_dir`: a local Hugging Face directory (T5: google/t5-v1_1-xxl
    # layout; CLIP: openai/clip-vit-large-patch14, a CLIPModel with both towers), tokenizer from the same
    # directory unless `tokenizer_dir` is set. With no pretrained_dir, a random encoder of the size below and a
    # tokenizer trained on the training captions (vocab_size), both kept in <workdir>/encoders.
    c.encoders = ml_collections.ConfigDict()
    c.encoders.t5 = ml_collections.ConfigDict(dict(
        pretrained_dir="", tokenizer_dir="", vocab_size=64, max_length=128, seed=1234, dtype="float32",
        d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, layer_norm_epsilon=1e-6))
    c.encoders.clip = ml_collections.ConfigDict(dict(
        pretrained_dir="", tokenizer_dir="", vocab_size=640, max_length=77, seed=4321, dtype="float32"))
    c.encoders.clip.text = ml_collections.ConfigDict(dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768))
    c.encoders.clip.vision = ml_collections.ConfigDict(dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
        patch_size=14, projection_dim=768))

    # Data: the synthetic shapes dataset (TFDS array_record, read with grain).
    c.data = ml_collections.ConfigDict()
    c.data.name = "shapes"
    c.data.data_dir = "~/.cache/ediffi_jax/tensorflow_datasets"
    c.data.resolution = 64
    c.data.num_train = 20000
    c.data.num_val = 512
    c.data.seed = 0
    # An `ediffi-embed` output directory: train on its precomputed embeddings (the encoders never run in the
    # train step; the run uses the encoders the data was embedded with). "" = encode captions in the step.
    c.data.precomputed = ""
    # Real image–text data (data/sources.py): name "folder" | "webdataset" | "coco" (built from `path` into
    # data_dir on first use; build-time filters min_size / max_aspect, folder caption layout `captions`, COCO
    # `coco_year`) or "tfds" (a prepared TFDS dataset: `path` = its directory, or `tfds_name` under data_dir, fields
    # `image_key` / `caption_key`). Training reads `split`; `val_split` ("" = none) is the held-out split of the
    # validation loss (train/validation.py: the EMA model's EDM loss on its first `val_examples` usable examples,
    # rounded up to whole global batches, centre-cropped, at 8 fixed σ quantiles with fixed noise; logged as
    # eval/val_loss every train.eval_every steps and at the end). num_train / num_val are the shapes set's sizes
    # only. Pipeline (data/pipeline.py make_image_text_iterator, data/records.py):
    # short side resized to `resolution` with `resize_filter` (bicubic | area | bilinear | lanczos), `crop`
    # (random | center), captions whitespace-collapsed and cut to `max_caption_chars`; bad records skipped and
    # counted per reason, the counts logged every `bad_record_log_every` steps (0 = only at checkpoints);
    # `num_workers` grain processes (0 = `num_threads` threads in the trainer), `prefetch` chunks buffered.
    c.data.path = ""
    c.data.tfds_name = ""
    c.data.split = "train"
    c.data.val_split = ""
    c.data.val_examples = 256
    c.data.image_key = "image"
    c.data.caption_key = "caption"
    c.data.captions = "auto"
    c.data.coco_year = "2014"
    c.data.min_size = 0
    c.data.max_aspect = 0.0
    c.data.crop = "random"
    c.data.resize_filter = "bicubic"
    c.data.max_caption_chars = 1024
    c.data.num_workers = 0
    c.data.num_threads = 4
    c.data.prefetch = 8
    c.data.bad_record_log_every = 1000
    # Real data: an `ediffi-embed` output of this data (one keyed store per split, data/keyed_embeddings.py) whose
    # text embeddings are joined to the records by "key": the train step reads them instead of running the text
    # encoders (only the CLIP image tower, if conditioning.order uses it, is loaded); a record whose key has none
    # is skipped and counted as `missing_embedding`. The run uses the encoders it was embedded with and must match
    # its conditioning, encoders and caption source. "" = encode captions in the step.
    c.data.embeddings = ""

    # EDM (Karras et al. 2022): σ_data and the training distribution ln σ ~ N(p_mean, p_std²).
    c.edm = ml_collections.ConfigDict(dict(sigma_data=0.5, p_mean=-1.2, p_std=1.2))

    # AdamW as in eDiff-I (lr 1e-4, weight decay 0.01, EMA 0.9999).
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-4, warmup_steps=1000, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0,
        ema_decay=0.9999))

    # Ensemble of expert denoisers (eDiff-I §4, experts.py). `layout`: a preset ("A" = one model, "2", "3-paper")
    # or comma-separated leaf paths ("0,10,11"); `node`: the tree node this run trains ("" = the root, all σ);
    # `parent`: the workdir of the run it starts from (needed when node != ""), whose EMA (`init`="ema") or raw
    # ("params") parameters initialise a fresh optimizer; the parent's files are only read.
    c.expert = ml_collections.ConfigDict(dict(layout="A", node="", parent="", init="ema"))

    # Super-resolution stage (sr.py): factor 0 = a base model; else this model upsamples by `factor`, trained on
    # (image, area-downsampled image) pairs [random aligned `crop`² crops], noise-conditioning augmentation
    # ln σ_aug ~ N(aug_p_mean, aug_p_std²), and sampled with σ_aug = sample_sigma_aug.
    c.sr = sr_config()

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 2048
    c.train.num_steps = 1_000_000
    c.train.log_every = 100
    c.train.ckpt_every = 5000
    c.train.keep_checkpoints = 3
    c.train.eval_every = 0  # 0 = only at the end: sample eval prompts and report the shape-score
    c.train.eval_num = 32
    # A step with a non-finite loss or gradient leaves params, EMA and optimizer state as they were (its step
    # still counts); after this many in a row the run stops with an error, keeping its last checkpoint (0 = never).
    c.train.max_consecutive_skips = 10

    # Sampler: EDM Heun with optional churn; guidance D = D_u + s·(D_text − D_u) [+ s_img·(D_text+img − D_text)
    # when a reference image is given], s = guidance_scale, s_img = image_guidance_scale (sampling.py).
    # Paint-with-words (paint_with_words.py): bias w·A with w = paint_weight·log(1+σ)·max(QKᵀ) for "paper";
    # paint_fn picks the weight function (paper, global_max, row_max, std, constant).
    c.sample = ml_collections.ConfigDict(dict(
        num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0, s_churn=0.0, s_min=0.0, s_max=float("inf"),
        s_noise=1.0, guidance_scale=3.0, image_guidance_scale=3.0, paint_weight=1.0, paint_fn="paper"))

    # Device mesh of the train step (train/sharding.py): axes ("data", "fsdp", "tensor"); -1 fills the remaining
    # devices (at most one). The batch is split over data x fsdp; parameters, EMA and optimizer state over fsdp
    # (and tensor) by the logical-axis rules of ediffi_jax/sharding.py. `dcn_*`: factors across slices (TPU
    # multi-slice; processes where devices have no slice_index); an axis' size is then ICI size x DCN factor.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))

    # Multi-host runs: with `initialize`, ediffi-train calls jax.distributed.initialize before touching devices;
    # unset fields ("", 0, -1) are left to JAX's auto-detection (TPU VMs, SLURM). See launch/.
    c.distributed = ml_collections.ConfigDict(dict(
        initialize=False, coordinator_address="", num_processes=0, process_id=-1))
    return c


def tiny_config() -> ml_collections.ConfigDict:
    """The CPU default (embedded, used by `make demo`): a small UNet on 32×32 shapes with the full eDiff-I
    conditioning from small random frozen encoders (2-layer T5 + SentencePiece, 2-layer CLIP text + BPE,
    2-layer CLIP ViT on the 32² image), tokenizers trained on the captions."""
    c = default_config()
    c.model.update(dict(
        image_size=32, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
        cross_attn_resolutions=(16, 8), head_dim=32, num_groups=8, dropout=0.0, context_dim=64,
        pooled_dim=64, emb_mult=4))
    c.conditioning.embeddings.t5.dim = 64
    c.conditioning.embeddings.clip_text.update(dict(dim=64, pooled_dim=32))
    c.conditioning.embeddings.clip_image.update(dict(dim=32, pooled_dim=32))
    c.encoders.t5.update(dict(max_length=24, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                              relative_attention_num_buckets=16, relative_attention_max_distance=32))
    c.encoders.clip.update(dict(max_length=24))
    c.encoders.clip.text.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, projection_dim=32))
    c.encoders.clip.vision.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32))
    c.data.resolution = 32
    c.data.num_train = 20000
    c.data.num_val = 256
    c.optim.update(dict(lr=1e-3, warmup_steps=100, ema_decay=0.999))
    c.train.update(dict(batch_size=16, num_steps=6000, log_every=50, ckpt_every=500, eval_num=16))
    c.sample.update(dict(num_steps=18, sigma_max=80.0, guidance_scale=3.0))
    return c


def tiny_sr_config() -> ml_collections.ConfigDict:
    """Stage 2 of the tiny CPU cascade: 32² → 64² shapes, a small SR UNet (cross-attention at 16² only, no
    self-attention), the tiny encoders."""
    c = tiny_config()
    c.model = unet_config(
        image_size=64, channels=16, channel_mult=(1, 2, 4, 4), num_res_blocks=1, attn_resolutions=(),
        cross_attn_resolutions=(16,), head_dim=32, num_groups=8, dropout=0.0, context_dim=64, pooled_dim=64,
        emb_mult=4, in_cond_channels=3, extra_cond_dim=1)
    c.data.resolution = 64
    c.sr = sr_config(factor=2)
    c.sample.update(dict(num_steps=12))
    return c


def run_config(stored: dict) -> ml_collections.ConfigDict:
    """The ConfigDict of a run's stored config.json, with every field added since the run was made filled in
    from `default_config` (new fields default to the behaviour from before they existed), so older runs and
    exports keep loading: e.g. a run from before the ``expert`` section gets ``expert.layout = ""``."""

    def fill(into: dict, defaults: dict) -> dict:
        for key, value in defaults.items():
            if key not in into:
                into[key] = value
            elif isinstance(value, dict) and isinstance(into[key], dict):
                fill(into[key], value)
        return into

    return ml_collections.ConfigDict(fill(dict(stored), default_config().to_dict()))
