"""The scoring tests' world: two tiny models of one architecture, their data, factors and brute-force
per-example gradients (shared by the CPU and CUDA scoring tests)."""

from __future__ import annotations

import functools

import numpy as np
import torch

from msif_core.ekfac import FitSettings, fit_ekfac
from msif_core.models import discover_modules

from .core import PAD, batch_for, loss_closures, perturbed_copy, random_docs, random_pairs, sequence_grads, tiny_model

DAMP_FT, DAMP_PT = 1e-3, "relative:0.1"
FULL_RANK = 10_000  # capped at min(p, d) per block


class World:
    """θ_pt, θ_ft (a perturbed copy), their own data and factors, and brute-force gradients."""

    def __init__(self, arch: str):
        self.pt = tiny_model(arch, seed=7)
        self.ft = perturbed_copy(self.pt, 0.05)
        self.specs = discover_modules(self.pt)
        self.names = [s.name for s in self.specs]
        self.docs = random_docs(7, 3, 9, seed=31)
        self.ftdata = random_pairs(6, (2, 4), (1, 4), seed=32)
        self.queries = random_pairs(3, (2, 4), (2, 3), seed=33)
        self.bs = batch_for(arch, 3)
        self.pt_f = fit_ekfac(self.pt, self.specs, self.docs, FitSettings(batch_size=self.bs), PAD)
        self.ft_f = fit_ekfac(self.ft, self.specs, self.ftdata, FitSettings(batch_size=self.bs, seed=1), PAD)
        self.grad_m = [sequence_grads(self.ft, self.specs, fn) for fn in loss_closures(self.ft, self.queries)]
        self.grad_pt = [sequence_grads(self.pt, self.specs, fn) for fn in loss_closures(self.pt, self.docs)]
        self.grad_ft = [sequence_grads(self.ft, self.specs, fn) for fn in loss_closures(self.ft, self.docs)]

    def stack(self, grads):
        return {n: torch.stack([g[n] for g in grads]) for n in self.names}

    def explicit(self, left: dict, right: dict) -> np.ndarray:
        """[N, Q] = Σ_modules ⟨right[n], left[q]⟩ from stacked per-example matrices."""
        return sum(torch.einsum("npd,qpd->nq", right[n].double(), left[n].double()) for n in self.names).numpy()


@functools.cache
def world(arch: str) -> World:
    return World(arch)
