"""SS-IF against kronfluence's pairwise EK-FAC scores on a tiny GPT-NeoX.

Same settings on both sides: the fused q/k/v projection as one block (kronfluence has no per-head
split), empirical Fisher, the same absolute damping, float64, the same analysed modules. Padding is
handled the same way too (kronfluence zeroes padded activations and bias entries via
``Task.get_attention_mask`` and counts only unpadded tokens), so documents of different lengths are
used: kronfluence gets each one padded to a common width, msif batches them its own way.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.core import (
    PAD,
    one_thread,  # noqa: F401  (autouse fixture)
    random_docs,
    random_pairs,
    rel_err,
    tiny_model,
)

from msif_core.ekfac import FitSettings, fit_ekfac
from msif_core.models import discover_modules
from msif_core.query import measurement_gradients, query_ihvps
from msif_core.scoring import score_documents

try:  # a dev dependency that `make test` installs: the comparison must run, not skip
    import kronfluence  # noqa: F401
except ImportError:  # pragma: no cover - only on a hand-made environment
    pytest.fail("kronfluence is missing: `make install` installs it, or run `pip install --no-deps kronfluence "
                "einops einconv opt-einsum accelerate`", pytrace=False)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # kronfluence's torch.cuda.amp calls

DAMPING = 1e-3


def _as_dataset(encoded, width):
    """Rows padded to ``width``; ``labels`` is −100 wherever the token is not a target."""
    rows = []
    for ids, mask in zip(encoded.input_ids, encoded.loss_mask):
        n = len(ids)
        rows.append({
            "input_ids": torch.tensor(ids + [PAD] * (width - n)),
            "attention_mask": torch.tensor([1] * n + [0] * (width - n)),
            "labels": torch.tensor([t if m else -100 for t, m in zip(ids, mask)] + [-100] * (width - n)),
        })
    return rows


def _summed_ce(batch, model):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def test_ss_if_matches_kronfluence_pairwise_ekfac(tmp_path):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    model = tiny_model("gpt_neox", seed=6)
    specs = discover_modules(model, attention_blocks="fused")
    assert all(s.n_blocks == 1 for s in specs)
    docs = random_docs(10, 4, 9, seed=61)
    queries = random_pairs(4, (2, 4), (2, 4), seed=62)

    # msif
    f = fit_ekfac(model, specs, docs, FitSettings(fisher="empirical", batch_size=4), PAD)
    grads = measurement_gradients(model, specs, queries, batch_size=2, pad_id=PAD)
    ih = query_ihvps(grads, specs, "ss_if", ft_factors=f, damping_ft=DAMPING)
    ours = score_documents(model, ih, docs, batch_size=3, pad_id=PAD).scores  # [N, Q]

    # kronfluence
    names = [s.name for s in specs]

    class LanguageModelTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            assert not sample, "this comparison uses the empirical Fisher"
            return _summed_ce(batch, model)

        def compute_measurement(self, batch, model):
            return _summed_ce(batch, model)  # −log p(completion | prompt): labels are −100 on the prompt

        def get_influence_tracked_modules(self):
            return names

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    task = LanguageModelTask()
    kmodel = prepare_model(copy.deepcopy(model), task)
    analyzer = Analyzer("msif", kmodel, task, cpu=True, disable_tqdm=True, output_dir=str(tmp_path))
    f64 = torch.float64
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True, activation_covariance_dtype=f64,
                                  gradient_covariance_dtype=f64, eigendecomposition_dtype=f64, lambda_dtype=f64,
                                  per_sample_gradient_dtype=f64)
    train = _as_dataset(docs, 9)
    analyzer.fit_all_factors("f", train, per_device_batch_size=4, factor_args=factor_args,
                             overwrite_output_dir=True)
    score_args = ScoreArguments(damping_factor=DAMPING, per_sample_gradient_dtype=f64, precondition_dtype=f64,
                                score_dtype=f64)
    analyzer.compute_pairwise_scores("s", "f", _as_dataset(queries, 8), train, per_device_query_batch_size=2,
                                     per_device_train_batch_size=3, score_args=score_args,
                                     overwrite_output_dir=True)
    theirs = analyzer.load_pairwise_scores("s")["all_modules"].T.double().numpy()  # [N, Q]

    assert theirs.shape == ours.shape == (10, 4)
    assert np.abs(theirs).max() > 0
    pearson = np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]
    assert pearson >= 0.999, pearson
    assert rel_err(ours, theirs) < 1e-9  # in float64 the two agree far beyond the required correlation
