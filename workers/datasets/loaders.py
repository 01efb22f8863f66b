"""Read community editing datasets directly, format auto-detected from the record keys.

* CounterFact, EasyEdit layout: ``prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt,
  locality_ground_truth``.
* CounterFact, original ROME layout: ``requested_rewrite{prompt, subject, target_new.str, target_true.str},
  paraphrase_prompts, neighborhood_prompts``.
* zsRE, MEND layout: ``src, subject, alt, rephrase, loc, loc_ans``.
* editq: ``EditRequest`` objects.

Every record becomes an ``EditRequest``; a bad record fails with its index and the offending field.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shared.schemas import EditRequest, Probe

_BUNDLED = Path(__file__).with_name("counterfact_val_300.json")


class DataFormat(StrEnum):
    counterfact_easyedit = "counterfact_easyedit"
    counterfact_rome = "counterfact_rome"
    zsre = "zsre"
    editq = "editq"


class DataFormatError(ValueError):
    """A data file or record that cannot be read; the message names the record and the field."""


@dataclass(frozen=True)
class EditDataset:
    format: DataFormat
    requests: list[EditRequest]
    path: Path | None = None


def bundled_counterfact_path() -> Path:
    """The first 300 CounterFact val records shipped with editq (tests and demo)."""
    return _BUNDLED


_EASYEDIT_ONLY = {"ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth", "case_id"}


def detect_format(record: dict[str, Any]) -> DataFormat:
    """Decide the format from a record's keys (the first record decides for a whole file)."""
    if not isinstance(record, dict):
        raise DataFormatError(f"expected a JSON object per record, got {type(record).__name__}")
    keys = record.keys()
    if "requested_rewrite" in keys:
        return DataFormat.counterfact_rome
    if {"src", "alt"} <= keys:
        return DataFormat.zsre
    if {"prompt", "subject"} <= keys:
        return DataFormat.counterfact_easyedit if keys & _EASYEDIT_ONLY else DataFormat.editq
    raise DataFormatError(
        f"unknown record format with keys {sorted(record)}; supported: CounterFact (EasyEdit: prompt, subject, "
        "target_new, ground_truth; ROME: requested_rewrite), zsRE (src, alt, loc, loc_ans), editq EditRequest"
    )


