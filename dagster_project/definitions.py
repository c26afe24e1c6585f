"""Dagster definitions of the msif pipeline: ``dagster dev -m dagster_project.definitions`` (``make ui``).

The experiment comes from ``$MSIF_CONFIG`` (a TOML file, see :mod:`dagster_project.config`); without
it, the built-in demo world under ``./lakehouse/demo`` (built on first load if absent: a few minutes).
``MSIF_DEVICE``, ``MSIF_DTYPE`` and ``MSIF_EMBEDDER`` override the device and embedder resources.

Materialise everything once (the UI's "Materialize all", or ``msif run``); after that the source
sensor and the automation conditions keep it up to date.
"""

from __future__ import annotations

from dagster_project.config import check_inputs, ensure_demo_world, load_config
from msif_assets.build import build_definitions

_cfg = load_config(check_files=False)
ensure_demo_world(_cfg)
check_inputs(_cfg)

defs = build_definitions(_cfg)
