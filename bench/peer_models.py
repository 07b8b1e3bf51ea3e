"""Workloads of bench/peers.py and, for each, the three train steps it times: ours and two diffusers peers.

Every step does the same work on the same shapes: draw ln σ ~ N(−1.2, 1.2²) and noise, EDM preconditioning
(c_in, c_skip, c_out, c_noise = ln σ / 4; Karras et al. 2022), one UNet forward on (c_in·x, c_noise, context
B × L × D), the weighted loss λ(σ)·‖D − y‖² averaged, backward, global-norm clipping to 1, AdamW (lr 1e-4,
β 0.9/0.999, ε 1e-8, weight decay 0.01), then an EMA update of every parameter (decay min(0.9999, (1+t)/(10+t))).

  * ours: the real jitted step of `ediffi_jax.train.step.train_step` (donated state; its "encode" just returns the
    batch's precomputed context, as when training on `ediffi-embed` output). It also draws per-example keep
    flags (drop prob 0 here) and skips non-finite updates with `jnp.where` (elementwise, not counted).
  * diffusers PyTorch `UNet2DConditionModel`: eager; `torch.optim.AdamW` (torch's default implementation for
    CPU tensors), `clip_grad_norm_`, EMA with `torch._foreach_lerp_`; `zero_grad(set_to_none=True)`.
  * diffusers Flax `FlaxUNet2DConditionModel` (0.39.0, NCHW in/out as its API takes): one `jax.jit` of loss,
    grad, `optax.chain(clip_by_global_norm(1), adamw)` and EMA, state donated; with and without
    `use_memory_efficient_attention`.

Mixed precision (`Workload.dtype = "bfloat16"`), float32 parameters, optimizer and loss in every framework: ours
`model.dtype = "bfloat16"` (GroupNorm statistics and softmax stay float32); Flax `dtype=jnp.bfloat16` (its
computation dtype); PyTorch `torch.autocast(dtype=torch.bfloat16)` around the forward. On a CUDA device the PyTorch
peer runs there (its attention is `scaled_dot_product_attention`, i.e. PyTorch's fused flash kernels).
"""

from __future__ import annotations

import dataclasses

