"""Whole takes as model input: decoded, preprocessed, time-aligned clips of every chosen view."""

from __future__ import annotations

import warnings

import torch
from torch.utils.data import DataLoader, Dataset

from pipeline import decoder_crashes
from pipeline.decoder_crashes import CrashGuard
from pipeline.extraction import decode_take
from pipeline.takes import Take
from pipeline.video import ClipSampling


class TakeClips(Dataset):
    """Decoded, preprocessed clips of whole takes: (V, T, 3, 224, 224), (V,) present, label, index,
    and what decoding had to say about the take (failed views, unequal lengths: one line each).

    `moved_windows` (seed, epoch): training clips, whose window (window sampling) moves at random,
    per take and epoch (ClipSampling.moved_window). `crash_guard`: decodes are marked in its folder, and
    the files it knows to crash the decoder are absent views (pipeline.decoder_crashes)."""

    def __init__(self, takes: list[Take], views: tuple[str, ...], sampling: ClipSampling,
                 moved_windows: tuple[int, int] | None = None, crash_guard: CrashGuard | None = None):
        self.takes, self.views, self.sampling, self.moved_windows = takes, views, sampling, moved_windows
        self.crash_guard = crash_guard

    def __len__(self) -> int:
        return len(self.takes)

    def __getitem__(self, index: int):
        take = self.takes[index]
        with warnings.catch_warnings(record=True) as caught:  # said by the loader in the main process, see ClipBatches
            warnings.simplefilter("always")
            sampling = self.sampling.moved_window(*self.moved_windows, take.take_uid) if self.moved_windows else self.sampling
            decoded = decode_take(take, self.views, sampling, crash_guard=self.crash_guard)
        # as extract does: a failed view counts as absent, said aloud
        notes = [f"take {take.take_uid}, view {view}: {reason}; treated as absent" for view, reason in decoded.failures.items()]
        notes += [str(warning.message) for warning in caught]
        blank = torch.zeros(self.sampling.frames, 3, 224, 224)
        clips = torch.stack([decoded.clips.get(view, blank) for view in self.views])
        present = torch.tensor([view in decoded.clips for view in self.views])
        return clips, present, int(take.label), index, "\n".join(notes)


_SAID: set[str] = set()  # notes already warned by this process: each is said once, whatever the epoch


class ClipBatches:
    """Batches of TakeClips (clips, present, labels, indices) whose notes are warned once per process.

    Warned here, not in the DataLoader worker: workers are new processes every epoch, so their
    warnings repeated in every epoch (and Python's own once-only record does not survive the
    catch_warnings that collects the notes when decoding runs in this process).
    """

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        with decoder_crashes.worker_batches(self.loader) as batches:  # as extract's
            for clips, present, labels, indices, notes in batches:
                for line in (line for take_notes in notes for line in take_notes.splitlines()):
                    if line not in _SAID:
                        _SAID.add(line)
                        warnings.warn(line, UserWarning, stacklevel=1)
                yield clips, present, labels, indices


def clip_loader(takes: list[Take], views, sampling: ClipSampling, batch_size: int, workers: int,
                moved_windows: tuple[int, int] | None = None, crash_guard: CrashGuard | None = None) -> ClipBatches:
    dataset = TakeClips(takes, views, sampling, moved_windows, crash_guard)
    timeout = decoder_crashes.loader_timeout(len(views) * batch_size, workers) if crash_guard else 0  # an item: a batch
    return ClipBatches(DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False, timeout=timeout))
