"""Readers for community knowledge-editing data (CounterFact, zsRE) and editq's own JSONL."""

from workers.datasets.loaders import (
    DataFormat,
    DataFormatError,
    EditDataset,
    bundled_counterfact_path,
    convert_record,
    detect_format,
    load_edits,
    parse_each,
    parse_records,
    read_records_text,
)

__all__ = [
    "DataFormat",
    "DataFormatError",
    "EditDataset",
    "bundled_counterfact_path",
    "convert_record",
    "detect_format",
    "load_edits",
    "parse_each",
    "parse_records",
    "read_records_text",
]
