"""Fusion heads over per-view backbone features, selectable by name for ablations.

`crossview` is SkillFormer's CrossViewFusion (Bianchi & Liotta, arXiv 2505.08665): per-view
LayerNorm, multi-head attention across views, mean over views, Linear-GELU-LayerNorm-Dropout to
H, a multiplicative sigmoid gate, Linear back to D with LayerNorm, self-calibration with
learnable scalar mean/std, then a 4-way classifier. Absent views are masked out of attention and
of the mean; they are never fed as zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.backbone import reference_view_feature

NUM_CLASSES = 4


@dataclass(frozen=True)
class HeadConfig:
    """Shape of a fusion head; saved with its weights."""

    fusion: str = field(default="crossview", metadata={"help": "crossview, crossview-nogate, mean, concat or temporal"})
    dim: int = field(default=768, metadata={"help": "backbone feature size D"})
    num_views: int = field(default=5, metadata={"help": "view slots V of the input"})
    frames: int = field(default=16, metadata={"help": "frames T of the cached tokens (temporal fusion)"})
    num_patches: int = field(default=196, metadata={"help": "patches per frame N (pools the reference feature)"})
    hidden: int = field(default=2560, metadata={"help": "projector size H (reference: 1536 / 2048 / 2560)"})
    heads: int = field(default=16, metadata={"help": "attention heads"})
    dropout: float = field(default=0.1, metadata={"help": "dropout in attention and projector"})


def head_inputs(tokens: torch.Tensor, config: HeadConfig) -> torch.Tensor:
    """Cached tokens (..., V, 1 + T, D) -> what the head consumes, computed once per dataset.

    View-level heads take the reference's per-view feature (..., V, D), the mean over CLS and all
    patch tokens; the temporal head takes the per-frame patch means (..., V, T, D).
    """
    if config.fusion == "temporal":
        return tokens[..., 1:, :]
    return reference_view_feature(tokens, config.num_patches)


def masked_mean(x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(B, S, D), (B, S) bool -> (B, D): mean over the present slots only."""
    weights = present.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class Dropout(nn.Module):
    """Inverted dropout as a comparison with uniform noise.

    Same distribution as nn.Dropout, but torch.compile fuses it into the neighbouring kernel, where
    nn.Dropout's bernoulli_ stays a separate kernel on CPU (~7% of a compiled fit-head step).
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * (torch.rand_like(x) >= self.p) / (1 - self.p)


class SelfCalibration(nn.Module):
    """Standardise each sample over its features, then apply a learnable scalar std and mean."""

    def __init__(self, std: float = 0.117, mean: float = 0.0007, eps: float = 1e-6):
        super().__init__()
        self.std, self.mean, self.eps = nn.Parameter(torch.tensor(std)), nn.Parameter(torch.tensor(mean)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D)
        centred = x - x.mean(-1, keepdim=True)
        return centred / (centred.std(-1, keepdim=True) + self.eps) * self.std + self.mean


class PooledCrossViewAttention(nn.Module):
    """Multi-head self-attention across view tokens, followed by the masked mean over views.

    Equals `nn.MultiheadAttention` followed by a masked mean over the query views, but takes the
    mean early: both the product with the values and the output projection are linear, so the
    attention weights are averaged over the present query views first. One weighted sum of the
    values per head then replaces S of them, and the output projection runs once per take instead
    of once per view (a compiled fit-head step took x0.90-0.98 the time in interleaved A/B runs).
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.dropout = Dropout(dropout)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(B, S, D), (B, S) bool -> (B, D)."""
        batch, slots, dim = x.shape
        q, k, v = self.qkv(x).view(batch, slots, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, S, d) each
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, h, S, S)
        scores = scores.masked_fill(~present[:, None, None, :], float("-inf"))
        weights = self.dropout(scores.softmax(-1))  # (B, h, S query, S key)
        mean_weights = masked_mean(weights.transpose(1, 2).flatten(2), present)  # over queries: (B, h * S key)
        return self.out((mean_weights.view(batch, self.heads, 1, slots) @ v).reshape(batch, dim))  # (B, h, 1, d) -> (B, D)


class GatedProjector(nn.Module):
    """(B, D) -> (B, D): Linear-GELU-LayerNorm-Dropout to H, sigmoid gate, Linear-LayerNorm back, calibration."""

    def __init__(self, dim: int, hidden: int, dropout: float, gate: bool = True):
        super().__init__()
        self.up = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.LayerNorm(hidden), Dropout(dropout))
        self.gate = nn.Linear(hidden, hidden) if gate else None
        self.down = nn.Sequential(nn.Linear(hidden, dim), nn.LayerNorm(dim))
        self.calibration = SelfCalibration()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)  # (B, H)
        if self.gate is not None:
            h = h * torch.sigmoid(self.gate(h))
        return self.calibration(self.down(h))


class CrossViewFusion(nn.Module):
    """SkillFormer's fusion: attention across the view tokens, then the gated projector."""

    def __init__(self, config: HeadConfig, gate: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(config.dim)
        self.attention = PooledCrossViewAttention(config.dim, config.heads, config.dropout)
        self.projector = GatedProjector(config.dim, config.hidden, config.dropout, gate)
        self.classifier = nn.Linear(config.dim, NUM_CLASSES)

    def forward(self, features: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(B, V, D) per-view features, (B, V) bool -> (B, 4) logits."""
        return self.classifier(self.projector(self.attention(self.norm(features), present)))


class TemporalFusion(nn.Module):
    """Attention over all view x frame tokens (per-frame patch means + view and frame embeddings)."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.view_embedding = nn.Parameter(torch.zeros(config.num_views, 1, config.dim))
        self.frame_embedding = nn.Parameter(torch.zeros(1, config.frames, config.dim))
        nn.init.trunc_normal_(self.view_embedding, std=0.02)
        nn.init.trunc_normal_(self.frame_embedding, std=0.02)
        self.norm = nn.LayerNorm(config.dim)
        self.attention = PooledCrossViewAttention(config.dim, config.heads, config.dropout)
        self.projector = GatedProjector(config.dim, config.hidden, config.dropout)
        self.classifier = nn.Linear(config.dim, NUM_CLASSES)

    def forward(self, features: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(B, V, T, D) per-frame features, (B, V) bool -> (B, 4) logits."""
        batch, _, frames, dim = features.shape
        tokens = features + self.view_embedding + self.frame_embedding  # (B, V, T, D)
        sequence = self.norm(tokens.reshape(batch, -1, dim))  # (B, V*T, D)
        mask = present.repeat_interleave(frames, dim=1)  # (B, V*T)
        return self.classifier(self.projector(self.attention(sequence, mask)))


class MeanFusion(nn.Module):
    """Ablation: mean of the present views' features, then a linear classifier."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.dim)
        self.classifier = nn.Linear(config.dim, NUM_CLASSES)

    def forward(self, features: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        views = self.norm(features)  # (B, V, D)
        return self.classifier(masked_mean(views, present))


class ConcatFusion(nn.Module):
    """Ablation: view features concatenated in fixed view order; an absent view is a learned token."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.dim)
        self.absent = nn.Parameter(torch.zeros(config.num_views, config.dim))
        self.classifier = nn.Sequential(
            nn.Linear(config.num_views * config.dim, config.hidden), nn.GELU(), Dropout(config.dropout),
            nn.Linear(config.hidden, NUM_CLASSES),
        )

    def forward(self, features: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        views = self.norm(features)  # (B, V, D)
        views = torch.where(present.unsqueeze(-1), views, self.absent)
        return self.classifier(views.flatten(1))


# heads that tell view slots apart (concat's fixed order, temporal's view embeddings); the others are permutation
# invariant over views, so which camera fills which exo slot does not change their output
VIEW_ORDER_DEPENDENT = frozenset({"concat", "temporal"})

FUSIONS = {
    "crossview": lambda config: CrossViewFusion(config),
    "crossview-nogate": lambda config: CrossViewFusion(config, gate=False),
    "mean": MeanFusion,
    "concat": ConcatFusion,
    "temporal": TemporalFusion,
}


def build_head(config: HeadConfig) -> nn.Module:
    if config.fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {config.fusion!r} (choose from {sorted(FUSIONS)})")
    return FUSIONS[config.fusion](config)
