"""`skillpipe finetune`: end-to-end LoRA (or full) training of backbone + fusion head."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.config import REQUIRED_HELP, load_config
from pipeline.distributed import local_device, torchrun_ranks
from pipeline.finetune import FinetuneConfig, run_finetune


def finetune(
    root: Optional[Path] = typer.Option(None, help=f"egoexo download root (holds annotations/ and takes/). {REQUIRED_HELP}"),
    out: Optional[Path] = typer.Option(None, help=f"Run folder: adapter/, head, config.json, metrics. {REQUIRED_HELP}"),
    backbone: Optional[str] = typer.Option(None, help="TimeSformer hub id or local folder (default facebook/timesformer-base-finetuned-k600)."),
    frames: Optional[int] = typer.Option(None, help="Frames T per view (default 16)."),
    sampling: Optional[str] = typer.Option(None, help="uniform (default, over the whole take) or window (the reference's "
                                           "4T-frame window at stride 4; centred for held-out and val clips, see "
                                           "--train-windows for training clips)."),
    train_windows: Optional[str] = typer.Option(None, help="With --sampling window: random (default; per take and "
                                                "epoch, seeded, as the reference trains) or centre (as evaluation)."),
    views: Optional[str] = typer.Option(None, help="View setting: ego, exos, ego+exos, ego+exo2 ..."),
    fusion: Optional[str] = typer.Option(None, help="Fusion head variant (default crossview)."),
    init_head: Optional[Path] = typer.Option(None, help="Warm-start the head from a fit-head cell folder."),
    tune: Optional[str] = typer.Option(None, help="lora (default) or full (every backbone weight)."),
    lora_r: Optional[int] = typer.Option(None, help="LoRA rank (default 64)."),
    lora_alpha: Optional[int] = typer.Option(None, help="LoRA alpha (default 128)."),
    lora_dropout: Optional[float] = typer.Option(None, help="LoRA dropout (default 0.1)."),
    hidden: Optional[int] = typer.Option(None, help="Head projector size H (default 2560)."),
    heads: Optional[int] = typer.Option(None, help="Head attention heads (default 16)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default 4)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default 2e-5)."),
    batch_size: Optional[int] = typer.Option(None, help="Takes per micro-batch (default 4)."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step (default 4)."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay (default 0.01)."),
    decay_norms_and_biases: Optional[bool] = typer.Option(None, help="Weight decay on biases and LayerNorm weights too "
                                                          "(default off, as HF Trainer; runs before 2026-12-05 had it on)."),
    warmup_ratio: Optional[float] = typer.Option(None, help="Warmup share of the cosine schedule (default 0.1)."),
    max_grad_norm: Optional[float] = typer.Option(None, help="Clip the gradient norm before each update (default 1.0, "
                                                  "as HF Trainer; 0: no clipping)."),
    holdout: Optional[float] = typer.Option(None, help="Stratified share of train held out to pick the best epoch (default 0.1)."),
    seed: Optional[int] = typer.Option(None, help="Random seed (default 0)."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, help="Recompute activations in backward (default on)."),
    precision: Optional[str] = typer.Option(None, help="bf16 (autocast, default) or fp32."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N (under torchrun: cuda, each rank its own GPU)."),
    workers: Optional[int] = typer.Option(None, help="Decoding processes (default 1)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's last epoch checkpoint."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML/TOML/JSON config (see configs/); flags override it."),
) -> None:
    """Fine-tune the backbone (LoRA by default) and the fusion head end to end; evaluate on val."""
    overrides = {k: v for k, v in locals().items() if k not in ("config", "resume")}
    settings = load_config(FinetuneConfig, config, overrides)
    with torchrun_ranks(settings.device) as ranks:  # torchrun: DistributedDataParallel over the ranks
        settings = dataclasses.replace(settings, device=local_device(settings.device))
        console = Console()
        columns = (TextColumn("finetune epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.4f} lr {task.fields[lr]:.2e} {task.fields[rate]}"), TimeElapsedColumn())
        # shown from the first step on: a run refused in its set-up, or a finished run resumed, prints no bar
        progress = Progress(*columns, console=console, disable=not ranks.is_main)
        task = progress.add_task("finetune", total=None, epoch=0, loss=0.0, lr=0.0, rate="")

        def on_step(info: dict) -> None:
            if info["step"] == 0:
                progress.start()
                progress.reset(task, total=info["steps"])
            elapsed = progress.tasks[task].elapsed or 1e-9
            progress.update(task, advance=1, epoch=info["epoch"], loss=info["loss"], lr=info["lr"],
                            rate=f"{(info['step'] + 1) / elapsed:.2f} it/s")

        try:
            state = run_finetune(settings, resume=resume, on_step=on_step, ranks=ranks,
                                 on_event=console.print if ranks.is_main else None)
        finally:
            progress.stop()
    if not ranks.is_main:
        return
    losses = [round(x, 4) for x in state["holdout_losses"] if x is not None]  # None: no held-out takes
    chosen = (f"best epoch {state['best_epoch']} of 0-{settings.epochs - 1} (held-out losses {losses})" if losses
              else f"no held-out takes: last epoch {state['best_epoch']} kept")
    console.print(f"{chosen}; val accuracy {state['metrics']['accuracy']:.3f} over {state['metrics']['num_takes']} takes "
                  f"-> {escape(str(settings.out))}")
    if absent := state["metrics"]["takes_with_absent_views"]:  # training's own takes were warned about as they came
        console.print(f"[yellow]{absent} val takes had views that were missing or could not be decoded "
                      "(absent_views in predictions.jsonl)")
