"""``build_definitions(cfg)``: every asset, check, sensor and resource of one experiment."""

from __future__ import annotations

import os

import dagster as dg

from .assets import build_assets
from .checks import build_checks
from .config import ExperimentConfig
from .resources import DeviceResource, EmbedderResource, LakehouseResource
from .sources import build_source_assets, build_source_sensor


def build_definitions(cfg: ExperimentConfig, device: DeviceResource | None = None,
                      embedder: EmbedderResource | None = None, sensor_interval_s: int = 60) -> dg.Definitions:
    """All assets, checks, the source sensor and the resources of one experiment.

    ``MSIF_DEVICE`` (auto|cpu|cuda|cuda:N), ``MSIF_DTYPE`` and ``MSIF_EMBEDDER`` override the default
    device and embedder resources.
    """
    device = device or DeviceResource(device=os.environ.get("MSIF_DEVICE", "auto"),
                                      dtype=os.environ.get("MSIF_DTYPE", "float32"))
    embedder = embedder or EmbedderResource(model=os.environ.get("MSIF_EMBEDDER", ""))
    assets = build_assets(cfg, embedder.model_name)
    checks = build_checks(cfg, {a.key.to_user_string() for a in assets})
    return dg.Definitions(
        assets=[*build_source_assets(cfg), *assets],
        asset_checks=checks,
        sensors=[build_source_sensor(cfg, sensor_interval_s),
                 dg.AutomationConditionSensorDefinition(
                     "msif_automation", target=dg.AssetSelection.all(), default_status=dg.DefaultSensorStatus.RUNNING,
                     minimum_interval_seconds=30,
                     description="Evaluates the assets' automation conditions (what became stale).")],
        resources={"lakehouse": LakehouseResource(root=str(cfg.root)), "device": device, "embedder": embedder},
    )
