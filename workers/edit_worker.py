"""The edit worker: holds the model at a committed weight version and computes batch updates on it.

A plain class, made a Ray actor by the controller (``ray.remote(EditWorker).options(...)``), so it is also usable
and testable without Ray. With several workers, a batch's v* is sharded across them (``compute_values``) and one
leader solves the closed-form update (``edit``); the others then follow the committed version from the store
(``sync``), so every worker holds bit-identical matrices, which ``info().checksums`` lets the controller verify.

After each applied batch the leader measures collapse signals and returns them in ``EditResult.metrics`` (flat
``shared.metrics.metric_key`` keys, so they land in the version manifest): per edited matrix every version, the
model-level ones every ``collapse_eval_every`` versions. A batch the collapse guard refuses raises
``workers.guards.GuardRejection`` (reason ``collapse_risk``, per-edit efficacy attached) with the worker unchanged.

Before a batch is kept, the leader scores the candidate model against the base model (the health budget,
``workers/evaluation/health_gate.py``): past the budget the batch is refused the same way (reason
``health_budget``) and its edits stay in the retrieval tier; within it, the reading goes into the manifest.

The leader also computes the version's reference answers (greedy answers on a fixed probe set, with transformers on
exactly the committed weights: ``workers/evaluation/reference_answers.py``); they go into the manifest, and every
serving replica must reproduce them before it serves the version. Worker 0 stores version 0's in the store once.
"""

from __future__ import annotations

import logging
import time

import torch

from shared.jobs import CompactJob, EditJob, EditResult, StoreMeta, ValuesJob, ValuesShard, WorkerConfig, WorkerInfo
from shared.metrics import metric_key
from shared.schemas import EditRequest
from shared.settings import Settings
from shared.weight_store import BASE_VERSION, LocalWeightStore, ReferenceAnswers, lineage
from workers.editing.compaction import compact, live_edits
from workers.editing.editor import Editor
from workers.editing.hparams import EditHParams
from workers.editing.results import BatchResult
from workers.editing.stats import SecondMomentCache, StatsCorpus
from workers.editing.values import ValueResult
from workers.evaluation.collapse import RetentionSample, load_control_facts, model_health
from workers.evaluation.general import GeneralHealth
from workers.evaluation.health_gate import gate_from_settings, health_metrics
from workers.evaluation.reference_answers import reference_answers
from workers.evaluation.runner import resolve_hparams
from workers.guards import GuardRejection
from workers.guards.collapse import matrix_health
from workers.guards.policy import edit_success
from workers.model_io import load_model, model_fingerprint

log = logging.getLogger("editq.worker")


class EditMemoryError(MemoryError):
    """A batch needs more v* activation memory than this worker's budget: it fails as out of memory *before* it
    starts, so the controller splits it (and an edit too large alone goes to the retrieval tier) instead of a GPU
    running out of memory mid-batch."""


class VersionMismatchError(RuntimeError):
    """The worker is not at the version a job was computed for."""


