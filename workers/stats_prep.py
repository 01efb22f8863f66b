"""Key statistics ahead of the first edit (``editq stats``, run by ``make setup``).

An edit worker needs E[k k^T] of every edited layer before its first batch. Computed on demand inside the worker,
that cost (minutes on a CPU) landed inside ``pool.start()`` of whichever command happened to come first. This module
computes exactly the statistics the worker and ``editq eval`` look up (same model fingerprint, layers, corpus and
cache directory), in the foreground and with progress, so no later command meets that cost by surprise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.settings import Settings
from workers.editing.hparams import V_STAR_ALGOS
from workers.editing.layout import FAMILIES, ModelLayout, UnsupportedModelError
from workers.editing.stats import Progress, SecondMomentCache, StatsCorpus


@dataclass
class StatsPlan:
    """What the statistics of one model and corpus need: which layers are missing and where text comes from."""

    model_path: Path
    fingerprint: str
    corpus: StatsCorpus
    layers: tuple[int, ...]
    max_len: int
    cache: SecondMomentCache
    layout: ModelLayout

    @property
    def missing(self) -> list[int]:
        return self.cache.missing(self.layout, self.layers)

    @property
    def directory(self) -> Path:
        return self.cache.dir


def plan_statistics(settings: Settings, corpus_path: Path | None = None) -> list[StatsPlan]:
    """The statistics every editing algorithm would look up for the settings' model, grouped by corpus.

    Reads only the model's config (no weights), so checking a ready cache takes well under a second. Layers,
    corpus size and seed come from the same resolution the edit worker uses (tuned defaults per model shape,
    ``EDITQ_HPARAMS_PATH`` on top); ``corpus_path`` stands for ``editq eval --stats-corpus``.
    """
    from transformers import AutoConfig

    from workers.evaluation.runner import resolve_hparams
    from workers.model_io import model_fingerprint

    model_path = settings.resolved_model_path()
    fingerprint = model_fingerprint(model_path)  # also says how to fetch a missing model
    config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    template = FAMILIES.get(config.model_type)
    if template is None:
        raise UnsupportedModelError(f"model_type {config.model_type!r} has no MLP template; supported: "
                                    f"{sorted(FAMILIES)}")
    layout = ModelLayout(config.model_type, template, int(config.num_hidden_layers))
    groups: dict[tuple[StatsCorpus, int], set[int]] = {}
    for algo in V_STAR_ALGOS:  # UltraEdit keeps running moments of its own edits: it reads no statistics
        hp = resolve_hparams(config, algo, {}, settings)
        corpus = StatsCorpus(path=corpus_path, n_texts=hp.stats_texts, text_tokens=hp.stats_text_tokens, seed=hp.seed)
        groups.setdefault((corpus, hp.stats_max_len), set()).update(hp.layers)
    return [
        StatsPlan(model_path, fingerprint, corpus, tuple(sorted(layers)), max_len,
                  SecondMomentCache(settings.stats_dir, fingerprint, corpus), layout)
        for (corpus, max_len), layers in groups.items()
    ]


def ensure_statistics(plans: list[StatsPlan], device: str = "auto", progress: Progress | None = None) -> None:
    """Compute what ``plans`` miss (instant when nothing is); the model is loaded only when something is."""
    todo = [plan for plan in plans if plan.missing]
    if not todo:
        return
    from workers.assets import quiet_transformers
    from workers.model_io import load_model

    with quiet_transformers():  # its loading bar would garble the caller's progress bars
        model, tokenizer = load_model(todo[0].model_path, device=device)
    for plan in todo:
        plan.cache.get(model, tokenizer, ModelLayout.from_model(model), plan.layers, max_len=plan.max_len,
                       progress=progress)


def ensure_health_reference(settings: Settings, device: str = "auto") -> bool:
    """The base model's reference for the health budget (KL on the mixed text, base perplexity and facts), cached
    under the home's ``general`` dir so no edit worker computes it at start. True when it had to be computed."""
    from transformers import AutoTokenizer

    from workers.assets import quiet_transformers
    from workers.evaluation.health_gate import HealthGate, gate_from_settings, settings_budget
    from workers.model_io import load_model, model_fingerprint

    if not settings.health_budget:
        return False
    model_path = settings.resolved_model_path()
    fingerprint = model_fingerprint(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    if HealthGate.cached(tokenizer, settings_budget(settings), settings.general_dir, fingerprint, model_path.name,
                         settings.health_facts_rotate, settings.health_fact_margin):
        return False
    with quiet_transformers():
        model, tokenizer = load_model(model_path, device=device)
    gate_from_settings(model, tokenizer, settings, fingerprint, model_path.name)
    return True
