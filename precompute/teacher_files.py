"""What a teacher is, read from its files alone: weights identity, TeacherSpec, tokenizer (no weights loaded).

Loading gte-Qwen2-7B takes minutes and 15 GB of memory; the spec it will report is settled, field by field,
by the config and the model folder's JSON files (``modules.json``, each module's config, the tokenizer's and
sentence-transformers' configs). Three uses:

* :func:`expected_spec`: the fields the files settle, so ``ddx precompute-teacher`` refuses a store of another
  teacher in seconds, before loading;
* :func:`spec_from_files`: the whole spec, for a driver that creates the store and plans the work but never
  runs the teacher (``--engine ray``: the actors load it); its fingerprint is the loaded model's, and each actor
  checks that again after loading;
* :func:`load_tokenizer`: the teacher's tokenizer without its weights (Ray's CPU stage counts tokens with it).

Weights are identified by hub commit or by a hash of the local files (cached by path, size and mtime:
hashing 15 GB of gte-Qwen2-7B takes ~20 s once).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from precompute.config import TeacherConfig
from storage.errors import DdxError
from storage.fs import atomic_open, default_cache_dir
from storage.spec import POOLING_MODES, TeacherSpec

__all__ = [
    "default_device",
    "device_and_dtype",
    "expected_spec",
    "load_tokenizer",
    "spec_from_files",
    "weights_identity",
]

CAUSAL_TASKS = ("text-generation", "any-to-any")  # sentence-transformers pads these on the left, whatever is saved


_SKIP_HASH = {".md", ".txt", ".ini", ".png", ".jpg", ".gitattributes", ".lock"}


def weights_identity(model: str, revision: str | None = None) -> tuple[str, str]:
    """(local folder, weights id) for a hub id or a local path.

    Hub ids resolve to a snapshot (downloaded when online, the local cache otherwise) and are
    identified by ``hub:<repo>@<commit>``; local folders by ``files:<blake2b of their files>``.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path), "files:" + _hash_folder(path)
    if path.exists():
        raise DdxError(f"Teacher {model!r} is a file; pass the model's folder (with modules.json) or a hub id.")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(model, revision=revision)
    except Exception as exc:
        raise DdxError(
            f"Cannot load teacher {model!r}: not a local folder and not available from the Hugging Face hub "
            f"or its local cache ({type(exc).__name__}: {exc}). Pass a local path, or download it first "
            f"('hf download {model}') where the hub is reachable."
        ) from exc
    return folder, f"hub:{model}@{Path(folder).name}"


