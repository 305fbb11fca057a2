"""TeacherSpec: everything that changes a teacher vector, and its fingerprint.

A store holds vectors of exactly one spec. Two specs that differ in any field below would give
different vectors for the same text, so opening a store with another spec is an error that names
the field. ``model`` (the id or path the user typed) is kept for display only: the weights are
identified by ``weights_id`` (hub repo + commit, or a hash of the local files), so moving a model
folder, or naming the same weights by another path, does not orphan a store.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from storage.errors import DdxError, DimensionMismatchError, FingerprintMismatchError

__all__ = ["POOLING_MODES", "TeacherSpec", "spec_problems"]

POOLING_MODES = ("mean", "cls", "lasttoken", "max", "weightedmean", "mean_sqrt_len_tokens")
DTYPES = ("float32", "bfloat16", "float16")
_DISPLAY_ONLY = ("model",)


@dataclass(frozen=True, kw_only=True)
class TeacherSpec:
    """The teacher as the vectors see it.

    Example:
        >>> spec = TeacherSpec(model="tiny", weights_id="files:ab12", pooling="mean", normalize=True,
        ...                    max_seq_length=128, dim=32)
        >>> len(spec.fingerprint)
        32
    """

    model: str  # hub id or local path, as given (display only)
    weights_id: str  # "hub:<repo>@<commit>" or "files:<blake2b of weights+tokenizer files>"
    pooling: str  # how token states become one vector
    normalize: bool  # L2-normalized output
    max_seq_length: int  # tokens kept per text (prompt included), longer texts are truncated
    dim: int  # output dimension
    query_prompt: str = ""  # prepended to queries (gte-Qwen2: its "Instruct: ...\nQuery: " line)
    passage_prompt: str = ""  # prepended to passages (gte-Qwen2: none)
    padding_side: str = "right"  # last-token pooling models are usually padded left
    dtype: str = "float32"  # compute dtype of the forward pass

    def __post_init__(self) -> None:
        if self.pooling not in POOLING_MODES:
            raise DdxError(f"TeacherSpec.pooling must be one of {POOLING_MODES}, got {self.pooling!r}.")
        if self.padding_side not in ("left", "right"):
            raise DdxError(f"TeacherSpec.padding_side must be 'left' or 'right', got {self.padding_side!r}.")
        if self.dtype not in DTYPES:
            raise DdxError(f"TeacherSpec.dtype must be one of {DTYPES}, got {self.dtype!r}.")
        if self.dim <= 0 or self.max_seq_length <= 0:
            raise DdxError(
                f"TeacherSpec.dim and max_seq_length must be positive, got {self.dim}, {self.max_seq_length}."
            )
        if not self.weights_id:
            raise DdxError("TeacherSpec.weights_id must identify the weights (hub commit or file hash).")

    def prompt(self, role: str) -> str:
        """The prompt prepended to texts of ``role``."""
        return {"query": self.query_prompt, "passage": self.passage_prompt}[role]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (stored in the store's zarr.json)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TeacherSpec:
        """Inverse of :meth:`to_dict`.

        Raises:
            DdxError: unknown keys (a newer format wrote them), missing keys, or values of the wrong type.
        """
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise DdxError(f"TeacherSpec has no field(s) {unknown}; this store may come from a newer ddx.")
        problems = spec_problems(data)
        if problems:
            raise DdxError(f"TeacherSpec: {'; '.join(problems)}.")
        return cls(**data)

    @property
    def fingerprint(self) -> str:
        """32 hex digits of sha256 over the canonical JSON of every vector-changing field."""
        payload = {k: v for k, v in sorted(self.to_dict().items()) if k not in _DISPLAY_ONLY}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def differences(self, other: TeacherSpec) -> list[tuple[str, Any, Any]]:
        """(field, self's value, other's value) for each vector-changing field that differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [(k, mine[k], theirs[k]) for k in mine if k not in _DISPLAY_ONLY and mine[k] != theirs[k]]

    def check_matches(self, requested: TeacherSpec, where: str) -> None:
        """Raise unless ``requested`` would produce the same vectors as this (the stored) spec.

        Raises:
            DimensionMismatchError: the dimensions differ.
            FingerprintMismatchError: any other vector-changing field differs (named in the message).
        """
        diffs = self.differences(requested)
        if not diffs:
            return
        if any(name == "dim" for name, _, _ in diffs):
            raise DimensionMismatchError(
                f"Store {where!r} holds {self.dim}-d vectors of {self.model!r}, but the teacher "
                f"{requested.model!r} gives {requested.dim}-d vectors. Use another --store for this teacher."
            )
        lines = "; ".join(f"{name}: store has {a!r}, requested {b!r}" for name, a, b in diffs)
        raise FingerprintMismatchError(
            f"Store {where!r} was made by another teacher spec ({lines}). "
            f"Use the store's settings (see 'ddx cache info {where}') or another --store."
        )


def spec_problems(data: dict[str, Any]) -> list[str]:
    """What keeps ``data`` from being a valid :class:`TeacherSpec` dict ([] when nothing does).

    A store's root metadata is checked with this: in a store of a known format, an unknown or
    misspelt field is damage, not a newer ddx.
    """
    declared = {f.name: f for f in fields(TeacherSpec)}
    out = [f"unknown field {k!r}" for k in sorted(set(data) - set(declared))]
    kinds = {"str": str, "bool": bool, "int": int}
    for name, f in declared.items():
        if name not in data:
            if f.default is MISSING:
                out.append(f"field {name!r} is missing")
            continue
        kind = kinds[str(f.type)]
        value = data[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            out.append(f"{name} is {value!r}, expected {kind.__name__}")
    if not out:
        try:
            TeacherSpec(**data)
        except DdxError as exc:
            out.append(str(exc).rstrip("."))
    return out
