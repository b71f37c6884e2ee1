"""finetune's epoch checkpoints: written so that a crash at any moment leaves one complete
checkpoint, found again by `--resume`, and loaded only into the run that wrote it.

A checkpoint is a folder (trainable weights as safetensors, optimizer + scheduler state, every
rank's RNG state, `state.json`), loadable with `torch.load(weights_only=True)`. It is written as
`checkpoint.staging/` and swapped in for `checkpoint/` (the previous one is `checkpoint.old/` for
the moment of the swap); `state.json` is written last and marks a folder complete.
"""

from __future__ import annotations

import hashlib
import io
import math
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipeline.config import ConfigError
from pipeline.distributed import Ranks
from pipeline.files import fsync_path, read_json, replace_folder, write_bytes_atomic, write_json_atomic

CHECKPOINT, STAGING, RETIRED = "checkpoint", "checkpoint.staging", "checkpoint.old"
BEST_WEIGHTS = "best.safetensors"  # the best epoch's trainable weights, beside the checkpoints
# what may change between a run and its resumption: where things are, and how they are computed
RESUMABLE_CHANGES = frozenset({"root", "out", "device", "workers"})
# settings added after checkpoints were first written, with the value that older runs trained with
ADDED_SETTINGS = {"max_grad_norm": 0.0, "sampling": "uniform", "decay_norms_and_biases": True}


def with_added_settings(saved: dict, config: dict) -> dict:
    """A checkpoint's recorded settings, completed with the values its run trained with for settings added since."""
    completed = {**ADDED_SETTINGS, **saved}
    if "train_windows" not in completed:  # window runs before it trained on centred windows; uniform ones on none
        completed["train_windows"] = "centre" if completed["sampling"] == "window" else config.get("train_windows")
    return completed


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def rng_states(ranks: Ranks, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Every rank's generators (dropout, DataLoader seeds), in rank order; a collective under torchrun."""
    own = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(device)
    if ranks.world_size == 1:
        return [own]
    gathered: list = [None] * ranks.world_size
    dist.all_gather_object(gathered, {name: state.cpu() for name, state in own.items()})
    return gathered


def save_epoch_checkpoint(out: Path, model, optimizer, schedule, state: dict, rngs: list[dict],
                          scaler: torch.amp.GradScaler | None = None) -> None:
    """Write the checkpoint beside the old one, then swap: a crash leaves one complete checkpoint."""
    folder, staging = Path(out) / CHECKPOINT, Path(out) / STAGING
    finish_interrupted_swap(Path(out))
    _remove(staging)
    staging.mkdir(parents=True)
    buffer = io.BytesIO()  # through write_bytes_atomic: fsynced before state.json marks the folder complete
    scaling = scaler.state_dict() if scaler else {}  # {} unless fp16 autocast scales the loss
    torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "rng": rngs, "grad_scaler": scaling},
               buffer)
    files = {"trainable.safetensors": save_safetensors(trainable_state(model)), "optimizer.pt": buffer.getvalue()}
    for name, data in files.items():
        write_bytes_atomic(staging / name, data)
    # written last: marks the folder complete; the files' hashes let a resume refuse them damaged since
    write_json_atomic(staging / "state.json", {**state, FILE_HASHES: {name: sha256(data) for name, data in files.items()}})
    replace_folder(staging, folder)  # the old one waits as checkpoint.old (RETIRED) between the renames


FILE_HASHES = "files_sha256"
DAMAGED = "it was damaged since it was written; the run cannot resume from it: start it again (another --out, or delete it)"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _checked_bytes(path: Path, hashes: dict[str, str]) -> bytes:
    """The file's bytes, refused when they differ from the hash its checkpoint recorded."""
    data = path.read_bytes()
    if path.name in hashes and hashes[path.name] != sha256(data):
        raise ConfigError(f"{path}: not the file its checkpoint recorded (another sha256): {DAMAGED}")
    return data


