"""Shared CLI plumbing: absl flag parsing with one-line errors for bad input."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Sequence

import ml_collections
from absl import flags


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Imports a config file and returns its `get_config()` (no overrides)."""
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location("_ediffi_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} defines no get_config()")
    return module.get_config()


def check_overrides(argv: Sequence[str], flag: str = "config") -> None:
    """Raises one clear line for a `--config.a.b=v` whose key the config file does not define."""
    path = None
    for i, a in enumerate(argv):
        if a == f"--{flag}" and i + 1 < len(argv):
            path = argv[i + 1]
        elif a.startswith(f"--{flag}="):
            path = a.split("=", 1)[1]
    if path is None:
        return
    config = load_config_file(path)
    for a in argv:
        if not a.startswith(f"--{flag}."):
            continue
        dotted = a[len(f"--{flag}."):].split("=", 1)[0]
        node = config
        for part in dotted.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ValueError(f"unknown config key {flag}.{dotted} (not defined in {path})")
            node = node[part]


def quiet_logs(level: int = logging.INFO) -> None:
    """Our logs at `level`; JAX's backend probing and Orbax's per-save chatter only from WARNING up."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    for name in ("absl", "jax", "jax._src.xla_bridge", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_main(main: Callable[[list[str]], None], argv: Sequence[str], required: Sequence[str] = ()) -> None:
    """Parses flags and runs `main`. Bad flags, bad config overrides and the ValueErrors our code raises for
    bad input exit with status 2 and one line on stderr (set EDIFFI_DEBUG=1 for the traceback)."""
    prog = os.path.basename(argv[0])
    try:
        check_overrides(argv)
        rest = flags.FLAGS(list(argv))
        for name in required:
            if getattr(flags.FLAGS, name) is None:
                raise ValueError(f"--{name} is required")
        main(rest)
    except (flags.Error, ValueError, FileNotFoundError) as e:
        if os.environ.get("EDIFFI_DEBUG"):
            raise
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)


def _one_line(e: BaseException) -> str:
    msg = [line for line in str(e).strip().splitlines() if line.strip()]
    return msg[0] if msg else type(e).__name__
