"""Which parameters AdamW's weight decay applies to: HF Trainer's rule, which the reference trained with.

Every trainable weight but biases and LayerNorm weights (`Trainer.get_decay_parameter_names`). skillpipe
decayed every weight until 2026-12-05; `decay_norms_and_biases` keeps that for runs begun before.
"""

from __future__ import annotations

import re

import torch

# HF Trainer's name patterns of parameters it never decays, beside those of LayerNorm modules
NOT_DECAYED_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
NOT_DECAYED = re.compile("|".join(NOT_DECAYED_PATTERNS))


def decayed_parameter_names(model: torch.nn.Module, decay_norms_and_biases: bool = False) -> set[str]:
    """Names of the trainable parameters that weight decay applies to."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if decay_norms_and_biases:
        return trainable
    return trainable - _in_layer_norms(model) - {name for name in trainable if NOT_DECAYED.search(name.lower())}


def _in_layer_norms(model: torch.nn.Module) -> set[str]:
    """Names of the parameters of `model`'s LayerNorm modules (below `model` itself, as HF's rule reads them).

    HF's rule is `transformers.trainer_pt_utils.get_parameter_names(model, [LayerNorm], NOT_DECAYED_PATTERNS)`; it is
    written out here so that fit-head, which never builds a backbone, does not import transformers (~2 s) for it.
    Tested equal to HF Trainer's own `get_decay_parameter_names` (tests/test_finetune.py)."""
    return {f"{prefix}.{name}" for prefix, module in model.named_modules() if prefix and isinstance(module, torch.nn.LayerNorm)
            for name, _ in module.named_parameters()}


def decay_groups(model: torch.nn.Module, weight_decay: float, decay_norms_and_biases: bool = False) -> list[dict]:
    """AdamW parameter groups of the trainable parameters: decayed, then not; one group when every weight decays."""
    decayed = decayed_parameter_names(model, decay_norms_and_biases)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for name, p in trainable if name in decayed], "weight_decay": weight_decay},
              {"params": [p for name, p in trainable if name not in decayed], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]  # every weight decayed: one group, as runs before had
