"""Second-moment statistics: computed once, cached on disk, reused; corpus files read with clear errors; the shipped
corpus stands in for sampling only for its own model and corpus."""

from __future__ import annotations

import pytest
import torch

from shared.settings import DEFAULT_MODEL_NAME
from workers.editing import corpora
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


# ---- the statistics corpus shipped with editq ----------------------------------------------------------------


def _ship(monkeypatch, where, fingerprint: str, corpus: StatsCorpus, texts: list[str]) -> None:
    """Register ``texts`` as the shipped corpus of (fingerprint, corpus) in an index under ``where``."""
    import gzip
    import hashlib
    import json

    raw = corpora.encode_texts(texts)
    name = f"{fingerprint}.{corpus.corpus_id}.jsonl.gz"
    (where / name).write_bytes(gzip.compress(raw, mtime=0))
    entry = {"file": name, "model_fingerprint": fingerprint, "corpus_id": corpus.corpus_id, "n_texts": len(texts),
             "sha256": hashlib.sha256(raw).hexdigest(), "made_with": {"sampler": "test"}}
    (where / "index.json").write_text(json.dumps({"corpora": [entry]}))
    monkeypatch.setattr(corpora, "HERE", where)
    monkeypatch.setattr(corpora, "INDEX", where / "index.json")


def test_shipped_corpus_is_used_only_for_its_model_and_corpus(tmp_path, tiny_llama, tiny_tokenizer,
                                                              monkeypatch) -> None:
    texts = ["the capital of france is paris", "the eiffel tower is located in paris , france", "who plays jazz ?"]
    corpus = StatsCorpus(n_texts=3, text_tokens=4)
    (tmp_path / "ship").mkdir()
    _ship(monkeypatch, tmp_path / "ship", "tiny-a", corpus, texts)
    sampled: list[str] = []

    def sampler(model, tokenizer, n_texts, n_tokens, seed, *args, **kwargs):
        sampled.append(f"{n_texts}x{n_tokens}")
        return ["the city of rome"] * n_texts

    monkeypatch.setattr(stats_module, "sample_texts", sampler)
    layout = ModelLayout.from_model(tiny_llama)

    shipped = SecondMomentCache(tmp_path / "stats", "tiny-a", corpus)
    assert "shipped with editq" in shipped.text_source()
    mom2 = shipped.get(tiny_llama, tiny_tokenizer, layout, [1, 2])
    assert sampled == []  # the shipped text stood in for sampling
    assert shipped.dir.name == "self-3x4-seed0"  # the same cache key as sampling would use
    # Exactly the statistics of those texts read as a corpus file (whose cache key differs).
    as_file = tmp_path / "same.jsonl"
    as_file.write_bytes(corpora.encode_texts(texts))
    reference = SecondMomentCache(tmp_path / "stats", "tiny-a", StatsCorpus(path=as_file))
    for layer, c in reference.get(tiny_llama, tiny_tokenizer, layout, [1, 2]).items():
        assert torch.equal(c, mom2[layer])

    # Another model, or another size of the same model's corpus, samples as before.
    other_model = SecondMomentCache(tmp_path / "stats", "tiny-b", corpus)
    assert "sampled from the model now" in other_model.text_source()
    other_model.get(tiny_llama, tiny_tokenizer, layout, [1])
    other_size = SecondMomentCache(tmp_path / "stats", "tiny-a", StatsCorpus(n_texts=5, text_tokens=4))
    other_size.get(tiny_llama, tiny_tokenizer, layout, [1])
    assert sampled == ["3x4", "5x4"]


def test_damaged_shipped_corpus_fails_loudly(tmp_path, tiny_llama, tiny_tokenizer, monkeypatch) -> None:
    import gzip

    corpus = StatsCorpus(n_texts=2, text_tokens=4)
    (tmp_path / "ship").mkdir()
    _ship(monkeypatch, tmp_path / "ship", "tiny-a", corpus, ["the city of rome", "paris"])
    entry = corpora.find("tiny-a", corpus.corpus_id)
    entry.path.write_bytes(gzip.compress(corpora.encode_texts(["the city of rome", "lyon"])))
    cache = SecondMomentCache(tmp_path / "stats", "tiny-a", corpus)
    with pytest.raises(corpora.ShippedCorpusError, match="sha256"):
        cache.get(tiny_llama, tiny_tokenizer, ModelLayout.from_model(tiny_llama), [1])


def test_the_default_models_corpus_ships_intact() -> None:
    """The SmolLM2 corpus is in the package, checks against its recorded sha256, and records how it was made."""
    (entry,) = [e for e in corpora.shipped() if e.model_fingerprint.startswith(DEFAULT_MODEL_NAME)]
    assert entry.corpus_id == StatsCorpus(n_texts=512, text_tokens=128, seed=0).corpus_id
    texts = entry.texts()
    assert len(texts) == 512 and all(t.strip() for t in texts)
    assert entry.path.stat().st_size < 400_000  # compressed: a few hundred kB at most
    made = entry.made_with
    assert made["sampler"] == "workers.editing.stats.sample_texts" and made["seed"] == 0 and made["n_tokens"] == 128


@pytest.mark.slow
def test_shipped_corpus_is_what_the_sampler_gives(smollm2) -> None:
    """The shipped text is the sampler's own output for the fetched SmolLM2: its model fingerprint matches (else a
    fresh machine would sample again), and sampling the first batch again, 8 tokens long instead of 128 (the same
    random draws, so seconds instead of minutes), gives the beginning of every text."""
    from tests.conftest import smollm2_path
    from workers.model_io import model_fingerprint

    model, tokenizer = smollm2
    corpus = StatsCorpus(n_texts=512, text_tokens=128, seed=0)
    entry = corpora.find(model_fingerprint(smollm2_path()), corpus.corpus_id)
    assert entry is not None, "the fetched SmolLM2 differs from the one the shipped corpus was sampled from"
    batch = entry.made_with["batch_size"]
    shipped = entry.texts()[:batch]
    threads = torch.get_num_threads()
    torch.set_num_threads(entry.made_with["torch_threads"])  # as it was made (the edit worker also runs with 1)
    try:
        heads = stats_module.sample_texts(model, tokenizer, batch, 8, corpus.seed, batch_size=batch)
    finally:
        torch.set_num_threads(threads)
    for head, text in zip(heads, shipped, strict=True):
        assert text.startswith(head.rstrip("\ufffd")), (head, text[: len(head) + 20])


def test_stats_plan_covers_exactly_what_the_editors_read(tmp_path, tiny_model_dir) -> None:
    """`editq stats` prepares the layers of every algorithm that reads second moments, and nothing for UltraEdit
    (it keeps running moments of its own edits): a plan it can never complete would look missing forever."""
    from transformers import AutoConfig

    from shared.settings import Settings
    from workers.editing.hparams import ALGOS, V_STAR_ALGOS
    from workers.evaluation.runner import resolve_hparams
    from workers.stats_prep import plan_statistics

    settings = Settings(home=tmp_path, model_path=tiny_model_dir)
    plans = plan_statistics(settings)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    wanted = {layer for algo in V_STAR_ALGOS for layer in resolve_hparams(config, algo, {}, settings).layers}
    assert {layer for plan in plans for layer in plan.layers} == wanted
    assert set(ALGOS) - set(V_STAR_ALGOS) == {"ultraedit"}
    assert all(plan.missing == sorted(plan.layers) for plan in plans)  # nothing cached in an empty home
