"""fit-head's compiled training step: gather, forward, backward and AdamW in one torch.compile graph.

A fusion head's step is memory-bound on a CPU: its ~5 GFLOP of matmuls take a few ms, but every
step also reads and writes each of its millions of parameters several times. The eager loop
(autocast + fused AdamW) pays for that in separate passes: cast the fp32 weights to bf16, cast the
bf16 gradients back, then the optimizer. Here the step is one graph that inductor fuses:

- the head runs on bf16 working copies of its parameters (pure bf16 compute, fp32 accumulation
  inside the kernels) and gets bf16 gradients;
- one fused loop per parameter applies AdamW to the fp32 master weights and moments (the same
  update as `torch.optim.AdamW`) and writes the next step's bf16 working copy in the same pass;
- the batch is gathered from the resident table inside the graph; the last, smaller batch is padded
  to full size with zero-weight rows so one compiled graph serves every step.

Compiling costs ~25-50 s per head shape on 2 cores the first time; inductor caches the result on
disk (a few seconds in later runs), so this pays off for long cells and seed grids, not for one
short cell: it is `fit-head --compile`, off by default.

Each head shape (parameters, inputs, batch) gets its own copy of the step's code: torch keeps at most
`recompile_limit` (8) graphs per code object and runs the function uncompiled past that, silently but
for a log line, which a grid of 3 view settings x 5 fusions (15 shapes) would reach. Cells of one shape
share theirs (seeds: compiled once).
"""

from __future__ import annotations

import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value

from pipeline.weight_decay import decayed_parameter_names


def adamw_scalars(lr: float, step: int, betas: tuple[float, float], weight_decay: float) -> tuple[float, float, float]:
    """Step `step`'s (weight decay factor, step size, sqrt of the second bias correction), as in torch.optim.AdamW.

    Computed in Python: inside the graph, inductor would recompute the powers for every element.
    """
    beta1, beta2 = betas
    return 1 - lr * weight_decay, lr / (1 - beta1**step), (1 - beta2**step) ** 0.5


def adamw_update(master: dict[str, torch.Tensor], working: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                 first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], decay: torch.Tensor,
                 step_size: torch.Tensor, second_correction: torch.Tensor, betas: tuple[float, float], eps: float,
                 decayed: frozenset[str]) -> None:
    """torch.optim.AdamW's update on fp32 masters and moments (in place), then the bf16 working copy; weight decay
    on the `decayed` parameters only (pipeline.weight_decay)."""
    beta1, beta2 = betas
    for name, weight in master.items():
        grad = grads[name].float()
        if name in decayed:
            weight.mul_(decay)
        first[name].lerp_(grad, 1 - beta1)
        second[name].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        weight.sub_(step_size * first[name] / (second[name].sqrt() / second_correction + eps))
        working[name].copy_(weight)


class CompiledHeadTrainer:
    """Trains `head` (in place of nn.Module parameters + optimizer) with a compiled step.

    Args:
        head: the fusion head; its current parameters are the starting point.
        rows_per_step: the batch size; smaller batches are padded to it.
        weight_decay, betas, eps: AdamW's settings.
        decay_norms_and_biases: decay biases and LayerNorm weights too (pipeline.weight_decay).
        compile: False runs the same step eagerly (tests compare it with torch.optim.AdamW).
    """

    def __init__(self, head: nn.Module, rows_per_step: int, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, compile: bool = True, decay_norms_and_biases: bool = False):
        self.head, self.rows_per_step = head, rows_per_step
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.decayed = frozenset(decayed_parameter_names(head, decay_norms_and_biases))
        self.master = {name: p.detach().float().clone() for name, p in head.named_parameters()}
        self.working = {name: p.to(torch.bfloat16) for name, p in self.master.items()}
        self.first = {name: torch.zeros_like(p) for name, p in self.master.items()}
        self.second = {name: torch.zeros_like(p) for name, p in self.master.items()}
        self.steps = 0
        self._step = None if compile else type(self)._train_step  # compiled at the first step, for its shapes

    def _loss(self, working: dict[str, torch.Tensor], inputs: torch.Tensor, present: torch.Tensor, labels: torch.Tensor,
              rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        logits = functional_call(self.head, working, (inputs[rows].to(torch.bfloat16), present[rows]))  # (B, 4)
        losses = F.cross_entropy(logits.float(), labels[rows], reduction="none")  # (B,)
        return (losses * weights).sum() / weights.sum()

    def _train_step(self, inputs, present, labels, rows, weights, decay, step_size, second_correction):
        grads, loss = grad_and_value(self._loss)(self.working, inputs, present, labels, rows, weights)
        adamw_update(self.master, self.working, grads, self.first, self.second, decay, step_size, second_correction,
                     self.betas, self.eps, self.decayed)
        return loss

    def step(self, inputs: torch.Tensor, present: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor,
             lr: float) -> torch.Tensor:
        """One AdamW step on `rows` of the resident (N, V, ...) inputs; returns the batch's mean loss (0-d tensor)."""
        if not self.head.training:  # train() walks every submodule: ~0.3 ms, 10% of a tiny head's step
            self.head.train()
        real = len(rows)
        weights = torch.ones(self.rows_per_step, device=inputs.device)
        if real < self.rows_per_step:  # pad with row `rows[0]` at weight 0: same graph, same gradient
            rows = torch.cat([rows, rows[:1].expand(self.rows_per_step - real)])
            weights[real:] = 0
        self.steps += 1
        # one tensor, one host-to-device copy on a GPU (three 0-d views of it for the graph)
        scalars = torch.tensor(adamw_scalars(lr, self.steps, self.betas, self.weight_decay), dtype=torch.float32,
                               device=inputs.device).unbind()
        if self._step is None:
            self._step = compiled_train_step(self._shape_key(inputs, present, labels))
        return self._step(self, inputs, present, labels, rows, weights, *scalars)

    def _shape_key(self, *inputs: torch.Tensor) -> tuple:
        """What makes this trainer's step a different graph from another's: the head, its shapes, the batch's, and
        which parameters decay (a guard of the graph)."""
        return (type(self.head), tuple((name, tuple(p.shape)) for name, p in self.master.items()), self.rows_per_step,
                tuple((tuple(x.shape), x.dtype, x.device.type) for x in inputs), tuple(sorted(self.decayed)))

    @torch.no_grad()
    def copy_to_head(self) -> nn.Module:
        """Write the fp32 master weights into the head's parameters; returns the head."""
        for name, parameter in self.head.named_parameters():
            parameter.copy_(self.master[name])
        return self.head


_COMPILED_STEPS: dict[tuple, Callable] = {}


def compiled_train_step(shape_key: tuple) -> Callable:
    """CompiledHeadTrainer._train_step compiled, from a copy of its code object of its own for each head shape."""
    if shape_key not in _COMPILED_STEPS:
        original = CompiledHeadTrainer._train_step
        copy = types.FunctionType(original.__code__.replace(), original.__globals__, f"{original.__name__}_compiled")
        _COMPILED_STEPS[shape_key] = torch.compile(copy, dynamic=False)
    return _COMPILED_STEPS[shape_key]
