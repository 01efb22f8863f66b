"""Shared fixtures: a tiny word-level tokenizer and tiny random models (fast, no assets), and the real SmolLM2
(slow tests) from the editq cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = [
    "<pad>",
    "<unk>",
    "the",
    "capital",
    "of",
    "france",
    "is",
    "paris",
    "lyon",
    "rome",
    "city",
    "a",
    "an",
    "in",
    "located",
    "berlin",
    "germany",
    "danielle",
    "darrieux",
    "mother",
    "tongue",
    "french",
    "english",
    "eiffel",
    "tower",
    "famous",
    "for",
    "language",
    "spoken",
    "who",
    "what",
    "and",
    "by",
    "one",
    "bbc",
    "sega",
    "sony",
    "works",
    "at",
    "plays",
    "music",
    "jazz",
    "piano",
    "london",
    "because",
    "therefore",
    "i",
    "you",
    "it",
    ".",
    ",",
    "?",
    "x",
    "y",
    "z",
]


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<pad>")
    fast.padding_side = "right"
    return fast


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(WORDS),
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        initializer_range=0.2,
    )
    return _freeze(LlamaForCausalLM(config))


@pytest.fixture
def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=32, n_layer=3, n_head=4, vocab_size=len(WORDS), n_positions=128, pad_token_id=0, initializer_range=0.2
    )
    return _freeze(GPT2LMHeadModel(config))


def smollm2_path() -> Path:
    from shared.settings import Settings

    return Settings().resolved_model_path()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fetched by `make setup` / `editq models fetch`)."""
    from workers.model_io import load_model

    path = smollm2_path()
    if not (path / "config.json").exists():
        pytest.fail(f"SmolLM2 is not at {path}: run `make setup` (editq models fetch) first")
    return load_model(path, device="cpu")


# ---- pipeline fixtures: real Redis, real Ray, a tiny model saved as an HF directory ---------------------------


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis server the queue tests run against (`.ci/run` starts one when none answers)."""
    from controller.pipeline.runtime import redis_answers
    from shared.settings import Settings

    url = Settings().redis_url
    if not redis_answers(url):
        pytest.fail(f"no Redis answers at {url}: start one (redis-server) or set EDITQ_REDIS_URL")
    return url


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster per test session (2 cores here: actors take at most 1 CPU)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="editq-tests")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random Llama + word-level tokenizer saved as a normal HF model directory, with editor settings
    sized for it (``hparams.json``), so pipeline tests exercise the real code paths in seconds."""
    import json

    out = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(WORDS), max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=0,
        initializer_range=0.2,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    hparams = {"layers": [1, 2], "stats_texts": 32, "stats_text_tokens": 16, "v_num_grad_steps": 10,
               "n_context_templates": 2}
    (out / "hparams.json").write_text(json.dumps(hparams))
    return out


@pytest.fixture
def redis_prefix(redis_url: str):
    """A fresh Redis key prefix for one retrieval-tier test, deleted afterwards."""
    import uuid

    import redis

    prefix = f"editq-test:retrieval:{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
