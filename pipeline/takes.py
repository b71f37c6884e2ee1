"""EgoExo4D demonstrator-proficiency takes: read and validate the official annotation files.

An `egoexo` download (`--benchmarks proficiency_demonstrator --parts downscaled_takes/448
annotations`) holds `annotations/proficiency_demonstrator_{train,val}.json` and the 448px videos
under `takes/<take_name>/frame_aligned_videos/downscaled/448/<file>.mp4`.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.files import read_json

VIEWS: tuple[str, ...] = ("ego", "exo1", "exo2", "exo3", "exo4")
SPLITS: tuple[str, ...] = ("train", "val")
SCENARIOS: tuple[str, ...] = ("Rock Climbing", "Basketball", "Dance", "Music", "Cooking", "Soccer")
REQUIRED_FIELDS: tuple[str, ...] = ("take_uid", "scenario_name", "video_paths", "proficiency_score")


class ProficiencyLabel(enum.IntEnum):
    """The four demonstrator proficiency levels, in the benchmark's order (class index = value)."""

    NOVICE = 0
    EARLY_EXPERT = 1
    INTERMEDIATE_EXPERT = 2
    LATE_EXPERT = 3

    @property
    def display(self) -> str:
        return LABEL_NAMES[self]

    @classmethod
    def parse(cls, name: str) -> ProficiencyLabel:
        """Exact annotation string -> label; anything else is an error, never a default class."""
        try:
            return cls(LABEL_NAMES.index(name))
        except ValueError:
            raise ValueError(f"unknown proficiency_score {name!r} (expected one of {LABEL_NAMES})") from None


LABEL_NAMES: tuple[str, ...] = ("Novice", "Early Expert", "Intermediate Expert", "Late Expert")


class AnnotationError(ValueError):
    """Raised once with every offending record of an annotation file listed."""

    def __init__(self, path: Path, problems: list[str], what: str = "invalid annotation record(s)"):
        self.path, self.problems = path, problems
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{path}: {len(problems)} {what}:\n{listing}")


UNUSABLE = "unusable annotation file"  # AnnotationError's wording for a file-level problem


@dataclass(frozen=True)
class Take:
    """One recorded take: a person doing a task, filmed from up to five views."""

    take_uid: str
    take_name: str
    scenario: str
    label: ProficiencyLabel
    split: str
    videos: dict[str, Path]  # view name -> 448px downscaled mp4 (may not exist on a partial download)


def video_files(take: Take, views: tuple[str, ...], root: Path) -> dict[str, str]:
    """view -> the take's video file for it, relative to the download root (a moved root gives the same)."""
    return {view: take.videos[view].relative_to(root).as_posix() for view in views if view in take.videos}


