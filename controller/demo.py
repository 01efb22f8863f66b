"""The local demo: edit real CounterFact facts on SmolLM2 and show what changed."""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.table import Table

from shared.settings import Settings
from workers.datasets import bundled_counterfact_path, load_edits
from workers.editing.editor import Editor
from workers.editing.stats import Progress, SecondMomentCache, StatsCorpus
from workers.evaluation.metrics import edit_metrics
from workers.evaluation.runner import resolve_hparams
from workers.model_io import load_model, model_fingerprint


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    batch = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, batch.input_ids.shape[1]:], skip_special_tokens=True).strip()


def run_demo(settings: Settings, n_edits: int, show: int, console: Console, progress: Progress) -> None:
    requests = load_edits(bundled_counterfact_path(), limit=n_edits).requests
    model_path = settings.resolved_model_path()
    console.print(f"model: {model_path}")
    model, tokenizer = load_model(model_path, device=settings.device)
    hp = resolve_hparams(model.config, "alphaedit", {}, settings)
    fingerprint = model_fingerprint(model_path)
    stats = SecondMomentCache(settings.stats_dir, fingerprint, StatsCorpus(
        n_texts=hp.stats_texts, text_tokens=hp.stats_text_tokens, seed=hp.seed))
    shown = requests[:show]
    before = [greedy(model, tokenizer, r.text) for r in shown]
    pre = edit_metrics(model, tokenizer, requests, zsre=False)
    editor = Editor(model, tokenizer, hp, stats, fingerprint, progress=progress)
    editor.prepare()
    start = time.perf_counter()
    editor.apply(requests)
    seconds = time.perf_counter() - start
    after = [greedy(model, tokenizer, r.text) for r in shown]
    post = edit_metrics(model, tokenizer, requests, zsre=False)

    table = Table(title=f"{n_edits} CounterFact edits with AlphaEdit, one batch ({seconds:.0f} s)")
    for col in ("prompt", "new target", "before", "after"):
        table.add_column(col, overflow="fold")
    for r, b, a in zip(shown, before, after, strict=True):
        table.add_row(r.text, r.target_new, b, a)
    console.print(table)
    metrics = Table(title="edit metrics (share of prompts)")
    for col in ("metric", "before", "after"):
        metrics.add_column(col)
    for key in ("efficacy", "generalization", "specificity"):
        metrics.add_row(key, f"{getattr(pre, key):.2f}", f"{getattr(post, key):.2f}")
    console.print(metrics)
