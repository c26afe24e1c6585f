"""Shared test helpers: :mod:`.core` (tiny models, explicit brute-force references for msif_core) and
:mod:`.pipeline` (tiny worlds, experiment files and event-log readers for the Dagster layer)."""
