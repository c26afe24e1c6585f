"""Checkpoints on disk: loading a local Hugging Face checkpoint (safetensors preferred, remote code never
run) and checking one without loading its weights (:func:`checkpoint_problems`: config, weights and their
shapes against the config, tokenizer files), so that bad input is named before any work."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model and tokenizer loaded from a local checkpoint directory."""

    model: nn.Module
    tokenizer: object
    path: str
    task: str  # "causal_lm" or "sequence_classification"


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model")


def load_model(path: str | Path, task: str = "auto", dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Load a local Hugging Face checkpoint (safetensors preferred, remote code never run).

    ``task="auto"`` picks a sequence-classification model when the checkpoint's architectures say
    so, else a causal LM. Raises a specific error for a missing or non-model path.
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model path {p} does not exist; point [models] at a local checkpoint "
                                f"directory written by save_pretrained")
    if not p.is_dir() or not (p / "config.json").exists():
        raise ValueError(f"{p} is not a Hugging Face checkpoint directory (no config.json); save the "
                         f"model with model.save_pretrained('{p}')")
    has_weights = any(p.glob("*.safetensors")) or any(p.glob("*.bin")) or any(p.glob("*.safetensors.index.json"))
    if not has_weights:
        raise ValueError(f"{p} has a config.json but no weights (*.safetensors or *.bin)")
    config = AutoConfig.from_pretrained(p, trust_remote_code=False)
    archs = getattr(config, "architectures", None) or []
    if task == "auto":
        task = "sequence_classification" if any("SequenceClassification" in a for a in archs) else "causal_lm"
    cls = AutoModelForSequenceClassification if task == "sequence_classification" else AutoModelForCausalLM
    try:
        model = cls.from_pretrained(p, dtype=dtype, trust_remote_code=False, use_safetensors=None)
    except (RuntimeError, ValueError, OSError) as e:
        problems, _ = checkpoint_problems(p, need_tokenizer=False)
        detail = "; ".join(problems) or " ".join(str(e).strip().splitlines()[:3])
        raise ValueError(f"{p}: cannot load the checkpoint: {detail}") from e
    model.to(device).eval()
    tokenizer = None
    # transformers 5 invents a near-empty default tokenizer for a directory without tokenizer files, so
    # look for them first: a checkpoint without a tokenizer still loads, with tokenizer None
    if any((p / f).exists() for f in _TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(p, trust_remote_code=False)
        except (OSError, ValueError) as e:
            log.warning("could not load the tokenizer in %s (%s)", p, e)
    else:
        log.warning("no tokenizer files in %s; pass token ids yourself or save the tokenizer beside the model", p)
    return LoadedModel(model, tokenizer, str(p), task)


def _weight_shapes(p: Path) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Tensor shapes of a checkpoint's safetensors files, read from their headers; problems found."""
    from safetensors import SafetensorError, safe_open

    problems: list[str] = []
    index = p / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            return {}, [f"{index} is unreadable ({e})"]
        problems += [f"{index} lists {f}, which is missing" for f in files if not (p / f).exists()]
        files = [p / f for f in files if (p / f).exists()]
    else:
        files = sorted(p.glob("*.safetensors"))
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    shapes[k] = tuple(fh.get_slice(k).get_shape())
        except (SafetensorError, OSError) as e:
            problems.append(f"{f} is unreadable ({e})")
    return shapes, problems


def _tokenizer_problem(p: Path) -> str | None:
    """Why the tokenizer in ``p`` cannot be loaded (its own messages silenced), or None."""
    import contextlib
    import io

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            tok = AutoTokenizer.from_pretrained(p, trust_remote_code=False)
        if tok is None or not callable(tok) or len(tok) == 0:
            return f"{p}: its tokenizer files load as an empty tokenizer; save the tokenizer with save_pretrained"
        tok("a")
    except Exception as e:  # noqa: BLE001 - any failure to load or run it is the checkpoint's
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (f"{p}: its tokenizer cannot be loaded ({type(e).__name__}: {first}); save it beside the model "
                f"with tokenizer.save_pretrained (tokenizer.json)")
    finally:
        hf_logging.set_verbosity(level)
    return None


def checkpoint_problems(path: str | Path, need_tokenizer: bool = True) -> tuple[list[str], list[str]]:
    """What is wrong with a checkpoint folder, found without loading its weights: (errors, notices).

    Errors: no folder, no or unparsable ``config.json``, no weights, unreadable or missing safetensors
    files, a weight whose shape disagrees with the model ``config.json`` describes (compared with a model
    built on the meta device), no tokenizer files (when ``need_tokenizer``). Notices: ``auto_map`` (custom
    code), which msif never runs.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    p = Path(path)
    if not p.is_dir():
        return [f"{p} is not a directory (a local Hugging Face checkpoint written by save_pretrained)"], []
    cfg_path = p / "config.json"
    if not cfg_path.exists():
        return [f"{p} has no config.json; it is not a Hugging Face checkpoint"], []
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        return [f"{cfg_path} is not valid JSON ({e})"], []
    errors: list[str] = []
    notices = [f"{cfg_path} names custom code (auto_map); msif never runs it and uses transformers' own "
               f"{raw.get('model_type', '?')} classes"] if "auto_map" in raw else []
    if need_tokenizer and not any((p / f).exists() for f in _TOKENIZER_FILES):
        errors.append(f"{p} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}, ...); save the tokenizer "
                      f"beside the model (tokenizer.save_pretrained)")
    elif need_tokenizer:
        problem = _tokenizer_problem(p)
        if problem:
            errors.append(problem)
    has_bin = any(p.glob("*.bin"))
    shapes, problems = _weight_shapes(p)
    errors += problems
    if not shapes and not problems and not has_bin:
        errors.append(f"{p} has a config.json but no weights (*.safetensors); save them with save_pretrained")
    if not shapes:
        return errors, notices
    try:
        config = AutoConfig.from_pretrained(p, trust_remote_code=False)
        archs = getattr(config, "architectures", None) or []
        cls = (AutoModelForSequenceClassification if any("SequenceClassification" in a for a in archs)
               else AutoModelForCausalLM)
        with torch.device("meta"):
            model = cls.from_config(config, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any failure here is the config's
        errors.append(f"{cfg_path} does not describe a model transformers can build ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[0] if str(e).strip() else e})")
        return errors, notices
    prefix = getattr(model, "base_model_prefix", "") or ""
    bad = []
    for name, param in model.state_dict().items():
        candidates = [name, name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else f"{prefix}.{name}"]
        hit = next((c for c in candidates if c in shapes), None)
        if hit is not None and tuple(param.shape) != shapes[hit]:
            bad.append(f"{hit}: weights {list(shapes[hit])}, config.json implies {list(param.shape)}")
    if bad:
        errors.append(f"{p}: {len(bad)} weight(s) disagree with config.json, e.g. " + "; ".join(bad[:3])
                      + " — the config belongs to another model, or the weights were altered")
    return errors, notices
