"""The pipeline the way a deployment runs it: ``dagster-daemon`` in a subprocess on the instance ``msif run``
wrote to (the instance settings of ``dagster_project/dagster.yaml``: run queue, pools), with the code
location of ``deploy/workspace.yaml``. A new fine-tuned checkpoint is noticed by the source sensor, the
automation sensor requests what depends on it, the run queue launches the runs, and the event log shows
the fine-tune side, the scores of every shard and the reports re-materialised, nothing of the corpus side,
every run successful.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from helpers.pipeline import build_world, latest_storage_id, materializations_since, perturb_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SHARDS = ["shard_00000", "shard_00001"]
EXPECTED = {("finetune_factors", None), ("query_ihvps", None), ("score_tables", None), ("attribution_report", None),
            ("attribution_quality", None)} | {("influence_scores", s) for s in SHARDS}
CORPUS_SIDE = {"corpus_shards", "corpus_embeddings", "candidates", "pretrain_covariance_sums", "pretrain_eigenbasis",
               "pretrain_lambda_sums", "pretrain_factors"}
DEADLINE_S = 420


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


@pytest.mark.slow
def test_daemon_reattributes_a_new_finetuned_checkpoint(tmp_path: Path) -> None:
    toml = build_world(tmp_path, n_docs=20, shard_size=10, candidates=4, methods=("ms_if", "bm25"))
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster_project" / "dagster.yaml", home / "dagster.yaml")
    env = dict(os.environ, DAGSTER_HOME=str(home), MSIF_CONFIG=str(toml), MSIF_DEVICE="cpu",
               MSIF_SENSOR_INTERVAL_S="2", MSIF_AUTOMATION_INTERVAL_S="2", PYTHONUNBUFFERED="1")
    first = subprocess.run([_bin("msif"), "run", str(toml)], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr

    with dg.DagsterInstance.from_config(str(home)) as instance:
        mark = latest_storage_id(instance)
        runs_before = {r.run_id for r in instance.get_runs()}
        perturb_checkpoint(tmp_path / "ckpt" / "pretrained", tmp_path / "ckpt" / "finetuned", seed=7)
        log = (tmp_path / "daemon.log").open("w")
        daemon = subprocess.Popen([_bin("dagster-daemon"), "run", "-w", str(ROOT / "deploy" / "workspace.yaml")],
                                  env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            t0 = time.monotonic()
            while time.monotonic() - t0 < DEADLINE_S:
                time.sleep(5)
                assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-4000:]
                runs = [r for r in instance.get_runs() if r.run_id not in runs_before]
                done = materializations_since(instance, mark)
                if EXPECTED <= done and runs and all(r.is_finished for r in runs):
                    break
        finally:
            daemon.terminate()
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:  # pragma: no cover - a daemon that ignores SIGTERM
                daemon.kill()
            log.close()
        tail = (tmp_path / "daemon.log").read_text()[-4000:]
        runs = [r for r in instance.get_runs() if r.run_id not in runs_before]
        done = materializations_since(instance, mark)
        assert done == EXPECTED, (sorted(done), tail)
        assert not {a for a, _ in done} & CORPUS_SIDE
        assert runs and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), \
            ([(r.run_id, r.status) for r in runs], tail)
        # the runs were the daemon's: the automation sensor's requests, launched from the run queue
        assert all(r.tags.get("dagster/from_automation_condition") or r.tags.get("dagster/sensor_name")
                   for r in runs), [r.tags for r in runs]
