"""Whole takes as model input: decoded, preprocessed, time-aligned clips of every chosen view."""

from __future__ import annotations

import warnings

import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.extraction import decode_take
from pipeline.takes import Take


class TakeClips(Dataset):
    """Decoded, preprocessed clips of whole takes: (V, T, 3, 224, 224), (V,) present, label."""

    def __init__(self, takes: list[Take], views: tuple[str, ...], frames: int):
        self.takes, self.views, self.frames = takes, views, frames

    def __len__(self) -> int:
        return len(self.takes)

    def __getitem__(self, index: int):
        take = self.takes[index]
        decoded = decode_take(take, self.views, self.frames)
        for view, reason in decoded.failures.items():  # as extract does: the view counts as absent, said aloud
            warnings.warn(f"take {take.take_uid}, view {view}: {reason}; treated as absent", stacklevel=2)
        blank = torch.zeros(self.frames, 3, 224, 224)
        clips = torch.stack([decoded.clips.get(view, blank) for view in self.views])
        present = torch.tensor([view in decoded.clips for view in self.views])
        return clips, present, int(take.label), index


def clip_loader(takes: list[Take], views, frames: int, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(TakeClips(takes, views, frames), batch_size=batch_size, num_workers=workers, shuffle=False)
