"""Where the edited MLP output matrices live, read from the model config (no per-model if-chains).

Every supported family maps to templates of module names. The edited weight is always exposed in ``nn.Linear``
orientation ``(d_out, d_in)``; GPT-2's ``Conv1D`` stores ``(d_in, d_out)`` and is transposed on the way in and out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FamilyTemplate:
    """Module-name templates for one architecture family; ``{}`` is the layer index."""

    block: str
    mlp_out: str


# Families by ``config.model_type``. Llama-like models share one template.
_LLAMA = FamilyTemplate(block="model.layers.{}", mlp_out="model.layers.{}.mlp.down_proj")
FAMILIES: dict[str, FamilyTemplate] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "mixtral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "phi3": _LLAMA,
    "olmo2": _LLAMA,
    "gpt2": FamilyTemplate(block="transformer.h.{}", mlp_out="transformer.h.{}.mlp.c_proj"),
    "gptj": FamilyTemplate(block="transformer.h.{}", mlp_out="transformer.h.{}.mlp.fc_out"),
    "gpt_neox": FamilyTemplate(block="gpt_neox.layers.{}", mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h"),
}


class UnsupportedModelError(ValueError):
    """The model's family has no known MLP template."""


def _is_transposed(module: nn.Module) -> bool:
    """GPT-2 style Conv1D keeps ``weight`` as (d_in, d_out); detect it by type, not by family name."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


@dataclass(frozen=True)
class ModelLayout:
    """Resolved module paths for one model instance."""

    model_type: str
    template: FamilyTemplate
    num_layers: int

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelLayout:
        config = model.config
        template = FAMILIES.get(config.model_type)
        if template is None:
            raise UnsupportedModelError(
                f"model_type {config.model_type!r} has no MLP template; supported: {sorted(FAMILIES)}"
            )
        layout = cls(config.model_type, template, int(config.num_hidden_layers))
        layout.mlp_out_module(model, 0)  # fail fast if the names do not resolve
        return layout

    def block_name(self, layer: int) -> str:
        return self.template.block.format(layer)

    def mlp_out_name(self, layer: int) -> str:
        return self.template.mlp_out.format(layer)

    def weight_name(self, layer: int) -> str:
        """State-dict name of the edited matrix (checkpoint/HF naming)."""
        return f"{self.mlp_out_name(layer)}.weight"

    def block(self, model: nn.Module, layer: int) -> nn.Module:
        return model.get_submodule(self.block_name(layer))

    def mlp_out_module(self, model: nn.Module, layer: int) -> nn.Module:
        self._check_layer(layer)
        try:
            return model.get_submodule(self.mlp_out_name(layer))
        except AttributeError as err:
            raise UnsupportedModelError(
                f"{self.mlp_out_name(layer)} not found in {type(model).__name__}"
            ) from err

    def is_transposed(self, model: nn.Module, layer: int) -> bool:
        """Whether the checkpoint stores this matrix as (d_in, d_out)."""
        return _is_transposed(self.mlp_out_module(model, layer))

    def get_weight(self, model: nn.Module, layer: int) -> torch.Tensor:
        """A copy of the edited matrix in (d_out, d_in) orientation."""
        module = self.mlp_out_module(model, layer)
        weight = module.weight.detach()
        return (weight.T if _is_transposed(module) else weight).clone()

    @torch.no_grad()
    def set_weight(self, model: nn.Module, layer: int, value: torch.Tensor) -> None:
        """Overwrite the edited matrix from a (d_out, d_in) tensor, in place (keeps tied/shared storage valid)."""
        module = self.mlp_out_module(model, layer)
        target = module.weight
        value = value.T if _is_transposed(module) else value
        if value.shape != target.shape:
            raise ValueError(f"shape mismatch for layer {layer}: {tuple(value.shape)} vs {tuple(target.shape)}")
        target.copy_(value.to(dtype=target.dtype, device=target.device))

    @torch.no_grad()
    def add_to_weight(self, model: nn.Module, layer: int, delta: torch.Tensor) -> None:
        """Add a (d_out, d_in) update to the edited matrix."""
        module = self.mlp_out_module(model, layer)
        delta = delta.T if _is_transposed(module) else delta
        module.weight.add_(delta.to(dtype=module.weight.dtype, device=module.weight.device))

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range: the model has {self.num_layers} layers")