SIGMA_DATA = 0.5
P_MEAN, P_STD = -1.2, 1.2
LR, WD, CLIP, EMA = 1e-4, 0.01, 1.0, 0.9999


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    image_size: int
    block_channels: tuple[int, ...]
    layers_per_block: int
    attn_res: tuple[int, ...]  # resolutions whose down/up blocks attend (peers: CrossAttn*Block2D)
    head_dim: int
    context_len: int
    context_dim: int
    batch: int
    steps: int = 5
    note: str = ""
    dtype: str = "float32"  # compute dtype (parameters stay float32): "bfloat16" = each framework's mixed precision

    def level_res(self) -> list[int]:
        return [self.image_size // 2**i for i in range(len(self.block_channels))]

    def ours_attn_res(self) -> tuple[int, ...]:
        """Our UNet attends (self, then cross) at these resolutions, its middle block iff the lowest is listed;
        the peers' middle block always attends (see `differences`)."""
        return tuple(self.attn_res)


WORKLOADS = {
    "small": Workload("small", 32, (32, 64), 1, (16,), 8, 77, 64, 4, steps=5,
                      note="quick check: 32², 2 levels, attention at 16 and in the middle"),
    "edm64": Workload("edm64", 64, (64, 128, 256, 256), 2, (32, 16, 8), 8, 77, 256, 8, steps=5,
                      note="eDiff-I-like 64²: attention at 32/16/8, 8-dim heads, context 77×256"),
    "attn64": Workload("attn64", 64, (64, 128, 256, 256), 2, (64, 32, 16), 8, 77, 256, 4, steps=5,
                       note="Stable-Diffusion-like: attention at 64/32/16 (+ middle), 8-dim heads"),
}


def differences(w: Workload) -> list[str]:
    """What our model does differently from the peers on workload `w` (printed with the table)."""
    out = [
        "peers' attention is a transformer block (GroupNorm, proj_in 1×1, LayerNorm+self-attn, LayerNorm+cross-"
        "attn, LayerNorm+GEGLU feed-forward C→8C→…→C, proj_out); ours is GroupNorm+self-attn then GroupNorm+"
        "cross-attn with q/k/v/out projections only (no feed-forward, no proj_in/out): fewer FLOPs per block",
        "ResBlocks: ours scale-shift norm (time embedding → 2C: GroupNorm·(1+scale)+shift), peers add the time "
        "embedding (→ C) before the second norm; down/up-sampling: both conv stride 2 / nearest ×2 + conv",
        "ours projects the context (LayerNorm + Linear D→D, the conditioning adapter) and prepends a learnt null "
        "token (L+1 keys, masked attention); peers take the context as is (L keys, no mask)",
        "time embedding: both sinusoidal(c_noise) → Linear → SiLU → Linear (width 4·C0); ours has no pooled vector "
        "here (pooled_dim 0)",
    ]
    lowest = w.level_res()[-1]
    if lowest not in w.attn_res:
        out.append(f"middle block: peers attend at {lowest}² (UNetMidBlock2DCrossAttn); ours attends only where "
                   f"its lists say, so its middle block at {lowest}² has no attention")
    return out


def heads(w: Workload) -> tuple[int, ...]:
    return tuple(c // w.head_dim for c in w.block_channels)


def peer_block_types(w: Workload) -> tuple[tuple[str, ...], tuple[str, ...]]:
    down = tuple("CrossAttnDownBlock2D" if r in w.attn_res else "DownBlock2D" for r in w.level_res())
    up = tuple(t.replace("Down", "Up") for t in reversed(down))
    return down, up


def edm_sigma_terms(sigma, xp):
    """(c_in, c_skip, c_out, c_noise, weight) for σ, with array module `xp` (jnp or torch)."""
    sd2 = SIGMA_DATA**2
    s2 = sigma**2
    c_in = 1.0 / xp.sqrt(s2 + sd2)
    c_skip = sd2 / (s2 + sd2)
    c_out = sigma * SIGMA_DATA / xp.sqrt(s2 + sd2)
    weight = (s2 + sd2) / (sigma * SIGMA_DATA) ** 2
    return c_in, c_skip, c_out, xp.log(sigma) / 4, weight


def ema_decay(t: int | float) -> float:
    return min(EMA, (1.0 + t) / (10.0 + t))


# ----------------------------------------------------------------------------------------------------------
# ours
# ----------------------------------------------------------------------------------------------------------
def ours_config(w: Workload, attention: str = "auto"):
    import ml_collections

    from ediffi_jax.config import default_config
    from ediffi_jax.models.unet import unet_config

    c = default_config()
    mult = tuple(ch // w.block_channels[0] for ch in w.block_channels)
    c.model = unet_config(
        image_size=w.image_size, channels=w.block_channels[0], channel_mult=mult, num_res_blocks=w.layers_per_block,
        attn_resolutions=w.ours_attn_res(), cross_attn_resolutions=w.ours_attn_res(), head_dim=w.head_dim,
        num_groups=32, dropout=0.0, context_dim=w.context_dim, pooled_dim=0, emb_mult=4, resblock_updown=False,
        attention=attention)
    c.conditioning.order = ("text",)
    c.conditioning.embeddings = ml_collections.ConfigDict(
        {"text": dict(dim=w.context_dim, pooled="none", pooled_dim=0, drop_prob=0.0)})
    c.optim.update(dict(lr=LR, warmup_steps=1, weight_decay=WD, b1=0.9, b2=0.999, eps=1e-8, grad_clip=CLIP,
                        ema_decay=EMA))
    c.edm.update(dict(sigma_data=SIGMA_DATA, p_mean=P_MEAN, p_std=P_STD))
    c.train.batch_size = w.batch
    c.model.dtype = w.dtype
    return c


def _encode(_, bt):
    """Our step's "encoder" on precomputed context tokens (as when training on `ediffi-embed` output)."""
    return {"text": {"tokens": bt["tokens"], "mask": bt["mask"]}}


def _ours_params(c):
    """(graphdef, params, n_params) of our model, initialised under `jax.jit` as ediffi-train does it (eager
    op-by-op initialisation is slow on an accelerator)."""
    import jax
    import numpy as np

    from ediffi_jax.tracing import abstract_module, fast_tracing
    from ediffi_jax.train.step import build_model, split_model

    graphdef, _ = split_model(abstract_module(lambda: build_model(c, 0)))
    with fast_tracing():
        params = jax.jit(lambda: split_model(build_model(c, 0))[1])()
    return graphdef, params, sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def _ours_forward(graphdef):
    """(params, x, c_noise, batch) → our UNet's output: the forward whose ops the FLOP counter reads."""
    import jax.numpy as jnp
    from flax import nnx

    def forward(p, x, cn, bt):
        keep = {"text": jnp.ones((x.shape[0],), bool)}
        return nnx.merge(graphdef, p)(x, cn, _encode(None, bt), keep)

    return forward


def ours_setup(w: Workload, attention: str = "auto"):
    """(jitted step, initial state, step args after the state, key, forward fn, forward args, n_params)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ediffi_jax.train.step import init_train_state, make_optimizer, step_spec, train_step

    c = ours_config(w, attention)
    rng = np.random.default_rng(0)
    b, r = w.batch, w.image_size
    batch = {"image": jnp.asarray(rng.uniform(-1, 1, (b, r, r, 3)), jnp.float32),
             "tokens": jnp.asarray(rng.normal(size=(b, w.context_len, w.context_dim)), jnp.float32),
             "mask": jnp.ones((b, w.context_len), bool)}
    graphdef, params, n_params = _ours_params(c)
    tx, spec = make_optimizer(c.optim), step_spec(c)

    step = jax.jit(lambda s, bt, k: train_step(s, bt, {}, k, graphdef=graphdef, encode=_encode, tx=tx, spec=spec),
                   donate_argnums=(0,))
    forward = _ours_forward(graphdef)
    fwd_args = (params, batch["image"], jnp.zeros((b,), jnp.float32), batch)
    state = jax.jit(lambda p: init_train_state(jax.tree.map(jnp.copy, p), tx))(params)
    return step, state, (batch,), jax.random.PRNGKey(0), forward, fwd_args, n_params


# ----------------------------------------------------------------------------------------------------------
# diffusers Flax peer
# ----------------------------------------------------------------------------------------------------------
def flax_setup(w: Workload, mem_efficient: bool):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from diffusers import FlaxUNet2DConditionModel

    down, up = peer_block_types(w)
    model = FlaxUNet2DConditionModel(
        sample_size=w.image_size, in_channels=3, out_channels=3, down_block_types=down, up_block_types=up,
        block_out_channels=w.block_channels, layers_per_block=w.layers_per_block, cross_attention_dim=w.context_dim,
        attention_head_dim=heads(w),  # diffusers' legacy name: the number of heads per level
        use_memory_efficient_attention=mem_efficient, dtype=jnp.dtype(w.dtype))
    params = jax.jit(model.init_weights)(jax.random.PRNGKey(0))
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    tx = optax.chain(optax.clip_by_global_norm(CLIP), optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WD))
    rng = np.random.default_rng(0)
    b, r = w.batch, w.image_size
    y = jnp.asarray(rng.uniform(-1, 1, (b, 3, r, r)), jnp.float32)
    ctx = jnp.asarray(rng.normal(size=(b, w.context_len, w.context_dim)), jnp.float32)

    def forward(p, x, cn, ctx):
        return model.apply({"params": p}, x, cn, ctx).sample.astype(jnp.float32)

    def step(state, y, ctx, key):
        p, opt_state, ema, t = state
        k_s, k_n = jax.random.split(jax.random.fold_in(key, t))
        sigma = jnp.exp(P_MEAN + P_STD * jax.random.normal(k_s, (b,)))
        c_in, c_skip, c_out, c_noise, weight = edm_sigma_terms(sigma, jnp)
        x = y + sigma[:, None, None, None] * jax.random.normal(k_n, y.shape)

        def loss_fn(p):
            f = forward(p, c_in[:, None, None, None] * x, c_noise, ctx)
            d = c_skip[:, None, None, None] * x + c_out[:, None, None, None] * f
            return jnp.mean(weight[:, None, None, None] * (d - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        p = optax.apply_updates(p, updates)
        tf = t.astype(jnp.float32)
        d = jnp.minimum(EMA, (1.0 + tf) / (10.0 + tf))
        ema = jax.tree.map(lambda e, q: d * e + (1.0 - d) * q, ema, p)
        return (p, opt_state, ema, t + 1), loss

    state = jax.jit(lambda p: (jax.tree.map(jnp.copy, p), tx.init(p), jax.tree.map(jnp.copy, p),
                               jnp.zeros((), jnp.int32)))(params)
    fwd_args = (params, y, jnp.zeros((b,), jnp.float32), ctx)
    return jax.jit(step, donate_argnums=(0,)), state, (y, ctx), jax.random.PRNGKey(0), forward, fwd_args, n_params


# ----------------------------------------------------------------------------------------------------------
# diffusers PyTorch peer
# ----------------------------------------------------------------------------------------------------------
def torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _torch_peer(w: Workload):
    """(diffusers UNet2DConditionModel on `torch_device()`, that device, a seeded generator on it, the forward's
    precision context: `torch.autocast` to `w.dtype`, or none for float32)."""
    import contextlib

    import torch
    from diffusers import UNet2DConditionModel

    dev = torch_device()
    torch.manual_seed(0)
    down, up = peer_block_types(w)
    model = UNet2DConditionModel(
        sample_size=w.image_size, in_channels=3, out_channels=3, down_block_types=down, up_block_types=up,
        block_out_channels=w.block_channels, layers_per_block=w.layers_per_block, cross_attention_dim=w.context_dim,
        attention_head_dim=heads(w), norm_num_groups=32).to(dev)
    half = w.dtype != "float32"
    cast = (lambda: torch.autocast(dev.type, dtype=getattr(torch, w.dtype))) if half else contextlib.nullcontext
    return model, dev, torch.Generator(dev).manual_seed(0), cast


def torch_setup(w: Workload):
    """(step fn, model, n_params) on `torch_device()`; the step returns the loss as a Python float (synchronous)."""
    import torch

    model, dev, g, cast = _torch_peer(w)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
    ema = [p.detach().clone() for p in params]
    b, r = w.batch, w.image_size
    y = torch.rand((b, 3, r, r), generator=g, device=dev) * 2 - 1
    ctx = torch.randn((b, w.context_len, w.context_dim), generator=g, device=dev)
    counter = {"t": 0}

    def step() -> float:
        sigma = torch.exp(P_MEAN + P_STD * torch.randn(b, generator=g, device=dev))
        c_in, c_skip, c_out, c_noise, weight = (v.view(-1, 1, 1, 1) if i != 3 else v
                                                for i, v in enumerate(edm_sigma_terms(sigma, torch)))
        x = y + sigma.view(-1, 1, 1, 1) * torch.randn(y.shape, generator=g, device=dev)
        with cast():
            f = model(c_in * x, c_noise, encoder_hidden_states=ctx).sample
        d = c_skip * x + c_out * f.float()
        loss = (weight * (d - y) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - ema_decay(counter["t"]))
        counter["t"] += 1
        return float(loss.detach())

    return step, model, n_params


# ----------------------------------------------------------------------------------------------------------
# sampling: our whole jitted Heun sampler vs the peers' UNet forward at the sampler's batch
# ----------------------------------------------------------------------------------------------------------
def ours_sampler_setup(w: Workload, num_steps: int, attention: str = "auto"):
    """(call → images, our UNet forward at batch 2B for the FLOP count, its args, n_params): `make_sampler` with
    guidance, i.e. one forward of the conditional and unconditional branches batched (2B) per evaluation."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ediffi_jax.sampling import HeunConfig
    from ediffi_jax.text_to_image import make_sampler

    graphdef, params, n_params = _ours_params(ours_config(w, attention))
    rng = np.random.default_rng(0)
    b, r = w.batch, w.image_size
    emb = {"text": {"tokens": jnp.asarray(rng.normal(size=(b, w.context_len, w.context_dim)), jnp.float32),
                    "mask": jnp.ones((b, w.context_len), bool)}}
    noise = jnp.asarray(rng.normal(size=(b, r, r, 3)), jnp.float32)
    sampler = make_sampler(graphdef, HeunConfig(num_steps=num_steps), SIGMA_DATA)
    s = jnp.float32(3.0)
    key = jax.random.PRNGKey(0)

    def call():
        return jax.block_until_ready(sampler(params, emb, noise, key, s, s))

    # the FLOP count of one guided evaluation: the same UNet at batch 2B (shapes only matter to the counter)
    b2 = 2 * b
    ctx = {"tokens": jnp.zeros((b2, w.context_len, w.context_dim), jnp.float32), "mask": jnp.ones((b2, w.context_len),
                                                                                                 bool)}
    fwd_args = (params, jnp.zeros((b2, r, r, 3), jnp.float32), jnp.zeros((b2,), jnp.float32), ctx)
    return call, _ours_forward(graphdef), fwd_args, n_params


def pm_double(w: Workload) -> Workload:
    """The workload at twice its batch: what one guided sampler evaluation runs (conditional + unconditional)."""
    return dataclasses.replace(w, batch=2 * w.batch)


def torch_forward_setup(w: Workload):
    """(forward at batch 2B under inference_mode, model, n_params): the PyTorch peer's cost per guided evaluation,
    with the same EDM preconditioning and guidance combination around it."""
    import torch

    model, dev, g, cast = _torch_peer(w)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    b, r = 2 * w.batch, w.image_size
    x = torch.randn((w.batch, 3, r, r), generator=g, device=dev) * 10
    ctx = torch.randn((b, w.context_len, w.context_dim), generator=g, device=dev)
    sigma = torch.full((b,), 10.0, device=dev)
    c_in, c_skip, c_out, c_noise, _ = (v.view(-1, 1, 1, 1) if i != 3 else v
                                       for i, v in enumerate(edm_sigma_terms(sigma, torch)))

    def forward():
        with torch.inference_mode():
            xx = torch.cat([x, x])
            with cast():
                f = model(c_in * xx, c_noise, encoder_hidden_states=ctx).sample
            d = c_skip * xx + c_out * f.float()
            d_u, d_c = d[: w.batch], d[w.batch:]
            out = d_u + 3.0 * (d_c - d_u)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return out

    return forward, model, n_params


def model_flops_per_step(fwd_flops: float) -> float:
    """Forward + backward (≈ 2 × forward) of the counted ops."""
    return 3.0 * fwd_flops


__all__ = ["WORKLOADS", "Workload", "differences", "flax_setup", "model_flops_per_step", "ours_sampler_setup",
           "ours_setup", "pm_double", "torch_device", "torch_forward_setup", "torch_setup"]