def takes_sha256(takes: list[Take], root: Path, views: tuple[str, ...] = VIEWS) -> str:
    """A hash of what training on `views` reads of `takes`: uids, labels, scenarios and those views' video files."""
    listing = [[t.take_uid, int(t.label), t.scenario, video_files(t, views, root)] for t in sorted(takes, key=lambda t: t.take_uid)]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def annotation_path(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / f"proficiency_demonstrator_{split}.json"


def downscaled_path(root: Path, video_path: str) -> Path:
    """`takes/<name>/frame_aligned_videos/<file>.mp4` -> its 448px file under the download root."""
    rel = PurePosixPath(video_path)
    return Path(root).joinpath(*rel.parent.parts, "downscaled", "448", rel.name)


def load_takes(root: Path, split: str) -> list[Take]:
    """All takes of one split, validated as a whole before any compute; sorted by take_uid."""
    if split not in SPLITS:
        raise AnnotationError(annotation_path(root, split), [f"unknown split {split!r} (expected one of {SPLITS})"], UNUSABLE)
    path = annotation_path(root, split)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file not found (is --root an egoexo download root?)")
    try:
        document = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnnotationError(path, [f"not valid UTF-8 JSON: {err}"], UNUSABLE) from None
    records = document.get("annotations") if isinstance(document, dict) else None
    if not isinstance(records, list):
        raise AnnotationError(path, ['top level must be an object with an "annotations" list'], UNUSABLE)

    takes, problems, seen, seen_names = [], [], {}, {}
    for position, record in enumerate(records):
        take, record_problems = _parse_record(root, split, record)
        where = f"record {position}" + (f" (take_uid {take.take_uid})" if take else "")
        problems += [f"{where}: {p}" for p in record_problems]
        if take is None:
            continue
        if take.take_uid in seen:
            problems.append(f"{where}: duplicate take_uid, first seen in record {seen[take.take_uid]}")
        if take.take_name and take.take_name in seen_names:  # the same videos under two labels
            problems.append(f"{where}: take folder {take.take_name!r} also belongs to record {seen_names[take.take_name]}")
        seen.setdefault(take.take_uid, position)
        seen_names.setdefault(take.take_name, position)
        takes.append(take)
    if problems:
        raise AnnotationError(path, problems)
    return sorted(takes, key=lambda t: t.take_uid)


def shared_takes(train: list, val: list) -> list[str]:
    """Takes (Take or cache records) in both splits, by take_uid or take folder: val would score training data."""
    uids = {t.take_uid for t in train} & {t.take_uid for t in val}
    folders = {t.take_name for t in train} & {t.take_name for t in val} - {t.take_name for t in val if t.take_uid in uids}
    return sorted(uids) + sorted(f"take folder {name}" for name in folders)


def _parse_record(root: Path, split: str, record: object) -> tuple[Take | None, list[str]]:
    if not isinstance(record, dict):
        return None, ["record is not an object"]
    problems = [f"missing field {name!r}" for name in REQUIRED_FIELDS if name not in record]
    if problems:
        return None, problems
    take_uid = record["take_uid"]
    if not isinstance(take_uid, str) or not take_uid:
        return None, [f"take_uid must be a non-empty string, got {take_uid!r}"]
    if "/" in take_uid or "\\" in take_uid or take_uid in (".", ".."):  # it names files in the cache
        return None, [f"take_uid must not be a path, got {take_uid!r}"]

    try:
        label = ProficiencyLabel.parse(record["proficiency_score"])
    except ValueError as err:
        problems.append(str(err))
    scenario = record["scenario_name"]
    if scenario not in SCENARIOS:
        problems.append(f"unknown scenario_name {scenario!r} (expected one of {SCENARIOS})")

    video_paths = record["video_paths"]
    videos, take_names = {}, set()
    if not isinstance(video_paths, dict):
        problems.append("video_paths must be an object with keys " + ", ".join(VIEWS))
        video_paths = {}
    for view in VIEWS:
        rel = video_paths.get(view)
        if rel is None:
            problems.append(f"video_paths has no {view!r} entry")
            continue
        path_problem = _unsafe_path_reason(rel)
        if path_problem:
            problems.append(f"video_paths[{view!r}] = {rel!r}: {path_problem}")
            continue
        videos[view] = downscaled_path(root, rel)
        take_names.add(PurePosixPath(rel).parts[1])
    if len(take_names) > 1:
        problems.append(f"video_paths point into several takes: {sorted(take_names)}")
    if len(set(videos.values())) < len(videos):
        problems.append(f"video_paths name one file for several views: {video_paths}")
    if problems:
        return Take(take_uid, "", str(scenario), ProficiencyLabel.NOVICE, split, {}), problems
    return Take(take_uid, take_names.pop(), scenario, label, split, videos), []


def _unsafe_path_reason(rel: object) -> str | None:
    """Why an annotation video path is unusable, or None: it must stay inside the download root."""
    if not isinstance(rel, str) or not rel:
        return "must be a non-empty string"
    path = PurePosixPath(rel)
    if path.is_absolute() or "\\" in rel or (len(rel) > 1 and rel[1] == ":"):
        return "absolute path escapes the download root"
    if ".." in path.parts:
        return "'..' escapes the download root"
    if len(path.parts) < 4 or path.parts[0] != "takes" or path.parts[2] != "frame_aligned_videos":
        return "expected takes/<take_name>/frame_aligned_videos/<file>.mp4"
    return None


def resolve_view_files(take_dir: Path) -> dict[str, Path]:
    """Map the mp4 files of one take folder to views by camera name.

    Ego is the Aria RGB file (`aria01_214-1.mp4`, `aria_214-1.mp4`, `aria1_...`; never a SLAM `1201-*`
    or eye `211-*` stream); `camN` / `gpN` is exoN for N in 1..4, and a missing one stays missing (a
    partial download). Other camera files (`cam05`) fill the free slots in numeric order when the
    folder holds four exo files (cam01-03 + cam05: exo4); with fewer, which camera is missing cannot be
    told, so they are left out with a warning rather than seen as another camera's view. Accepts the
    folder of mp4s itself, or a take folder holding `frame_aligned_videos/downscaled/448/` or else
    `frame_aligned_videos/`.
    """
    take_dir = Path(take_dir)
    if not take_dir.is_dir():
        raise ValueError(f"{take_dir}: not a folder (expected a take folder holding its view mp4s)")
    aligned = take_dir / "frame_aligned_videos"  # the full-resolution files, where the 448px ones were not downloaded
    folder = next((f for f in (aligned / "downscaled" / "448", aligned) if f.is_dir()), take_dir)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".mp4" and p.is_file())  # .MP4 too
    arias = [p for p in files if p.name.lower().startswith("aria")]
    # Aria's RGB stream is 214-1; a folder may also hold its SLAM (1201-*) or eye (211-*) streams
    egos = [p for p in arias if p.stem.lower().endswith("214-1")] or [p for p in arias if not _ARIA_SIDE_STREAM.search(p.stem)]
    exos = sorted((p for p in files if _EXO_NAME.match(p.name.lower())), key=_exo_number)
    if len(egos) > 1:
        raise ValueError(f"{folder}: expected one ego (aria*) video, found {[p.name for p in egos]}")
    if not egos and not exos:
        raise ValueError(f"{folder}: no ego (aria*) or exo (camN, gpN) video here")
    if len(exos) > 4:
        raise ValueError(f"{folder}: more than four exo videos: {[p.name for p in exos]}; the model takes four, "
                         "so pass a folder holding only the four it should see")
    numbered, others, doubles = {}, [], []
    for path in exos:  # in numeric order
        view = f"exo{_exo_number(path)}"
        if view in VIEWS and view not in numbered:
            numbered[view] = path
        else:  # cam05, or a second file for one number (cam01 and gp01)
            (doubles if view in VIEWS else others).append(path)
    if doubles:
        warnings.warn(f"{folder}: {[p.name for p in doubles]} left out: a second file for a camera number already "
                      f"taken ({sorted(numbered)}); pass a folder holding one file per camera", stacklevel=2)
    if len(exos) == 4 and not doubles:  # cam01-03 + cam05: cam05 takes the free slot
        numbered.update(zip([view for view in VIEWS[1:] if view not in numbered], others))
    elif others:
        warnings.warn(f"{folder}: {[p.name for p in others]} left out: with only {len(numbered)} other exo files it "
                      f"cannot be told which camera's slot {'it takes' if len(others) == 1 else 'they take'} (views "
                      f"found: {sorted(numbered)}); pass a folder holding all four exo files to use it", stacklevel=2)
    return ({"ego": egos[0]} if egos else {}) | {view: numbered[view] for view in VIEWS[1:] if view in numbered}


def slots_by_another_camera(files: dict[str, Path]) -> list[str]:
    """Exo slots that resolve_view_files filled with another camera's file (`cam05.mp4 as exo2`): an annotation may
    put that camera elsewhere."""
    return [f"{path.name} as {view}" for view, path in files.items()
            if view != "ego" and _EXO_NAME.match(path.name.lower()) and f"exo{_exo_number(path)}" != view]


def _exo_number(path: Path) -> int:
    return int(_EXO_NAME.match(path.name.lower()).group(2))


_EXO_NAME = re.compile(r"^(cam|gp)(\d+)\.mp4$")
_ARIA_SIDE_STREAM = re.compile(r"_(1201|211)-\d+$", re.IGNORECASE)  # SLAM and eye-tracking cameras: not the ego view
