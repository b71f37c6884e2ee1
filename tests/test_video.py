from pathlib import Path

import decord
import numpy as np
import pytest
import torch

from pipeline.video import ClipSampling, VideoError, decode_clip, sample_indices
from tests import videos


def test_decoding_returns_exactly_the_sampled_frames(tmp_path):
    path = videos.good_video(tmp_path / "v.mp4", frames=30, size=(48, 64))
    all_frames = decord.VideoReader(str(path)).get_batch(list(range(30))).asnumpy()
    clip, length = decode_clip(path, ClipSampling(8))
    assert length == 30 and clip.shape == (8, 48, 64, 3) and clip.dtype == np.uint8
    np.testing.assert_array_equal(clip, all_frames[sample_indices(30, 8)])


@pytest.mark.parametrize("make,reason", [
    (lambda p: p, "file not found"),
    (videos.empty_video, "empty file"),
    (videos.truncated_video, "cannot decode (RuntimeError"),
    (videos.random_bytes_video, "not an mp4, mov, mkv or webm file (unknown header)"),
    (lambda p: videos.container_video(p, "mpegts"), "an MPEG-TS file: decord returns exact frames only from"),
    (lambda p: videos.container_video(p, "avi"), "an AVI file: decord returns exact frames only from"),
    (videos.half_truncated_faststart_video, "cannot decode"),
    (lambda p: p.write_bytes(b"\x00\x00\x00\x01free" + (2**63).to_bytes(8, "big") + b"\x00" * 16),
     "not an mp4, mov, mkv or webm file (unknown header)"),  # a 64-bit box size far past the end
    (videos.audio_only_video, "cannot find video stream with wanted index: -1); it has no video stream (audio aac)"),
    (lambda p: videos.short_video(p, 3), "only 3 frames, need at least 8"),
])
def test_every_kind_of_bad_video_raises_a_video_error_naming_the_file(tmp_path, make, reason):
    path = tmp_path / "bad.mp4"
    make(path)
    with pytest.raises(VideoError) as info:
        decode_clip(path, ClipSampling(8))
    assert info.value.path == path and str(path) in str(info.value)
    assert reason in info.value.reason


@pytest.mark.parametrize("failing", ["open", "stat"])
def test_an_unreadable_video_is_a_video_error_naming_the_file_not_a_stopped_run(tmp_path, monkeypatch, failing):
    """open() raised PermissionError, or stat() (in is_file) an I/O error of a failing disk, out of decode_clip: extract
    stopped instead of recording the view as failed. Simulated: the tests run as root, whom file modes do not stop."""
    path = videos.good_video(tmp_path / "v.mp4", frames=30, size=(48, 64))
    if failing == "open":
        def unreadable(file, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(file))

        monkeypatch.setattr("pipeline.video.open", unreadable, raising=False)
    else:
        stat = Path.stat

        def failing_disk(self, *args, **kwargs):
            if self == path:
                raise OSError(5, "Input/output error", str(self))
            return stat(self, *args, **kwargs)

        monkeypatch.setattr(Path, "stat", failing_disk)
    with pytest.raises(VideoError) as info:
        decode_clip(path, ClipSampling(8))
    reason = {"open": "PermissionError: Permission denied", "stat": "OSError: Input/output error"}[failing]
    assert info.value.path == path and info.value.reason == f"cannot read ({reason})"


@pytest.mark.parametrize("container, suffix", [("mp4", "mp4"), ("mov", "mov"), ("matroska", "mkv")])
def test_the_containers_decoded_are_those_whose_frames_come_out_exact(tmp_path, container, suffix):
    """MPEG-TS and AVI are refused (above): decord returned other frames from them, with no error. (webm is Matroska;
    PyAV's vp9 encoder fails to open once decord's own ffmpeg is loaded, as in this file.)"""
    path = videos.container_video(tmp_path / f"v.{suffix}", container)
    clip, length = decode_clip(path, ClipSampling(8))
    assert length == 40 and videos.frame_indices(clip) == sample_indices(40, 8).tolist()


@pytest.mark.parametrize("first_box", [b"junk", b"udta", b"wide"])
def test_a_quicktime_file_that_begins_with_another_box_is_decoded(tmp_path, first_box):
    """QuickTime files may put boxes other than ftyp first: the check walks the boxes to one only they hold."""
    path = videos.container_video(tmp_path / "v.mov", "mov")
    data = bytearray(path.read_bytes())
    assert data[4:8] == b"ftyp"
    data[4:8] = first_box  # the same size: the media boxes after it stay where their offsets say
    path.write_bytes(bytes(data))
    clip, length = decode_clip(path, ClipSampling(8))
    assert length == 40 and videos.frame_indices(clip) == sample_indices(40, 8).tolist()


def test_a_take_whose_views_have_different_lengths_is_warned_about(tmp_path):
    from pipeline.extraction import decode_take
    from pipeline.takes import ProficiencyLabel, Take

    lengths = {"ego": 60, "exo1": 30, "exo2": 60}
    files = {view: videos.good_video(tmp_path / f"{view}.mp4", frames=n, size=(48, 64)) for view, n in lengths.items()}
    take = Take("uid7", "t7", "Dance", ProficiencyLabel.NOVICE, "train", files)
    with pytest.warns(UserWarning, match=r"take uid7: its views have different lengths \(\{'ego': 60, 'exo1': 30"):
        decoded = decode_take(take, tuple(lengths), ClipSampling(4))
    assert set(decoded.clips) == set(lengths) and not decoded.failures  # a warning, not a failure


def test_training_clips_move_their_window_per_epoch_the_same_in_every_view(tmp_path):
    from pipeline.clips import TakeClips
    from pipeline.takes import ProficiencyLabel, Take
    from pipeline.video import preprocess

    files = {view: videos.good_video(tmp_path / f"{view}.mp4", frames=60, size=(48, 64)) for view in ("ego", "exo1")}
    take = Take("uid8", "t8", "Dance", ProficiencyLabel.NOVICE, "train", files)
    centred = ClipSampling(4, "window")
    clips = {epoch: TakeClips([take], ("ego", "exo1"), centred, moved_windows=(0, epoch))[0][0] for epoch in range(4)}
    assert torch.equal(clips[1], TakeClips([take], ("ego", "exo1"), centred, moved_windows=(0, 1))[0][0])  # seeded
    assert len({clip.sum().item() for clip in clips.values()}) > 1  # the window moves from epoch to epoch
    for epoch, clip in clips.items():  # each is the take's frames at its epoch's window, in every view
        moved = centred.moved_window(0, epoch, "uid8")
        for slot, view in enumerate(("ego", "exo1")):
            assert torch.equal(clip[slot], preprocess(decode_clip(files[view], moved)[0]))
    assert torch.equal(TakeClips([take], ("ego",), centred)[0][0][0], preprocess(decode_clip(files["ego"], centred)[0]))
