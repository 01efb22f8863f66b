"""Readers for community knowledge-editing data (CounterFact, zsRE) and editq's own JSONL."""

from workers.datasets.loaders import (
    DataFormat,
    DataFormatError,
    EditDataset,
    bundled_counterfact_path,
    detect_format,
    load_edits,
    parse_records,
)

__all__ = [
    "DataFormat",
    "DataFormatError",
    "EditDataset",
    "bundled_counterfact_path",
    "detect_format",
    "load_edits",
    "parse_records",
]
