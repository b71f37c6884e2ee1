"""`skillpipe extract`: cache TimeSformer token features of every take of a split."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from pipeline.config import REQUIRED_HELP, ConfigError, load_config
from pipeline.distributed import local_device, torchrun_ranks
from pipeline.extraction import ExtractConfig
from pipeline.extraction_progress import extract_with_progress
from pipeline.views import FAILURES_EXIT


def extract(
    root: Optional[Path] = typer.Option(None, help=f"egoexo download root (holds annotations/ and takes/). {REQUIRED_HELP}"),
    split: Optional[str] = typer.Option(None, help="Annotation split to extract: train (default) or val; fit-head needs both in one cache."),
    cache: Optional[Path] = typer.Option(None, help="Feature cache folder (default cache/features)."),
    backbone: Optional[str] = typer.Option(None, help="TimeSformer hub id or local folder (default facebook/timesformer-base-finetuned-k600)."),
    frames: Optional[int] = typer.Option(None, help="Frames T sampled per view (default: the finetune run's, from "
                                         "--adapter RUN or --backbone RUN/backbone; else 16)."),
    sampling: Optional[str] = typer.Option(
        None, help="uniform: T frames spread over the whole take; window: the reference's clip, T frames at stride 4 "
                   "from the 4T-frame window at the take's centre (~2 s at 30 fps; the reference draws it at random). "
                   "Default: the finetune run's (--adapter RUN or --backbone RUN/backbone), else uniform.",
    ),
    views: Optional[str] = typer.Option(None, help="Views to extract: ego, exos, ego+exos, ego+exo2 (+ joins views) or a comma list "
                                                        "such as ego,exo1 (default ego,exo1,exo2,exo3,exo4)."),
    adapter: Optional[Path] = typer.Option(None, help="LoRA adapter folder (or a finetune run holding adapter/)."),
    device: Optional[str] = typer.Option(None, help="cpu (default) or cuda[:N]."),
    precision: Optional[str] = typer.Option(None, help="bf16 (autocast, default) or fp32."),
    batch_size: Optional[int] = typer.Option(None, help="Clips per backbone forward (default 1 on CPU, 16 on CUDA)."),
    workers: Optional[int] = typer.Option(None, help="Decoding processes; 0 decodes in the main process (default 1)."),
    shard_size: Optional[int] = typer.Option(None, help="Takes per zarr shard, the unit of commit and resume (default: the cache's, 16 for a new cache)."),
    compile: Optional[bool] = typer.Option(
        None, "--compile/--no-compile",
        help="Fused attention + torch.compile with the weights frozen into the graph: 1.2-1.5x faster forwards on a "
             "CPU after a one-off compile (~30-60 s per process); recorded in the fingerprint.",
    ),
    frozen_weights: Optional[bool] = typer.Option(
        None, "--frozen-weights/--no-frozen-weights",
        help="With --compile: freeze the weights into the compiled graph (prepacked matmuls, bias fused): x0.82-0.94 "
             "of the time per forward on a CPU, for ~20 s more compile per process. Default: as the cache was begun, on for a "
             "new cache.",
    ),
    retry_failed: Optional[bool] = typer.Option(
        None, "--retry-failed/--no-retry-failed",
        help="Decode the failed views again, after fixing or fetching those files; the other views keep their "
             "cached features.",
    ),
    reuse: Optional[Path] = typer.Option(
        None, help="Another cache to copy features from: the takes it holds, made the same way from the same video "
                   "files, are copied, not extracted again (say after the annotations added takes, or for fewer "
                   "views). Its other settings must match this run's.",
    ),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML/TOML/JSON config file; flags override it."),
) -> None:
    """Decode takes, run the backbone per view, and commit token features to a zarr cache (resumable)."""
    overrides = dict(
        root=root, split=split, cache=cache, backbone=backbone, frames=frames, sampling=sampling, views=views, adapter=adapter,
        device=device, precision=precision, batch_size=batch_size, workers=workers, shard_size=shard_size,
        compile=compile, frozen_weights=frozen_weights, retry_failed=retry_failed, reuse=reuse,
    )
    settings = load_config(ExtractConfig, config, overrides)
    if frozen_weights is not None and not settings.compile:
        raise ConfigError("--frozen-weights / --no-frozen-weights choose how --compile runs the backbone: give --compile too")
    with torchrun_ranks(settings.device) as ranks:  # torchrun: each rank extracts its own shards
        settings = dataclasses.replace(settings, device=local_device(settings.device))
        summary = extract_with_progress(settings, ranks=ranks)
    # under torchrun rank 0 reports the split's failed views (every rank's, from the committed markers) and exits 3,
    # the others 0: torchrun stops every rank at the first non-zero exit, which cut rank 0's summary off
    raise typer.Exit(FAILURES_EXIT if summary.failures and ranks.is_main else 0)
