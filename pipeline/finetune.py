"""End-to-end fine-tuning: LoRA (or every weight) of the TimeSformer plus the fusion head.

    skillpipe finetune --root ROOT --out RUN --backbone ID --frames 16 --views ego+exos

Same takes, sampling and preprocessing as extract, same head classes as fit-head. AdamW with a
cosine schedule and warmup, gradient accumulation, gradient checkpointing, bf16 autocast on CPU.
A checkpoint is committed after every epoch (trainable weights as safetensors, optimizer,
scheduler and RNG state loadable with `torch.load(weights_only=True)`); `--resume` continues from
it and ends with the same weights as an uninterrupted run. The best epoch is chosen on a held-out
part of train; val is only used for the final evaluation.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch.nn.parallel import DistributedDataParallel

from pipeline import backbone as bb
from pipeline.cache import CacheError
from pipeline.checkpoints import HEAD_INFO, HEAD_WEIGHTS, load_head, save_head
from pipeline.config import (ConfigError, config_to_dict, device_problem, foreign_output, output_problem, save_config,
                             with_absolute_paths)
from pipeline.distributed import MainRankFailed, Ranks, barrier, run_on_main, summed_over_ranks
from pipeline.evaluation import evaluate_split, take_logits
from pipeline.clips import clip_loader
from pipeline.decoder_crashes import CRASHES, MARKERS, CrashGuard, explained_worker_death, known_crashes, triage
from pipeline.epoch_checkpoints import (
    BEST_WEIGHTS, CHECKPOINT, RETIRED, STAGING, find_epoch_checkpoint, finish_interrupted_swap, has_epoch_checkpoint,
    load_epoch_checkpoint, restore_best_weights, rng_states, save_epoch_checkpoint, trainable_state,
)
from pipeline.files import read_json, remove_temporary_files, write_bytes_atomic, write_folder_atomic
from pipeline.fusion import FUSIONS, HeadConfig, build_head
from pipeline.head_training import TrainingDiverged, label_prior, stratified_holdout, warmup_steps_for
from pipeline.metrics import mark_incomplete
from pipeline.skill_model import SkillModel
from pipeline.takes import load_takes, shared_takes, takes_sha256
from pipeline.video import SAMPLING_NAMES, ClipSampling
from pipeline.views import parse_view_setting
from pipeline.weight_decay import decay_groups
from pipeline.writer_lock import RUN_LOCK, first_writer


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of `skillpipe finetune`; saved as `<out>/config.json`, the one file a model needs."""

    root: Path  # egoexo download root
    out: Path  # run folder
    backbone: str = bb.DEFAULT_BACKBONE
    frames: int = 16
    sampling: Literal["uniform", "window"] = "uniform"  # over the whole take, or the reference's 4T-frame window (centred)
    # window sampling: where training clips' windows sit. random: drawn per take and epoch from the seed (the
    # reference trains on random windows); centre: where evaluation puts them. Held-out and val clips: centre
    train_windows: Literal["random", "centre"] = "random"
    views: str = "ego+exos"
    fusion: str = "crossview"
    init_head: Path | None = None  # a fit-head cell to warm-start the head from
    tune: Literal["lora", "full"] = "lora"
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.1
    hidden: int = 2560
    heads: int = 16
    epochs: int = 4
    lr: float = 2e-5
    batch_size: int = 4
    grad_accum: int = 4
    weight_decay: float = 0.01
    # AdamW's decay on biases and LayerNorm weights too: HF Trainer (the reference's) leaves them out, and so does
    # skillpipe since 2026-12-05; runs before that decayed every weight
    decay_norms_and_biases: bool = False
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0  # clip the gradient's norm before each update (HF Trainer's default, used by the reference); 0: off
    holdout: float = 0.1
    seed: int = 0
    gradient_checkpointing: bool = True
    precision: Literal["bf16", "fp32"] = "bf16"
    device: str = "cpu"
    workers: int = 1

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ConfigError(f"FinetuneConfig.fusion: unknown {self.fusion!r} (choose from {sorted(FUSIONS)})")
        parse_view_setting(self.views)
        for name in ("frames", "epochs", "batch_size", "grad_accum", "lora_r", "lora_alpha", "hidden", "heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"FinetuneConfig.{name}: must be >= 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ConfigError(f"FinetuneConfig.workers: must be >= 0, got {self.workers}")
        if self.sampling not in SAMPLING_NAMES:
            raise ConfigError(f"FinetuneConfig.sampling: unknown {self.sampling!r} (choose from {sorted(SAMPLING_NAMES)})")
        if self.train_windows not in ("random", "centre"):
            raise ConfigError(f"FinetuneConfig.train_windows: random or centre, got {self.train_windows!r}")
        if not (0 <= self.lr < math.inf and 0 <= self.weight_decay < math.inf):  # lr 0: evaluate a warm-started head
            raise ConfigError(f"FinetuneConfig: lr and weight_decay must be >= 0 and finite (got {self.lr}, "
                              f"{self.weight_decay})")
        if not self.max_grad_norm >= 0:
            raise ConfigError(f"FinetuneConfig.max_grad_norm: must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        for problem in (device_problem(self.device), output_problem("out", self.out)):
            if problem:
                raise ConfigError(f"FinetuneConfig.{problem}")
        if foreign := foreign_output(self.out, type(self).__name__):
            raise ConfigError(f"FinetuneConfig.out: {self.out} holds another kind of output ({foreign}); a run "
                              "written there would replace or mix with its files: use another folder")
        for name, high in (("holdout", 0.5), ("warmup_ratio", 1.0), ("lora_dropout", 1.0)):
            if not 0 <= getattr(self, name) < high:
                raise ConfigError(f"FinetuneConfig.{name}: must be in [0, {high}), got {getattr(self, name)}")

    @property
    def clip_sampling(self) -> ClipSampling:
        return ClipSampling(self.frames, self.sampling)


def build_model(config: FinetuneConfig) -> tuple[SkillModel, tuple[str, ...], str]:
    """The model to train, its views, and the hash of the backbone's weights before any training."""
    views = parse_view_setting(config.views)
    torch.manual_seed(config.seed)
    backbone = bb.load_backbone(config.backbone, config.frames)
    weights_sha256 = bb.weights_hash(backbone)
    if config.tune == "lora":
        backbone = bb.add_lora(backbone, bb.LoraSettings(config.lora_r, config.lora_alpha, config.lora_dropout))
    if config.gradient_checkpointing:
        base = backbone.get_base_model() if config.tune == "lora" else backbone
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x's name; the old one warns
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model_config = backbone.config
    if model_config.hidden_size % config.heads:
        raise ConfigError(f"FinetuneConfig.heads: {config.heads} must divide the backbone's feature size {model_config.hidden_size}")
    head_config = HeadConfig(
        fusion=config.fusion, dim=model_config.hidden_size, num_views=len(views), frames=config.frames,
        num_patches=(model_config.image_size // model_config.patch_size) ** 2, hidden=config.hidden, heads=config.heads,
    )
    head = build_head(head_config)
    if config.init_head:
        head, head_config = _warm_start_head(config.init_head, head_config, views)
    return SkillModel(backbone, head, head_config), views, weights_sha256


def _warm_start_head(cell: Path, expected: HeadConfig, views: tuple[str, ...]):
    head, info = load_head(cell)
    saved = HeadConfig(**info["head"])
    frames_matter = saved.fusion == "temporal"  # its frame embedding has one row per frame
    if (tuple(info["views"]) != views or saved.dim != expected.dim or saved.fusion != expected.fusion
            or saved.num_patches != expected.num_patches or (frames_matter and saved.frames != expected.frames)):
        raise ConfigError(
            f"--init-head {cell}: trained for views {info['views']}, fusion {saved.fusion}, D={saved.dim}, "
            f"T={saved.frames}, N={saved.num_patches}; this run has views {list(views)}, fusion {expected.fusion}, "
            f"D={expected.dim}, T={expected.frames}, N={expected.num_patches}"
        )
    # a head that pools over time works for any T: it then records this run's
    return head.train(), saved if frames_matter else replace(saved, frames=expected.frames)


def rank_share(order: list[int], ranks: Ranks) -> list[int]:
    """This rank's part of an epoch; every rank gets the same count (wrapping around, like
    DistributedSampler) so that DDP's collective calls line up."""
    per_rank = -(-len(order) // ranks.world_size)
    padded = (order * ranks.world_size)[: per_rank * ranks.world_size]
    return padded[ranks.rank :: ranks.world_size]


def run_finetune(
    config: FinetuneConfig, resume: bool = False, on_step: Callable[[dict], None] | None = None, ranks: Ranks = Ranks(),
    on_event: Callable[[str], None] | None = None,
) -> dict:
    """Train, keep the best held-out epoch, and write the final model into `config.out`.

    Under torchrun every rank trains a disjoint share of each epoch through DistributedDataParallel;
    rank 0 alone writes checkpoints, picks the best epoch and evaluates. It holds the run folder's
    lock (pipeline.writer_lock) throughout: a second run into the folder stops at once.

    Decodes are guarded as extract's are (pipeline.decoder_crashes): a video that crashes the decoder
    stops the run with the file named and recorded, and `--resume` goes on with its view absent.
    """
    out, new_folder = Path(config.out), not Path(config.out).exists()
    with ExitStack() as held:
        # rank 0 takes the lock; a refusal (another run holds it) stops the other ranks with its message
        run_on_main(ranks, lambda: held.enter_context(first_writer(out / RUN_LOCK, f"the run folder {out}")), (CacheError,))
        try:
            return _run_finetune(config, resume, on_step, ranks, on_event)
        except BaseException as err:
            if ranks.is_main and new_folder and [path.name for path in out.iterdir()] == [RUN_LOCK]:
                (out / RUN_LOCK).unlink()  # refused before it wrote anything: leave no folder behind it
                out.rmdir()
            if (isinstance(err, RuntimeError) and not isinstance(err, MainRankFailed)  # rank 0 explains its own
                    and (explained := explained_worker_death(out, err, "finetune --resume"))):
                raise explained from err
            raise


# errors of rank 0's own steps (its folder, held-out scoring, checkpoints) that the other ranks raise as such, with its
# message (the user-facing kinds: one line, exit 2); any other (a full disk, a bug) reaches them as MainRankFailed
MAIN_STEP_ERRORS = (ConfigError, CacheError, TrainingDiverged)


def _prepare_run_folder(out: Path, config: FinetuneConfig) -> None:
    """Rank 0's, once every rank has read its checkpoint: save the run's config, finish a checkpoint swap cut short (a
    run killed mid-swap in its last epoch has no next save, and would end with checkpoint.staging/ and
    checkpoint.old/ but no checkpoint/), and delete the temporary files of an earlier try killed mid-write (this run
    holds the folder's lock; not in folders a user made there, such as an evaluate --out RUN/eval)."""
    save_config(config, out / "config.json")
    finish_interrupted_swap(out)
    remove_temporary_files([out, *(out / name for name in (CHECKPOINT, STAGING, RETIRED, MARKERS, CRASHES))])


def _run_finetune(config: FinetuneConfig, resume: bool, on_step: Callable[[dict], None] | None, ranks: Ranks,
                  on_event: Callable[[str], None] | None) -> dict:
    config = with_absolute_paths(config, backbone=bb.resolved_backbone(config.backbone))  # evaluate reads them back
    train_takes, val_takes = load_takes(config.root, "train"), load_takes(config.root, "val")
    if not train_takes or not val_takes:
        raise ConfigError(f"{config.root}: the {'train' if not train_takes else 'val'} annotations list no takes; "
                          "finetune trains on train and reports on val")
    if shared := shared_takes(train_takes, val_takes):
        raise ConfigError(f"{config.root}: {len(shared)} take(s) in both the train and val annotations, e.g. "
                          f"{shared[:3]}; val would score training data")
    model, views, weights_sha256 = build_model(config)
    trained_size = {"hidden": model.head_config.hidden, "heads": model.head_config.heads}
    if config.init_head and trained_size != {"hidden": config.hidden, "heads": config.heads}:
        if on_event:  # the warm-started head keeps its size; config.json must say so
            on_event(f"--init-head: the head keeps its trained size {trained_size}, not hidden {config.hidden}, "
                     f"heads {config.heads}")
        config = replace(config, **trained_size)
    if config.init_head and on_event:
        for note in init_head_notes(config, weights_sha256):
            on_event(note)
    device = torch.device(config.device)
    model.to(device)
    trained = DistributedDataParallel(model) if ranks.world_size > 1 else model
    held = stratified_holdout(np.array([int(t.label) for t in train_takes]), config.holdout)
    fit_takes = [t for t, h in zip(train_takes, held) if not h]
    holdout_takes = [t for t, h in zip(train_takes, held) if h]
    prior = label_prior(np.array([int(t.label) for t in fit_takes])).tolist()
    model.set_label_prior(prior)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(decay_groups(model, config.weight_decay, config.decay_norms_and_biases), lr=config.lr)
    # fp16 autocast (GPUs without bf16) needs loss scaling, or small gradients underflow to zero; bf16 and fp32 do not
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "bf16" and bb.autocast_dtype(device) == torch.float16)
    updates_per_epoch = -(-len(rank_share(list(range(len(fit_takes))), ranks)) // (config.batch_size * config.grad_accum))
    from transformers import get_cosine_schedule_with_warmup  # here: ~2 s to import, which `--help` never pays

    schedule = get_cosine_schedule_with_warmup(
        optimizer, warmup_steps_for(config.warmup_ratio, updates_per_epoch * config.epochs), updates_per_epoch * config.epochs
    )
    out = Path(config.out)
    state = {"epoch": -1, "best_loss": float("inf"), "best_epoch": -1, "holdout_losses": [], "train_losses": [],
             "world_size": ranks.world_size, "config": config_to_dict(config), "weights_sha256": weights_sha256,
             "train_takes_sha256": takes_sha256(train_takes, config.root, views)}
    checkpoint = find_epoch_checkpoint(out)
    if not checkpoint and (results := run_results(out)):
        raise ConfigError(f"{out}: holds a finished run ({', '.join(results)}) but no checkpoint to continue: a new run "
                          "there would leave those beside its own config.json until it ends; use another --out, or "
                          "delete them to train there again")
    if resume:
        if checkpoint:
            state = load_epoch_checkpoint(checkpoint, model, optimizer, schedule, state["config"], ranks, device,
                                          weights_sha256, scaler, state["train_takes_sha256"])
            run_on_main(ranks, lambda: restore_best_weights(out, checkpoint, state), MAIN_STEP_ERRORS)
        if on_event:
            on_event(f"resuming {checkpoint} after epoch {state['epoch']}" if checkpoint else
                     f"--resume: {out} has no complete checkpoint yet; starting from the beginning")
    elif has_epoch_checkpoint(out):
        raise ConfigError(f"{out}: holds a checkpoint already; pass --resume to continue it, or use another --out")
    triage(out)  # files that crashed the decoder in an earlier try of this run are recorded, then not decoded again
    barrier(ranks)  # every rank has read its checkpoint and triaged: rank 0 may tidy the folder
    run_on_main(ranks, lambda: _prepare_run_folder(out, config), MAIN_STEP_ERRORS)
    guard = CrashGuard(out, known_crashes(out))
    if guard.crashes and on_event:
        on_event(f"{len(guard.crashes)} video file(s) recorded in {out / CRASHES} crash the decoder: "
                 "their views are absent in this run")
    autocast = lambda: bb.autocast_context(device, enabled=config.precision == "bf16")  # noqa: E731

    for epoch in range(state["epoch"] + 1, config.epochs):
        order = torch.randperm(len(fit_takes), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
        share = rank_share(order.tolist(), ranks)
        moved = (config.seed, epoch) if config.train_windows == "random" else None
        loader = clip_loader([fit_takes[i] for i in share], views, config.clip_sampling, config.batch_size, config.workers,
                             moved, guard)
        model.train()
        visible_takes = batches_with_takes = 0  # batches_with_takes: this rank's, in the update's group so far
        for step, (clips, present, labels, _) in enumerate(loader):
            updates = (step + 1) % config.grad_accum == 0 or step + 1 == len(loader)
            group_batches = accumulated_batches(step, len(loader), config.grad_accum)
            # DDP all-reduces in backward: inside an accumulation group only the last batch's need be (every rank
            # has as many batches, rank_share, so their groups end together)
            with trained.no_sync() if ranks.world_size > 1 and not updates else nullcontext():
                present = present.to(device)
                with autocast():
                    logits = trained(clips.to(device), present)
                visible = present.any(1).float()  # takes without a decodable view carry no signal
                losses = F.cross_entropy(logits.float(), labels.to(device), reduction="none")
                loss = (losses * visible).sum() / visible.sum().clamp_min(1)
                visible_takes += int(visible.sum().item())
                batches_with_takes += bool(visible.any())
                scaler.scale(loss / group_batches).backward()
            state["train_losses"].append(loss.item())
            if updates:
                factor = group_gradient_factor(group_batches, ranks.world_size,
                                               summed_over_ranks(ranks, batches_with_takes, device))
                batches_with_takes = 0
                # factor None: no batch of the group, on any rank, had a decodable take. No update then (AdamW would
                # still decay the weights and move them by its momentum), and like a skipped fp16 one it does not use
                # up a scheduled step
                if factor is not None:
                    for parameter in parameters if factor != 1 else ():
                        if parameter.grad is not None:
                            parameter.grad.mul_(factor)
                    if config.max_grad_norm:  # DDP has averaged the gradients: every rank clips alike
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
                    scale = scaler.get_scale()
                    scaler.step(optimizer)  # skipped when fp16 gradients overflowed; update() then lowers the scale
                    scaler.update()
                    if scaler.get_scale() >= scale:  # as HF Trainer: a skipped update does not use up a scheduled step
                        schedule.step()
                optimizer.zero_grad(set_to_none=True)
            if on_step:
                on_step({"epoch": epoch, "step": step, "steps": len(loader), "loss": loss.item(), "lr": schedule.get_last_lr()[0]})
        if not summed_over_ranks(ranks, visible_takes, device):
            raise ConfigError(f"{out}: none of the {len(fit_takes)} training takes had a decodable view of {config.views} "
                              f"in epoch {epoch} (every view failed to decode, or is shorter than --frames {config.frames}: "
                              "see the warnings above); nothing can be learnt")
        state["epoch"] = epoch

        def score_epoch() -> None:  # rank 0's
            # None without held-out takes (then the last epoch is kept): JSON has no NaN, and metrics.json and head.json
            # carry these losses (NaN until the thirteenth session, which strict JSON parsers refuse)
            holdout_loss = _holdout_loss(model, holdout_takes, views, config, device, guard) if holdout_takes else None
            state["holdout_losses"].append(holdout_loss)
            if holdout_loss is not None and not math.isfinite(holdout_loss):
                raise TrainingDiverged(f"{out}: held-out loss is {holdout_loss} after epoch {epoch}; training diverged")
            if holdout_loss is None or holdout_loss < state["best_loss"]:
                state["best_loss"], state["best_epoch"] = holdout_loss, epoch

        def save_epoch() -> None:  # rank 0's
            save_epoch_checkpoint(out, model, optimizer, schedule, state, rngs, scaler)
            if state["best_epoch"] == epoch:  # after the checkpoint, which a resume restores it from (restore_best_weights)
                write_bytes_atomic(out / BEST_WEIGHTS, save_safetensors(trainable_state(model)))

        run_on_main(ranks, score_epoch, MAIN_STEP_ERRORS)
        rngs = rng_states(ranks, device)  # every rank's: each resumes its own dropout and data seeds
        run_on_main(ranks, save_epoch, MAIN_STEP_ERRORS)
        barrier(ranks)

    if not ranks.is_main:
        return state
    model.load_state_dict(load_safetensors((out / BEST_WEIGHTS).read_bytes()), strict=False)
    _save_final(out, model, config, views, state, prior, weights_sha256)
    settings = {**config_to_dict(config), "best_epoch": state["best_epoch"], "holdout_losses": state["holdout_losses"]}
    state["metrics"] = evaluate_split(model, val_takes, views, config.clip_sampling, config.precision, out, settings,
                                      config.device, config.workers, guard)
    return state


def accumulated_batches(step: int, steps: int, grad_accum: int) -> int:
    """How many batches the update that `step` (of `steps` in the epoch) joins averages over: `grad_accum`, fewer in
    a short last group, so that its gradient is its batches' mean like any other update's (not scaled down)."""
    group_start = step - step % grad_accum
    return min(grad_accum, steps - group_start)


def run_results(out: Path) -> list[str]:
    """The files a finished run leaves in its folder (besides its checkpoint) that are in `out`."""
    return [name for name in ("metrics.json", "predictions.jsonl", HEAD_INFO, HEAD_WEIGHTS, "adapter", "backbone")
            if (out / name).exists()]


def group_gradient_factor(group_batches: int, world_size: int, batches_with_takes: float) -> float | None:
    """What an update's accumulated gradient is multiplied by to be the mean over the batches that had a decodable
    take: each rank's `group_batches` added their mean loss's gradient divided by `group_batches`, DDP averaged the
    `world_size` ranks, and a batch without any decodable take added zero. `batches_with_takes`: summed over the
    ranks. None when no batch had one."""
    if not batches_with_takes:
        return None
    return group_batches * world_size / batches_with_takes


def init_head_notes(config: FinetuneConfig, weights_sha256: str) -> list[str]:
    """What differs between the features the --init-head cell was fitted on and this run's: its clip sampling, its
    frame count, an adapter, other backbone weights. Notes, not errors: any head is a starting point, but metrics of
    such a head (say at --lr 0) are not those of the cell.

    From the cell's own head.json, not its cache: a warm start needs only the cell, whose cache may be gone or rebuilt
    since. The weights are compared only at the same T (their hash is taken with the time embeddings resized to T)."""
    cell = config.init_head
    fingerprint = read_json(Path(cell) / "head.json").get("cache_fingerprint", {})
    notes = []
    sampling = {name: option for option, name in SAMPLING_NAMES.items()}.get(fingerprint.get("preprocessing", {}).get("sampling"))
    if sampling not in (None, config.sampling):
        notes.append(f"note: --init-head {cell} was fitted on {sampling} clips; this run samples {config.sampling} (--sampling)")
    if fingerprint.get("frames") not in (None, config.frames):  # its pooled features average other frames
        notes.append(f"note: --init-head {cell} was fitted on clips of {fingerprint['frames']} frames; this run's have "
                     f"{config.frames} (--frames)")
    if fingerprint.get("adapter_sha256"):
        notes.append(f"note: --init-head {cell} was fitted on features of an adapted backbone (extract --adapter); this "
                     f"run starts from {config.backbone} without that adapter")
    elif fingerprint.get("frames") == config.frames and fingerprint.get("weights_sha256") not in (None, weights_sha256):
        notes.append(f"note: --init-head {cell} was fitted on features of other backbone weights "
                     f"({fingerprint.get('backbone')}) than this run's {config.backbone}")
    return notes


def _holdout_loss(model, takes, views, config: FinetuneConfig, device, guard: CrashGuard) -> float:
    logits, _ = take_logits(model, takes, views, config.clip_sampling, config.precision, device, config.batch_size,
                            config.workers, guard)
    return float(F.cross_entropy(logits, torch.tensor([int(t.label) for t in takes])))


def _save_final(out: Path, model: SkillModel, config: FinetuneConfig, views, state: dict, label_prior: list[float],
                weights_sha256: str) -> None:
    """The trained backbone part, then the head: the head's files, written last, name what they were trained with."""
    mark_incomplete(out)  # a resumed finished run's: until the new evaluation, the folder is not complete
    tuned = out / ("adapter" if config.tune == "lora" else "backbone")
    write_folder_atomic(tuned, model.backbone.save_pretrained)
    if config.tune == "lora":  # it loads the base weights named in config.json: evaluate checks they are still these
        trained_with = {"weights_sha256": weights_sha256, "adapter_sha256": bb.adapter_hash(tuned),
                        "backbone_architecture": bb.architecture(model.backbone)}
    else:  # full: the trained backbone is the run's own folder
        trained_with = {"backbone_folder_sha256": bb.folder_hash(tuned)}
    save_head(out, model.head, model.head_config, views, run="finetune", best_epoch=state["best_epoch"],
              holdout_losses=state["holdout_losses"], precision=config.precision,
              label_prior=label_prior, **trained_with)
