"""``editq eval``: sequential batched editing of the first N records, then metrics on all N (before and after).

Records are edited in order, batch after batch, without restoring the model: the final model is evaluated on every
record, so early edits must survive later ones (AlphaEdit's sequential protocol). The ``general`` block adds the
general-ability measures of ``workers.evaluation.general`` (full budget) before and after editing.

By default the deployment's policy applies, as in the pipeline: the guard settings, and the health budget
(``EDITQ_HEALTH_*``), whose refused batches go to the retrieval tier. Every edit is then scored the way it would be
served (its weights, or the tier with retrieval over all tier-held edits), and the JSON reports ``weights_share``,
``tier_share`` and the routes (with the tier's own hit rates) beside the combined metrics. ``policy=False``
evaluates the bare editor.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shared.settings import Settings
from workers.datasets import DataFormat, load_edits
from workers.editing.editor import Editor
from workers.editing.hparams import EditHParams, default_hparams
from workers.editing.stats import Progress, SecondMomentCache, StatsCorpus
from workers.evaluation.general import (
    BaseReference,
    GeneralProbe,
    RetentionFact,
    fact_retention,
    fluency,
    kl_and_agreement,
    load_or_compute_reference,
    load_retention_facts,
    without_subjects,
)
from workers.evaluation.metrics import edit_metrics
from workers.evaluation.scoring import perplexity
from workers.model_io import load_model, model_fingerprint

HELDOUT_TEXT = Path(__file__).with_name("heldout_text.txt")


@dataclass
class EvalConfig:
    data: Path
    limit: int = 200
    batch_size: int = 50
    algo: str = "alphaedit"
    hparams: dict[str, Any] = field(default_factory=dict)
    stats_corpus: Path | None = None
    model_path: Path | None = None
    state_out: Path | None = None
    general: bool = True
    policy: bool = True  # the deployment's guards and health budget, refused batches served by the tier



def heldout_texts() -> list[str]:
    """Short paragraphs of plain encyclopedic prose written for editq (no CounterFact subject is edited in them);
    perplexity on them tracks damage to general language ability."""
    return [p.strip() for p in HELDOUT_TEXT.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def resolve_hparams(config: Any, algo: str, overrides: dict[str, Any], settings: Settings) -> EditHParams:
    hp = default_hparams(config, algo)  # type: ignore[arg-type]
    if settings.hparams_path is not None:
        hp = hp.with_overrides(**EditHParams.from_json(settings.hparams_path).to_dict() | {"algo": algo})
    return hp.with_overrides(**overrides) if overrides else hp


@dataclass
class GeneralPre:
    """What the general measures need after editing, and their values before it."""

    probe: GeneralProbe
    reference: BaseReference
    facts: list[RetentionFact]
    retention: float
    fluency: float

    @classmethod
    def measure(
        cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: Settings, fingerprint: str,
        model_path: Path, edited_subjects: Iterable[str],
    ) -> GeneralPre:
        """Base reference (cached under ``home/general``), retention facts minus the edited subjects, and the
        pre-edit retention and fluency; call before the first edit."""
        probe = GeneralProbe.from_asset(tokenizer)
        reference = load_or_compute_reference(model, tokenizer, probe, settings.stats_dir.parent / "general",
                                              fingerprint)
        facts = without_subjects(load_retention_facts(Path(model_path).name), edited_subjects)
        return cls(probe, reference, facts, fact_retention(model, tokenizer, facts), fluency(model, tokenizer))

    def report(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ppl_pre: float, ppl_post: float
    ) -> dict[str, float | None]:
        kl, agreement = kl_and_agreement(model, tokenizer, self.probe, self.reference)
        values = {
            "kl": kl, "top1_agreement": agreement,
            "retention_pre": self.retention, "retention_post": fact_retention(model, tokenizer, self.facts),
            "ppl_pre": ppl_pre, "ppl_post": ppl_post,
            "fluency_pre": self.fluency, "fluency_post": fluency(model, tokenizer),
        }
        return {k: None if math.isnan(v) else v for k, v in values.items()}  # no NaN in JSON (no facts: null)


def run_evaluation(cfg: EvalConfig, settings: Settings, progress: Progress | None = None) -> dict[str, Any]:
    if cfg.limit < 1 or cfg.batch_size < 1:
        raise ValueError("--limit and --batch-size must be positive")
    EditHParams(algo=cfg.algo).with_overrides(**cfg.hparams)  # reject unknown settings before loading a model
    dataset = load_edits(cfg.data, limit=cfg.limit)
    requests = dataset.requests
    zsre = dataset.format == DataFormat.zsre
    model_path = cfg.model_path or settings.resolved_model_path()
    model, tokenizer = load_model(model_path, device=settings.device)
    hp = resolve_hparams(model.config, cfg.algo, cfg.hparams, settings)
    if cfg.policy:
        hp = hp.with_overrides(**settings.guard_overrides())
    fingerprint = model_fingerprint(Path(model_path))
    corpus = StatsCorpus(
        path=cfg.stats_corpus, n_texts=hp.stats_texts, text_tokens=hp.stats_text_tokens, seed=hp.seed
    )
    stats = SecondMomentCache(settings.stats_dir, fingerprint, corpus)
    texts = heldout_texts()

    pre = edit_metrics(model, tokenizer, requests, zsre)
    ppl_pre = perplexity(model, tokenizer, texts)
    general = (
        GeneralPre.measure(model, tokenizer, settings, fingerprint, Path(model_path), {r.subject for r in requests})
        if cfg.general else None
    )
    from workers.evaluation.policy import ServingPolicy  # imports collapse.py, which imports this module

    policy = ServingPolicy.from_settings(model, tokenizer, settings, fingerprint, Path(model_path)) if cfg.policy \
        else None
    start = time.perf_counter()
    editor = Editor(model, tokenizer, hp, stats, fingerprint, progress=progress)
    editor.prepare()
    stats_seconds = time.perf_counter() - start

    split: dict[str, float] = {}
    edit_seconds = 0.0
    for begin in range(0, len(requests), cfg.batch_size):
        batch = requests[begin : begin + cfg.batch_size]
        t0 = time.perf_counter()
        result = editor.apply(batch) if policy is None else policy.apply(editor, batch)
        edit_seconds += time.perf_counter() - t0
        for key, value in (result.seconds if result is not None else {}).items():
            split[key] = split.get(key, 0.0) + value
        if progress:
            progress("editing", begin + len(batch), len(requests))
    served = policy.served(model, tokenizer, requests, zsre) if policy is not None else None
    post = edit_metrics(model, tokenizer, requests, zsre) if served is None else served.metrics
    ppl_post = perplexity(model, tokenizer, texts)
    general_out = general.report(model, tokenizer, ppl_pre, ppl_post) if general is not None else None
    if cfg.state_out is not None:
        editor.state.save(cfg.state_out)
    n = len(requests)
    return {
        **post.as_dict(),
        **(served.as_dict() if served is not None else {"policy": None}),
        "pre": pre.as_dict(),
        "seconds_per_edit": edit_seconds / n,
        "perplexity_pre": ppl_pre,
        "perplexity_post": ppl_post,
        "general": general_out,
        "n_edits": n,
        "batch_size": cfg.batch_size,
        "algo": cfg.algo,
        "metric": "token_accuracy" if zsre else "probability_comparison",
        "stats_seconds": stats_seconds,
        "seconds_split_per_edit": {k: v / n for k, v in split.items()},
        "data": {"path": str(cfg.data), "format": dataset.format.value},
        "model": {"path": str(model_path), "fingerprint": fingerprint, "device": str(editor.device)},
        "stats_corpus": corpus.corpus_id,
        "hparams": hp.to_dict(),
    }
