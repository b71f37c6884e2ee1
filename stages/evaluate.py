"""`skillpipe evaluate` and `skillpipe predict`: use a trained model on raw videos."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline import backbone as bb
from pipeline.checkpoints import HEAD_INFO
from pipeline.config import ConfigError, is_a_download_root, output_problem
from pipeline.decoder_crashes import CrashGuard, explained_worker_death, triage
from pipeline.evaluation import evaluate_split, predict_past_decoder_crashes
from pipeline.files import remove_temporary_files
from pipeline.fusion import VIEW_ORDER_DEPENDENT
from pipeline.skill_model import ModelSpec, load_skill_model, read_model_spec
from pipeline.takes import LABEL_NAMES, ProficiencyLabel, Take, load_takes, resolve_view_files, slots_by_another_camera
from pipeline.views import FAILURES_EXIT, absent_views, parse_view_setting
from pipeline.writer_lock import RUN_LOCK, first_writer


def _another_runs_folder(out: Path) -> str | None:
    """How `out` belongs to another run (one that is not an evaluate's): its folder, finished or under way (a finetune
    run, a fit-head cell or grid), or the adapter, backbone or checkpoint a run is read from; None if it does not."""
    if (out / "cache.json").is_file():  # evaluate's crash records and temporary-file clean-up would mix with extract's
        return "is a feature cache's folder"
    if is_a_download_root(out):
        return "is an EgoExo4D download root (annotations/, takes/)"
    if held := [name for name in (HEAD_INFO, "grid.json", "config.json", "checkpoint") if (out / name).exists()]:
        return f"holds another run's results or settings ({held[0]})"
    for folder in (out, *out.resolve().parents):
        if folder.name in ("adapter", "backbone", "checkpoint") and (folder.parent / "config.json").is_file():
            return f"is inside {folder}, which the run {folder.parent} is read from"
    return None


def _checked_spec(checkpoint: Path, out: Path, frames: int | None, views: str | None) -> ModelSpec:
    """The checkpoint's spec, once the options are checked against it. Its own config decides frames and views; a
    different value is an error. --out must not be among the model's inputs, whose hashes its files would change."""
    spec = read_model_spec(checkpoint)
    if folder := spec.input_holding(out):
        raise ConfigError(f"--out {out} is inside {folder}, which {checkpoint} is read from: files written there "
                          f"would change what it was trained with; write to another folder, e.g. {checkpoint / 'eval'}")
    if frames is not None and frames != spec.frames:
        raise ConfigError(f"--frames {frames} conflicts with {checkpoint}, trained with {spec.frames} frames")
    if views is not None and parse_view_setting(views) != spec.views:
        raise ConfigError(f"--views {views} conflicts with {checkpoint}, trained on views {list(spec.views)}")
    return spec


