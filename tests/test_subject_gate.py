"""The retrieval tier's subject gate (workers/retrieval/subject_gate.py): which stored edits a query can concern."""

from __future__ import annotations

from workers.retrieval.subject_gate import SubjectGate, subject_words


def test_a_query_names_an_edit_by_every_word_of_its_subject() -> None:
    gate = SubjectGate()
    gate.add("nyc", "New York City")
    gate.add("apple", "Apple")
    gate.add("who", "The Who")
    gate.add("sartre", "Jean-Paul Sartre")
    assert gate.candidates("The mayor of New York City is") == {"nyc"}
    assert gate.candidates("Who leads Apple's parent company?") == {"apple"}  # case, possessive
    assert gate.candidates("the city of York is in") == set()  # 'New' missing: not NYC
    assert gate.candidates("The Who was formed in") == {"who"}  # a subject of stopwords keeps them
    assert gate.candidates("Who founded a company?") == set()  # "who" alone is not The Who
    assert gate.candidates("Sartre, Jean-Paul, wrote in") == {"sartre"}
    assert gate.candidates("Pineapple juice") == set()  # whole words only: 'apple' is not in 'pineapple'
    assert subject_words("The Beatles") == frozenset({"beatles"})


def test_a_longer_name_that_starts_with_the_subject_does_not_name_it() -> None:
    """CounterFact neighbourhood prompts such as "Nintendo DS Lite, created by" reached the "Nintendo DS" edit."""
    gate = SubjectGate()
    gate.add("ds", "Nintendo DS")
    gate.add("vu", "Vanderbilt University")
    assert gate.candidates("Nintendo DS Lite, created by") == set()
    assert gate.candidates("Vanderbilt University Department of Leadership is headquartered in") == set()
    assert gate.candidates("Nintendo DS, developed by") == {"ds"}
    assert gate.candidates("The Nintendo DS is made by") == {"ds"}
    assert gate.candidates("Nintendo DS The handheld") == {"ds"}  # a stopword after it: still the subject
    assert gate.candidates("Nintendo DS Lite or Nintendo DS: who made the") == {"ds"}  # named plainly once
    assert gate.candidates("Nintendo DS\nLite") == {"ds"}  # only one space continues a name
    assert gate.candidates("Who taught at Vanderbilt University? Vanderbilt University employs") == {"vu"}
    assert gate.candidates("DS by Nintendo Lite") == {"ds"}  # words apart: the bag rule alone decides


def test_neighbour_probes_that_ask_a_stored_edits_own_fact_are_collisions() -> None:
    from shared.schemas import EditRequest, Probe
    from workers.retrieval.evaluation import colliding_probes

    riga = EditRequest(edit_id="riga", subject="Riga", prompt="{} is a twin city of", target_new="Athens",
                       target_true="Kiev", neighborhood_prompts=[Probe(prompt="The twin city of Oslo is", target="X")])
    oslo = EditRequest(edit_id="oslo", subject="Oslo", prompt="{} is a twin city of", target_new="Lima",
                       target_true="Y", neighborhood_prompts=[Probe(prompt="The twin city of Riga is", target="Kiev"),
                                                              Probe(prompt="Riga is the capital of", target="Latvia"),
                                                              Probe(prompt="Tallinn is a twin city of", target="Kiev")])
    # Only Oslo's probe that names Riga and expects the answer the Riga edit replaces (Kiev) collides.
    assert colliding_probes([riga, oslo]) == {("The twin city of Riga is", "Kiev")}
    assert colliding_probes([oslo]) == set()


def test_replace_remove_and_entries_without_a_subject() -> None:
    gate = SubjectGate()
    gate.add("e1", "Danielle Darrieux")
    gate.add("e1", "Toko Yasuda")  # replaced: only the new subject counts
    assert gate.candidates("Danielle Darrieux's mother tongue is") == set()
    assert gate.candidates("Toko Yasuda plays the") == {"e1"}
    gate.add("old", None)  # stored before subjects were kept: always a candidate
    assert gate.candidates("anything at all") == {"old"}
    gate.remove("e1")
    gate.remove("old")
    assert gate.candidates("Toko Yasuda plays the") == set() and len(gate) == 0


def test_unspaced_scripts_match_inside_a_run() -> None:
    gate = SubjectGate()
    gate.add("bj", "北京")
    assert gate.candidates("北京是中国的首都") == {"bj"}
    assert gate.candidates("上海是中国的城市") == set()


# ---- in the index, the Redis repository and the tier ------------------------------------------------------------
def test_the_index_searches_only_among_the_named_edits() -> None:
    import torch

    from tests.test_retrieval import _unit
    from workers.retrieval.index import KnowledgeIndex

    index = KnowledgeIndex(_unit(3), 10.0)
    index.add("paris", _unit(0), torch.ones(3, 2), "Paris is in France", subject="Paris")
    index.add("rome", _unit(1), torch.ones(3, 2), "Rome is in Italy", subject="Rome")
    query = _unit(0)  # the key is Paris's: without the gate it is a hit whatever the text says
    assert index.lookup(query).edit_id == "paris"
    assert [h.edit_id for h in index.lookup_among(query, 1, index.candidates("Paris lies on"))] == ["paris"]
    assert index.lookup_among(query, 1, index.candidates("Rome lies on")) == []  # Rome's score is below the sentinel
    (miss,) = index.search_among(query[None], [index.candidates("The weather is")])
    assert miss.edit_id is None and not miss.accepted
    index.remove("paris")
    assert index.candidates("Paris lies on") == set()


def test_subjects_travel_through_redis_to_other_readers(redis_prefix) -> None:
    import torch

    from tests.test_retrieval import _repo, _tiny_edit

    writer, reader = _repo(redis_prefix), _repo(redis_prefix)
    edit = _tiny_edit()  # subject "france"
    writer.add(edit, "the capital of france is rome", torch.zeros(4).index_fill_(0, torch.tensor([0]), 1.0),
               torch.ones(3, 2))
    reader.refresh_interval_s = 0.0
    assert reader.candidates("What is the capital of France?") == {edit.edit_id}
    assert reader.candidates("What is the capital of Spain?") == set()
    fresh = _repo(redis_prefix)  # a new reader rebuilds from the hashes (reload): the subject is there too
    assert fresh.candidates("France's capital") == {edit.edit_id}
    writer.retire(edit.edit_id)
    assert reader.candidates("What is the capital of France?") == set()


def test_a_query_that_names_no_stored_subject_costs_no_encoding() -> None:
    from shared.settings import Settings
    from workers.datasets import bundled_counterfact_path, load_edits
    from workers.retrieval.tier import RetrievalTier

    edits = load_edits(bundled_counterfact_path(), limit=5).requests
    tier = RetrievalTier.load(settings=Settings(retrieval_subject_gate=True))
    tier.add_many(edits)
    encoded: list[list[str]] = []
    features = tier.encoder.features
    tier.encoder.features = lambda texts, *a, **k: encoded.append(list(texts)) or features(texts, *a, **k)
    assert tier.lookup("The weather in Lisbon today is") is None and encoded == []
    hit = tier.lookup(edits[0].text)
    assert hit is not None and hit.edit_id == edits[0].edit_id and encoded == [[edits[0].text]]
    plain = RetrievalTier(tier.recipe, tier.encoder, tier.checkpoint_id)  # the gate off: every query is encoded
    plain.add_many(edits[:1])
    encoded.clear()
    plain.lookup("The weather in Lisbon today is")
    assert len(encoded) == 1
