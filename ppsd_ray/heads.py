"""Exit heads: map the exit layer's hidden state to next-token logits.

Every head type loads through `load_exit_head`. Type `lm` is the model's own
final norm and LM head applied at the exit layer (no training). Trained heads
are a .safetensors file whose metadata names the model, exit layer and type.
"""
from __future__ import annotations

from torch import nn


class ExitHead(nn.Module):
    """hidden [1, n, H] at the exit layer -> logits [1, n, V]."""

    kind: str = "base"

    def __init__(self, exit_layer: int):
        super().__init__()
        self.exit_layer = exit_layer


class LMExitHead(ExitHead):
    """The model's own final norm and LM head, shared with the last stage's weights."""

    kind = "lm"

    def __init__(self, exit_layer: int, norm: nn.Module, lm_head: nn.Module):
        super().__init__(exit_layer)
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, hidden):
        return self.lm_head(self.norm(hidden))


def load_exit_head(spec: str, exit_layer: int, norm: nn.Module, lm_head: nn.Module) -> ExitHead:
    if spec == "lm":
        return LMExitHead(exit_layer, norm, lm_head)
    raise ValueError(f"head: unknown head {spec!r} (trained heads are not supported yet)")