def evaluate(
    checkpoint: Path = typer.Option(..., help="A finetune run folder or a fit-head cell folder."),
    root: Path = typer.Option(..., help="egoexo download root."),
    split: str = typer.Option("val", help="Annotation split to evaluate."),
    out: Path = typer.Option(..., help="Folder for metrics.json, predictions.jsonl, confusion.png."),
    frames: Optional[int] = typer.Option(None, help="Must match the checkpoint if given."),
    views: Optional[str] = typer.Option(None, help="Must match the checkpoint if given."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    workers: int = typer.Option(1, min=0, help="Decoding processes, beside the model (0: decode in this process, where "
                                               "a file that crashes the decoder ends the run; see the README)."),
) -> None:
    """Evaluate a trained model end to end (decode, backbone, head) on a split."""
    if problem := output_problem("--out", out):
        raise ConfigError(problem)
    if out.resolve() == checkpoint.resolve():  # its metrics.json and predictions.jsonl are the run's own results
        raise ConfigError(f"--out {out} is the checkpoint folder itself: evaluating there would overwrite the run's own "
                          f"metrics; write to another folder, e.g. {checkpoint / 'eval'}")
    spec = _checked_spec(checkpoint, out, frames, views)  # first: its refusal names the model's input
    if problem := _another_runs_folder(out):
        raise ConfigError(f"--out {out} {problem}: evaluating there would replace or mix with its files; write to "
                          f"another folder, e.g. {checkpoint / 'eval'}")
    takes = load_takes(root, split)
    if not takes:
        raise ConfigError(f"{root}: the {split} annotations list no takes; nothing to evaluate")
    model, spec = load_skill_model(checkpoint, device, spec)
    settings = {"checkpoint": str(checkpoint), "root": str(root), "split": split, "frames": spec.frames,
                "sampling": spec.sampling, "views": list(spec.views), "backbone": spec.backbone, "precision": spec.precision,
                # a fit-head cell's head may run in another precision than its cache's backbone (None: the backbone's)
                "head_precision": model.head_precision or spec.precision,
                "backbone_forward": bb.COMPILED_FORWARDS[spec.frozen_weights] if spec.compiled else "eager"}
    # one evaluate writes a folder at a time, so the temporary files of an earlier one that was killed mid-write can
    # be told from a live writer's, and go
    with first_writer(out / RUN_LOCK, f"the evaluate folder {out}"):
        remove_temporary_files([out])
        guard = CrashGuard(out, triage(out))  # videos that crashed the decoder in an earlier try: absent views now
        try:
            metrics = evaluate_split(model, takes, spec.views, spec.clip_sampling, spec.precision, out, settings, device,
                                     workers, guard)
        except RuntimeError as err:
            if explained := explained_worker_death(out, err, "the same command"):
                raise explained from err
            raise
    console = Console()
    console.print(f"{split}: accuracy {metrics['accuracy']:.3f} over {metrics['num_takes']} takes -> {escape(str(out))}")
    if metrics["takes_with_absent_views"]:
        console.print(f"[yellow]{metrics['takes_with_absent_views']} takes had views that were missing or could not be "
                      f"decoded (see the warnings above and absent_views in predictions.jsonl); "
                      f"{metrics['takes_without_views']} had none and got the label prior of the train takes the "
                      "model was fitted on")
        raise typer.Exit(FAILURES_EXIT)


def predict(
    take_dirs: List[Path] = typer.Argument(..., help="Take folders holding the view mp4s (aria*, cam*/gp*)."),
    checkpoint: Path = typer.Option(..., help="A finetune run folder or a fit-head cell folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Predict the proficiency level of takes given as folders of view files."""
    model, spec = load_skill_model(checkpoint, device)
    takes = []
    for folder in take_dirs:
        try:
            files = resolve_view_files(folder)
        except ValueError as err:  # the folder's files do not map to views: the user's input, not a bug
            raise ConfigError(str(err)) from None
        if model.head_config.fusion in VIEW_ORDER_DEPENDENT and (moved := slots_by_another_camera(files)):
            warnings.warn(f"{folder}: {', '.join(moved)}: this model's {model.head_config.fusion} head tells view slots "
                          "apart, and the annotations it was trained on may have put that camera in another slot "
                          "(predict fills a free slot in camera order)", stacklevel=2)
        takes.append(Take(str(folder), Path(folder).name, "", ProficiencyLabel.NOVICE, "predict", files))
    probabilities, present = predict_past_decoder_crashes(model, takes, spec.views, spec.clip_sampling, spec.precision,
                                                          device)
    absent = absent_views(present, spec.views)
    rows = [{"take": t.take_uid, "predicted": LABEL_NAMES[int(p.argmax())],
             "probabilities": dict(zip(LABEL_NAMES, (round(float(x), 4) for x in p))), "absent_views": missing}
            for t, p, missing in zip(takes, probabilities, absent)]
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        table = Table(title=f"predictions of {checkpoint}")
        table.add_column("take", overflow="fold")  # a folder path: every character tells takes apart
        for column in ("predicted", *LABEL_NAMES, "absent views"):
            table.add_column(column)
        for row in rows:
            table.add_row(row["take"], row["predicted"], *(f"{row['probabilities'][n]:.3f}" for n in LABEL_NAMES),
                          ", ".join(row["absent_views"]))
        Console().print(table)
    if any(absent):  # the warnings said why; a take without any view got the train label prior
        raise typer.Exit(FAILURES_EXIT)
