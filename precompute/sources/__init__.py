"""Data sources: readers that stream (id, text, role) records and, where the format has them,
qrels and training examples. Open one with :func:`parse_source` (``beir:data/scifact``,
``msmarco:data/msmarco``, ``hf:NAME[:CONFIG][:SPLIT]``, ``jsonl:pairs.jsonl?query=question``, ...).
"""

from __future__ import annotations

from .base import (
    LineOrigins,
    Qrels,
    Source,
    SourceOptions,
    TextBlock,
    TextRecord,
    TrainExample,
    blocks_from_records,
    join_title,
    text_id,
)
from .beir import BeirSource
from .errors import BadSourceError
from .hf import HFSource
from .hotpotqa import HotpotQASource
from .layout import FIELDS, LAYOUTS, Layout, resolve_layout
from .msmarco import MsMarcoSource
from .nq import NQSource
from .reading import read_qrels
from .registry import SOURCE_KINDS, parse_source
from .table import TableSource
from .tabular import CsvSource, JsonlSource, ParquetSource, TabularSource, TsvSource

__all__ = [
    "FIELDS",
    "LAYOUTS",
    "SOURCE_KINDS",
    "BadSourceError",
    "BeirSource",
    "CsvSource",
    "HFSource",
    "HotpotQASource",
    "JsonlSource",
    "Layout",
    "LineOrigins",
    "MsMarcoSource",
    "NQSource",
    "ParquetSource",
    "Qrels",
    "Source",
    "SourceOptions",
    "TableSource",
    "TabularSource",
    "TextBlock",
    "TextRecord",
    "TrainExample",
    "TsvSource",
    "blocks_from_records",
    "join_title",
    "parse_source",
    "read_qrels",
    "resolve_layout",
    "text_id",
]
