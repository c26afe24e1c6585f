"""Gradients: one forward and backward pass that yields, per analysed module, the inputs ``a_t`` and
the output gradients ``ds_t`` of every token, and the losses/measurements they come from.

The backward pass asks autograd for gradients with respect to the modules' *outputs* only, so weight
gradients are never formed; a per-sequence weight gradient, when needed, is ``Σ_t ds_t a_tᵀ``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import Batch
from .models import ModuleSpec


@dataclass
class Captured:
    """Per-module token activations (bias column appended, padding zeroed) and output gradients."""

    a: dict[str, torch.Tensor]  # [B, T, d]
    ds: dict[str, torch.Tensor]  # [B, T, P]
    loss: torch.Tensor  # summed loss of the batch (detached)
    per_sequence_loss: torch.Tensor  # [B]


@contextmanager
def _hooks(model: nn.Module, specs: list[ModuleSpec]) -> Iterator[tuple[dict, dict]]:
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for s in specs:
        def hook(mod, args, out, name=s.name):
            inputs[name] = args[0].detach()
            outputs[name] = out
        handles.append(model.get_submodule(s.name).register_forward_hook(hook))
    try:
        yield inputs, outputs
    finally:
        for h in handles:
            h.remove()


@contextmanager
def analysed_grads_only(model: nn.Module, specs: list[ModuleSpec]) -> Iterator[None]:
    """Within the block, only the analysed modules' parameters require grad (restored after)."""
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    keep = {s.name for s in specs}
    for n, p in model.named_parameters():
        p.requires_grad_(n.rsplit(".", 1)[0] in keep)
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])


def sample_from_probs(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of probabilities [N, V] by inverting the cumulative distribution.

    One uniform number per row (from ``generator``, in row order): cheaper than ``torch.multinomial``
    over a large vocabulary, and reproducible. The uniforms are drawn on the generator's own device and
    moved to the probabilities' one, so a CPU generator gives the same draws on CPU and GPU.
    """
    with torch.no_grad():
        cdf = probs.cumsum(dim=-1)
        where = generator.device if generator is not None else cdf.device
        u = torch.rand(cdf.shape[0], 1, generator=generator, dtype=cdf.dtype, device=where).to(cdf.device)
        u = u * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[-1] - 1)


def sample_from_logits(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row from softmax(logits) [N, V] (see :func:`sample_from_probs`)."""
    with torch.no_grad():
        return sample_from_probs(torch.softmax(logits, dim=-1), generator)


def token_losses(logits: torch.Tensor, batch: Batch, fisher: str = "empirical",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sequence summed next-token cross-entropy over target tokens, shape [B] (no gradient).

    The logits at position t predict token t+1. ``fisher="true"`` samples each target from the
    model's own predictive distribution at that position (softmax of the logits at t, drawn with
    :func:`sample_from_probs` over the target positions in row-major order); ``"empirical"`` uses the
    data's tokens. This is the loss whose gradient :func:`lm_loss_and_grad` writes out.
    """
    return lm_loss_and_grad(logits.detach(), batch, fisher, generator)[0]


def lm_loss_and_grad(logits: torch.Tensor, batch: Batch, fisher: str = "empirical",
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed target cross-entropy [B] and its gradient with respect to ``logits``.

    The same quantity as :func:`token_losses`, with the gradient written out (softmax − one-hot on
    target positions, zero elsewhere) so that the softmax is computed once and shared with the
    true-Fisher draw.
    """
    mask = batch.loss_mask[:, 1:]
    probs = torch.softmax(logits[:, :-1], dim=-1)
    target = batch.input_ids[:, 1:].clone()
    if fisher == "true":
        target[mask] = sample_from_probs(probs[mask], generator)
    elif fisher != "empirical":
        raise ValueError(f"fisher must be 'true' or 'empirical', got {fisher!r}")
    p_t = probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    m = mask.to(probs.dtype)
    per_seq = -(torch.log(p_t.clamp_min(torch.finfo(probs.dtype).tiny)) * m).sum(dim=1)
    grad = torch.empty_like(logits)  # written once: (softmax − one-hot) ⊙ mask, zero at the last position
    grad[:, -1].zero_()
    g = torch.mul(probs, m.unsqueeze(-1), out=grad[:, :-1])
    g.scatter_add_(-1, target.unsqueeze(-1), -m.unsqueeze(-1))
    return per_seq, grad


def label_losses(logits: torch.Tensor, batch: Batch, fisher: str = "empirical",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sequence −log p(label | x) for a classification head, shape [B]."""
    if batch.labels is None:
        raise ValueError("a classification model needs labels in the batch")
    target = batch.labels
    if fisher == "true":
        target = sample_from_logits(logits.detach(), generator)
    return F.cross_entropy(logits, target.to(logits.device), reduction="none")


def forward_backward(model: nn.Module, specs: list[ModuleSpec], batch: Batch, fisher: str = "empirical",
                     generator: torch.Generator | None = None) -> Captured:
    """Run ``model`` on ``batch`` and return per-token ``a`` and ``ds`` of each module in ``specs``.

    ``ds`` is the gradient of the batch's summed loss; since sequences do not interact, its rows are
    each sequence's own gradients. Padding positions get ``a = 0`` (and have ``ds = 0``).
    """
    with _hooks(model, specs) as (inputs, outputs):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        logits = out.logits
        names = [s.name for s in specs]
        if logits.dim() == 3:
            per_seq, dlogits = lm_loss_and_grad(logits.detach(), batch, fisher, generator)
            grads = torch.autograd.grad(logits, [outputs[n] for n in names], grad_outputs=dlogits,
                                        allow_unused=True)
        else:
            per_seq = label_losses(logits, batch, fisher, generator)
            grads = torch.autograd.grad(per_seq.sum(), [outputs[n] for n in names], allow_unused=True)
        loss = per_seq.sum()
    keep = batch.attention_mask.unsqueeze(-1).to(next(iter(inputs.values())).dtype)
    padded = not bool(batch.attention_mask.all())
    a: dict[str, torch.Tensor] = {}
    ds: dict[str, torch.Tensor] = {}
    b, t = batch.input_ids.shape
    for s, g in zip(specs, grads):
        x = _per_token(inputs[s.name], b, t, s.name)
        if g is not None:
            g = _per_token(g, b, t, s.name)
        if s.has_bias:  # [a, 1] on real tokens, zeros on padding
            xb = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)  # one contiguous copy
            a[s.name] = xb.mul_(keep) if padded else xb
        else:
            a[s.name] = x * keep if padded else x
        ds[s.name] = x.new_zeros(b, t, s.out_features) if g is None else g.detach()
    return Captured(a, ds, loss.detach(), per_seq.detach())


def _per_token(x: torch.Tensor, b: int, t: int, name: str) -> torch.Tensor:
    """``x`` as [B, T, width]: some models (OPT's MLP) flatten the tokens to [B·T, width] first."""
    if x.dim() == 3 and x.shape[:2] == (b, t):
        return x
    if x.shape[:-1].numel() == b * t:
        return x.reshape(b, t, x.shape[-1])
    raise ValueError(f"module {name} sees tensors of shape {tuple(x.shape)} for a batch of {b} x {t} tokens; "
                     f"only projections applied to every token can be analysed: leave it out of module_tags")

