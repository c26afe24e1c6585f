"""``build_definitions(cfg)``: every asset, check, sensor and resource of one experiment."""

from __future__ import annotations

import os

import dagster as dg

from .assets import build_assets
from .checks import build_checks
from .config import ExperimentConfig
from .resources import DeviceResource, EmbedderResource, LakehouseResource
from .sources import build_source_assets, build_source_sensor


def _interval(name: str, default: int) -> int:
    v = os.environ.get(name, "")
    if not v:
        return default
    if not v.isdigit() or int(v) < 1:
        raise ValueError(f"{name} must be a whole number of seconds >= 1, got {v!r}")
    return int(v)


def build_definitions(cfg: ExperimentConfig, device: DeviceResource | None = None,
                      embedder: EmbedderResource | None = None, sensor_interval_s: int | None = None,
                      automation_interval_s: int | None = None,
                      executor: dg.ExecutorDefinition | None = None) -> dg.Definitions:
    """All assets, checks, the source sensor and the resources of one experiment.

    ``MSIF_DEVICE`` (auto|cpu|cuda|cuda:N), ``MSIF_DTYPE`` and ``MSIF_EMBEDDER`` override the default
    device and embedder resources; ``MSIF_SENSOR_INTERVAL_S`` (default 60) and ``MSIF_AUTOMATION_INTERVAL_S``
    (default 30) how often the daemon observes the sources and evaluates the automation conditions.

    The steps that run models are in the pool ``msif_accelerator`` (capped by the instance's
    ``concurrency: pools:``, one at a time by default) unless the device resolves to the CPU.

    ``executor``: how a run executes its steps; default Dagster's in-process executor: a run (of the UI, the
    daemon) is already a process of its own, and its steps share the models it loaded, where a process per
    step would import torch and load them again for each (``msif run --workers N`` runs whole runs in worker
    processes instead, :mod:`msif_assets.jobs`).
    """
    sensor_interval_s = sensor_interval_s or _interval("MSIF_SENSOR_INTERVAL_S", 60)
    automation_interval_s = automation_interval_s or _interval("MSIF_AUTOMATION_INTERVAL_S", 30)
    device = device or DeviceResource(device=os.environ.get("MSIF_DEVICE", "auto"),
                                      dtype=os.environ.get("MSIF_DTYPE", "float32"))
    embedder = embedder or EmbedderResource(model=os.environ.get("MSIF_EMBEDDER", ""))
    # the pool caps steps that share an accelerator; on a CPU-only device there is none to share
    assets = build_assets(cfg, embedder.model_name, accelerator_pool=device.torch_device() != "cpu")
    checks = build_checks(cfg, {a.key.to_user_string() for a in assets})
    return dg.Definitions(
        assets=[*build_source_assets(cfg), *assets],
        asset_checks=checks,
        sensors=[build_source_sensor(cfg, sensor_interval_s),
                 dg.AutomationConditionSensorDefinition(
                     "msif_automation", target=dg.AssetSelection.all(), default_status=dg.DefaultSensorStatus.RUNNING,
                     minimum_interval_seconds=automation_interval_s,
                     description="Evaluates the assets' automation conditions (what became stale).")],
        resources={"lakehouse": LakehouseResource(root=str(cfg.root)), "device": device, "embedder": embedder},
        executor=executor or dg.in_process_executor,
    )
