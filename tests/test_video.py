import decord
import numpy as np
import pytest

from pipeline.video import VideoError, decode_clip, sample_indices
from tests import videos


def test_decoding_returns_exactly_the_sampled_frames(tmp_path):
    path = videos.good_video(tmp_path / "v.mp4", frames=30, size=(48, 64))
    all_frames = decord.VideoReader(str(path)).get_batch(list(range(30))).asnumpy()
    clip = decode_clip(path, 8)
    assert clip.shape == (8, 48, 64, 3) and clip.dtype == np.uint8
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
        decode_clip(path, 8)
    assert info.value.path == path and str(path) in str(info.value)
    assert reason in info.value.reason
