import decord
import numpy as np
import pytest

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
    (videos.random_bytes_video, "cannot decode (RuntimeError"),
    (videos.half_truncated_faststart_video, "cannot decode"),
    (lambda p: videos.short_video(p, 3), "only 3 frames, need at least 8"),
])
def test_every_kind_of_bad_video_raises_a_video_error_naming_the_file(tmp_path, make, reason):
    path = tmp_path / "bad.mp4"
    make(path)
    with pytest.raises(VideoError) as info:
        decode_clip(path, ClipSampling(8))
    assert info.value.path == path and str(path) in str(info.value)
    assert reason in info.value.reason


def test_a_take_whose_views_have_different_lengths_is_warned_about(tmp_path):
    from pipeline.extraction import decode_take
    from pipeline.takes import ProficiencyLabel, Take

    lengths = {"ego": 60, "exo1": 30, "exo2": 60}
    files = {view: videos.good_video(tmp_path / f"{view}.mp4", frames=n, size=(48, 64)) for view, n in lengths.items()}
    take = Take("uid7", "t7", "Dance", ProficiencyLabel.NOVICE, "train", files)
    with pytest.warns(UserWarning, match=r"take uid7: its views have different lengths \(\{'ego': 60, 'exo1': 30"):
        decoded = decode_take(take, tuple(lengths), ClipSampling(4))
    assert set(decoded.clips) == set(lengths) and not decoded.failures  # a warning, not a failure
