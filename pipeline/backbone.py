"""The TimeSformer backbone: load it for any frame count, adapt it with LoRA, encode clips.

TimeSformer: Bertasius, Wang & Torresani, "Is Space-Time Attention All You Need for Video
Understanding?", ICML 2021. LoRA: Hu et al., "LoRA: Low-Rank Adaptation of Large Language
Models", ICLR 2022. Weights: Hugging Face `facebook/timesformer-base-finetuned-k600` or any local
folder holding a TimeSformer `config.json` + weights.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import TimesformerConfig, TimesformerModel
from transformers.utils import logging as hf_logging

DEFAULT_BACKBONE = "facebook/timesformer-base-finetuned-k600"

# The seven module kinds SkillFormer adapts in every layer, anchored so that e.g. the spatial
# attention's `attention.output.dense` never matches the temporal one (a plain "dense" would
# match every dense layer): spatial qkv + output, temporal qkv + output, temporal_dense, MLP.
LORA_TARGETS = (
    r".*\.layer\.\d+\.(attention\.attention\.qkv|attention\.output\.dense"
    r"|temporal_attention\.attention\.qkv|temporal_attention\.output\.dense"
    r"|temporal_dense|intermediate\.dense|output\.dense)"
)
LORA_KINDS_PER_LAYER = 7


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters (reference: r=32/alpha=64 ego, 48/96 exos, 64/128 ego+exos)."""

    r: int = field(default=32, metadata={"help": "rank of the low-rank update"})
    alpha: int = field(default=64, metadata={"help": "scaling numerator (update scaled by alpha / r)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the LoRA input"})


def load_backbone(name_or_dir: str, num_frames: int) -> TimesformerModel:
    """A TimeSformer from the hub or a local folder, set up for `num_frames` frames, in eval mode."""
    path = Path(name_or_dir)
    if path.exists() and not (path / "config.json").is_file():
        raise ValueError(f"{path}: backbone folder has no config.json (expected a save_pretrained TimeSformer)")
    hf_logging.disable_progress_bar()  # one bar per load would drown the stage's own progress
    model = TimesformerModel.from_pretrained(str(name_or_dir))
    set_num_frames(model, num_frames)
    return model.eval()


def set_num_frames(model: TimesformerModel, num_frames: int) -> None:
    """Resample the time embeddings to T frames and make every layer reshape with T.

    HF's layers read `config.num_frames` to split tokens into frames: feeding T frames to a model
    configured for another count runs silently but mixes frames. The layers share the model's
    config object, so setting it once is enough. Linear interpolation (align_corners=False)
    keeps the pretrained embeddings' ordering and spacing; HF's own fallback is nearest.
    """
    embeddings = model.embeddings.time_embeddings  # (1, T0, D)
    if embeddings.shape[1] != num_frames:
        resized = F.interpolate(embeddings.data.transpose(1, 2), size=num_frames, mode="linear", align_corners=False)
        model.embeddings.time_embeddings = torch.nn.Parameter(resized.transpose(1, 2).contiguous())
    model.config.num_frames = num_frames


def add_lora(model: TimesformerModel, settings: LoraSettings):
    """Wrap `model` with trainable LoRA adapters on the seven reference module kinds."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none", target_modules=LORA_TARGETS
    )
    adapted = get_peft_model(model, config)
    _check_adapted_count(adapted, model.config.num_hidden_layers)
    return adapted


def load_adapter(model: TimesformerModel, adapter_dir: Path, trainable: bool = False):
    """Attach a saved peft adapter (a folder with adapter_config.json, or one holding `adapter/`)."""
    from peft import PeftModel

    folder = resolve_adapter_dir(adapter_dir)
    adapted = PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)
    _check_adapted_count(adapted, model.config.num_hidden_layers)
    return adapted


def resolve_adapter_dir(adapter_dir: Path) -> Path:
    adapter_dir = Path(adapter_dir)
    for folder in (adapter_dir, adapter_dir / "adapter"):
        if (folder / "adapter_config.json").is_file():
            return folder
    raise FileNotFoundError(f"{adapter_dir}: no LoRA adapter found (no adapter_config.json here or in adapter/)")


def _check_adapted_count(model, num_layers: int) -> None:
    from peft.tuners.lora import LoraLayer

    adapted = sum(isinstance(module, LoraLayer) for module in model.modules())
    if adapted != LORA_KINDS_PER_LAYER * num_layers:
        raise RuntimeError(f"LoRA adapted {adapted} modules, expected {LORA_KINDS_PER_LAYER} x {num_layers} layers")


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def adapter_hash(adapter_dir: Path) -> str:
    """sha256 over the adapter folder's files (relative names + bytes)."""
    folder = resolve_adapter_dir(adapter_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def autocast_context(device: torch.device, enabled: bool = True):
    """bf16 autocast on CPU (AMX) and CUDA; a no-op context when disabled (exact fp32)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def encode_clips(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, T, 3, H, W) -> (B, 1 + T, D) fp32: row 0 the CLS token, row 1 + t frame t's patch mean."""
    hidden = model(pixel_values=pixel_values).last_hidden_state.float()  # (B, 1 + N*T, D)
    batch, frames, dim = hidden.shape[0], pixel_values.shape[1], hidden.shape[-1]
    patches = hidden[:, 1:].reshape(batch, -1, frames, dim)  # (B, N, T, D): patch-major, time fastest
    return torch.cat([hidden[:, :1], patches.mean(dim=1)], dim=1)


def reference_view_feature(tokens: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(..., 1 + T, D) cached tokens -> (..., D): the mean over all 1 + N*T backbone tokens.

    SkillFormer's per-view feature is `last_hidden_state.mean(1)`; the cache holds the CLS token
    and per-frame patch means, from which that mean is exact: (cls + N * sum_t mean_t) / (1 + N*T).
    """
    frames = tokens.shape[-2] - 1
    total = tokens[..., 0, :] + num_patches * tokens[..., 1:, :].sum(dim=-2)
    return total / (1 + num_patches * frames)


def tiny_config(num_frames: int = 8, **overrides) -> TimesformerConfig:
    """A tiny TimeSformer (224 px, 16 px patches = 196 patches) for tests and the demo."""
    settings = dict(
        image_size=224, patch_size=16, num_frames=num_frames, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64,
    )
    return TimesformerConfig(**{**settings, **overrides})


def save_tiny_backbone(out_dir: Path, seed: int = 0, num_frames: int = 8, **overrides) -> Path:
    """Save a seeded, randomly initialised tiny TimeSformer so `from_pretrained(out_dir)` loads it."""
    torch.manual_seed(seed)
    model = TimesformerModel(tiny_config(num_frames, **overrides))
    # HF zero-initialises the cls/position/time embeddings; random ones make frames and
    # positions distinguishable, as in a trained model.
    for parameter in (model.embeddings.cls_token, model.embeddings.position_embeddings, model.embeddings.time_embeddings):
        torch.nn.init.trunc_normal_(parameter, std=0.02)
    hf_logging.disable_progress_bar()
    model.save_pretrained(out_dir)
    return Path(out_dir)
