"""Nothing lost without a word (issue: outputs checked, one run per lakehouse, failures named once, inputs
checked first). Each case runs `msif run` (in-process, through the CLI) on a tiny world:

- a deleted or truncated score table, a truncated factor file or deleted embeddings is noticed, named
  and recomputed (never "up to date"), and the tables come back identical;
- two `msif run` at once on one lakehouse: the second waits with a message, the tables are whole;
- a runtime failure is reported once, everything downstream of it is skipped in one line, the summary
  says it shows earlier results, and the next run redoes only that;
- bad inputs (weights that disagree with config.json, no weights, an invalid JSON line, duplicate
  query_ids, an empty corpus) fail before any asset runs; an empty completion is a named warning.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from helpers.pipeline import build_world

from dagster_project import cli
from msif_assets.layout import Layout

METHODS = ("ms_if", "gdp", "bm25")


def _run(toml: Path, capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, str, str]:
    rc = cli.main(["run", str(toml), *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _tables(root: Path) -> pd.DataFrame:
    files = sorted((root / "tables" / "influence_scores").glob("*.parquet"))
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    return df.sort_values(["query_id", "method", "doc_id"]).reset_index(drop=True)


def _instance(root: Path) -> dg.DagsterInstance:
    return dg.DagsterInstance.local_temp(tempdir=str(root / "lakehouse" / ".dagster"))


def _materialized(root: Path) -> list[str]:
    home = root / "lakehouse" / ".dagster"
    if not home.exists():
        return []
    with _instance(root) as inst:
        recs = inst.get_event_records(dg.EventRecordsFilter(event_type=dg.DagsterEventType.ASSET_MATERIALIZATION),
                                      limit=10_000)
    return [r.event_log_entry.asset_materialization.asset_key.to_user_string() for r in recs]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("reliable")
    toml = build_world(root, n_docs=32, shard_size=16, candidates=6, methods=METHODS)
    pristine = tmp_path_factory.mktemp("pristine")
    shutil.copytree(root, pristine, dirs_exist_ok=True)  # the world before any run, for the concurrent test
    assert cli.main(["run", str(toml)]) == 0
    return root, toml, _tables(root / "lakehouse"), pristine


def test_deleted_and_truncated_outputs_are_recomputed(world, capsys: pytest.CaptureFixture) -> None:
    root, toml, before, _ = world
    lay = Layout(root / "lakehouse")
    capsys.readouterr()
    # a deleted score table
    lay.scores("shard_00000").unlink()
    rc, out, _ = _run(toml, capsys)
    assert rc == 0 and "everything was up to date" not in out
    assert f"stale influence_scores [shard_00000]: {lay.scores('shard_00000')} is missing" in out
    pd.testing.assert_frame_equal(_tables(lay.root), before)
    # a truncated score table: named by its size, recomputed
    p = lay.scores("shard_00001")
    p.write_bytes(p.read_bytes()[:200])
    rc, out, _ = _run(toml, capsys)
    assert rc == 0 and f"stale influence_scores [shard_00001]: {p} was changed (200 bytes now" in out
    pd.testing.assert_frame_equal(_tables(lay.root), before)
    # a truncated factor file and deleted embeddings: their assets, then what depends on them
    f = lay.pretrain_factors / "factors.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    shutil.rmtree(lay.lancedb / f"{lay.embedding_table('shard_00001')}.lance")
    rc, out, _ = _run(toml, capsys)
    assert rc == 0
    assert "stale pretrain_factors" in out and "factors.safetensors was changed" in out
    assert "stale corpus_embeddings [shard_00001]" in out and "is missing" in out
    assert "ok   pretrain_factors" in out and "corpus_embeddings [shard_00001]" in out
    pd.testing.assert_frame_equal(_tables(lay.root), before, check_exact=False, rtol=1e-6)
    # a damaged DuckDB file: rebuilt (and a reader names it)
    from msif_assets.io import CorruptTableError
    from msif_assets.views import connect

    lay.database.write_bytes(b"not a database" * 100)
    with pytest.raises(CorruptTableError, match="not a readable DuckDB database"):
        connect(lay)
    rc, out, _ = _run(toml, capsys)
    assert rc == 0 and "stale score_tables" in out and "Top documents by ms_if" in out
    # and now it is up to date again
    rc, out, _ = _run(toml, capsys)
    assert rc == 0 and "everything was up to date" in out and "stale" not in out


def test_outputs_intact_check_and_reader_errors(world) -> None:
    from msif_assets.checks import outputs_problems
    from msif_core.ekfac import Factors, UnreadableFileError

    root, toml, _, _ = world
    lay = Layout(root / "lakehouse")
    from msif_assets.config import load_config

    cfg = load_config(toml)
    names = {"influence_scores", "pretrain_factors", "score_tables"}
    with _instance(root) as inst:
        assert outputs_problems(inst, cfg, names) == {}
        backup = lay.pretrain_factors.parent / "backup"
        shutil.copytree(lay.pretrain_factors, backup)
        f = lay.pretrain_factors / "factors.safetensors"
        f.write_bytes(f.read_bytes()[:100])
        probs = outputs_problems(inst, cfg, names)
        assert list(probs) == [(dg.AssetKey("pretrain_factors"), None)] and str(f) in probs[list(probs)[0]]
        with pytest.raises(UnreadableFileError, match=str(f)):
            Factors.load(lay.pretrain_factors)
        shutil.rmtree(lay.pretrain_factors)
        shutil.move(backup, lay.pretrain_factors)
        assert outputs_problems(inst, cfg, names) == {}


def _fail_finetune_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    import msif_core.api

    def boom(*a, **k):
        raise RuntimeError("the fine-tune fit broke here")

    monkeypatch.setattr(msif_core.api, "fit_stage_factors", boom)


def test_failure_reported_once_everything_downstream_skipped(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    toml = build_world(tmp_path, n_docs=20, shard_size=16, candidates=4, methods=METHODS)
    _fail_finetune_fit(monkeypatch)
    rc, out, err = _run(toml, capsys)
    assert rc == 1
    assert out.count("FAIL") == 1 and "FAIL finetune_factors" in out
    assert (out + err).count("the fine-tune fit broke here") == 1  # the error, once, at its root
    skipped = [line for line in out.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and "downstream of the failure" in skipped[0]
    for name in ("query_ihvps", "influence_scores [shard_00000]", "influence_scores [shard_00001]", "score_tables",
                 "attribution_report", "attribution_quality"):  # every level below the failure
        assert name in skipped[0], name
    assert "ok   pretrain_factors" in out  # what does not depend on it still ran
    assert "EARLIER" not in out and "no results to show" in err and "failed: finetune_factors" in err
    monkeypatch.undo()
    rc, out, _ = _run(toml, capsys)
    assert rc == 0 and "ok   finetune_factors" in out and "corpus_shards" not in out


def test_after_a_failure_earlier_results_are_labelled(world, capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    root, toml, before, _ = world
    ft = root / "data" / "finetune.jsonl"
    original = ft.read_text()
    ft.write_text(original + json.dumps({"prompt": "Question: Where was Ada born ? Answer:", "completion": " Oslo"})
                  + "\n")
    _fail_finetune_fit(monkeypatch)
    capsys.readouterr()
    rc, out, err = _run(toml, capsys)
    assert rc == 1 and out.count("FAIL") == 1 and "results below are those of an EARLIER run" in out
    assert "Top documents by ms_if" in out
    # the fix: the next run redoes the failed step and what depends on it, nothing else
    monkeypatch.undo()
    ft.write_text(original)
    rc, out, _ = _run(toml, capsys)
    assert rc == 0 and "ok   finetune_factors" in out and "corpus_shards" not in out
    pd.testing.assert_frame_equal(_tables(root / "lakehouse"), before, check_exact=False, rtol=1e-6)


def test_two_runs_at_once_wait_and_leave_whole_tables(world) -> None:
    _, _, before, pristine = world
    toml = pristine / "experiment.toml"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    msif = Path(sys.executable).with_name("msif")
    procs = [subprocess.Popen([str(msif), "run", str(toml)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    waited = [o for o in outs if "is in use by pid" in o and "waiting for it to finish" in o]
    assert len(waited) == 1, outs
    assert "everything was up to date" in waited[0]  # it found the other's complete work
    pd.testing.assert_frame_equal(_tables(pristine / "lakehouse"), before, check_exact=False, rtol=1e-6)
    # refusing instead of waiting
    from msif_assets.lock import acquire, release

    acquire(pristine / "lakehouse")
    try:
        r = subprocess.run([str(msif), "run", str(toml), "--no-wait"], capture_output=True, text=True, env=env,
                           timeout=300)
    finally:
        release(pristine / "lakehouse")
    assert r.returncode == 3 and "is in use by pid" in r.stderr


@pytest.fixture
def fresh(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path, build_world(tmp_path, n_docs=20, shard_size=16, candidates=4, methods=METHODS)


def _config_error(toml: Path, capsys: pytest.CaptureFixture) -> str:
    rc, out, err = _run(toml, capsys)
    assert rc == 2, (out, err)
    assert _materialized(toml.parent) == []  # nothing ran
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("msif: configuration error:"), err
    return err


def test_weights_that_disagree_with_config(fresh, capsys: pytest.CaptureFixture) -> None:
    root, toml = fresh
    cfg_path = root / "ckpt" / "finetuned" / "config.json"
    c = json.loads(cfg_path.read_text())
    c["intermediate_size"] *= 2
    cfg_path.write_text(json.dumps(c))
    err = _config_error(toml, capsys)
    assert f"[models] finetuned: {root / 'ckpt' / 'finetuned'}" in err and "disagree with config.json" in err
    assert "dense_h_to_4h" in err


@pytest.mark.parametrize("case, words", [
    ("no_weights", ["[models] pretrained", "no weights"]),
    ("bad_json_line", ["queries.jsonl line 3 is not valid JSON"]),
    ("duplicate_query_ids", ["query_id must be unique", "q1"]),
    ("empty_corpus", ["holds no documents"]),
    ("duplicate_doc_ids", ["doc_id must be unique", "d001"]),
    ("no_tokenizer", ["[models] finetuned", "no tokenizer files"]),
    ("no_tokenizer_json", ["[models] finetuned", "tokenizer cannot be loaded"]),
    ("null_doc_id", ["row(s) have no doc_id", "rows 4"]),
    ("null_text", ["row(s) have no text"]),
    ("bad_true_doc_ids", ["true_doc_ids must be a list of doc_id strings", "q1"]),
    ("non_utf8", ["queries.jsonl line 2 is not UTF-8"]),
    ("several", ["unknown key 'bogus'", "candidates must be >= 1"]),
])
def test_bad_inputs_fail_before_any_work(fresh, capsys: pytest.CaptureFixture, case: str, words: list[str]) -> None:
    root, toml = fresh
    q = root / "data" / "queries.jsonl"
    corpus = root / "data" / "corpus.parquet"
    if case == "no_weights":
        (root / "ckpt" / "pretrained" / "model.safetensors").unlink()
    elif case == "bad_json_line":
        lines = q.read_text().splitlines()
        q.write_text("\n".join(lines[:2] + ['{"query_id": "qx", "prompt": '] + lines[2:]) + "\n")
    elif case == "duplicate_query_ids":
        lines = q.read_text().splitlines()
        q.write_text("\n".join(lines + [lines[1]]) + "\n")
    elif case == "empty_corpus":
        pd.read_parquet(corpus).iloc[:0].to_parquet(corpus, index=False)
    elif case == "duplicate_doc_ids":
        df = pd.read_parquet(corpus)
        pd.concat([df, df.iloc[[1]]]).to_parquet(corpus, index=False)
    elif case == "no_tokenizer":
        for f in (root / "ckpt" / "finetuned").glob("tokenizer*"):
            f.unlink()
    elif case == "no_tokenizer_json":
        (root / "ckpt" / "finetuned" / "tokenizer.json").unlink()
    elif case in ("null_doc_id", "null_text"):
        df = pd.read_parquet(corpus)
        df.loc[3, "doc_id" if case == "null_doc_id" else "text"] = None
        df.to_parquet(corpus, index=False)
    elif case == "bad_true_doc_ids":
        rows = [json.loads(x) for x in q.read_text().splitlines()]
        rows[1]["true_doc_ids"] = "d003"
        q.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif case == "non_utf8":
        lines = q.read_bytes().splitlines()
        q.write_bytes(b"\n".join(lines[:1] + [lines[1].replace(b"Question", b"Qu\xe9stion")] + lines[2:]) + b"\n")
    elif case == "several":
        toml.write_text(toml.read_text().replace("[scores]\n", "[scores]\nbogus = 1\ncandidates = -1\n")
                        .replace("candidates = 4\n", ""))
    err = _config_error(toml, capsys)
    for w in words:
        assert w in err, (w, err)


def test_stray_files_and_a_moved_lakehouse(world, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A file left in a table folder is not read by the views; a lakehouse moved elsewhere rebuilds its
    DuckDB views (they name files by absolute path) and nothing else."""
    root, toml, before, _ = world
    lay = Layout(root / "lakehouse")
    stray = lay.scores("shard_00099")
    shutil.copy(lay.scores("shard_00000"), stray)
    try:
        capsys.readouterr()
        rc, out, _ = _run(toml, capsys)
        assert rc == 0
        import duckdb

        con = duckdb.connect(str(lay.database), read_only=True)
        n = con.execute("SELECT count(*) FROM influence_scores").fetchone()[0]
        con.close()
        assert n == len(before)
    finally:
        stray.unlink()
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    rc, out, _ = _run(moved / "experiment.toml", capsys)
    assert rc == 0 and "stale score_tables: it was written under" in out
    ran = [line.split()[1].rstrip(",") for line in out.splitlines() if line.startswith("  ok ")]
    assert ran and ran[0] == "score_tables" and set(ran) <= {"score_tables", "attribution_quality"}  # + reports
    assert str(moved / "lakehouse" / "tables") in (moved / "lakehouse" / "msif.duckdb").read_bytes().decode("latin-1")


