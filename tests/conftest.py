"""Test layout: ``tests/<package>/`` mirrors the packages (``core`` → msif_core, ``assets`` → msif_assets,
``demo`` → msif_demo, ``app`` → dagster_project and the README); shared helpers are the ``helpers``
package (``tests`` is on the path through ``pythonpath`` in pyproject.toml)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded in a test
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
