"""Query side: measurement gradients ∇m and their preconditioned forms ("query iHVPs", SPEC section 4).

- MS-IF: ``P_pt P_ft ∇m`` (both stages' EK-FAC inverses),
- SS-IF: ``P_ft ∇m``,
- GDP: ``∇m`` as is.

A query iHVP is one [P, d] matrix per module and query, kept exactly or, with ``rank > 0``, as a
rank-r factorisation ``U Vᵀ`` per block.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .data import Encoded, iter_batches
from .ekfac import Factors, save_tensor_dir
from .gradients import analysed_grads_only, forward_backward, sequence_gradients
from .models import ModuleSpec

log = logging.getLogger(__name__)

METHODS = ("ms_if", "ss_if", "gdp")


def measurement_gradients(model: nn.Module, specs: list[ModuleSpec], encoded: Encoded, batch_size: int = 8,
                          pad_id: int | None = None) -> dict[str, torch.Tensor]:
    """∇m per query and module, [Q, P, d] in the order of ``encoded``.

    m = −log p(completion | prompt) summed over target tokens (or −log p(label | x) with a
    classification head): the empirical loss of each query sequence.
    """
    if len(encoded) == 0:
        raise ValueError("no queries to compute measurement gradients for")
    dev = next(model.parameters()).device
    pad = pad_id if pad_id is not None else int(getattr(model.config, "pad_token_id", None) or 0)
    out = {s.name: torch.zeros(len(encoded), s.out_features, s.d, dtype=next(model.parameters()).dtype,
                               device=dev) for s in specs}
    with analysed_grads_only(model, specs):
        for batch in iter_batches(encoded, batch_size, pad):
            cap = forward_backward(model, specs, batch.to(dev), fisher="empirical")
            idx = torch.tensor(batch.index, device=dev)
            for s in specs:
                out[s.name][idx] = sequence_gradients(cap, s)
    return out


@dataclass
class QueryIHVPs:
    """Preconditioned query gradients, per module: dense [Q, P, d] or low-rank factors per block."""

    method: str
    specs: dict[str, ModuleSpec]
    dense: dict[str, torch.Tensor] = field(default_factory=dict)  # [Q, P, d]
    u: dict[str, torch.Tensor] = field(default_factory=dict)  # [Q, blocks, p, r]
    v: dict[str, torch.Tensor] = field(default_factory=dict)  # [Q, blocks, d, r]
    rank: int = 0
    manifest: dict = field(default_factory=dict)

    @property
    def n_queries(self) -> int:
        """Number of queries."""
        t = next(iter((self.dense or self.u).values()))
        return int(t.shape[0])

    def matrix(self, name: str) -> torch.Tensor:
        """The [Q, P, d] query iHVPs of module ``name`` (rebuilt from U Vᵀ when low-rank)."""
        if name in self.dense:
            return self.dense[name]
        u, v = self.u[name], self.v[name]
        m = torch.matmul(u, v.transpose(-1, -2))  # [Q, n, p, d]
        return m.reshape(m.shape[0], -1, m.shape[-1])

    def save(self, directory: str | Path) -> Path:
        """Write ``ihvps.safetensors`` and ``manifest.json`` atomically."""
        t = ({f"dense/{k}": x for k, x in self.dense.items()} | {f"u/{k}": x for k, x in self.u.items()}
             | {f"v/{k}": x for k, x in self.v.items()})
        man = dict(self.manifest) | {"method": self.method, "rank": self.rank,
                                     "modules": [s.to_json() for s in self.specs.values()]}
        return save_tensor_dir(directory, "ihvps.safetensors", t, man)

    @staticmethod
    def load(directory: str | Path, device: str | torch.device = "cpu") -> QueryIHVPs:
        """Read what ``save`` wrote."""
        directory = Path(directory)
        if not (directory / "manifest.json").exists():
            raise FileNotFoundError(f"{directory} holds no query iHVPs; compute them first")
        man = json.loads((directory / "manifest.json").read_text())
        t = load_file(str(directory / "ihvps.safetensors"), device=str(device))
        specs = {d["name"]: ModuleSpec.from_json(d) for d in man["modules"]}
        part = {k: {n[len(k) + 1:]: x for n, x in t.items() if n.startswith(k + "/")} for k in ("dense", "u", "v")}
        return QueryIHVPs(man["method"], specs, part["dense"], part["u"], part["v"], int(man["rank"]), man)


def _low_rank(m: torch.Tensor, spec: ModuleSpec, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors per block: m [Q, P, d] -> U [Q, n, p, r] (singular values folded in), V."""
    q = m.shape[0]
    x = m.reshape(q, spec.n_blocks, spec.p, spec.d)
    r = min(rank, spec.p, spec.d)
    uu, ss, vh = torch.linalg.svd(x.double(), full_matrices=False)
    u = (uu[..., :r] * ss[..., None, :r]).to(m.dtype)
    v = vh[..., :r, :].transpose(-1, -2).to(m.dtype)
    return u, v


def query_ihvps(grads: dict[str, torch.Tensor], specs: list[ModuleSpec], method: str,
                ft_factors: Factors | None = None, pt_factors: Factors | None = None,
                damping_ft: float | str = 1e-4, damping_pt: float | str = 1e-4, rank: int = 0) -> QueryIHVPs:
    """Precondition measurement gradients for ``method`` (``ms_if``, ``ss_if`` or ``gdp``).

    ``ms_if`` needs both factor sets; ``ss_if`` the fine-tune factors. Modules missing from a factor
    set (e.g. a replaced head) are skipped with a log line.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method in ("ms_if", "ss_if") and ft_factors is None:
        raise ValueError(f"{method} needs the fine-tuned model's EK-FAC factors")
    if method == "ms_if" and pt_factors is None:
        raise ValueError("ms_if needs the pre-trained model's EK-FAC factors")
    out = QueryIHVPs(method, {}, rank=rank, manifest={
        "damping_ft": damping_ft if method != "gdp" else None,
        "damping_pt": damping_pt if method == "ms_if" else None})
    for s in specs:
        g = grads[s.name]
        if method in ("ms_if", "ss_if"):
            if s.name not in ft_factors.specs:
                log.info("skipping %s: not in the fine-tune factors", s.name)
                continue
            g = ft_factors.precondition(s.name, g, damping_ft)
        if method == "ms_if":
            if s.name not in pt_factors.specs:
                log.info("skipping %s: not in the pre-train factors", s.name)
                continue
            g = pt_factors.precondition(s.name, g, damping_pt)
        out.specs[s.name] = s
        if rank > 0:
            out.u[s.name], out.v[s.name] = _low_rank(g, s, rank)
        else:
            out.dense[s.name] = g
    return out
