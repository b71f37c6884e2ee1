"""The end-to-end model: TimeSformer (optionally LoRA-adapted) per view, then a fusion head.

Loads from either kind of trained artifact: a `skillpipe finetune` run (config.json + adapter/
or backbone/ + head) or a `skillpipe fit-head` cell (head + the cache it was trained on, whose
extract config names the backbone, frames and adapter).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline import backbone as bb
from pipeline.cache import CacheError, FeatureCache, spec_differences, written_by_the_cache
from pipeline.checkpoints import load_head
from pipeline.config import ConfigError, device_problem
from pipeline.files import read_json
from pipeline.fusion import NUM_CLASSES, HeadConfig, head_inputs
from pipeline.video import ClipSampling


class SkillModel(nn.Module):
    """(B, V, T, 3, 224, 224) clips + (B, V) present -> (B, 4) logits."""

    def __init__(self, backbone: nn.Module, head: nn.Module, head_config: HeadConfig, round_like_cache: bool = False,
                 compiled: bool = False, frozen_weights: bool = False, head_precision: str | None = None,
                 label_prior: list[float] | None = None, clips_per_forward: int | None = None):
        super().__init__()
        self.backbone, self.head, self.head_config = backbone, head, head_config
        # a fit-head cell's head precision (it may differ from its cache's; fit-head trains in bf16 autocast on every
        # device); None: the caller's autocast, as a finetune run's head trained (fp16 on GPUs without bf16)
        self.head_precision = head_precision
        # takes without any decodable view get the label prior, as in fit-head (the head cannot see them)
        self.register_buffer("prior_logits", prior_logits(label_prior), persistent=False)
        # fit-head trained on float16 cached tokens: rounding the same way reproduces its inputs
        self.round_like_cache = round_like_cache
        # inference like `extract --compile` (the caller switched the backbone to fused attention):
        # the same compiled graph, fed one clip at a time as extract does on the CPU
        self.compiled_encode = bb.compiled_encode_clips(frozen_weights) if compiled else None
        # a fit-head cell: the present clips in forwards of extract's size, since bf16 matmuls round differently with
        # the number of rows (a base-size backbone's tokens moved by up to 0.02 when 2 takes' clips went together)
        self.clips_per_forward = clips_per_forward or (1 if compiled else None)

    def tokens(self, clips: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Backbone tokens of the present clips only: (B, V, 1 + T, D); absent slots stay zero."""
        batch, views, frames = clips.shape[:3]
        encode = present.clone()
        if not encode.any():  # no view of the batch decoded: still run one blank clip, weighted 0 below, so
            encode[0, 0] = True  # that every DDP rank's backbone takes part in each step's gradient all-reduce
        encode_clips = self.compiled_encode or bb.encode_clips
        chosen = clips[encode]  # (P, T, 3, H, W)
        step = self.clips_per_forward or len(chosen)
        encoded = torch.cat([encode_clips(self.backbone, chosen[start : start + step])
                             for start in range(0, len(chosen), step)])  # (P, 1 + T, D) fp32
        if self.round_like_cache:
            encoded = encoded.half().float()
        out = encoded.new_zeros(batch, views, 1 + frames, encoded.shape[-1])
        out[encode] = encoded * present[encode][:, None, None]
        return out

    def forward(self, clips: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        features = head_inputs(self.tokens(clips, present), self.head_config)
        visible = present.any(1, keepdim=True)  # (B, 1)
        autocast = torch.autocast(features.device.type, dtype=torch.bfloat16, enabled=self.head_precision == "bf16")
        with autocast if self.head_precision else nullcontext():
            # a take without views would make attention over no keys (NaN): it runs on its zero slots
            # instead, a finite filler that is replaced by the prior (no gradient reaches the head from it)
            logits = self.head(features.float(), present | ~visible)
        return torch.where(visible, logits.float(), self.prior_logits)

    def set_label_prior(self, label_prior: list[float]) -> None:
        self.prior_logits.copy_(prior_logits(label_prior))


def prior_logits(label_prior: list[float] | None) -> torch.Tensor:
    """(4,) logits whose softmax is the label prior (uniform when unknown); finite for unseen labels."""
    prior = torch.tensor(label_prior if label_prior is not None else [1.0] * NUM_CLASSES, dtype=torch.float32)
    return (prior / prior.sum()).clamp_min(1e-12).log()


@dataclass(frozen=True)
class ModelSpec:
    """What a trained artifact needs at inference: its backbone, frames, views and precision."""

    backbone: str
    adapter: Path | None
    frames: int
    views: tuple[str, ...]
    precision: str
    from_cache: bool  # a fit-head cell: inputs rounded like the cache
    compiled: bool = False  # its cache was extracted with --compile: evaluate the same way
    weights_sha256: str | None = None  # bb.weights_hash of the backbone it was trained on (None: not recorded)
    adapter_sha256: str | None = None  # bb.adapter_hash of its adapter (None: none, or not recorded)
    sampling: str = "uniform"  # how its clips were sampled (pipeline.video.ClipSampling); older artifacts: uniform
    frozen_weights: bool = False  # compiled with the weights frozen into the graph (bb.compiled_encode_clips)
    clips_per_forward: int | None = None  # a fit-head cell: its cache's clips per backbone forward (None: any)
    cache: Path | None = None  # a fit-head cell's cache
    backbone_folder_sha256: str | None = None  # a full finetune run: bb.folder_hash of its backbone/ (None: not recorded)
    backbone_architecture: dict | None = None  # bb.architecture of that backbone (None: not recorded)

    def input_holding(self, out: Path) -> Path | None:
        """The folder the model is read from that writing into `out` would change: its adapter or backbone folder
        (hashed whole), or its cache's own files (a folder of other files inside the cache, such as a run's, is fine)."""
        for folder in (self.adapter, bb.local_backbone_dir(self.backbone)):
            if folder and Path(out).resolve().is_relative_to(Path(folder).resolve()):
                return folder
        return self.cache if self.cache and written_by_the_cache(self.cache, out) else None

    @property
    def clip_sampling(self) -> ClipSampling:
        return ClipSampling(self.frames, self.sampling)


def read_model_spec(checkpoint: Path) -> ModelSpec:
    checkpoint = Path(checkpoint)
    info = read_json(checkpoint / "head.json") if (checkpoint / "head.json").is_file() else None
    if info and "cache" in info:  # a fit-head cell
        cache = FeatureCache.open(info["cache"])
        fingerprint = cache.spec.fingerprint
        if changes := spec_differences({"fingerprint": info.get("cache_fingerprint", fingerprint)},
                                       {"fingerprint": fingerprint}, "the head was trained on", "the cache now has"):
            listing = "\n".join(f"  - {change}" for change in changes)
            raise CacheError(f"{checkpoint}: its cache {cache.root} was rebuilt differently since:\n{listing}")
        extract_config = next(iter(sorted(cache.root.glob("extract-*.json"))), None)
        if extract_config is None:
            raise ConfigError(f"{checkpoint}: its cache {cache.root} has no extract config; cannot rebuild the backbone")
        settings = read_json(extract_config)
        return ModelSpec(settings["backbone"], Path(settings["adapter"]) if settings.get("adapter") else None,
                         int(settings["frames"]), tuple(info["views"]), settings["precision"], True,
                         bool(settings.get("compile", False)), fingerprint.get("weights_sha256"), fingerprint.get("adapter_sha256"),
                         settings.get("sampling", "uniform"),
                         frozen_weights=fingerprint.get("backbone_forward") == bb.COMPILED_FORWARDS[True],
                         backbone_architecture=fingerprint.get("backbone_architecture"),
                         clips_per_forward=bb.clips_per_forward(settings.get("batch_size"), settings.get("device", "cpu")),
                         cache=cache.root)
    if (checkpoint / "config.json").is_file() and info:  # a finetune run
        settings = read_json(checkpoint / "config.json")
        tuned = checkpoint / ("backbone" if settings.get("tune") == "full" else "adapter")
        if not tuned.is_dir():
            raise ConfigError(f"{checkpoint}: trained with tune={settings.get('tune')}, but its {tuned.name}/ folder is missing")
        sampling = settings.get("sampling", "uniform")
        if tuned.name == "backbone":
            return ModelSpec(str(tuned), None, int(settings["frames"]), tuple(info["views"]), settings["precision"], False,
                             sampling=sampling, backbone_folder_sha256=info.get("backbone_folder_sha256"))
        return ModelSpec(settings["backbone"], tuned, int(settings["frames"]), tuple(info["views"]), settings["precision"],
                         False, weights_sha256=info.get("weights_sha256"), adapter_sha256=info.get("adapter_sha256"),
                         sampling=sampling, backbone_architecture=info.get("backbone_architecture"))
    raise FileNotFoundError(f"{checkpoint}: not a finetune run or fit-head cell (expected head.json, plus config.json or a cache)")


def load_skill_model(checkpoint: Path, device: str = "cpu", spec: ModelSpec | None = None) -> tuple[SkillModel, ModelSpec]:
    """The trained model for inference, with the backbone set up as the artifact's features were made (`spec`: the
    checkpoint's, when the caller has read it already)."""
    if problem := device_problem(device):
        raise ConfigError(f"--{problem}")
    spec = spec or read_model_spec(checkpoint)
    if spec.backbone_folder_sha256 and bb.folder_hash(Path(spec.backbone)) != spec.backbone_folder_sha256:
        raise ConfigError(f"{checkpoint}: the backbone {spec.backbone} changed since it was trained")
    backbone = bb.load_backbone(spec.backbone, spec.frames)
    if spec.weights_sha256 and bb.weights_hash(backbone) != spec.weights_sha256:
        raise ConfigError(f"{checkpoint}: the backbone {spec.backbone} no longer holds the weights it was trained with")
    if changed := bb.architecture_changes(spec.backbone_architecture, backbone):
        raise ConfigError(f"{checkpoint}: the backbone {spec.backbone} has the weights it was trained with, but not the "
                          f"architecture ({changed})")
    if spec.adapter_sha256 and bb.adapter_hash(spec.adapter) != spec.adapter_sha256:
        raise ConfigError(f"{checkpoint}: the adapter {spec.adapter} changed since it was trained")
    if spec.adapter:
        backbone = bb.load_adapter(backbone, spec.adapter)
    backbone = bb.prepare_for_inference(backbone, device, spec.precision, fused_attention=spec.compiled)
    head, info = load_head(checkpoint)
    head_precision = info.get("precision") if spec.from_cache else None  # a finetune run's head: the run's autocast
    model = SkillModel(backbone, head, HeadConfig(**info["head"]), round_like_cache=spec.from_cache,
                       compiled=spec.compiled, frozen_weights=spec.frozen_weights, head_precision=head_precision,
                       label_prior=info.get("label_prior"), clips_per_forward=spec.clips_per_forward)
    return model.to(device).eval(), spec
