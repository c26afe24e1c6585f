"""Candidate distances: with every document a candidate, each pair carries the cosine distance LanceDB's
own search would report (so the ``retriever`` method ranks the same either way); the one-call API refuses
the retriever method by name."""

from __future__ import annotations

import numpy as np
import pytest

from msif_assets.assets.corpus import cosine_distances


def test_all_pairs_distances_are_lancedb_cosine_distances(tmp_path) -> None:
    import lancedb

    rng = np.random.default_rng(3)
    docs, queries = rng.normal(size=(30, 8)), rng.normal(size=(4, 8))
    docs[0] *= 7.0  # scale does not change a cosine distance
    db = lancedb.connect(str(tmp_path / "db"))
    tbl = db.create_table("t", data=[{"doc_id": f"d{i}", "vector": v.astype(np.float32).tolist()}
                                     for i, v in enumerate(docs)])
    ours = cosine_distances(queries, docs)  # [Q, N], query-major like all_pairs
    for qi, q in enumerate(queries):
        hits = tbl.search(q.astype(np.float32)).distance_type("cosine").limit(30).to_pandas()
        theirs = dict(zip(hits.doc_id, hits._distance))
        got = np.array([theirs[f"d{i}"] for i in range(30)])
        np.testing.assert_allclose(ours[qi], got, atol=2e-6)  # LanceDB computes in float32
        assert list(np.argsort(ours[qi], kind="stable")[:5]) == [int(d[1:]) for d in hits.doc_id[:5]]


def test_attribute_refuses_the_retriever_method() -> None:
    from msif_core.api import AttributionSettings, attribute

    with pytest.raises(ValueError, match="'retriever' is the pipeline's candidate retriever.*msif run"):
        attribute("nowhere/pt", "nowhere/ft", [("d", "text")], [("p", "c")], [("q", "p", "c")],
                  AttributionSettings(methods=("ms_if", "retriever")))


@pytest.mark.parametrize("method", ["ms_if_rrf", "ms_if_cosine", "ms_if_index"])
def test_attribute_refuses_pipeline_only_methods_before_loading(method) -> None:
    from msif_core.api import AttributionSettings, attribute

    # "nowhere/..." does not exist: the error must come before any checkpoint is opened
    with pytest.raises(ValueError, match=rf"\['{method}'\] are computed by the pipeline.*msif run"):
        attribute("nowhere/pt", "nowhere/ft", [("d", "text")], [("p", "c")], [("q", "p", "c")],
                  AttributionSettings(methods=("ms_if", method)))