def _parsed(path: Path, parse: Callable[[bytes], object], data: bytes) -> object:
    """`parse(data)`; a file that cannot be parsed (cut, emptied, overwritten: an older checkpoint has no hashes) is
    named in a ConfigError instead of the library's own error."""
    try:
        return parse(data)
    except (SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ConfigError(f"{path}: unreadable ({type(err).__name__}: {str(err)[:200]}); {DAMAGED}") from None


def restore_best_weights(out: Path, checkpoint: Path, state: dict) -> None:
    """After a resume: when the checkpoint's epoch was the best, its weights are the best ones.

    best.safetensors is written after the checkpoint of its epoch, so a crash between the two
    writes leaves an older best beside a state that names this epoch; rewrite it from the checkpoint.
    """
    if state["best_epoch"] == state["epoch"] >= 0:
        write_bytes_atomic(Path(out) / BEST_WEIGHTS, (Path(checkpoint) / "trainable.safetensors").read_bytes())


def finish_interrupted_swap(out: Path) -> None:
    """Make the newest complete checkpoint `checkpoint/` again after a crash mid-swap (a resumed run
    may have started from `checkpoint.staging/`), before the next save deletes the staging folder."""
    newest = find_epoch_checkpoint(out)
    if newest == out / STAGING:
        replace_folder(newest, out / CHECKPOINT)
    elif newest == out / RETIRED and not (out / CHECKPOINT).exists():  # the crash came between the two renames
        newest.rename(out / CHECKPOINT)
        fsync_path(out)


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder, its completion mark first: a crash midway never leaves a
    folder that looks complete without its weights."""
    (folder / "state.json").unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def find_epoch_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of a run, including one left mid-swap by a crash."""
    out = Path(out)
    complete = [out / name for name in (CHECKPOINT, STAGING, RETIRED)
                if all((out / name / file).is_file() for file in ("state.json", "trainable.safetensors", "optimizer.pt"))]
    return max(complete, key=lambda folder: read_json(folder / "state.json")["epoch"], default=None)


def has_epoch_checkpoint(out: Path) -> bool:
    return any((Path(out) / name).exists() for name in (CHECKPOINT, STAGING, RETIRED))


def load_epoch_checkpoint(folder: Path, model, optimizer, schedule, config: dict, ranks: Ranks,
                          device: torch.device, weights_sha256: str | None = None,
                          scaler: torch.amp.GradScaler | None = None, train_takes_sha256: str | None = None) -> dict:
    """Restore weights, optimizer, scheduler and this rank's generators; returns the saved state.

    Raises ConfigError when the checkpoint belongs to another run: other settings (beyond
    RESUMABLE_CHANGES), another world size, other trainable weights, a backbone whose weights
    (`weights_sha256`, before training) are not the ones the run started from (recorded since 2026-12-05), or train
    annotations that changed since (`train_takes_sha256`: takes, labels, video files; recorded since 2026-12-05,
    twelfth session).
    """
    state = read_json(folder / "state.json")
    if "config" in state:
        saved = with_added_settings(state["config"], config)
    else:  # checkpoints before 2026-11-29 did not record their settings; those added since, they trained without
        saved = {**config, **with_added_settings({}, config)}
    changed = sorted(key for key in set(config) | set(saved) if key not in RESUMABLE_CHANGES and config.get(key) != saved.get(key))
    if changed:
        details = ", ".join(f"{key}: {saved.get(key)!r} -> {config.get(key)!r}" for key in changed)
        raise ConfigError(f"{folder}: written with other settings ({details}); resume with the same ones, or use another --out")
    started_from = {  # hash of what the run started from -> (this run's, what a difference means)
        "weights_sha256": (weights_sha256, f"the run was trained on other backbone weights than {config.get('backbone')} "
                                           "holds now; resume with the backbone it started from"),
        "train_takes_sha256": (train_takes_sha256, f"the train annotations under {config.get('root')} changed since the "
                               "run began (takes, labels, scenarios or video files): its held-out takes, data order and "
                               "schedule would no longer match; resume with the annotations it started from"),
    }
    for key, (current, difference) in started_from.items():
        if current:
            if state.get(key, current) != current:
                raise ConfigError(f"{folder}: {difference}, or use another --out")
            state[key] = current  # a checkpoint from before the hash gains it: later resumes check it
    if state["world_size"] != ranks.world_size:
        raise ConfigError(f"{folder}: checkpoint written by {state['world_size']} process(es); resume with the same world size")
    # checkpoints before the thirteenth session wrote NaN (no held-out takes) where JSON now gets null
    if "holdout_losses" in state:
        state["holdout_losses"] = [x if x is not None and math.isfinite(x) else None for x in state["holdout_losses"]]
    if isinstance(state.get("best_loss"), float) and not math.isfinite(state["best_loss"]):
        state["best_loss"] = None
    hashes = state.pop(FILE_HASHES, {})  # checkpoints before 2026-12-05 (twelfth session) record none
    trainable = _checked_bytes(folder / "trainable.safetensors", hashes)
    optimizer_state = _checked_bytes(folder / "optimizer.pt", hashes)
    missing, unexpected = model.load_state_dict(_parsed(folder / "trainable.safetensors", load_safetensors, trainable),
                                                strict=False)
    if unexpected:
        raise ConfigError(f"{folder}: checkpoint does not match this model (unexpected {unexpected[:3]}...)")
    saved = _parsed(folder / "optimizer.pt", lambda data: torch.load(io.BytesIO(data), weights_only=True, map_location="cpu"),
                    optimizer_state)  # map_location: a CUDA run resumes anywhere
    try:
        optimizer.load_state_dict(saved["optimizer"])
    except ValueError as err:  # another parameter grouping: a run of another skillpipe version or settings
        raise ConfigError(f"{folder}: its optimizer state does not fit this run ({err}); resume with the settings and "
                          "skillpipe version that wrote it, or use another --out") from None
    schedule.load_state_dict(saved["schedule"])
    if scaler and saved.get("grad_scaler"):  # fp16 runs: the loss scale it had reached
        scaler.load_state_dict(saved["grad_scaler"])
    # checkpoints before 2026-11-29 hold one CPU state (rank 0's), which every rank restored
    own = {"cpu": saved["rng"]} if isinstance(saved["rng"], torch.Tensor) else saved["rng"][ranks.rank]
    torch.set_rng_state(own["cpu"])
    if device.type == "cuda" and "cuda" in own:
        torch.cuda.set_rng_state(own["cuda"], device)
    return state
