"""A small synthetic dataset in the exact layout of an `egoexo` proficiency_demonstrator download.

The skill level is split across views: label = 2 * exo_cue + ego_cue, where the ego cue (the
colour of a large central panel) shows only in the ego video and the exo cue (the brightness and
hue of a large central disc) only in the four exo videos. A model that sees one side only tops
out near 50%; fusing ego and exos can reach 100%. Nuisances (background level, noise, a moving
blob, hue jitter) vary per take so that the task is not a pixel lookup.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.takes import LABEL_NAMES, SCENARIOS, VIEWS

EGO_FILES = ("aria01_214-1.mp4", "aria02_214-1.mp4", "aria04_214-1.mp4", "aria_214-1.mp4", "aria1_214-1.mp4")
EXO_CAM = ("cam01.mp4", "cam02.mp4", "cam03.mp4", "cam04.mp4")
EXO_GOPRO = ("gp01.mp4", "gp02.mp4", "gp03.mp4", "gp04.mp4")
EXO_CAM05 = ("cam01.mp4", "cam02.mp4", "cam03.mp4", "cam05.mp4")
UNIVERSITIES = ("uniandes", "georgiatech", "cmu", "iiith", "minnesota", "upenn")
EGO_SIZE, EXO_SIZE = (448, 448), (448, 796)  # (height, width): 448 px on the short side


@dataclass(frozen=True)
class DemoSummary:
    takes: dict[str, int]  # split -> number of takes
    labels: dict[str, dict[str, int]]  # split -> label name -> count


def write_demo_dataset(
    root: Path, takes: int = 40, val_fraction: float = 0.3, seed: int = 0, frames: int = 16, write_videos: bool = True
) -> DemoSummary:
    """Write annotations and 448px mp4s under `root`; the same seed writes the same dataset."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    labels = np.resize(np.arange(4), takes)  # balanced: 0, 1, 2, 3, 0, 1, ...
    val_every = max(2, round(1 / val_fraction)) if val_fraction > 0 else takes + 1
    records = {"train": [], "val": []}
    for index, label in enumerate(labels):
        # every k-th group of four takes goes to val, so both splits stay label-balanced
        split = "val" if (index // 4) % val_every == val_every - 1 else "train"
        scenario = SCENARIOS[index % len(SCENARIOS)]
        record = _record(index, int(label), scenario, rng)
        records[split].append(record)
        if write_videos:
            _write_take_videos(root, record, int(label), frames, np.random.default_rng([seed, index]))
    for split, split_records in records.items():
        document = {"ds": "20231211_15:13:34", "annotations": split_records}
        path = root / "annotations" / f"proficiency_demonstrator_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=1))
    return DemoSummary(
        takes={split: len(r) for split, r in records.items()},
        labels={split: {name: sum(x["proficiency_score"] == name for x in r) for name in LABEL_NAMES} for split, r in records.items()},
    )


def _record(index: int, label: int, scenario: str, rng: np.random.Generator) -> dict:
    university = UNIVERSITIES[index % len(UNIVERSITIES)]
    take_name = f"{university}_{scenario.split()[-1].lower()}_{index:03d}_{1 + index % 9}"
    ego = EGO_FILES[index % len(EGO_FILES)]
    if scenario in ("Cooking", "Dance", "Music") and (index // len(SCENARIOS)) % 2 == 0:
        exos = EXO_GOPRO
    elif scenario in ("Cooking", "Soccer"):
        exos = EXO_CAM05
    else:
        exos = EXO_CAM
    return {
        "task_id": 1000 + SCENARIOS.index(scenario),
        "task_name": f"{scenario} demo task",
        "scenario_name": scenario,
        "university_id": university,
        "origin_participant_id": f"{university}_{index % 7}",
        "take_uid": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
        "video_paths": {view: f"takes/{take_name}/frame_aligned_videos/{f}" for view, f in zip(VIEWS, (ego, *exos))},
        "proficiency_score": LABEL_NAMES[label],
    }


def _write_take_videos(root: Path, record: dict, label: int, frames: int, rng: np.random.Generator) -> None:
    ego_cue, exo_cue = label & 1, label >> 1
    for view, rel in record["video_paths"].items():
        rel = Path(rel)
        path = root / rel.parent / "downscaled" / "448" / rel.name
        if view == "ego":
            clip = render_clip(EGO_SIZE, frames, rng, panel=ego_cue)
        else:
            clip = render_clip(EXO_SIZE, frames, rng, disc=exo_cue)
        write_video(path, clip)


def render_clip(size: tuple[int, int], frames: int, rng: np.random.Generator, panel: int | None = None, disc: int | None = None) -> np.ndarray:
    """(T, H, W, 3) uint8: nuisance background, plus a panel (ego cue) or a disc (exo cue) at the centre."""
    height, width = size
    base = np.empty((height, width, 3), np.float32)
    base[:] = rng.uniform(60, 160) + rng.uniform(-25, 25, size=3)
    cy, cx, radius = height // 2, width // 2, int(0.3 * height)
    if panel is not None:  # ego cue: warm vs cool central panel
        colour = np.array([220, 90, 40] if panel else [40, 90, 220]) + rng.uniform(-20, 20, 3)
        base[cy - radius : cy + radius, cx - radius : cx + radius] = colour
    if disc is not None:  # exo cue: bright green vs dark magenta central disc
        ys, xs = np.ogrid[0:height, 0:width]
        colour = np.array([90, 230, 110] if disc else [110, 30, 100]) + rng.uniform(-20, 20, 3)
        base[(ys - cy) ** 2 + (xs - cx) ** 2 < radius**2] = colour
    noise = rng.normal(0, 6, (height, width, 1)).astype(np.float32)
    blob, blob_y, blob_x = int(0.08 * height), int(rng.uniform(0.2, 0.8) * height), rng.uniform(0, width)
    clip = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        frame = base + np.roll(noise, 7 * t, axis=1)  # the noise drifts, so frames differ
        x = int(blob_x + 12 * t) % (width - blob)  # a distractor moving across the frame
        frame[blob_y - blob : blob_y + blob, x : x + blob] = rng.uniform(0, 255, 3)
        np.clip(frame, 0, 255, out=frame)
        clip[t] = frame
    return clip


def write_video(path: Path, frames: np.ndarray, fps: int = 30, faststart: bool = False) -> None:
    """Write (T, H, W, 3) uint8 frames as an h264 yuv420p mp4, atomically (temp name, then rename)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(tmp), mode="w", format="mp4", options=options) as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "crf": "20"})
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    os.replace(tmp, path)
