"""Shared pytest set-up: persistent XLA compilation cache so repeated runs compile once."""

import os

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
from multidevice import Lane, apply_test_xla_flags  # noqa: E402

apply_test_xla_flags(os.environ)  # before anything imports jax (see multidevice.TEST_XLA_FLAGS)


def micro_config(data_dir: str):
    """The smallest config that still exercises every part of the base model (16×16, one attention level)."""
    from ediffi_jax.config import tiny_config

    c = tiny_config()
    c.model.update(dict(image_size=16, channels=16, channel_mult=(1, 2), attn_resolutions=(8,),
                        cross_attn_resolutions=(8,), head_dim=16, num_groups=4, context_dim=32, pooled_dim=32))
    c.conditioning.embeddings.t5.dim = 32
    c.conditioning.embeddings.clip_text.update(dict(dim=32, pooled_dim=16))
    c.conditioning.embeddings.clip_image.update(dict(dim=16, pooled_dim=16))
    c.encoders.t5.update(dict(max_length=20, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    c.encoders.clip.max_length = 20
    c.encoders.clip.text.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, projection_dim=16))
    c.encoders.clip.vision.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, image_size=16, patch_size=4, projection_dim=16))
    c.data.update(dict(resolution=16, num_train=512, num_val=16, data_dir=data_dir))
    c.optim.update(dict(lr=2e-3, warmup_steps=20))
    c.train.update(dict(batch_size=8, num_steps=300, log_every=25, ckpt_every=100, eval_num=8))
    c.sample.update(dict(num_steps=6))
    return c


def one_level_config(data_dir: str, **train):
    """micro_config with a one-level U-Net (cross-attention at 16², no resampling; compiles in half the time),
    64 training examples, no validation; `train` overrides config.train (default: every step logged, no
    evaluation). Every test that trains small runs uses this model, optimizer and batch, so they all share one
    compiled train step through the persistent compilation cache (an expert's σ interval is an operand)."""
    c = micro_config(data_dir)
    c.data.update(dict(num_train=64, num_val=0))
    c.model.update(dict(channel_mult=(1,), attn_resolutions=(), cross_attn_resolutions=(16,)))
    c.train.update({"log_every": 1, "eval_num": 0, **train})
    return c


CONFIG_FILE = """import sys
sys.path.insert(0, {tests!r})
from conftest import one_level_config


def get_config():
    return one_level_config({data_dir!r}, **{train!r})
"""


def write_config_file(path, data_dir: str, **train) -> str:
    """A config file of `one_level_config(data_dir, **train)` for ediffi-train and other subprocesses."""
    with open(path, "w") as f:
        f.write(CONFIG_FILE.format(tests=os.path.dirname(os.path.abspath(__file__)), data_dir=data_dir, train=train))
    return str(path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir):
    """A run of the one-level micro model trained once for the whole session: (config, workdir, final metrics).
    Its compiled step serves the other tests' runs too (the demo-asset test trains the multi-level tiny model)."""
    from ediffi_jax.train.loop import train

    # 160 steps: enough to read the text; cheap. 16 validation captions, 8 sampled at the end. The 64 training
    # captions give the tokenizers, so the encoders, so the compiled step, of the other tests' runs.
    config = one_level_config(data_dir, num_steps=160, log_every=20, ckpt_every=80, eval_num=8)
    config.data.num_val = 16
    workdir = str(tmp_path_factory.mktemp("run"))
    metrics = train(config, workdir)
    return config, workdir, metrics


def pytest_collection_modifyitems(session, config, items):
    """Modules with background runs (BACKGROUND, see `lane`) run last, in their order: their runs then have the
    rest of the session to finish on the spare core."""
    items.sort(key=lambda item: hasattr(getattr(item, "module", None), "BACKGROUND"))  # stable


@pytest.fixture(scope="session", autouse=True)
def lane(request, tmp_path_factory):
    """The background runs of the selected test modules (tests/multidevice.py), started at the beginning of the
    session: a module lists them as BACKGROUND = {name: start(directory) -> Background}, and its tests read them
    with `lane[name].result()`. The lane takes them in the order of the modules."""
    lane = Lane(tmp_path_factory.mktemp)
    modules = []
    for item in request.session.items:
        module = getattr(item, "module", None)
        if module is not None and module not in modules:
            modules.append(module)
    for module in modules:
        for name, start in getattr(module, "BACKGROUND", {}).items():
            lane.add(name, start)
    lane.start()
    yield lane
    lane.close()


# EDIFFI_TEST_COMPILE_REPORT=1: in-process seconds of tracing, lowering and XLA compiling per test (fixtures
# included), the 20 costliest printed at the end; the suite is compile-bound, this says where to trim.
_COMPILE = {"current": "(collection)", "by_test": {}}
if os.environ.get("EDIFFI_TEST_COMPILE_REPORT") == "1":
    import jax.monitoring

    def _on_duration(event: str, seconds: float, **_) -> None:
        if event.startswith("/jax/core/compile/") or event.startswith("/jax/compilation_cache/"):
            per = _COMPILE["by_test"].setdefault(_COMPILE["current"], {})
            key = event.rsplit("/", 1)[-1]
            per[key] = per.get(key, 0.0) + seconds

    jax.monitoring.register_event_duration_secs_listener(_on_duration)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _COMPILE["current"] = item.nodeid
    try:
        return (yield)
    finally:
        _COMPILE["current"] = "(between tests)"


def pytest_terminal_summary(terminalreporter):
    by_test = _COMPILE["by_test"]
    if not by_test:
        return
    total = {}
    for per in by_test.values():
        for k, v in per.items():
            total[k] = total.get(k, 0.0) + v
    terminalreporter.write_line("in-process compile seconds, all tests: " + ", ".join(
        f"{k} {v:.1f}" for k, v in sorted(total.items(), key=lambda kv: -kv[1])))
    key = "backend_compile_duration"
    for nodeid, per in sorted(by_test.items(), key=lambda kv: -sum(kv[1].values()))[:20]:
        terminalreporter.write_line(f"  {sum(per.values()):6.1f} s (XLA {per.get(key, 0.0):5.1f})  {nodeid}")