def test_empty_completion_is_a_named_warning(fresh, capsys: pytest.CaptureFixture) -> None:
    root, toml = fresh
    q = root / "data" / "queries.jsonl"
    rows = [json.loads(x) for x in q.read_text().splitlines()]
    rows[2]["completion"] = ""
    q.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, _ = _run(toml, capsys)
    assert rc == 0
    assert f"note: [data] queries: 1 of {len(rows)} queries have an empty completion and will not be scored: " \
           f"{rows[2]['query_id']}" in out


def test_ui_opens_the_instance_msif_run_wrote_to(world, monkeypatch: pytest.MonkeyPatch) -> None:
    """`msif ui` (what `make ui` runs) starts `dagster dev` with DAGSTER_HOME on the instance `msif run`
    used: the UI's instance, opened as `dagster dev` opens it, holds the run's materialisations."""
    root, toml, _, _ = world
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    seen: dict = {}
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, env: seen.update(cmd=cmd, env=env) or 0)
    assert cli.main(["ui", str(toml)]) == 0
    assert seen["cmd"][1:] == ["dev", "-m", "dagster_project.definitions"]
    assert seen["env"]["MSIF_CONFIG"] == str(toml.resolve())
    assert Path(seen["env"]["DAGSTER_HOME"]) == root / "lakehouse" / ".dagster"
    monkeypatch.setenv("DAGSTER_HOME", seen["env"]["DAGSTER_HOME"])
    with dg.DagsterInstance.get() as inst:  # how dagster dev and the daemon open DAGSTER_HOME
        recs = inst.get_event_records(dg.EventRecordsFilter(event_type=dg.DagsterEventType.ASSET_MATERIALIZATION),
                                      limit=10_000)
    keys = {r.event_log_entry.asset_materialization.asset_key.to_user_string() for r in recs}
    assert {"influence_scores", "score_tables", "attribution_report"} <= keys
    assert sorted(keys) == sorted(set(_materialized(root)))