class EditWorker:
    def __init__(self, config: WorkerConfig) -> None:
        settings = Settings(**config.settings)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.index = config.index
        model_path = settings.resolved_model_path()
        self.model, self.tokenizer = load_model(model_path, device=settings.device)
        fingerprint = model_fingerprint(model_path)
        meta = config.meta
        if meta is None:
            hp = resolve_hparams(self.model.config, settings.algo, {}, settings)
        else:
            if meta.base_model != fingerprint:
                raise ValueError(
                    f"the weight store was made for model {meta.base_model}, but this worker loaded {fingerprint}: "
                    "use another EDITQ_NAMESPACE or EDITQ_STORE_DIR for another model"
                )
            hp = EditHParams.from_dict(meta.hparams)
        stats = SecondMomentCache(
            settings.stats_dir, fingerprint,
            StatsCorpus(n_texts=hp.stats_texts, text_tokens=hp.stats_text_tokens, seed=hp.seed),
        )
        policy = hp.with_overrides(**settings.guard_overrides())  # deployment policy on top of the store's editor
        self.editor = Editor(
            self.model, self.tokenizer, policy, stats, fingerprint, templates=meta.templates if meta else None
        )
        self.meta = meta or StoreMeta(
            base_model=fingerprint, algo=hp.algo, hparams=hp.to_dict(), templates=self.editor.state.templates
        )
        self.base = {name: w.clone() for name, w in self._matrices().items()}
        self.store = LocalWeightStore(settings.resolved_store_dir())
        self.version = BASE_VERSION
        # Model-level collapse metrics cost a few forward passes: every N versions (Settings.collapse_eval_every).
        self.collapse_every = settings.collapse_eval_every
        self.max_batch_tokens = settings.worker_max_batch_tokens
        self.efficacy_check = settings.efficacy_check
        self.control_facts = load_control_facts(model_path.name)
        self.retention = RetentionSample(capacity=64, seed=hp.seed)
        # Built here, on the unedited model: the gate's reference is the base model's answers.
        self.health = gate_from_settings(self.model, self.tokenizer, settings, fingerprint, model_path.name)
        # Subjects edited in this lineage: their facts are meant to change, so retention does not count them. A
        # worker that rebuilt a version from the store knows only the subjects it edited itself (conservative).
        self.edited_subjects: set[str] = set()

    def _matrices(self) -> dict[str, torch.Tensor]:
        layout = self.editor.layout
        return {layout.weight_name(layer): w for layer, w in self.editor.state.weights.items()}

    def prepare(self) -> WorkerInfo:
        """Load or compute the key statistics (and null-space projectors) before the first batch; worker 0 of a
        store without version 0's reference answers computes them (the model is still at base here)."""
        if self.index == 0 and self.version == BASE_VERSION and self.store.reference(BASE_VERSION) is None:
            reference = self.compute_reference(BASE_VERSION)
            if reference is not None:
                self.store.put_base_reference(reference)
        self.editor.prepare()
        return self.info()

    def compute_reference(self, version: int) -> ReferenceAnswers | None:
        """The model's greedy answers on the probe set now; a failure is logged and never costs a batch (replicas
        then skip the check for that version, logged there too)."""
        try:
            return reference_answers(self.model, self.tokenizer)
        except Exception as err:
            log.warning("worker %d: reference answers failed at version %d: %s", self.index, version, err)
            return None

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            index=self.index, version=self.version, device=str(self.editor.device),
            checksums=self.editor.checksums(), meta=self.meta,
        )

    def sync(self, version: int, force_rebuild: bool = False) -> WorkerInfo:
        """Move to committed ``version``: forward along its lineage when possible, else rebuild from base."""
        if version == self.version and not force_rebuild:
            return self.info()
        chain = lineage(self.store, version)
        on_chain = [m.version for m in chain]
        if force_rebuild or (self.version != BASE_VERSION and self.version not in on_chain):
            self._reset_to_base()
        start = on_chain.index(self.version) + 1 if self.version in on_chain else 0
        for manifest in chain[start:]:
            deltas, aux = self.store.deltas(manifest.version)
            self.editor.apply_deltas(deltas, aux)
            self.version = manifest.version
            bad = [e.name for e in manifest.matrices if self.editor.checksums()[e.name] != e.sha256]
            if bad:
                raise RuntimeError(f"worker {self.index}: version {manifest.version} rebuilt with wrong {bad}")
        self.version = version
        return self.info()

    def _reset_to_base(self) -> None:
        layout = self.editor.layout
        state = self.editor.state
        for layer in state.weights:
            state.weights[layer] = self.base[layout.weight_name(layer)].clone()
        state.prev_keys_cov.clear()
        state.prev_keys.clear()
        state.moments.clear()
        self.retention.clear()
        self.edited_subjects.clear()
        state.edit_ids.clear()
        state.n_batches = 0
        self.editor.reset_weights()
        self.version = BASE_VERSION

    def _require_version(self, version: int) -> None:
        if self.version != version:
            raise VersionMismatchError(f"worker {self.index} is at version {self.version}, job needs {version}")

    def _check_budget(self, requests) -> None:
        if self.max_batch_tokens is None:
            return
        tokens = self.editor.value_tokens(requests)
        if tokens > self.max_batch_tokens:
            raise EditMemoryError(
                f"out of memory: {len(requests)} edit(s) need {tokens} tokens of v* activations, above this worker's "
                f"budget of {self.max_batch_tokens} (EDITQ_WORKER_MAX_BATCH_TOKENS)"
            )

    def compute_values(self, job: ValuesJob) -> ValuesShard:
        """v* of one shard of a batch (the expensive, embarrassingly parallel part)."""
        self._require_version(job.version)
        self._check_budget(job.requests)
        self.editor.prepare()
        seconds: dict[str, float] = {}
        values = self.editor.compute_values(job.requests, seconds)
        return ValuesShard(
            targets=values.targets, deltas=values.deltas, nll=values.nll, steps=values.steps, seconds=seconds
        )

    def edit(self, job: EditJob) -> EditResult:
        """Solve and apply one batch on top of ``job.parent``; the worker is then at ``job.version`` (uncommitted:
        the controller syncs it back to the parent if the commit does not happen)."""
        self._require_version(job.parent)
        if not job.shards:
            self._check_budget(job.requests)
        start = time.perf_counter()
        values = None
        if job.shards:
            values = ValueResult.concat(
                [ValueResult(s.targets, s.deltas, s.nll, s.steps) for s in job.shards]
            )
        subjects = self.edited_subjects | {r.subject for r in job.requests}
        readings: list[GeneralHealth] = []
        gate = self.health

        def accept(model) -> None:  # the candidate, before the editor keeps it: raises past the budget
            readings.append(gate.check(model, subjects, [r.edit_id or r.content_key() for r in job.requests]))

        try:
            result = self.editor.apply(job.requests, values, accept=accept if gate is not None else None)
        except GuardRejection as err:
            log.warning("worker %d: batch for version %d rejected (%s): %s", self.index, job.version, err.reason, err)
            raise
        self.version = job.version
        self.edited_subjects = subjects
        changed = {d.name for d in result.deltas}
        checksums = {name: sha for name, sha in self.editor.checksums().items() if name in changed}
        seconds = dict(result.seconds)
        for shard in job.shards or []:
            for key, value in shard.seconds.items():
                seconds[f"shard_{key}"] = max(seconds.get(f"shard_{key}", 0.0), value)
        missed = self.missed_edits(result, job.requests, seconds)
        metrics_start = time.perf_counter()
        metrics = self.collapse_metrics(result, job.requests, job.version, readings[0].ppl if readings else None)
        if readings:
            metrics |= health_metrics(readings[0])
        seconds["collapse_metrics"] = time.perf_counter() - metrics_start
        reference_start = time.perf_counter()
        reference = self.compute_reference(job.version)
        seconds["reference_answers"] = time.perf_counter() - reference_start
        seconds["leader_total"] = time.perf_counter() - start
        return EditResult(
            version=job.version, parent=job.parent, edit_ids=result.edit_ids, deltas=result.deltas,
            aux=result.aux, checksums=checksums, v_nll=result.v_nll, seconds=seconds,
            metrics=metrics, missed_edit_ids=missed, reference=reference,
        )

    def compact(self, job: CompactJob) -> EditResult:
        """Re-solve every live edit of ``job.parent``'s lineage jointly on the base weights (``compaction.py``), through
        the same health budget as a batch; the worker is then at ``job.version`` (uncommitted, like ``edit``).
        Raises ``CompactionRefused`` or ``GuardRejection`` (health budget) with the worker unchanged."""
        self._require_version(job.parent)
        start = time.perf_counter()
        live = live_edits(self.store, job.parent, exclude=job.exclude)
        subjects = self.edited_subjects | {r.subject for r in live.requests}
        readings: list[GeneralHealth] = []
        gate = self.health

        def accept(model) -> None:
            readings.append(gate.check(model, subjects))

        done = compact(self.editor, live, accept if gate is not None else None, max_lost=job.max_lost)
        self.version = job.version
        self.edited_subjects = subjects
        result = done.result
        checksums = self.editor.checksums()
        seconds = dict(result.seconds)
        metrics = self.collapse_metrics(result, [], job.version, readings[0].ppl if readings else None)
        if readings:
            metrics |= health_metrics(readings[0])
        metrics |= {
            "compaction_edits": float(len(live)), "compaction_efficacy_before": done.efficacy(after=False),
            "compaction_efficacy_after": done.efficacy(after=True), "compaction_lost_edits": float(len(done.lost)),
        }
        reference = self.compute_reference(job.version)
        seconds["leader_total"] = time.perf_counter() - start
        log.info("worker %d: compacted %d live edits into version %d in %.1f s (efficacy %.3f -> %.3f)", self.index,
                 len(live), job.version, seconds["leader_total"], done.efficacy(after=False), done.efficacy())
        return EditResult(
            version=job.version, parent=job.parent, edit_ids=[], deltas=result.deltas, aux=result.aux,
            checksums=checksums, v_nll=[], seconds=seconds, metrics=metrics, reference=reference,
            kind="revert" if job.exclude else "compaction",
            missed_edit_ids=done.lost,  # took before, not after (only when EDITQ_COMPACT_MAX_LOST allows any)
        )

    def missed_edits(self, result: BatchResult, requests: list[EditRequest], seconds: dict[str, float]) -> list[str]:
        """Edits the applied update did not make take on their own prompt (the guard's scores when it measured
        them, else one forward pass). A failed check is logged and treated as all taken: never costs the batch."""
        if not self.efficacy_check:
            return []
        start = time.perf_counter()
        try:
            success = result.per_edit_success
            if success is None:
                success = edit_success(self.model, self.tokenizer, requests).tolist()
        except Exception as err:
            log.warning("worker %d: efficacy check failed: %s", self.index, err)
            return []
        seconds["efficacy_check"] = time.perf_counter() - start
        return [edit_id for edit_id, ok in zip(result.edit_ids, success, strict=True) if ok < 0.5]

    def collapse_metrics(
        self, result: BatchResult, requests: list[EditRequest], version: int, perplexity: float | None = None
    ) -> dict[str, float]:
        """Per-matrix signals every version; model-level ones (perplexity, control facts, retention of earlier
        edits) every ``collapse_every`` versions. Metric failures are logged, never fail the batch."""
        out: dict[str, float] = {}
        try:
            spectra = self.editor.base_spectra()
            for layer, weight in self.editor.state.weights.items():
                health = matrix_health(weight, spectra[layer])
                out[metric_key("editq_sigma_max", layer=layer)] = health.sigma_max
                out[metric_key("editq_condition_number", layer=layer)] = health.condition_number
                out[metric_key("editq_relative_drift_ratio", layer=layer)] = health.relative_drift
                out[metric_key("editq_subspace_overlap_ratio", layer=layer)] = health.subspace_overlap
            for layer, share in result.filtered_energy.items():
                out[metric_key("editq_filtered_energy_ratio", layer=layer)] = share
            if result.guard_efficacy is not None:
                out[metric_key("editq_guard_batch_efficacy_ratio")] = result.guard_efficacy
            if version % self.collapse_every == 0:
                out |= model_health(self.model, self.tokenizer, self.control_facts, self.retention,
                                    perplexity=perplexity)
        except Exception as err:  # a metric must never cost an applied batch
            log.warning("worker %d: collapse metrics failed at version %d: %s", self.index, version, err)
        self.retention.add(requests)  # after measuring: the sample holds only earlier edits
        return out
