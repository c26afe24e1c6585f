"""The app's built-in demo: ``demo.toml`` with its paths under ``./lakehouse/demo``, where the demo world
(:mod:`msif_demo`: data and two trained checkpoints) is built on first use; and :func:`load_experiment`,
which is what ``msif`` and the Dagster definitions load: the experiment file given, else
``$MSIF_CONFIG``, else the demo."""

from __future__ import annotations

import os
from pathlib import Path

from msif_assets.config import ENV_VAR, ExperimentConfig, load_config, load_toml

DEMO_ROOT = Path("lakehouse") / "demo"
DEMO_TOML = Path(__file__).with_name("demo.toml")


def demo_config(root: str | Path | None = None, check_files: bool = False) -> ExperimentConfig:
    """The demo experiment: ``dagster_project/demo.toml`` with its paths under ``root`` (./lakehouse/demo).

    The demo world itself is built by :func:`ensure_demo_world` on first use.
    """
    root = Path(root) if root is not None else Path.cwd() / DEMO_ROOT
    return load_toml(DEMO_TOML, root, check_files=check_files, is_demo=True)


def load_experiment(path: str | Path | None = None, check_files: bool = True) -> ExperimentConfig:
    """The experiment at ``path``, else at ``$MSIF_CONFIG``, else the built-in demo."""
    if path is None and not os.environ.get(ENV_VAR):
        return demo_config(check_files=check_files)
    return load_config(path, check_files=check_files)


def ensure_demo_world(cfg: ExperimentConfig) -> None:
    """Build the demo world under ``cfg.root`` unless an identical build is already there
    (:func:`msif_demo.build_demo` checks; the first build takes a minute or two). No-op for other
    experiments."""
    if not cfg.is_demo:
        return
    from msif_demo import build_demo

    build_demo(cfg.root)
