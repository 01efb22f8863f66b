"""Second-moment statistics: computed once, cached on disk, reused; corpus files read with clear errors."""

from __future__ import annotations

import pytest
import torch

from workers.editing import stats as stats_module
from workers.editing.layout import ModelLayout
from workers.editing.stats import SecondMomentCache, StatsCorpus, read_corpus_file


def test_corpus_formats(tmp_path) -> None:
    txt = tmp_path / "c.txt"
    txt.write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    assert read_corpus_file(txt) == ["first paragraph\nstill first", "second paragraph"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "a b"}\n\n{"text": "c"}\n')
    assert read_corpus_file(jsonl) == ["a b", "c"]
    jsonl.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:2: expected a JSON object with a 'text' field"):
        read_corpus_file(jsonl)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no text"):
        read_corpus_file(tmp_path / "empty.txt")


def test_second_moments_are_exact_cached_and_reused(tmp_path, tiny_llama, tiny_tokenizer, monkeypatch) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the capital of france is paris\n\nthe eiffel tower is located in paris , france")
    layout = ModelLayout.from_model(tiny_llama)
    cache = SecondMomentCache(tmp_path / "stats", "tiny", StatsCorpus(path=corpus))
    assert cache.missing(layout, [1, 2]) == [1, 2]
    mom2 = cache.get(tiny_llama, tiny_tokenizer, layout, [1, 2])

    # Reference: E[k k^T] over every token of both texts, read one text at a time.
    keys = []
    module = layout.mlp_out_module(tiny_llama, 1)
    handle = module.register_forward_hook(lambda m, args, out: keys.append(args[0][0]))
    for text in read_corpus_file(corpus):
        tiny_llama(input_ids=torch.tensor([tiny_tokenizer(text)["input_ids"]]))
    handle.remove()
    k = torch.cat(keys).double()
    torch.testing.assert_close(mom2[1], k.T @ k / k.shape[0], rtol=1e-4, atol=1e-6)

    assert cache.missing(layout, [1, 2]) == []
    monkeypatch.setattr(stats_module, "accumulate_second_moments", lambda *a, **k: pytest.fail("recomputed"))
    again = SecondMomentCache(tmp_path / "stats", "tiny", StatsCorpus(path=corpus))
    assert torch.equal(again.get(tiny_llama, tiny_tokenizer, layout, [1, 2])[2], mom2[2])
    other = SecondMomentCache(tmp_path / "stats", "tiny", StatsCorpus(path=None, n_texts=4, text_tokens=4))
    assert other.missing(layout, [1]) == [1]  # another corpus has its own cache
