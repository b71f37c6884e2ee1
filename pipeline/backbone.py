"""The TimeSformer backbone: load it for any frame count, adapt it with LoRA, encode clips.

TimeSformer: Bertasius, Wang & Torresani, "Is Space-Time Attention All You Need for Video
Understanding?", ICML 2021. LoRA: Hu et al., "LoRA: Low-Rank Adaptation of Large Language
Models", arXiv 2106.09685 (2021), ICLR 2022. Weights: Hugging Face
`facebook/timesformer-base-finetuned-k600` or any local folder holding a TimeSformer
`config.json` + weights.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn.functional as F

from pipeline.config import ConfigError
from pipeline.files import write_folder_atomic
from pipeline.video import PREPROCESSING

if TYPE_CHECKING:  # transformers is imported where a backbone is built: ~2 s that status, fit-head and --help never pay
    from transformers import TimesformerConfig, TimesformerModel

DEFAULT_BACKBONE = "facebook/timesformer-base-finetuned-k600"

# The seven module kinds SkillFormer adapts in every layer. peft fullmatches a string target
# against each module name, so the pattern is anchored on `layer.<i>.`: the spatial
# `attention.output.dense` never matches the temporal one (peft's suffix lists miss the latter).
LORA_TARGETS = (
    r".*\.layer\.\d+\.(attention\.attention\.qkv|attention\.output\.dense"
    r"|temporal_attention\.attention\.qkv|temporal_attention\.output\.dense"
    r"|temporal_dense|intermediate\.dense|output\.dense)"
)
LORA_KINDS_PER_LAYER = 7


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters (reference: r/alpha 32/64 ego, 48/96 exos, 64/128 ego+exos)."""

    r: int = field(default=32, metadata={"help": "rank of the low-rank update B @ A"})
    alpha: int = field(default=64, metadata={"help": "scaling numerator: the update is scaled by alpha / r"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the LoRA branch's input"})


def local_backbone_dir(name_or_dir: str) -> Path | None:
    """The folder `name_or_dir` names, or None for a hub id.

    A hub id is "name" or "org/name"; anything else that does not exist is a mistyped folder,
    which HF would report as a malformed repo id.
    """
    path = Path(name_or_dir).expanduser()
    looks_local = path.is_absolute() or str(name_or_dir).startswith((".", "~")) or len(path.parts) > 2
    return path if path.exists() or looks_local else None


def resolved_backbone(name_or_dir: str) -> str:
    """A hub id as it is, a local folder as its absolute path."""
    path = local_backbone_dir(name_or_dir)
    return str(path.resolve()) if path else name_or_dir


def load_backbone(name_or_dir: str, num_frames: int) -> TimesformerModel:
    """A TimeSformer from the hub or a local folder, set up for `num_frames` frames, in eval mode."""
    path = local_backbone_dir(name_or_dir)
    if path:
        if not path.exists():
            raise ConfigError(f"{path}: no such folder (a backbone is a hub id or a folder written by save_pretrained)")
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path}: not a TimeSformer folder (no config.json; expected save_pretrained output)")
        name_or_dir = str(path)
    from transformers import TimesformerModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load would drown the stage's own progress
    # fp32 master weights whatever the checkpoint's dtype: autocast gives bf16 speed, LoRA needs fp32.
    load = functools.partial(TimesformerModel.from_pretrained, name_or_dir, dtype=torch.float32, output_loading_info=True)
    try:
        try:  # the hub's local cache first: offline (a cluster's compute nodes), huggingface_hub's retries took ~25 s
            model, loading = load(local_files_only=True)
        except OSError:
            if path:
                raise
            model, loading = load()  # not downloaded yet
    except (RuntimeError, ValueError) as err:  # weights of other sizes than config.json says, a malformed config.json
        raise ConfigError(f"backbone {name_or_dir!r}: not a loadable TimeSformer: {_first_line(err)}") from None
    except OSError as err:  # offline, firewalled, or a misspelt hub id; a folder without weights
        reason = _first_line(err)
        if path:
            raise ConfigError(f"backbone {name_or_dir!r}: not a loadable TimeSformer folder: {reason}") from None
        raise ConfigError(f"backbone {name_or_dir!r}: not a local folder, and the Hugging Face hub (or its local cache) "
                          f"cannot provide it: {reason}. Download it where the hub is reachable (e.g. "
                          f"`hf download {name_or_dir}`: a downloaded model loads from the cache without the hub), or "
                          f"pass --backbone with a folder written by save_pretrained") from None
    # transformers only logs weights the checkpoint lacks, and initialises them at random: features from those
    # would pass for the model's (another architecture's checkpoint, a config.json describing more layers)
    unfilled = sorted(loading["missing_keys"]) + sorted(str(key) for key in loading["mismatched_keys"])
    if unfilled:
        raise ConfigError(f"backbone {name_or_dir!r}: {len(unfilled)} of the TimeSformer's {len(model.state_dict())} "
                          f"weights are not in its checkpoint (e.g. {unfilled[:3]}) and would be random: is it a "
                          "TimeSformer checkpoint matching its config.json?")
    check_preprocessing(model, name_or_dir, path)
    set_num_frames(model, num_frames)
    return model.eval()


def check_preprocessing(model: TimesformerModel, name: str, folder: Path | None) -> None:
    """Refuse a backbone that expects other input than skillpipe's preprocessing gives (224 px, mean 0.45, std 0.225).

    Another image size runs without error (HF resizes the position embeddings on every forward) but gives other
    features, pooled with the wrong patch count; another normalisation is only known from a folder's
    preprocessor_config.json (`hf download` writes it; a hub id's is not fetched)."""
    if model.config.image_size != PREPROCESSING.size:
        raise ConfigError(f"backbone {name!r}: its config.json says image_size {model.config.image_size}, but skillpipe "
                          f"feeds {PREPROCESSING.size} px frames (the base k600 checkpoint's size); another size is not supported")
    file = folder / "preprocessor_config.json" if folder else None
    if not file or not file.is_file():
        return
    try:
        settings = json.loads(file.read_text())
        expected = {"image_mean": PREPROCESSING.mean, "image_std": PREPROCESSING.std}
        given = {key: settings[key] if isinstance(settings[key], list) else [settings[key]]
                 for key in expected if key in settings}
        differing = {key: values for key, values in given.items() if any(abs(float(x) - expected[key]) > 1e-6 for x in values)}
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{file}: not a readable preprocessor config: {err}") from None
    if differing:
        raise ConfigError(f"{file}: the backbone was trained on frames normalised with {differing}; skillpipe normalises "
                          f"with mean {PREPROCESSING.mean} and std {PREPROCESSING.std}, so its features would be off")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def set_num_frames(model: TimesformerModel, num_frames: int) -> None:
    """Resample the time embeddings to `num_frames` and make every layer reshape with it.

    HF's layers split tokens into frames with `config.num_frames`: feeding T frames to a model
    configured for another count runs silently but mixes frames.
    """
    if any(layer.config is not model.config for layer in model.encoder.layer):
        raise RuntimeError("TimeSformer layers no longer share the model's config; num_frames would not reach them")
    time = model.embeddings.time_embeddings  # (1, T0, D)
    if time.shape[1] != num_frames:
        # Linear, align_corners=False: each embedding is the centre of one of T0 equal time bins,
        # resampled at the centres of T bins (symmetric in time). The reference code reads position
        # t * T0 / T instead (left-aligned, last one repeated): |4/T - 1/2| steps away for T0 = 8, so at most
        # 0.375 for 8 <= T <= 32 (and more for fewer frames: 0.5 at T=4, 1.5 at T=2).
        # A Parameter of exactly T rows also keeps HF's own fallback (nearest at every forward) from running.
        resized = F.interpolate(time.detach().transpose(1, 2), size=num_frames, mode="linear", align_corners=False)
        model.embeddings.time_embeddings = torch.nn.Parameter(
            resized.transpose(1, 2).contiguous(), requires_grad=time.requires_grad
        )  # (1, T, D)
    model.config.num_frames = num_frames


def add_lora(model: TimesformerModel, settings: LoraSettings):
    """Wrap `model` (adapted in place) with trainable LoRA on the seven reference module kinds."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none", target_modules=LORA_TARGETS
    )
    training = model.training
    with _peft_on_new_transformers():
        adapted = get_peft_model(model, config)
    _check_adapted_count(adapted, model.config.num_hidden_layers)
    # peft leaves the wrapper and the new LoRA dropouts in train mode over an eval base: unify.
    return adapted.train(training)


def load_adapter(model: TimesformerModel, adapter_dir: Path):
    """Attach a saved peft adapter for inference (a folder with adapter_config.json, or one holding `adapter/`)."""
    from peft import PeftModel

    with _peft_on_new_transformers():
        adapted = PeftModel.from_pretrained(model, str(resolve_adapter_dir(adapter_dir)), is_trainable=False)
    _check_adapted_count(adapted, model.config.num_hidden_layers)
    return adapted.eval()


@contextlib.contextmanager
def _peft_on_new_transformers() -> Iterator[None]:
    """peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: a FutureWarning
    about peft's code, not ours, printed on every run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def resolve_adapter_dir(adapter_dir: Path) -> Path:
    """The folder holding adapter_config.json: `adapter_dir` itself or its `adapter/` subfolder."""
    adapter_dir = Path(adapter_dir)
    for folder in (adapter_dir, adapter_dir / "adapter"):
        if (folder / "adapter_config.json").is_file():
            return folder
    raise FileNotFoundError(f"{adapter_dir}: no LoRA adapter found (no adapter_config.json here or in adapter/)")


def _check_adapted_count(model: torch.nn.Module, num_layers: int) -> None:
    from peft.tuners.lora import LoraLayer

    adapted = sum(isinstance(module, LoraLayer) for module in model.modules())
    if adapted != LORA_KINDS_PER_LAYER * num_layers:
        raise RuntimeError(f"LoRA adapted {adapted} modules, expected {LORA_KINDS_PER_LAYER} x {num_layers} layers")


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict (name, dtype, shape, raw bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # reshape: 0-dim can't view
    return digest.hexdigest()


# config.json settings that change the features without changing any weight's shape (weights_hash sees shapes)
ARCHITECTURE_FIELDS = ("num_attention_heads", "hidden_act", "layer_norm_eps", "attention_type", "qkv_bias",
                       "hidden_size", "num_hidden_layers", "intermediate_size", "image_size", "patch_size", "num_channels")


def architecture(model: torch.nn.Module) -> dict:
    """The backbone's architecture settings (ARCHITECTURE_FIELDS of its config; a peft model's are its base's)."""
    return {name: getattr(model.config, name, None) for name in ARCHITECTURE_FIELDS}


def architecture_changes(recorded: dict | None, model: torch.nn.Module) -> str:
    """How `model`'s architecture differs from a `recorded` one ('' when alike, or when none was recorded)."""
    now = architecture(model)
    return ", ".join(f"{name}: {recorded.get(name)!r} then, {now[name]!r} now" for name in ARCHITECTURE_FIELDS
                     if recorded and recorded.get(name) != now[name])


def adapter_hash(adapter_dir: Path) -> str:
    """sha256 over the adapter folder's files (sorted relative names + bytes)."""
    return folder_hash(resolve_adapter_dir(adapter_dir))


def folder_hash(folder: Path) -> str:
    """sha256 over a folder's files (sorted relative names + bytes)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        # name and length delimit each file, so moving bytes between files changes the hash
        digest.update(f"{path.relative_to(folder).as_posix()}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def autocast_dtype(device: torch.device) -> torch.dtype:
    """bf16 (CPU: AMX; CUDA), or fp16 on pre-Ampere GPUs, which lack bf16."""
    device = torch.device(device)
    # native bf16 from compute capability 8 (Ampere); torch.cuda.is_bf16_supported() also counts the slow emulation of
    # older GPUs, and asks the current device rather than `device`
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        return torch.float16
    return torch.bfloat16  # fp16 on CPU is slow, and needs loss scaling when training


def autocast_context(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Autocast to autocast_dtype; exact fp32 when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype(device))


def cast_for_autocast_inference(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Store Linear and Conv weights in the autocast dtype once, for inference under autocast_context.

    Autocast casts these fp32 weights on every forward: ~10-15% of a base-size forward on the CPU.
    Weights cast beforehand give bitwise the same outputs (tested, with and without LoRA), so
    nothing downstream changes. Inference only: training needs the fp32 weights.
    """
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
            module.to(autocast_dtype(device))
    return model


def prepare_for_inference(model: torch.nn.Module, device: torch.device, precision: str, fused_attention: bool = False
                          ) -> torch.nn.Module:
    """The backbone on `device` in eval mode, set up as extract runs it: weights stored in the autocast
    dtype under bf16, FusedSelfAttention for `extract --compile`. evaluate/predict use the same set-up,
    so a fit-head cell sees the very features its cache holds."""
    model = model.to(device).eval()
    if precision == "bf16":
        model = cast_for_autocast_inference(model, device)
    if fused_attention:
        from pipeline.fused_attention import use_fused_attention

        model = use_fused_attention(model)
    return model


# A compiled cache's "backbone_forward" fingerprint entry, by whether its weights were frozen; eager caches have none.
COMPILED_FORWARDS = {False: "fused-attention+torch.compile", True: "fused-attention+torch.compile+frozen-weights"}


def compiled_encode_clips(frozen_weights: bool = True) -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]:
    """encode_clips compiled with torch.compile (`extract --compile`; the backbone uses FusedSelfAttention).

    frozen_weights: inductor's `freezing`. The weights become constants of the graph: each Linear's weight is
    prepacked once for oneDNN with its bias (and the MLP's GELU) fused into the matmul, instead of the bias copied
    into the output and the weight reordered on every call. Measured at x0.82-0.94 of the unfrozen compiled
    forward's time (2026-12-05, base size, T=8 and T=16: x0.87-0.90 in medians of 8 interleaved rounds, x0.82-0.94
    in two `make bench` runs), for ~20 s more compile per process (inductor does not cache frozen graphs on disk).
    Different bf16 rounding, so it has its own fingerprint. The graph keeps the weights it was compiled with: only for a model
    that no longer changes, and only without autograd (under inference_mode, as extract, evaluate and predict run it).

    Each call returns a function with its own compiled code (a copy of encode_clips' code object): frozen graphs
    hold their model's weights, and torch keeps at most `recompile_limit` (8) graphs per code object. The whole
    forward must compile as one graph (fullgraph): past that limit, or at a graph break, torch would otherwise run
    the rest eagerly (rounding unlike the fingerprint) or compile inner functions frozen into caches other
    torch.compile users share. A frozen graph's weights stay in memory until the process ends (inductor keeps
    every module it loaded, with its constants): one per process, as the stages build it, not one per loop turn.
    """
    code = encode_clips.__code__.replace()  # a distinct code object: dynamo keeps its compiled graphs on it
    compiled = torch.compile(types.FunctionType(code, encode_clips.__globals__, "encode_clips_compiled"), fullgraph=True)

    def encode(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        check_frames(model, pixel_values)  # here, not in the graph: a raise would fail the fullgraph trace
        if frozen_weights and torch.is_grad_enabled():  # inductor would silently not freeze: not the fingerprint's rounding
            raise RuntimeError("the frozen-weights forward runs only under torch.inference_mode() or torch.no_grad()")
        # set globally, not as torch.compile(options=...): dynamo reads it while tracing, to make the weights constants
        with torch._inductor.config.patch(freezing=frozen_weights):
            return compiled(model, pixel_values)

    return encode


def clips_per_forward(batch_size: int | None, device: str) -> int:
    """Clips per backbone forward in extract: `batch_size`, else 1 on a CPU (fastest per clip there), 16 on CUDA."""
    return batch_size or (1 if device == "cpu" else 16)


def check_frames(model: torch.nn.Module, pixel_values: torch.Tensor) -> None:
    if pixel_values.shape[1] != model.config.num_frames:
        raise ValueError(
            f"clips have {pixel_values.shape[1]} frames but the backbone is set up for {model.config.num_frames}: "
            "call set_num_frames (HF would silently mix frames)"
        )


def encode_clips(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, T, 3, H, W) -> (B, 1 + T, D) fp32: row 0 the CLS token, row 1 + t frame t's patch mean."""
    check_frames(model, pixel_values)
    batch, frames = pixel_values.shape[:2]
    hidden = model(pixel_values=pixel_values).last_hidden_state.float()  # (B, 1 + N*T, D)
    patches = hidden[:, 1:].reshape(batch, -1, frames, hidden.shape[-1])  # (B, N, T, D): patch-major, time fastest
    return torch.cat([hidden[:, :1], patches.mean(dim=1)], dim=1)  # (B, 1 + T, D)


def reference_view_feature(tokens: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(..., 1 + T, D) encoded tokens -> (..., D): the mean over all 1 + N*T backbone tokens.

    SkillFormer's per-view feature is `last_hidden_state.mean(1)`; from the CLS token and the
    per-frame patch means it is exact: (cls + N * sum_t mean_t) / (1 + N*T).
    """
    frames = tokens.shape[-2] - 1
    total = tokens[..., 0, :] + num_patches * tokens[..., 1:, :].sum(dim=-2)  # (..., D)
    return total / (1 + num_patches * frames)


def tiny_config(num_frames: int = 8, **overrides) -> TimesformerConfig:
    """A tiny TimeSformer (224 px, 16 px patches = 196 patches, D=32, 2 layers) for tests and the demo."""
    from transformers import TimesformerConfig

    settings = dict(
        image_size=224, patch_size=16, num_frames=num_frames, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64,
    )
    return TimesformerConfig(**{**settings, **overrides})


def save_tiny_backbone(out_dir: Path, seed: int = 0, num_frames: int = 8, **overrides) -> Path:
    """Save a seeded, randomly initialised tiny TimeSformer so `from_pretrained(out_dir)` loads it."""
    from transformers import TimesformerModel
    from transformers.utils import logging as hf_logging

    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = TimesformerModel(tiny_config(num_frames, **overrides))
        # HF initialises time_embeddings to zeros; random ones (as in a trained model) make frames
        # distinguishable and their interpolation testable.
        torch.nn.init.trunc_normal_(model.embeddings.time_embeddings, std=model.config.initializer_range)
    hf_logging.disable_progress_bar()
    write_folder_atomic(Path(out_dir), model.save_pretrained)  # config.json appears only with the weights
    return Path(out_dir)
