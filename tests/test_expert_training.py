"""Training and sampling an ensemble of experts: children start from their parent and see only their σ, the
driver resumes, the ensemble loads in one call, and its sampler uses each expert on its own steps only."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import one_level_config
from flax import nnx

from ediffi_jax.ensemble import assemble_ensemble, load_ensemble, save_ensemble
from ediffi_jax.sampling import HeunConfig, heun_sample
from ediffi_jax.text_to_image import guided_denoiser, make_sampler
from ediffi_jax.train import step_cache
from ediffi_jax.train.events import read_scalars
from ediffi_jax.train.expert_init import params_from_parent
from ediffi_jax.train.expert_tree import train_expert_tree
from ediffi_jax.train.loop import train

PROMPTS = ["a red circle on the left", "a blue square at the top"]


def fast_config(data_dir):
    """The shared one-level micro model, 4 steps; the root and both children run one compiled step (the σ
    interval is an operand of the step)."""
    c = one_level_config(data_dir, num_steps=4, ckpt_every=4)
    c.sample.num_steps = 8
    c.expert.layout = "2"
    return c


@pytest.fixture(scope="module")
def tree_run(data_dir, tmp_path_factory):
    config = fast_config(data_dir)
    root_dir = str(tmp_path_factory.mktemp("experts"))
    hits = step_cache.STATS["hits"]
    out = train_expert_tree(config, root_dir, child_steps=3)
    # Both children run the root's compiled step (train/step_cache.py): their σ interval is an operand.
    assert step_cache.STATS["hits"] >= hits + 2
    return config, root_dir, out


def _mtimes(d):
    return [os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs]


def test_children_start_from_parent_and_draw_only_their_sigma(tree_run):
    config, root_dir, _ = tree_run
    ens = load_ensemble(os.path.join(root_dir, "ensemble"))
    lo_hi = {p: ens.tree.interval(p) for p in ("0", "1")}
    assert lo_hi["0"] == (0.0, pytest.approx(np.exp(-1.2))) and lo_hi["1"][1] == np.inf
    for path, (lo, hi) in lo_hi.items():
        scalars = read_scalars(os.path.join(root_dir, path, "tb"))
        lows, highs = scalars["train/sigma_min"], scalars["train/sigma_max"]
        assert len(lows) == 3 and len(highs) == 3  # one per step (log_every = 1)
        assert min(v for _, v in lows) >= lo and max(v for _, v in highs) < hi, path
    # The root drew σ on both sides of the split.
    root = read_scalars(os.path.join(root_dir, "root", "tb"))
    assert min(v for _, v in root["train/sigma_min"]) < np.exp(-1.2) < max(v for _, v in root["train/sigma_max"])
    # A child's initial parameters are the parent's EMA parameters, bit for bit.
    parent = load_ensemble(os.path.join(root_dir, "root"))
    c = config.copy_and_resolve_references()
    c.expert.update(dict(node="0", parent=os.path.join(root_dir, "root")))
    init = params_from_parent(c, c.expert.parent, parent.params)
    for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(parent.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # ... and the children trained away from it; the parent's files were never written after it finished.
    assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0
               for a, b in zip(jax.tree.leaves(ens.experts[0]), jax.tree.leaves(parent.params)))
    assert max(_mtimes(os.path.join(root_dir, "root", "checkpoints"))) <= min(
        _mtimes(os.path.join(root_dir, "0", "checkpoints")))


def test_driver_rerun_is_a_noop(tree_run):
    config, root_dir, out = tree_run
    before = {d: _mtimes(os.path.join(root_dir, d)) for d in ("root", "0", "1", "ensemble")}
    assert train_expert_tree(config, root_dir, child_steps=3) == out
    assert {d: _mtimes(os.path.join(root_dir, d)) for d in before} == before


def test_identical_experts_sample_bitwise_like_the_single_model(tree_run, tmp_path):
    _, root_dir, _ = tree_run
    single = load_ensemble(os.path.join(root_dir, "root"))
    assert single.tree.leaf_paths == ("",) and len(single.experts) == 1
    two = load_ensemble(save_ensemble(str(tmp_path / "same"), single.config, single.encoders,
                                      load_ensemble(os.path.join(root_dir, "ensemble")).tree,
                                      [single.params, single.params], [4, 4], ["a", "b"]))
    assert two.tree.leaf_paths == ("0", "1")
    np.testing.assert_array_equal(two.generate(PROMPTS, seed=1), single.generate(PROMPTS, seed=1))


def test_each_expert_runs_on_its_own_evaluations(tree_run):
    """The segmented ensemble sampler equals a reference that evaluates both experts at every σ and picks
    the owner's output; it differs from either expert alone."""
    _, root_dir, out = tree_run
    ens = load_ensemble(out)
    heun = HeunConfig(num_steps=8, s_churn=2.0)
    emb = ens.encoders.encode_prompts(PROMPTS)
    noise = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    key, s = jax.random.PRNGKey(1), jnp.float32(2.0)
    got = make_sampler(ens.graphdef, heun, tree=ens.tree)(ens.experts, emb, noise, key, s, s)

    @jax.jit
    def reference(experts):
        dens = [guided_denoiser(nnx.merge(ens.graphdef, p), emb, s) for p in experts]

        def gathered(x, sigma):
            owner = ens.tree.route(sigma)[:, None, None, None]
            return jnp.where(owner == 0, dens[0](x, sigma), dens[1](x, sigma))

        return heun_sample(gathered, noise, heun, key)

    np.testing.assert_allclose(got, reference(ens.experts), atol=2e-5)
    single = make_sampler(ens.graphdef, heun)  # one compile for both experts
    for p in ens.experts:
        alone = single(p, emb, noise, key, s, s)
        assert float(jnp.abs(alone - got).max()) > 1e-4


def test_bad_expert_setups_are_one_clear_error(tree_run, tmp_path):
    config, root_dir, _ = tree_run
    c = config.copy_and_resolve_references()
    c.expert.node = "01"
    with pytest.raises(ValueError, match=r"expert.node='01' is not a node of expert.layout='2'"):
        train(c, str(tmp_path / "a"))
    c.expert.node = "0"
    with pytest.raises(ValueError, match="expert.node='0' needs expert.parent"):
        train(c, str(tmp_path / "b"))
    c.expert.parent = os.path.join(root_dir, "1")
    with pytest.raises(ValueError, match="trained node '1', but node '0' starts from node ''"):
        train(c, str(tmp_path / "c"))
    c.expert.parent = os.path.join(root_dir, "root")
    c.model.channels = 32
    with pytest.raises(ValueError, match=r"holds a checkpoint of another model: model.channels=16 there, 32"):
        train(c, str(tmp_path / "d"))
    assert not os.listdir(tmp_path)  # nothing was written for refused runs
    c = config.copy_and_resolve_references()
    c.expert.layout = "0,01"
    with pytest.raises(ValueError, match="expert.layout='0,01'"):
        train(c, str(tmp_path / "e"))
    with pytest.raises(ValueError, match=r"runs are missing \['1'\]"):
        assemble_ensemble(str(tmp_path / "f"), {"0": os.path.join(root_dir, "0")})
    with pytest.raises(ValueError, match="trained expert node '1', not leaf '0'"):
        assemble_ensemble(str(tmp_path / "g"), {"0": os.path.join(root_dir, "1"), "1": os.path.join(root_dir, "1")})
