"""Tiny random sentence-transformer models built offline, for tests that must run in seconds.

Two shapes cover the teacher paths ddx supports:

* ``build_tiny_bert``: a 2-layer BERT with a WordPiece tokenizer, mean pooling (the MiniLM/mpnet path).
* ``build_tiny_qwen2``: a 2-layer Qwen2 with a byte-level BPE tokenizer that appends ``<|endoftext|>``,
  left padding, last-token pooling and a query prompt (the gte-Qwen2-7B-instruct path).

Tokenizers are built with the ``tokenizers`` library from a vocabulary derived from the built-in word
list (every word a token, unknown words split into characters). They are not *trained*: the library's
trainers break frequency ties in hash order, so two builds gave two vocabularies and, through token
lengths, two batch orders. Weights are random with a fixed seed: every build of the same arguments gives
the same model.
"""

from __future__ import annotations

from pathlib import Path

WORDS = (  # noqa: SIM905 - a word list reads better as text
    "the a of and to in is was for on that with as by at from it an be this are or which his her their "
    "protein cell gene virus cancer patient study result effect risk dose trial brain heart blood lung "
    "river city war king queen film album song team game season player coach school college history what "
    "who when where why how does did many much first last year born capital country population search "
    "query passage answer question retrieve relevant document evidence claim support refute distill "
    "teacher student vector store embedding model train loss batch token length zebra quartz"
).split()

QWEN_QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: "


def tiny_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """``n`` pseudo-sentences of 3–60 words over a fixed vocabulary (deterministic)."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.choice([3, 5, 8, 12, 20, 35, 60])
        out.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
    return out


def _vocabulary(specials: list[str]) -> dict[str, int]:
    """Specials, every word of WORDS, then single characters (plain and as ``##`` continuations): deterministic."""
    chars = sorted(
        {c for text in [*WORDS, QWEN_QUERY_PROMPT, "0123456789.,:?!'-\"()"] for c in text.lower()} - {" ", "\n"}
    )
    tokens = [*specials, *sorted(set(WORDS)), *chars, *(f"##{c}" for c in chars)]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


def _wordpiece(specials: list[str], unk: str, lowercase: bool):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordPiece(vocab=_vocabulary(specials), unk_token=unk, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def build_tiny_bert(path: Path, *, dim: int = 32, normalize: bool = True, seed: int = 0) -> Path:
    """A 2-layer BERT sentence-transformer with mean pooling, saved at ``path``."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from tokenizers import processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = Path(path)
    hf_dir = path / "hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    wp = _wordpiece(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "[UNK]", lowercase=True)
    wp.post_processor = processors.BertProcessing(
        ("[SEP]", wp.token_to_id("[SEP]")), ("[CLS]", wp.token_to_id("[CLS]"))
    )
    tok = BertTokenizerFast(
        tokenizer_object=wp,
        model_max_length=128,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    tok.save_pretrained(hf_dir)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * dim,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(hf_dir)
    transformer = Transformer(str(hf_dir), max_seq_length=128)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")]
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(path))
    return path


def build_tiny_qwen2(path: Path, *, dim: int = 48, seed: int = 0) -> Path:
    """A 2-layer Qwen2 sentence-transformer: last-token pooling, left padding, a query prompt."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2Model

    path = Path(path)
    hf_dir = path / "hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    eos = "<|endoftext|>"
    wp = _wordpiece([eos, "<unk>"], "<unk>", lowercase=False)  # cased, like Qwen2's byte-level BPE
    eos_id = wp.token_to_id(eos)
    wp.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, eos_id)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=wp, eos_token=eos, pad_token=eos, unk_token="<unk>", padding_side="left", model_max_length=128
    )
    tok.save_pretrained(hf_dir)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * dim,
        max_position_embeddings=128,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    Qwen2Model(config).save_pretrained(hf_dir)
    transformer = Transformer(str(hf_dir), max_seq_length=128)
    transformer.tokenizer.padding_side = "left"
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="lasttoken")
    model = SentenceTransformer(
        modules=[transformer, pooling, Normalize()], device="cpu", prompts={"query": QWEN_QUERY_PROMPT}
    )
    model.save(str(path))
    return path