def _as_list(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    return [value] if isinstance(value, str) else list(value)


def _need(record: dict[str, Any], key: str) -> Any:
    if key not in record:
        raise KeyError(key)
    return record[key]


def _from_easyedit(record: dict[str, Any], index: int) -> EditRequest:
    case = record.get("case_id", index)
    truths = _as_list(record.get("locality_ground_truth"))
    locality = _as_list(record.get("locality_prompt"))
    return EditRequest(
        edit_id=f"cf-{case}",
        subject=_need(record, "subject"),
        prompt=_need(record, "prompt"),
        target_new=_need(record, "target_new"),
        target_true=_need(record, "ground_truth"),
        paraphrase_prompts=_as_list(record.get("rephrase_prompt")),
        neighborhood_prompts=[Probe(prompt=p, target=t) for p, t in zip(locality, truths, strict=False)],
        source=f"counterfact:{case}",
    )


def _from_rome(record: dict[str, Any], index: int) -> EditRequest:
    rewrite = _need(record, "requested_rewrite")
    case = record.get("case_id", index)
    true = _need(_need(rewrite, "target_true"), "str")
    return EditRequest(
        edit_id=f"cf-{case}",
        subject=_need(rewrite, "subject"),
        prompt=_need(rewrite, "prompt"),
        target_new=_need(_need(rewrite, "target_new"), "str"),
        target_true=true,
        paraphrase_prompts=_as_list(record.get("paraphrase_prompts")),
        neighborhood_prompts=[Probe(prompt=p, target=true) for p in _as_list(record.get("neighborhood_prompts"))],
        source=f"counterfact:{case}",
    )


def _from_zsre(record: dict[str, Any], index: int) -> EditRequest:
    case = record.get("case_id", index)
    # MEND's files already carry the "nq question: " prefix in loc; MEMIT appends the question mark.
    loc = str(_need(record, "loc")).strip()
    question = loc if loc.startswith("nq question:") else f"nq question: {loc}"
    question = question if question.endswith("?") else f"{question}?"
    return EditRequest(
        edit_id=f"zsre-{case}",
        subject=_need(record, "subject"),
        prompt=_need(record, "src"),
        target_new=_need(record, "alt"),
        paraphrase_prompts=_as_list(record.get("rephrase")),
        neighborhood_prompts=[Probe(prompt=question, target=_need(record, "loc_ans"))],
        source=f"zsre:{case}",
    )


def _from_editq(record: dict[str, Any], _index: int) -> EditRequest:
    return EditRequest.model_validate(record)


_CONVERTERS: dict[DataFormat, Callable[[dict[str, Any], int], EditRequest]] = {
    DataFormat.counterfact_easyedit: _from_easyedit,
    DataFormat.counterfact_rome: _from_rome,
    DataFormat.zsre: _from_zsre,
    DataFormat.editq: _from_editq,
}


def _explain(err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or "record"
        parts.append(f"field '{field}': {item['msg']}")
    return "; ".join(parts)


def convert_record(record: Any, index: int, fmt: DataFormat | None, source_name: str = "data") -> EditRequest:
    """One raw record as an EditRequest (format detected from it when ``fmt`` is None); errors name the field."""
    try:
        return _CONVERTERS[fmt or detect_format(record)](record, index)
    except DataFormatError as err:
        raise DataFormatError(f"{source_name} record {index}: {err}") from None
    except KeyError as err:
        raise DataFormatError(f"{source_name} record {index}: missing field {err.args[0]!r}") from None
    except ValidationError as err:
        raise DataFormatError(f"{source_name} record {index}: {_explain(err)}") from None
    except (TypeError, AttributeError) as err:
        raise DataFormatError(f"{source_name} record {index}: malformed record ({err})") from None


def parse_records(
    records: Iterable[dict[str, Any]], source_name: str = "data", limit: int | None = None
) -> EditDataset:
    """Convert raw records (all of one format) into edit requests; the first bad record fails the whole file."""
    requests: list[EditRequest] = []
    fmt: DataFormat | None = None
    for index, record in enumerate(records):
        if limit is not None and len(requests) >= limit:
            break
        if fmt is None:
            try:
                fmt = detect_format(record)
            except DataFormatError as err:
                raise DataFormatError(f"{source_name} record {index}: {err}") from None
        requests.append(convert_record(record, index, fmt, source_name))
    if fmt is None:
        raise DataFormatError(f"{source_name}: no records")
    return EditDataset(fmt, requests)


def parse_each(records: Iterable[Any], source_name: str = "data") -> list[EditRequest | DataFormatError]:
    """Convert every record on its own, so one bad record is reported without stopping the good ones."""
    out: list[EditRequest | DataFormatError] = []
    fmt: DataFormat | None = None
    for index, record in enumerate(records):
        try:
            fmt = fmt or detect_format(record)
        except DataFormatError as err:
            out.append(DataFormatError(f"{source_name} record {index}: {err}"))
            continue
        try:
            out.append(convert_record(record, index, fmt, source_name))
        except DataFormatError as err:
            out.append(err)
    return out


def _read_records(path: Path) -> list[Any]:
    return read_records_text(path.read_text(encoding="utf-8"), str(path), jsonl=path.suffix == ".jsonl")


def read_records_text(text: str, name: str, jsonl: bool | None = None) -> list[Any]:
    """Records from JSON (a list or one object) or JSONL text; ``jsonl=None`` guesses from the text."""
    path = name
    if not text.strip():
        raise DataFormatError(f"{path}: file is empty")
    if jsonl is None:
        stripped = text.lstrip()
        jsonl = not stripped.startswith("[") and len([ln for ln in text.splitlines() if ln.strip()]) > 1
    if jsonl:
        records = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataFormatError(f"{path}: line {line_no}: invalid JSON ({err.msg})") from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: line {err.lineno}: invalid JSON ({err.msg})") from None
    return data if isinstance(data, list) else [data]


def load_edits(path: Path | str, limit: int | None = None) -> EditDataset:
    """Read a .json (list or single object) or .jsonl file of edit records in any supported format."""
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"{path}: no such file")
    dataset = parse_records(_read_records(path), source_name=path.name, limit=limit)
    return EditDataset(dataset.format, dataset.requests, path)
