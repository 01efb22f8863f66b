"""Data loaders: every supported format maps to EditRequests; bad input names the record and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.schemas import EditRequest
from workers.datasets import DataFormat, DataFormatError, bundled_counterfact_path, load_edits, parse_records

EASYEDIT = {
    "case_id": 42, "prompt": "The profession of Arun Nehru is", "target_new": "actor", "subject": "Arun Nehru",
    "ground_truth": "politician", "rephrase_prompt": "Arun Nehru is known for",
    "locality_prompt": "George Washington's profession is a", "locality_ground_truth": "politician",
}
ROME = {
    "case_id": 7,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                          "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French"}},
    "paraphrase_prompts": ["Danielle Darrieux spoke the language", "Danielle Darrieux's native language is"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Jean Marais spoke the language"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}
ZSRE = {
    "subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?", "pred": "Harvard",
    "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
    "rephrase": "What university did Watts Humphrey take part in?",
    "loc": "nq question: who played desmond doss father in hacksaw ridge", "loc_ans": "Hugo Weaving",
}


def _write(tmp_path: Path, name: str, content: object) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def test_easyedit_counterfact(tmp_path: Path) -> None:
    ds = load_edits(_write(tmp_path, "cf.json", [EASYEDIT]))
    assert ds.format == DataFormat.counterfact_easyedit
    (r,) = ds.requests
    assert (r.edit_id, r.subject, r.prompt, r.target_new, r.target_true) == (
        "cf-42", "Arun Nehru", "The profession of {} is", "actor", "politician")
    assert r.paraphrase_prompts == ["Arun Nehru is known for"]
    assert [(p.prompt, p.target) for p in r.neighborhood_prompts] == [
        ("George Washington's profession is a", "politician")]
    assert r.text == "The profession of Arun Nehru is"


def test_rome_counterfact(tmp_path: Path) -> None:
    ds = load_edits(_write(tmp_path, "rome.json", [ROME]))
    assert ds.format == DataFormat.counterfact_rome
    (r,) = ds.requests
    assert (r.prompt, r.target_new, r.target_true) == ("The mother tongue of {} is", "English", "French")
    assert len(r.paraphrase_prompts) == 2
    assert {p.target for p in r.neighborhood_prompts} == {"French"}  # neighbours keep the true object


def test_zsre(tmp_path: Path) -> None:
    ds = load_edits(_write(tmp_path, "zsre.jsonl", json.dumps(ZSRE) + "\n\n" + json.dumps(ZSRE) + "\n"))
    assert ds.format == DataFormat.zsre and len(ds.requests) == 2
    r = ds.requests[0]
    assert (r.edit_id, r.prompt, r.target_new, r.target_true) == (
        "zsre-0", "What university did {} attend?", "University of Michigan", None)
    assert r.neighborhood_prompts[0].prompt == "nq question: who played desmond doss father in hacksaw ridge?"
    assert r.neighborhood_prompts[0].target == "Hugo Weaving"


def test_native_jsonl_and_limit(tmp_path: Path) -> None:
    lines = [{"subject": "France", "prompt": "The capital of {} is", "target_new": f"City{i}"} for i in range(5)]
    ds = load_edits(_write(tmp_path, "e.jsonl", "\n".join(json.dumps(x) for x in lines)), limit=3)
    assert ds.format == DataFormat.editq
    assert [r.target_new for r in ds.requests] == ["City0", "City1", "City2"]


def test_bundled_sample() -> None:
    ds = load_edits(bundled_counterfact_path())
    assert ds.format == DataFormat.counterfact_easyedit
    assert len(ds.requests) == 300
    assert len({r.edit_id for r in ds.requests}) == 300


def test_bad_record_names_record_and_field(tmp_path: Path) -> None:
    bad = dict(EASYEDIT, case_id=43, target_new="   ")
    with pytest.raises(DataFormatError, match=r"record 1: field 'target_new'"):
        load_edits(_write(tmp_path, "bad.json", [EASYEDIT, bad]))
    with pytest.raises(DataFormatError, match=r"record 0: missing field 'ground_truth'"):
        parse_records([{k: v for k, v in EASYEDIT.items() if k != "ground_truth"} | {"target_new": "x"}])


def test_subject_must_occur_in_prompt() -> None:
    with pytest.raises(DataFormatError, match=r"record 0: .*prompt must contain"):
        parse_records([dict(EASYEDIT, subject="Somebody Else")])


def test_unknown_format_lists_keys_and_invalid_json_names_line(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"unknown record format with keys \['answer', 'question'\]"):
        parse_records([{"question": "q", "answer": "a"}])
    with pytest.raises(DataFormatError, match=r"line 2: invalid JSON"):
        load_edits(_write(tmp_path, "x.jsonl", json.dumps(EASYEDIT) + "\n{not json\n"))
    with pytest.raises(DataFormatError, match="empty"):
        load_edits(_write(tmp_path, "empty.json", "  \n"))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("target_new", "", "target_new"),
        ("subject", "\udc80bad", "unicode string"),
        ("prompt", "The capital of {} is {}", "exactly once"),
        ("target_new", "Paris", "must differ"),
        ("prompt", "x" * 501, "at most 500"),
        ("subject", "Fra\x00nce", "control character"),
    ],
)
def test_edit_request_validation(field: str, value: str, message: str) -> None:
    data = {"subject": "France", "prompt": "The capital of {} is", "target_new": "Lyon", "target_true": "Paris"}
    with pytest.raises(ValueError, match=message) as err:
        EditRequest.model_validate({**data, field: value})
    assert field in str(err.value) or message in str(err.value)


def test_content_derived_edit_id_is_stable() -> None:
    a = EditRequest(subject="France", prompt="The capital of {} is", target_new="Lyon")
    b = EditRequest(subject="France", prompt="The capital of France is", target_new="Lyon")
    c = EditRequest(subject="France", prompt="The capital of {} is", target_new="Nice")
    assert a.edit_id == b.edit_id != c.edit_id
    assert EditRequest(edit_id="client-1", subject="France", prompt="{} is", target_new="x").edit_id == "client-1"
