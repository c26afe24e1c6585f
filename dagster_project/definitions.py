"""Dagster definitions of the msif pipeline: ``dagster dev -m dagster_project.definitions`` (``make ui``).

Importing this module does nothing: Dagster calls :func:`defs` when it loads the code location. The
experiment comes from ``$MSIF_CONFIG`` (a TOML file, see :mod:`msif_assets.config`); without it, the
built-in demo world under ``./lakehouse/demo`` (built then if absent: a minute or two).
``MSIF_DEVICE``, ``MSIF_DTYPE`` and ``MSIF_EMBEDDER`` override the device and embedder resources.

Materialise everything once (the UI's "Materialize all", or ``msif run``); after that the source
sensor and the automation conditions keep it up to date.
"""

from __future__ import annotations

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    """The experiment's assets, checks, sensors and resources (the demo world built first if needed)."""
    import logging

    from msif_assets.build import build_definitions
    from msif_assets.preflight import preflight

    from .demo import ensure_demo_world, load_experiment

    cfg = load_experiment(check_files=False)
    ensure_demo_world(cfg)
    for note in preflight(cfg):  # every input check that needs no model, before any run
        logging.getLogger("msif_assets").warning(note)
    return build_definitions(cfg)
