"""Loading a teacher and pinning down its TeacherSpec; encoding one batch of texts.

The spec is read from the model as loaded (pooling module, Normalize module, tokenizer padding
side, max length) after the user's overrides are applied to the model itself, so the stored spec
always describes what actually ran. What the files alone tell (weights identity, the expected spec,
the tokenizer) is in :mod:`precompute.teacher_files`, re-exported here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from precompute.config import PRESETS, TeacherConfig
from precompute.teacher_files import (
    default_device,
    device_and_dtype,
    expected_spec,
    load_tokenizer,
    spec_from_files,
    weights_identity,
)
from storage.errors import DdxError
from storage.spec import TeacherSpec

__all__ = [
    "PRESETS",
    "TeacherConfig",
    "TeacherEncoder",
    "count_tokens",
    "default_device",
    "expected_spec",
    "load_teacher",
    "load_tokenizer",
    "spec_from_files",
    "weights_identity",
]

LENGTH_BATCH = 256  # texts per tokenizer call in token_lengths (bounds its transient memory)


def load_teacher(config: TeacherConfig) -> TeacherEncoder:
    """Load the teacher named by ``config`` and return an encoder that knows its exact spec."""
    import torch
    from sentence_transformers import SentenceTransformer

    cfg = config.resolved()
    device, dtype = device_and_dtype(cfg)
    folder, weights_id = weights_identity(cfg.model, cfg.revision)
    kwargs = {"dtype": getattr(torch, dtype), "attn_implementation": "sdpa"}
    try:
        model = SentenceTransformer(
            folder, device=device, trust_remote_code=bool(cfg.trust_remote_code), model_kwargs=kwargs
        )
    except (ValueError, ImportError) as exc:
        if "sdpa" not in str(exc).lower() and "attn" not in str(exc).lower():
            raise
        model = SentenceTransformer(
            folder,
            device=device,
            trust_remote_code=bool(cfg.trust_remote_code),
            model_kwargs={"dtype": getattr(torch, dtype)},
        )
    _apply_overrides(model, cfg)
    return TeacherEncoder(model, _spec_of(model, cfg, weights_id, dtype), device)


def _apply_overrides(model: Any, cfg: TeacherConfig) -> None:
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    if cfg.max_seq_length is not None:
        model.max_seq_length = cfg.max_seq_length
    if cfg.padding_side is not None:
        model.tokenizer.padding_side = cfg.padding_side
    names = list(model._modules)
    pool_idx = next((i for i, n in enumerate(names) if isinstance(model._modules[n], Pooling)), None)
    if cfg.pooling is not None and pool_idx is not None and model[pool_idx].pooling_mode != cfg.pooling:
        model._modules[names[pool_idx]] = Pooling(model.get_embedding_dimension(), pooling_mode=cfg.pooling)
    has_norm = any(isinstance(m, Normalize) for m in model)
    if cfg.normalize is True and not has_norm:
        model.append(Normalize())
    elif cfg.normalize is False and has_norm:
        for name in [n for n in model._modules if isinstance(model._modules[n], Normalize)]:
            del model._modules[name]


def _spec_of(model: Any, cfg: TeacherConfig, weights_id: str, dtype: str) -> TeacherSpec:
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    pooling = next((m.pooling_mode for m in model if isinstance(m, Pooling)), None)
    if not isinstance(pooling, str):
        raise DdxError(f"Teacher {cfg.model!r} has no single pooling mode ({pooling!r}); pass --pooling.")
    prompts = getattr(model, "prompts", {}) or {}
    return TeacherSpec(
        model=cfg.model,
        weights_id=weights_id,
        pooling=pooling,
        normalize=any(isinstance(m, Normalize) for m in model),
        max_seq_length=int(model.max_seq_length or model.tokenizer.model_max_length),
        dim=int(model.get_embedding_dimension()),
        query_prompt=cfg.query_prompt if cfg.query_prompt is not None else prompts.get("query", ""),
        passage_prompt=cfg.passage_prompt
        if cfg.passage_prompt is not None
        else prompts.get("passage", prompts.get("document", "")),
        padding_side=model.tokenizer.padding_side,
        dtype=dtype,
    )


def count_tokens(tokenizer: Any, texts: list[str], prompt: str, max_length: int) -> np.ndarray:
    """Tokens each of ``texts`` takes after ``prompt``, truncated at ``max_length`` (int32).

    The one definition of a text's length, for batching and the store's ``n_tokens``: the local engine counts
    with the loaded model's tokenizer, Ray's CPU stage with the tokenizer alone
    (:func:`precompute.teacher_files.load_tokenizer`). Tokenized ``LENGTH_BATCH`` texts at a time: a fast
    tokenizer keeps every text's full encoding (tokens, offsets, the truncated overflow) until the call
    returns, ~130 KB for a SciFact abstract, so one call over a 65,536-text window peaked at gigabytes.
    """
    out = np.empty(len(texts), dtype=np.int32)
    for start in range(0, len(texts), LENGTH_BATCH):
        batch = [prompt + t for t in texts[start : start + LENGTH_BATCH]]
        enc = tokenizer(
            batch, truncation=True, max_length=max_length, return_attention_mask=False, return_token_type_ids=False
        )
        out[start : start + len(batch)] = [len(ids) for ids in enc["input_ids"]]
    return out


class TeacherEncoder:
    """Runs the teacher on batches of texts under ``torch.inference_mode``.

    Attributes:
        forward_calls: number of forward passes so far (tests assert a reuse run makes none).
    """

    def __init__(self, model: Any, spec: TeacherSpec, device: str) -> None:
        self.model, self.spec, self.device = model, spec, device
        self.forward_calls = 0
        self.model.eval()

    def token_lengths(self, texts: list[str], role: str) -> np.ndarray:
        """Tokens each text takes (prompt included, truncated at max_seq_length): :func:`count_tokens`."""
        return count_tokens(self.model.tokenizer, texts, self.spec.prompt(role), self.spec.max_seq_length)

    def encode(self, texts: list[str], role: str) -> np.ndarray:
        """Vectors of one batch as float32, shape (len(texts), dim)."""
        import torch

        with torch.inference_mode():
            features = self.model.preprocess(texts, prompt=self.spec.prompt(role) or None)
            features = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in features.items()}
            out = self.model(features)["sentence_embedding"]
            self.forward_calls += 1
            return out.float().cpu().numpy()