def test_preflight_remembers_a_clean_check_until_an_input_changes(fresh, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each Dagster run process loads the definitions and with them the input checks: a passed check is
    remembered for the same settings and input files (sizes, modification times); a changed input file is
    read again, and its problem found."""
    from msif_assets import preflight as pf
    from msif_assets.config import ConfigError, load_config

    root, toml = fresh
    cfg = load_config(toml)
    (root / "lakehouse").mkdir(exist_ok=True)
    first = pf.preflight(cfg)
    calls = []
    real = pf.check_data
    monkeypatch.setattr(pf, "check_data", lambda c: calls.append(1) or real(c))
    assert pf.preflight(cfg) == first and calls == []  # remembered: nothing read
    q = root / "data" / "queries.jsonl"
    q.write_text(q.read_text() + "{not json\n")
    with pytest.raises(ConfigError, match="queries"):
        pf.preflight(cfg)
    assert calls == [1]


def test_preflight_rechecks_only_the_checkpoint_that_changed(fresh, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new fine-tune changes the fine-tuned folder only: the pre-trained checkpoint, which passed before with
    the same files, is not checked again (its meta-device build and tokenizer load take seconds), the
    fine-tuned one is, and a problem in it is still found."""
    import msif_core.checkpoints as ck
    from msif_assets import preflight as pf
    from msif_assets.config import ConfigError, load_config

    root, toml = fresh
    cfg = load_config(toml)
    (root / "lakehouse").mkdir(exist_ok=True)
    first = pf.preflight(cfg)
    checked: list[str] = []
    real = ck.checkpoint_problems
    monkeypatch.setattr(ck, "checkpoint_problems", lambda p, **kw: checked.append(str(p)) or real(p, **kw))
    ft = root / "ckpt" / "finetuned" / "config.json"
    c = json.loads(ft.read_text())
    ft.write_text(json.dumps(c, indent=1))  # same model, new file: a changed fine-tuned folder
    assert pf.preflight(cfg) == first
    assert checked == [str(cfg.finetuned)]
    c["intermediate_size"] *= 2
    ft.write_text(json.dumps(c))
    with pytest.raises(ConfigError, match=r"\[models\] finetuned: .*disagree with config.json"):
        pf.preflight(cfg)
    assert checked == [str(cfg.finetuned)] * 2
    checked.clear()
    (root / "ckpt" / "pretrained" / "config.json").write_text(json.dumps(c))  # and now the pre-trained one
    with pytest.raises(ConfigError, match=r"\[models\] pretrained: .*disagree"):
        pf.preflight(cfg)
    assert sorted(checked) == sorted([str(cfg.pretrained), str(cfg.finetuned)])
