"""Which parameters AdamW's weight decay applies to: HF Trainer's rule, which the reference trained with.

Every trainable weight but biases and LayerNorm weights (`Trainer.get_decay_parameter_names`). skillpipe
decayed every weight until 2026-12-05; `decay_norms_and_biases` keeps that for runs begun before.
"""

from __future__ import annotations

import torch

# HF Trainer's name patterns of parameters it never decays, beside those of LayerNorm modules
NOT_DECAYED_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def decayed_parameter_names(model: torch.nn.Module, decay_norms_and_biases: bool = False) -> set[str]:
    """Names of the trainable parameters that weight decay applies to."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if decay_norms_and_biases:
        return trainable
    from transformers.trainer_pt_utils import get_parameter_names  # here: transformers takes ~2 s to import

    return trainable & set(get_parameter_names(model, [torch.nn.LayerNorm], list(NOT_DECAYED_PATTERNS)))


def decay_groups(model: torch.nn.Module, weight_decay: float, decay_norms_and_biases: bool = False) -> list[dict]:
    """AdamW parameter groups of the trainable parameters: decayed, then not; one group when every weight decays."""
    decayed = decayed_parameter_names(model, decay_norms_and_biases)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for name, p in trainable if name in decayed], "weight_decay": weight_decay},
              {"params": [p for name, p in trainable if name not in decayed], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]  # every weight decayed: one group, as runs before had
