"""What a retrieval hit puts in front of a query (``EDITQ_RETRIEVAL_INJECTION``): RECIPE's continuous prompt, the
edit's statement as text, or both; a miss leaves the request untouched."""

from __future__ import annotations

import pytest
import torch

from workers.retrieval.index import RetrievalHit
from workers.retrieval.injection import TEXT_INJECTION_TEMPLATE, prompt_embeds, text_prefix_ids
from workers.serving.retrieval import QueryRetrieval

STATEMENT = "the capital of france is rome"


class _Tier:
    """Only the two calls ``QueryRetrieval`` makes (the real lookup is tested with the shipped checkpoint)."""

    def __init__(self, hit: RetrievalHit | None) -> None:
        self.hit = hit

    def lookup(self, query: str) -> RetrievalHit | None:
        return self.hit

    def lookup_all(self, query: str, k: int) -> list[RetrievalHit]:
        return [self.hit] if self.hit is not None else []

    def prompt_embeds(self, embedding, ids, hit):
        return prompt_embeds(embedding, ids, None if hit is None else hit.prompt)


@pytest.fixture
def parts(tiny_tokenizer):
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(tiny_tokenizer.vocab_size, 8)
    hit = RetrievalHit("e1", 3.0, 1.0, torch.randn(3, 8), STATEMENT)
    return tiny_tokenizer, embedding, hit


@torch.no_grad()
def test_each_injection_builds_the_engine_input(parts) -> None:
    tokenizer, embedding, hit = parts
    query = "the capital of france is"
    ids = tokenizer(query)["input_ids"]
    prefix = text_prefix_ids(tokenizer, STATEMENT)
    assert prefix == tokenizer(TEXT_INJECTION_TEMPLATE.format(statement=STATEMENT),
                               add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(prefix).count("rome") == TEXT_INJECTION_TEMPLATE.count("{statement}")

    inputs, used = QueryRetrieval(_Tier(hit), embedding, tokenizer, "prompt").prepare(query, query)
    assert used.edit_id == "e1" and inputs["prompt_embeds"].shape == (3 + len(ids), 8)

    inputs, _ = QueryRetrieval(_Tier(hit), embedding, tokenizer, "text").prepare(query, query)
    assert inputs == {"prompt_token_ids": prefix + ids}  # token ids: vLLM's prefix cache applies

    inputs, _ = QueryRetrieval(_Tier(hit), embedding, tokenizer, "hybrid").prepare(query, query)
    embeds = inputs["prompt_embeds"]
    assert embeds.shape == (3 + len(prefix) + len(ids), 8)
    torch.testing.assert_close(embeds[:3], hit.prompt)
    torch.testing.assert_close(embeds[3:], embedding(torch.tensor(prefix + ids)))


def test_a_miss_or_a_hit_without_statement_falls_back(parts) -> None:
    tokenizer, embedding, hit = parts
    query = "the capital of france is"
    assert QueryRetrieval(_Tier(None), embedding, tokenizer, "hybrid").prepare(query, query) == (query, None)
    bare = RetrievalHit("e1", 3.0, 1.0, hit.prompt)  # e.g. an entry written before statements were kept
    inputs, used = QueryRetrieval(_Tier(bare), embedding, tokenizer, "text").prepare(query, query)
    assert used is not None and inputs["prompt_embeds"].shape[0] == 3 + len(tokenizer(query)["input_ids"])


def test_a_query_that_needs_two_edits_gets_both() -> None:
    """Two facts about one subject among 100 unrelated edits (shipped checkpoint): a question about both retrieves
    both above the sentinel, the unrelated ones stay out, and text injection puts both statements in front with the
    best hit next to the query."""
    from transformers import AutoTokenizer

    from shared.schemas import EditRequest
    from shared.settings import Settings
    from workers.datasets import bundled_counterfact_path, load_edits
    from workers.retrieval.tier import RetrievalTier

    tier = RetrievalTier.load()
    tier.add_many(load_edits(bundled_counterfact_path(), limit=100).requests)
    tongue = EditRequest(edit_id="tongue", subject="Danielle Darrieux", prompt="The mother tongue of {} is",
                         target_new="English")
    born = EditRequest(edit_id="born", subject="Danielle Darrieux", prompt="{} was born in the city of",
                       target_new="Tokyo")
    other = EditRequest(edit_id="other", subject="Rudolf Diesel", prompt="{} was a citizen of", target_new="Brazil")
    tier.add_many([tongue, born, other])
    query = "Where was Danielle Darrieux born, and what language did she speak?"
    assert {h.edit_id for h in tier.lookup_all(query, 4)} == {"tongue", "born"}

    tokenizer = AutoTokenizer.from_pretrained(Settings().resolved_model_path(), local_files_only=True)
    retrieval = QueryRetrieval(tier, torch.nn.Embedding(8, 4), tokenizer, "text", top_k=2)
    inputs, used = retrieval.prepare(query, query)
    assert {used.edit_id, *used.also} == {"tongue", "born"} and len(used.also) == 1
    text = tokenizer.decode(inputs["prompt_token_ids"])
    assert "Tokyo" in text and "English" in text and "Brazil" not in text and text.endswith(query)
    best = next(s for s in (tongue, born) if s.edit_id == used.edit_id)
    assert text.rindex(best.target_new) > text.rindex(next(s for s in (tongue, born) if s is not best).target_new)
    single = QueryRetrieval(tier, torch.nn.Embedding(8, 4), tokenizer, "text", top_k=1).prepare(query, query)
    assert single[1].also == []


def test_a_bos_token_stays_first(parts) -> None:
    """Llama- or Mistral-style tokenizers start every prompt with BOS: the statement goes after it."""
    tokenizer, embedding, hit = parts
    bos = tokenizer.pad_token_id  # any special id will do for the check

    class _WithBos:
        all_special_ids = (bos,)

        def __call__(self, text, add_special_tokens=True):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            return {"input_ids": ([bos] if add_special_tokens else []) + ids}

    query = "the capital of france is"
    inputs, _ = QueryRetrieval(_Tier(hit), embedding, _WithBos(), "text").prepare(query, query)
    prefix = text_prefix_ids(tokenizer, STATEMENT)
    assert inputs["prompt_token_ids"] == [bos, *prefix, *tokenizer(query, add_special_tokens=False)["input_ids"]]
