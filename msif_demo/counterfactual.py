"""What the model actually depended on: remove documents from the demo world's pre-training corpus,
retrain both stages exactly as the build did, and measure how each test query's answer changes.

For a group of test queries with distinct facts (no two share a true source document), a method's
removal set is the union of its top-k documents of every query of the group. The pre-trained model is
retrained from the build's initialisation (same seed, same hyper-parameters and schedule; an epoch has
fewer steps when fewer documents are left, the only difference), then fine-tuned on the same pairs with the
same seed, and each query of the group is measured on the new fine-tuned model: m = −log p(completion |
prompt) (summed over the completion's tokens, as the influence scores measure it) and whether the
greedy answer's first word is right. The reference is the same retrain with nothing removed, so a
nondeterminism of training would cancel (it also reports whether that retrain reproduces the shipped
checkpoint bit for bit).

Used by ``bench/counterfactual.py``; no Dagster.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from .build import REPORT_NAME, DemoParams

log = logging.getLogger(__name__)


class CounterfactualError(ValueError):
    """A configuration of the counterfactual test that cannot run."""


@dataclass(frozen=True)
class DemoWorld:
    """A built demo world as the retrain needs it."""

    root: Path
    params: DemoParams
    corpus: pd.DataFrame  # doc_id, text, in the build's order
    finetune: list[dict]  # prompt, completion
    queries: pd.DataFrame  # query_id, prompt, completion, true_doc_ids, entity, relation
    tokenizer: object

    @classmethod
    def load(cls, root: str | Path) -> DemoWorld:
        """The demo world built under ``root`` (``msif_demo.build_demo``'s layout), with its build's parameters
        (a :class:`CounterfactualError` when the report or the data are missing, or the parameters do not
        reproduce the report's hash)."""
        from transformers import AutoTokenizer

        from .world import read_jsonl

        root = Path(root)
        try:
            report = json.loads((root / REPORT_NAME).read_text())
        except (OSError, ValueError) as e:
            raise CounterfactualError(f"{root / REPORT_NAME}: no readable demo build report ({e}); build the world "
                                      f"first (make demo)") from e
        params = DemoParams(size=report["params"]["size"], num_threads=report["params"].get("num_threads"))
        if params.params_hash() != report.get("params_hash"):
            raise CounterfactualError(f"{root}: the demo world was built with other parameters than the "
                                      f"{params.size!r} preset (hash {report.get('params_hash')} vs "
                                      f"{params.params_hash()}); rebuild it with make demo")
        corpus = pd.read_parquet(root / "data" / "corpus.parquet", columns=["doc_id", "text"])
        queries = pd.DataFrame(read_jsonl(root / "data" / "queries.jsonl"))
        tokenizer = AutoTokenizer.from_pretrained(root / "models" / "pretrained")
        return cls(root, params, corpus, read_jsonl(root / "data" / "finetune.jsonl"), queries, tokenizer)


def choose_groups(queries: pd.DataFrame, n_groups: int, size: int, seed: int = 0) -> list[list[str]]:
    """``n_groups`` disjoint groups of ``size`` query ids, drawn with ``seed``: within a group no two queries
    ask the same (entity, relation) or share a true source document. A :class:`CounterfactualError` when the
    queries do not allow it."""
    if n_groups < 1 or size < 1:
        raise CounterfactualError(f"groups and group size must be >= 1, got {n_groups} x {size}")
    order = list(queries.index)
    random.Random(seed).shuffle(order)
    groups: list[list[str]] = []
    used: set[str] = set()
    for _ in range(n_groups):
        group, facts, sources = [], set(), set()
        for i in order:
            q = queries.loc[i]
            fact, true = (q.entity, q.relation), set(q.true_doc_ids)
            if q.query_id in used or fact in facts or true & sources or not true:
                continue
            group.append(str(q.query_id))
            facts.add(fact)
            sources |= true
            if len(group) == size:
                break
        if len(group) < size:
            raise CounterfactualError(
                f"only {len(group)} of the {size} queries of group {len(groups) + 1} have facts distinct from the "
                f"others' (no shared true source); use fewer or smaller groups")
        used |= set(group)
        groups.append(group)
    return groups


def check_groups(queries: pd.DataFrame, groups: Sequence[Sequence[str]], ks: Sequence[int], n_docs: int) -> None:
    """The configuration errors :func:`removal_sets` would run into, before any training: k outside
    [1, corpus), unknown query ids, a query in two groups, two queries of a group that share a fact or a
    true source document."""
    bad_k = [k for k in ks if not 1 <= k < n_docs]
    if bad_k:
        raise CounterfactualError(f"k = {bad_k} cannot be removed from a corpus of {n_docs} documents "
                                  f"(1 <= k < {n_docs})")
    by_id = queries.set_index("query_id")
    seen: set[str] = set()
    for g, group in enumerate(groups, 1):
        unknown = [q for q in group if q not in by_id.index]
        if unknown:
            raise CounterfactualError(f"group {g}: unknown query id(s) {unknown[:5]}")
        again = [q for q in group if q in seen]
        if again:
            raise CounterfactualError(f"group {g}: query id(s) {again[:5]} are in an earlier group too")
        seen |= set(group)
        facts: dict[tuple, str] = {}
        owner: dict[str, str] = {}
        for q in group:
            row = by_id.loc[q]
            fact = (row.entity, row.relation)
            if fact in facts:
                raise CounterfactualError(f"group {g}: queries {facts[fact]} and {q} ask the same fact {fact}")
            facts[fact] = q
            for d in row.true_doc_ids:
                if d in owner:
                    raise CounterfactualError(f"group {g}: queries {owner[d]} and {q} share the true source {d} "
                                              f"(their facts overlap)")
                owner[d] = q


def removal_sets(rankings: Mapping[str, Mapping[str, Sequence[str]]], groups: Sequence[Sequence[str]],
                 ks: Sequence[int], queries: pd.DataFrame, doc_ids: Sequence[str],
                 seed: int = 0) -> list[dict]:
    """Every (group, method, k) removal: the union over the group's queries of each one's top-k documents by
    the method (``rankings[method][query_id]``: doc ids best first), plus ``random`` (k documents per query,
    seeded), ``true_sources`` (every true source document of the group's queries, independent of k) and, in a
    world with aliases, ``alias_links`` (every document stating the alias of a group's entity: the other
    half of what the model needs to answer about a name)."""
    check_groups(queries, groups, ks, len(doc_ids))
    by_id = queries.set_index("query_id")
    out = []
    for g, group in enumerate(groups):
        for method, ranking in rankings.items():
            missing = [q for q in group if q not in ranking]
            if missing:
                raise CounterfactualError(f"method {method} has no ranking for query id(s) {missing[:5]}")
            for k in ks:
                docs = sorted({d for q in group for d in list(ranking[q])[:k]})
                out.append({"group": g, "method": method, "k": k, "removed": docs})
        rng = random.Random(f"{seed}-{g}")
        for k in ks:
            docs = sorted({d for _ in group for d in rng.sample(list(doc_ids), k)})
            out.append({"group": g, "method": "random", "k": k, "removed": docs})
        true = sorted({d for q in group for d in by_id.loc[q].true_doc_ids})
        out.append({"group": g, "method": "true_sources", "k": None, "removed": true})
        links = sorted({d for q in group for d in _links(by_id.loc[q])})
        if links:
            out.append({"group": g, "method": "alias_links", "k": None, "removed": links})
    return out


def _links(query: pd.Series) -> list[str]:
    """The documents stating the alias link of a query's entity (none in a world without aliases)."""
    links = query.get("link_doc_ids")
    return list(links) if isinstance(links, list | tuple) else []


def retrain(world: DemoWorld, removed: Sequence[str] = ()) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """Pre-train from the build's initialisation on the corpus without ``removed``, then fine-tune a copy on
    the build's pairs: (pre-trained, fine-tuned, timings). Deterministic for a given removal."""
    from msif_core import training as T

    p = world.params
    drop = set(removed)
    unknown = drop - set(world.corpus.doc_id)
    if unknown:
        raise CounterfactualError(f"cannot remove unknown document id(s) {sorted(unknown)[:5]}")
    texts = world.corpus.text[~world.corpus.doc_id.isin(drop)].tolist()
    tok = world.tokenizer
    t0 = time.perf_counter()
    with T.torch_threads(p.num_threads):
        pre = T.make_model(p.model, len(tok), tok.pad_token_id, tok.eos_token_id, seed=p.pretrain.seed)
        T.pretrain(pre, tok, texts, p.pretrain, p.model.max_seq_len)
        t1 = time.perf_counter()
        ft = T.clone_model(pre)
        T.finetune(ft, tok, [r["prompt"] for r in world.finetune], [r["completion"] for r in world.finetune],
                   p.finetune, p.model.max_seq_len)
    return pre, ft, {"pretrain_s": round(t1 - t0, 2), "finetune_s": round(time.perf_counter() - t1, 2),
                     "documents": len(texts)}


@torch.no_grad()
def measure(model: torch.nn.Module, world: DemoWorld, query_ids: Sequence[str]) -> pd.DataFrame:
    """Per query: ``nll`` = −log p(completion | prompt) summed over the completion's tokens, and ``correct``
    (the greedy answer's first word is the completion's)."""
    from msif_core import training as T
    from msif_core.data import collate, encode_pairs

    q = world.queries.set_index("query_id").loc[list(query_ids)]
    enc = encode_pairs(world.tokenizer, q.prompt.tolist(), q.completion.tolist(), world.params.model.max_seq_len)
    model.eval()
    nll = []
    for i in range(len(enc)):
        batch = collate(enc, [i], world.tokenizer.pad_token_id)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        nll.append(float(T.causal_lm_loss(logits, batch, reduction="sum")))
    _, gens = T.answer_accuracy(model, world.tokenizer, q.prompt.tolist(), q.completion.tolist(),
                                world.params.max_new_tokens)
    correct = [T.first_word(g) == T.first_word(c) for g, c in zip(gens, q.completion)]
    return pd.DataFrame({"query_id": list(query_ids), "nll": nll, "correct": correct, "answer": gens})


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two models hold bit-identical parameters."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
