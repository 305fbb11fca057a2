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
    "PendingVectors",
    "TeacherConfig",
    "TeacherEncoder",
    "compile_blocks",
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
    spec = _spec_of(model, cfg, weights_id, dtype)
    if cfg.compile:
        compile_blocks(model, spec)
    return TeacherEncoder(model, spec, device)


def compile_blocks(model: Any, spec: TeacherSpec) -> int:
    """Compile each transformer block of ``model`` with ``torch.compile(dynamic=True)``; returns how many.

    Regional compilation: the blocks are one class, so they share one compiled graph (compiled once, not once per
    block), and ``dynamic=True`` keeps it for every batch shape the token budget cuts. It fuses the element-wise
    work between the GEMMs (RMSNorm in fp32, rotary, SiLU·mul), which the H100 profile put at 31 % of the
    teacher's GPU time (docs/benchmarks.md). Warm-up forwards here pay the compiles at load time (one graph per
    kind of batch: padded, unpadded, one text), so a machine where compiling fails says so at once, in one line,
    before any text is read, and no batch of the run compiles again.
    """
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    blocks = max((m for m in lists if len({type(c) for c in m}) == 1), key=len, default=None)
    if blocks is None:
        raise DdxError(f"--compile: {spec.model!r} has no list of transformer blocks to compile; run without it.")
    for block in blocks:
        block.compile(dynamic=True)
    try:  # the shapes a run meets: a padded batch, an unpadded one (no attention mask), a single text
        with torch.inference_mode():
            for texts in (["warm up", "the compiled teacher once"], ["warm up", "warm up"], ["warm up"]):
                features = model.preprocess(texts)
                model({k: v.to(model.device) if hasattr(v, "to") else v for k, v in features.items()})
    except Exception as exc:  # inductor needs a C compiler (and Triton on a GPU)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DdxError(
            f"--compile: torch.compile failed on this machine ({first[:200]}); run without --compile."
        ) from exc
    return len(blocks)


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

    :meth:`launch` tokenizes a batch and queues its forward pass; on CUDA that returns while the GPU still
    computes (the vectors come back through a pinned buffer), so the caller can tokenize the next batch
    meanwhile and the GPU never waits for the host between batches (:func:`precompute.encode.encode_role`).

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

    def launch(self, texts: list[str], role: str) -> PendingVectors:
        """Tokenize one batch and queue the teacher's forward pass; ``.result()`` waits for its vectors."""
        import torch

        cuda = self.device.startswith("cuda")
        with torch.inference_mode():
            features = self.model.preprocess(texts, prompt=self.spec.prompt(role) or None)
            features = {
                k: (v.pin_memory().to(self.device, non_blocking=True) if cuda else v.to(self.device))
                if hasattr(v, "to")
                else v
                for k, v in features.items()
            }
            out = self.model(features)["sentence_embedding"].float()
            self.forward_calls += 1
            if not cuda:
                return PendingVectors(out.cpu().numpy())
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            return PendingVectors(host, done)

    def encode(self, texts: list[str], role: str) -> np.ndarray:
        """Vectors of one batch as float32, shape (len(texts), dim)."""
        return self.launch(texts, role).result()


class PendingVectors:
    """One launched batch: its vectors once the device has copied them to the host."""

    def __init__(self, vectors: Any, done: Any = None) -> None:
        self._vectors, self._done = vectors, done

    def result(self) -> np.ndarray:
        """The batch's vectors, float32 (len(texts), dim); waits for the device's copy."""
        if self._done is not None:
            self._done.synchronize()
            self._vectors, self._done = self._vectors.numpy(), None
        return np.asarray(self._vectors)
