"""The one gap in Dagster's public API that msif works around, and how.

msif records the content hash of each checkpoint and data set as the *data version* of an observation
(so that automation conditions see exactly what changed) from ``msif run`` and from its source sensor,
outside an observable source's own run. Dagster's public API records such observations
(``AssetObservation(tags=...)``, ``SensorResult(asset_events=...)``) but exports no name for the tag
that carries the version nor a reader of it; the tag's value is the stable ``"dagster/data_version"``,
which Dagster itself writes for observable sources. This module names it and reads it back through the
public ``DagsterInstance.fetch_observations``.
"""

from __future__ import annotations

import dagster as dg

DATA_VERSION_TAG = "dagster/data_version"


def observation(key: dg.AssetKey, version: str, partition: str | None = None) -> dg.AssetObservation:
    """An observation of ``key`` (or one of its partitions) that records data version ``version``."""
    return dg.AssetObservation(asset_key=key, partition=partition, tags={DATA_VERSION_TAG: version},
                               metadata={"content_hash": version})


def latest_data_version(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None) -> str | None:
    """The data version of the newest observation of ``key`` (of ``partition``), or None."""
    flt = dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition is not None else None)
    recs = instance.fetch_observations(flt, limit=1, ascending=False).records
    if not recs:
        return None
    obs = recs[0].asset_observation
    return (obs.tags or {}).get(DATA_VERSION_TAG) if obs is not None else None