def _hash_folder(path: Path) -> str:
    # Filter on the path inside the folder: a model kept under ~/.cache must still hash its own files.
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() not in _SKIP_HASH
        and p.name not in _SKIP_HASH
        and ".cache" not in p.relative_to(path).parts
    )
    if not files:
        raise DdxError(
            f"Teacher folder {str(path)!r} holds no model files; pass the folder with modules.json / config.json."
        )
    stat_key = json.dumps([(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    cache_file = default_cache_dir() / "weights-ids.json"
    cache = _read_json(cache_file)
    entry = f"v2:{path.resolve()}:{hashlib.sha256(stat_key.encode()).hexdigest()}"
    if entry in cache:
        return cache[entry]
    h = hashlib.blake2b(digest_size=16)
    for p in files:
        h.update(str(p.relative_to(path)).encode() + b"\x00")
        with open(p, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    digest = h.hexdigest()
    cache[entry] = digest
    try:  # temp file + rename: a reader sees the old cache or the new one; of two racing writers the last wins
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(cache_file, "w", encoding="utf-8") as f:
            f.write(json.dumps(cache))
    except OSError:
        pass  # the cache only saves time (an entry lost to a race is hashed again next time)
    return digest


def _read_json(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def default_device() -> str:
    """``cuda:<local rank>`` when CUDA is available, else ``cpu``.

    The local rank is torchrun's ``LOCAL_RANK``, else SLURM's ``SLURM_LOCALID`` (``srun`` without torchrun),
    modulo the GPUs this process sees: with ``--gpus-per-task=1`` each task sees one GPU, as ``cuda:0``.
    """
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    return f"cuda:{local % max(torch.cuda.device_count(), 1)}"


def device_and_dtype(cfg: TeacherConfig) -> tuple[str, str]:
    """(device, compute dtype) a teacher of ``cfg`` runs with here: bfloat16 on CUDA, float32 on CPU by default."""
    device = cfg.device or default_device()
    return device, cfg.dtype or ("bfloat16" if device.startswith("cuda") else "float32")


def expected_spec(config: TeacherConfig) -> dict[str, Any]:
    """The TeacherSpec fields ``load_teacher(config)`` will report, read from the config and the model's files.

    No weights are loaded (the weights id hashes the files, cached by size and mtime), so a store of another
    teacher spec is refused in seconds instead of after minutes of loading a 7B teacher. A field the files do
    not settle (a module type ddx does not model, a tokenizer whose padding side is a class default) is left
    out: the check on the loaded model still covers it.

    Example:
        >>> expected_spec(TeacherConfig(model="models/tiny", normalize=False))  # doctest: +SKIP
        {'model': 'models/tiny', 'weights_id': 'files:…', 'dtype': 'float32', 'normalize': False, 'dim': 32, …}
    """
    cfg = config.resolved()
    folder, weights_id = weights_identity(cfg.model, cfg.revision)
    spec: dict[str, Any] = {"model": cfg.model, "weights_id": weights_id, "dtype": device_and_dtype(cfg)[1]}
    spec.update(_prompts_from_files(Path(folder), cfg))
    overrides = {"normalize": cfg.normalize, "max_seq_length": cfg.max_seq_length, "padding_side": cfg.padding_side}
    modules = _read_any_json(Path(folder) / "modules.json")
    if isinstance(modules, list):  # without modules.json, sentence-transformers builds its own: leave it to the load
        spec.update(_modules_spec(Path(folder), modules, cfg))
    spec.update({k: v for k, v in overrides.items() if v is not None})
    return spec


def _read_any_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _prompts_from_files(folder: Path, cfg: TeacherConfig) -> dict[str, str]:
    """Query and passage prompts: the user's, else those the model saved ("" for none, as sentence-transformers)."""
    path = folder / "config_sentence_transformers.json"
    saved = _read_any_json(path) if path.exists() else {}
    prompts = (saved.get("prompts") or {}) if isinstance(saved, dict) else None  # None: unreadable, leave it
    out: dict[str, str] = {}
    if cfg.query_prompt is not None:
        out["query_prompt"] = cfg.query_prompt
    elif isinstance(prompts, dict):
        out["query_prompt"] = prompts.get("query") or ""
    if cfg.passage_prompt is not None:
        out["passage_prompt"] = cfg.passage_prompt
    elif isinstance(prompts, dict):
        out["passage_prompt"] = prompts.get("passage", prompts.get("document")) or ""
    return out


def _modules_spec(folder: Path, modules: list[Any], cfg: TeacherConfig) -> dict[str, Any]:
    """Pooling, normalize, dim, max length and padding side from modules.json and each module's config."""
    kinds = [(str(m.get("type", "")).rsplit(".", 1)[-1], folder / str(m.get("path", ""))) for m in modules]
    out: dict[str, Any] = {"normalize": any(kind == "Normalize" for kind, _ in kinds)}
    dim: int | None = None
    for kind, path in kinds:
        if kind == "Pooling":  # an overridden pooling keeps the output width (see _apply_overrides)
            modes, width = _pooling_config(path)
            if cfg.pooling or (len(modes) == 1 and modes[0] in POOLING_MODES):
                out["pooling"] = cfg.pooling or modes[0]
            dim = width * len(modes) if modes and width else None
        elif kind == "Dense":
            dense = _read_any_json(path / "config.json")
            dim = dense.get("out_features") if isinstance(dense, dict) else None
        elif kind not in ("Transformer", "Normalize"):
            dim = None  # a module ddx does not model may change the output: leave dim to the load
            break
    if dim is not None:
        out["dim"] = int(dim)
    transformer = next((path for kind, path in kinds if kind == "Transformer"), None)
    if transformer is not None:
        out.update(_tokenizer_spec(transformer))
    return out


def _pooling_config(path: Path) -> tuple[list[str], int | None]:
    """(pooling modes, token embedding width) of a Pooling module, in either of its config formats."""
    conf = _read_any_json(path / "config.json")
    if not isinstance(conf, dict):
        return [], None
    width = conf.get("embedding_dimension", conf.get("word_embedding_dimension"))
    mode = conf.get("pooling_mode")
    if mode is None:  # the format before sentence-transformers 6: one flag per mode, "mean" when none is set
        flags = {"cls_token": "cls", "max_tokens": "max", "mean_tokens": "mean"}
        flags |= {"mean_sqrt_len_tokens": "mean_sqrt_len_tokens", "weightedmean_tokens": "weightedmean"}
        flags |= {"lasttoken": "lasttoken"}
        mode = [m for key, m in flags.items() if conf.get(f"pooling_mode_{key}")] or ["mean"]
    modes = [mode] if isinstance(mode, str) else list(mode)
    return modes, width if isinstance(width, int) else None


def _tokenizer_spec(module: Path) -> dict[str, Any]:
    """max_seq_length and padding side as sentence-transformers >= 6 sets them when it loads the Transformer."""
    st_conf = _read_any_json(module / "sentence_bert_config.json")
    st_conf = st_conf if isinstance(st_conf, dict) else {}
    if any(k in st_conf for k in ("processor_kwargs", "tokenizer_args", "config_kwargs", "tokenizer_name_or_path")):
        return {}  # tokenizer settings come from elsewhere: leave them to the load
    tok = _read_any_json(module / "tokenizer_config.json")
    tok = tok if isinstance(tok, dict) else {}
    out: dict[str, Any] = {}
    if tok.get("padding_side") in ("left", "right"):
        out["padding_side"] = tok["padding_side"]
    if st_conf.get("transformer_task") in CAUSAL_TASKS:
        out["padding_side"] = "left"
    if isinstance(st_conf.get("max_seq_length"), int):
        out["max_seq_length"] = st_conf["max_seq_length"]
        return out
    model_conf = _read_any_json(module / "config.json")
    positions = model_conf.get("max_position_embeddings") if isinstance(model_conf, dict) else None
    limit = tok.get("model_max_length")
    if isinstance(limit, int) and isinstance(positions, int) and positions != -1:
        out["max_seq_length"] = min(limit, positions)  # the tokenizer's limit, capped at the model's positions
    return out


def spec_from_files(config: TeacherConfig) -> TeacherSpec:
    """The TeacherSpec ``load_teacher(config)`` reports, from the config and the model's files: no weights loaded.

    Fields :func:`expected_spec` leaves open are settled from the tokenizer (its padding side; a class default
    when the files save none), loaded alone. The compute dtype is the config's, else the default of *this*
    machine (bfloat16 with CUDA, float32 without): a driver planning for GPU workers must set it.

    Raises:
        DdxError: a field the files cannot settle (a module type ddx does not model, several pooling modes),
            naming it and the option that settles it.

    Example:
        >>> spec_from_files(TeacherConfig(model="models/tiny", dtype="bfloat16")).fingerprint  # doctest: +SKIP
        'b1946ac92492d2347c6235b4d2611184'
    """
    fields = expected_spec(config)
    if "padding_side" not in fields:
        fields["padding_side"] = load_tokenizer(config).padding_side
    missing = sorted({f.name for f in dataclasses.fields(TeacherSpec)} - set(fields) - _DEFAULTED)
    if missing:
        hints = {"pooling": "--pooling", "max_seq_length": "--max-seq-length", "padding_side": "--padding-side"}
        how = [hints[m] for m in missing if m in hints]
        raise DdxError(
            f"Teacher {config.model!r}: its files do not settle {', '.join(missing)} without loading its weights"
            + (f"; pass {' and '.join(how)}" if how else "")
            + ", or use the local engine (it reads the spec from the loaded model)."
        )
    return TeacherSpec(**fields)


_DEFAULTED = {"query_prompt", "passage_prompt"}  # TeacherSpec's defaults ("") are sentence-transformers' too


def load_tokenizer(config: TeacherConfig) -> Any:
    """The teacher's tokenizer, as its sentence-transformers Transformer module sets it up, without the model.

    Raises:
        DdxError: the model folder has no Transformer module (nothing to tokenize with).
    """
    from transformers import AutoTokenizer

    cfg = config.resolved()
    folder = Path(weights_identity(cfg.model, cfg.revision)[0])
    modules = _read_any_json(folder / "modules.json")
    paths = [m.get("path", "") for m in modules or [] if str(m.get("type", "")).endswith("Transformer")]
    module = folder / str(paths[0]) if paths else folder  # no modules.json: sentence-transformers wraps the folder
    st_conf = _read_any_json(module / "sentence_bert_config.json") or {}
    kwargs = dict(st_conf.get("tokenizer_args") or {}) | dict(st_conf.get("processor_kwargs", {}).get("text", {}))
    source = st_conf.get("tokenizer_name_or_path") or str(module)
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=bool(cfg.trust_remote_code), **kwargs)
    if st_conf.get("transformer_task") in CAUSAL_TASKS:
        tok.padding_side = "left"
    if cfg.padding_side is not None:
        tok.padding_side = cfg.padding_side
    if st_conf.get("do_lower_case") and tok.is_fast:
        _lowercase_first(tok)
    return tok


def _lowercase_first(tok: Any) -> None:
    """Lowercase before the tokenizer's own normalizer, as sentence-transformers does under ``do_lower_case``."""
    from tokenizers.normalizers import Lowercase
    from tokenizers.normalizers import Sequence as NormalizerSequence

    normalizer = tok.backend_tokenizer.normalizer
    if "Lowercase" in repr(normalizer):
        return
    tok.backend_tokenizer.normalizer = NormalizerSequence([Lowercase(), normalizer]) if normalizer else Lowercase()
