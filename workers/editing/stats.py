"""Second-moment statistics C = E[k k^T] of the edited matrices' inputs, computed once per (model, layer, corpus)
and cached on disk.

The reference code reads 100k Wikipedia texts from a hub; nothing may be downloaded here, so the default corpus is
text sampled from the model itself (a fixed seed makes it reproducible). It approximates the model's own
distribution of activations; it is narrower than Wikipedia, which in the AlphaEdit paper's ablation mostly costs
specificity. A user corpus (txt: one text per paragraph; jsonl: a "text" field) can replace it.

Sampling is most of a fresh machine's first-run cost (about 10 minutes on a CPU core for 512 x 128 tokens), so the
sampled text of the default model ships with editq (``workers/editing/corpora``): it is used only for that exact
model fingerprint and corpus id, and equals what the sampler gives there, so the statistics and their cache key are
the same either way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing import corpora
from workers.editing.hooks import capture, run_until_stopped
from workers.editing.layout import ModelLayout
from workers.editing.tokens import chunks_by_tokens, pad_right

# Openings for self-sampled text: varied registers so the keys cover more than one kind of prose.
SELF_SAMPLE_OPENINGS = (
    "The", "In", "A", "It", "When", "This", "According to", "He", "She", "They", "One of the", "During the",
    "Scientists", "The city of", "In the year", "Many people", "The history of", "There", "After", "Most",
)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class StatsCorpus:
    """Which text the statistics come from."""

    path: Path | None = None
    n_texts: int = 512
    text_tokens: int = 128
    seed: int = 0

    @property
    def corpus_id(self) -> str:
        if self.path is None:
            return f"self-{self.n_texts}x{self.text_tokens}-seed{self.seed}"
        digest = hashlib.sha256(Path(self.path).read_bytes()).hexdigest()[:16]
        return f"file-{digest}"


def read_corpus_file(path: Path) -> list[str]:
    """Texts from a .txt (blank-line separated paragraphs, else lines) or .jsonl (``text`` field) file."""
    path = Path(path)
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(f"{path}:{n}: expected a JSON object with a 'text' field ({err})") from None
    else:
        paragraphs = [p.strip() for p in raw.split("\n\n")]
        texts = paragraphs if len(paragraphs) > 1 else raw.splitlines()
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"{path}: no text found")
    return texts


@torch.no_grad()
def sample_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    n_texts: int,
    n_tokens: int,
    seed: int,
    batch_size: int = 64,
    progress: Progress | None = None,
) -> list[str]:
    """Sample ``n_texts`` continuations of ``n_tokens`` (plain sampling, temperature 1) from fixed openings."""
    device = next(model.parameters()).device
    texts: list[str] = []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, n_texts, batch_size):
                size = min(batch_size, n_texts - start)
                openings = [SELF_SAMPLE_OPENINGS[(start + i) % len(SELF_SAMPLE_OPENINGS)] for i in range(size)]
                batch = tokenizer(openings, return_tensors="pt", padding=True).to(device)
                out = model.generate(
                    **batch, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                    max_new_tokens=n_tokens, pad_token_id=tokenizer.pad_token_id,
                )
                texts.extend(tokenizer.batch_decode(out, skip_special_tokens=True))
                if progress:
                    progress("sampling text", len(texts), n_texts)
    finally:
        tokenizer.padding_side = old_side
    return texts


@torch.no_grad()
def accumulate_second_moments(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layout: ModelLayout,
    layers: Sequence[int],
    texts: Sequence[str],
    max_len: int = 1024,
    max_batch_tokens: int = 8192,
    progress: Progress | None = None,
) -> tuple[dict[int, torch.Tensor], int]:
    """Sum of k k^T (float64) over every non-padding token, for all ``layers`` in one pass per batch."""
    device = next(model.parameters()).device
    rows = [tokenizer(t, truncation=True, max_length=max_len)["input_ids"] for t in texts]
    rows = [r for r in rows if r]
    targets = {f"k{layer}": (layout.mlp_out_module(model, layer), "input") for layer in layers}
    sums: dict[int, torch.Tensor] = {}
    count = 0
    done = 0
    for group in chunks_by_tokens([len(r) for r in rows], max_batch_tokens):
        batch = pad_right([rows[i] for i in group], tokenizer.pad_token_id).to(device)
        mask = batch.attention_mask.bool()
        with capture(targets, stop_after=f"k{max(layers)}") as store:
            run_until_stopped(lambda b=batch: model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                                    use_cache=False))
        for layer in layers:
            k = store[f"k{layer}"][mask].float()
            part = (k.T @ k).to(torch.float64)
            sums[layer] = sums[layer] + part if layer in sums else part
        count += int(mask.sum())
        done += len(group)
        if progress:
            progress("second moments", done, len(rows))
    return sums, count


class SecondMomentCache:
    """Disk cache of normalised second moments, one safetensors file per layer, keyed by model and corpus."""

    def __init__(self, root: Path, model_fingerprint: str, corpus: StatsCorpus) -> None:
        self.corpus = corpus
        self.fingerprint = model_fingerprint
        self.dir = Path(root) / model_fingerprint / corpus.corpus_id
        self._memory: dict[int, torch.Tensor] = {}

    def _file(self, layout: ModelLayout, layer: int) -> Path:
        return self.dir / f"{layout.mlp_out_name(layer)}.mom2.safetensors"

    def missing(self, layout: ModelLayout, layers: Sequence[int]) -> list[int]:
        return [layer for layer in layers if layer not in self._memory and not self._file(layout, layer).exists()]

    def text_source(self) -> str:
        """Where the text for missing statistics would come from (for people: what a first run will cost)."""
        if self.corpus.path is not None:
            return f"corpus file {self.corpus.path}"
        if (self.dir / "texts.jsonl").exists():
            return "text sampled earlier (cached)"
        shipped = corpora.find(self.fingerprint, self.corpus.corpus_id)
        if shipped is not None:
            return f"text shipped with editq ({shipped.file})"
        return f"text sampled from the model now ({self.corpus.n_texts} x {self.corpus.text_tokens} tokens)"

    def get(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        layout: ModelLayout,
        layers: Sequence[int],
        max_len: int = 1024,
        progress: Progress | None = None,
    ) -> dict[int, torch.Tensor]:
        """Normalised C per layer (float64, CPU); computes and stores the missing ones in one pass."""
        todo = self.missing(layout, layers)
        if todo:
            texts = self._texts(model, tokenizer, progress)
            sums, count = accumulate_second_moments(
                model, tokenizer, layout, todo, texts, max_len=max_len, progress=progress
            )
            self.dir.mkdir(parents=True, exist_ok=True)
            for layer in todo:
                tmp = self._file(layout, layer).with_suffix(".tmp")
                save_file({"mom2_sum": sums[layer].cpu(), "count": torch.tensor([count])}, str(tmp))
                tmp.replace(self._file(layout, layer))
        for layer in layers:
            if layer not in self._memory:
                data = load_file(str(self._file(layout, layer)))
                self._memory[layer] = data["mom2_sum"] / float(data["count"][0])
        return {layer: self._memory[layer] for layer in layers}

    def _texts(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, progress: Progress | None
    ) -> list[str]:
        if self.corpus.path is not None:
            return read_corpus_file(self.corpus.path)
        cached = self.dir / "texts.jsonl"
        if cached.exists():
            return [json.loads(line)["text"] for line in cached.read_text().splitlines() if line]
        shipped = corpora.find(self.fingerprint, self.corpus.corpus_id)
        if shipped is not None:  # what sample_texts gave for this very model and corpus id: no need to sample
            texts = shipped.texts()
            if progress:
                progress("shipped text", len(texts), len(texts))
            return texts
        texts = sample_texts(
            model, tokenizer, self.corpus.n_texts, self.corpus.text_tokens, self.corpus.seed, progress=progress
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        cached.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        return texts
