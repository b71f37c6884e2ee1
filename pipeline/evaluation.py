"""End-to-end evaluation and prediction: decode, backbone (+ adapter), head, probabilities."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeline import backbone as bb
from pipeline.clips import clip_loader
from pipeline.decoder_crashes import CrashGuard, known_crashes, outside_the_file, triage, worker_died
from pipeline.metrics import write_evaluation
from pipeline.takes import Take
from pipeline.video import ClipSampling


@torch.inference_mode()
def logit_batches(model, takes: list[Take], views, sampling: ClipSampling, precision: str, device: str = "cpu",
                  batch_size: int = 2, workers: int = 0, crash_guard: CrashGuard | None = None
                  ) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """Per batch of `takes`, in order: (B, 4) fp32 logits on the CPU and (B, V) bool, which views each take had
    (decoded under `crash_guard` when given: pipeline.decoder_crashes)."""
    model.eval()
    device = torch.device(device)
    for clips, present, _, _ in clip_loader(takes, views, sampling, batch_size, workers, crash_guard=crash_guard):
        with bb.autocast_context(device, enabled=precision == "bf16"):
            logits = model(clips.to(device), present.to(device)).float().cpu()
        yield logits, present.numpy()


def take_logits(model, takes: list[Take], views, sampling: ClipSampling, precision: str, device: str = "cpu",
                batch_size: int = 2, workers: int = 0, crash_guard: CrashGuard | None = None
                ) -> tuple[torch.Tensor, np.ndarray]:
    """(N, 4) fp32 logits for `takes`, in order, on the CPU, and (N, V) bool: which views each take had."""
    return _stacked(list(logit_batches(model, takes, views, sampling, precision, device, batch_size, workers,
                                       crash_guard)), len(views))


def _stacked(batches: list[tuple[torch.Tensor, np.ndarray]], num_views: int) -> tuple[torch.Tensor, np.ndarray]:
    """logit_batches' batches as one (N, 4) and one (N, V) array (N may be 0)."""
    return (torch.cat([torch.zeros(0, 4), *(logits for logits, _ in batches)]),
            np.concatenate([np.zeros((0, num_views), dtype=bool), *(present for _, present in batches)]))


def predict_takes(model, takes: list[Take], views, sampling: ClipSampling, precision: str, device: str = "cpu",
                  batch_size: int = 2, workers: int = 0, crash_guard: CrashGuard | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) class probabilities for `takes`, in order, and (N, V) bool: which views each take had."""
    logits, present = take_logits(model, takes, views, sampling, precision, device, batch_size, workers, crash_guard)
    return torch.softmax(logits, -1).numpy(), present


def predict_past_decoder_crashes(model, takes: list[Take], views, sampling: ClipSampling, precision: str,
                                 device: str = "cpu", batch_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """predict_takes for `predict`, which has no output folder to record crashes in: decoding runs in a worker process
    guarded in a scratch folder, and when a file kills (or hangs) the decoder, the takes from the batch it was in on
    are predicted again with that view absent (warned with the file's name, as every failed view is). Each retry rules
    out one more file, so this ends; a worker death that no file explains is raised."""
    batches: list[tuple[torch.Tensor, np.ndarray]] = []  # whole batches: a retry groups the rest as one run would
    with tempfile.TemporaryDirectory(prefix="skillpipe-predict-") as scratch:
        while True:
            known = known_crashes(Path(scratch))
            done = sum(len(logits) for logits, _ in batches)
            try:
                for batch in logit_batches(model, takes[done:], views, sampling, precision, device, batch_size, 1,
                                           CrashGuard(Path(scratch), known)):
                    batches.append(batch)  # kept through a crash in a later batch
                logits, present = _stacked(batches, len(views))
                return torch.softmax(logits, -1).numpy(), present
            except RuntimeError as err:
                if not worker_died(err):
                    raise
                cleared: list[str] = []
                if not set(triage(Path(scratch), cleared)) - set(known):
                    raise (outside_the_file(err, cleared, "predict decodes it again when run again.") if cleared
                           else err) from err


def evaluate_split(model, takes: list[Take], views, sampling: ClipSampling, precision: str, out: Path, settings: dict,
                   device: str = "cpu", workers: int = 0, crash_guard: CrashGuard | None = None) -> dict:
    probabilities, present = predict_takes(model, takes, views, sampling, precision, device, workers=workers,
                                           crash_guard=crash_guard)
    labels = np.array([int(t.label) for t in takes], dtype=np.int64)
    return write_evaluation(out, [t.take_uid for t in takes], labels, probabilities, [t.scenario for t in takes],
                            present, tuple(views), settings, f"{Path(out).name}")
