import numpy as np
import pytest
import torch

from pipeline.video import ClipSampling, preprocess, sample_indices


@pytest.mark.parametrize("num_frames,samples", [(8, 8), (30, 8), (300, 16), (1001, 32), (17, 16)])
def test_indices_are_segment_centres_over_the_whole_take(num_frames, samples):
    indices = sample_indices(num_frames, samples)
    assert len(indices) == samples and np.all(np.diff(indices) > 0)
    assert indices[0] >= 0 and indices[-1] < num_frames
    segment = num_frames / samples
    # each index lies inside its own segment, at most half a segment (+1 frame) from the centre
    centres = (np.arange(samples) + 0.5) * segment
    assert np.all(np.abs(indices - centres) <= 1)
    assert indices[0] < segment and indices[-1] >= num_frames - segment


def test_sampling_is_deterministic_and_time_aligned_across_views():
    # frame-aligned views of one take share their frame count, hence the very same frame indices
    first = [sample_indices(450, 16) for _view in range(5)]
    assert all(np.array_equal(first[0], other) for other in first)
    assert np.array_equal(sample_indices(450, 16), first[0])
    # the same relative times, whatever the length
    relative = sample_indices(900, 8) / 900
    assert np.allclose(relative, sample_indices(450, 8) / 450, atol=1 / 450)


def test_too_short_a_take_is_an_error():
    with pytest.raises(ValueError, match="only 5 frames, need at least 8"):
        sample_indices(5, 8)


@pytest.mark.parametrize("num_frames,samples", [(450, 16), (451, 8), (64, 16), (65, 16), (1800, 32)])
def test_window_sampling_is_the_references_clip_at_the_takes_centre(num_frames, samples):
    """T frames at stride 4 from a 4T-frame window (the reference's), centred instead of random."""
    indices = ClipSampling(samples, "window").indices(num_frames)
    assert len(indices) == samples and np.all(np.diff(indices) == 4)
    start, end = indices[0], indices[0] + 4 * samples  # the window [start, end)
    assert 0 <= start and end <= num_frames
    assert abs((start + end) / 2 - num_frames / 2) <= 1  # centred
    assert np.array_equal(indices, ClipSampling(samples, "window").indices(num_frames))  # deterministic


@pytest.mark.parametrize("num_frames,samples,stride", [(40, 16, 2), (63, 16, 3), (16, 16, 1), (12, 8, 1)])
def test_a_take_shorter_than_the_window_gets_the_largest_stride_that_fits(num_frames, samples, stride):
    indices = ClipSampling(samples, "window").indices(num_frames)
    assert len(indices) == samples and np.all(np.diff(indices) == stride)
    assert indices[0] >= 0 and indices[-1] < num_frames
    assert abs((indices[0] + indices[0] + stride * samples) / 2 - num_frames / 2) <= 1


def test_a_moved_window_spans_the_take_from_start_to_end_and_is_drawn_from_seed_epoch_and_take():
    assert ClipSampling(8, "window", position=0.0).indices(450)[0] == 0
    assert ClipSampling(8, "window", position=1.0).indices(450)[-1] == 450 - 4  # the window's last 4 frames end the take
    window = ClipSampling(16, "window")
    draws = [window.moved_window(seed, epoch, uid).position for seed in (0, 1) for epoch in range(10) for uid in ("a", "b")]
    assert all(0 <= p <= 1 for p in draws) and len(set(draws)) == len(draws)
    assert window.moved_window(3, 2, "a") == window.moved_window(3, 2, "a")  # every rank and resume draws the same
    assert np.all(np.diff(window.moved_window(3, 2, "a").indices(900)) == 4)
    assert ClipSampling(16).moved_window(3, 2, "a") == ClipSampling(16)  # uniform sampling does not move
    assert 0 <= window.moved_window(-1, 0, "a").position <= 1  # finetune accepts negative seeds
    with pytest.raises(ValueError, match="needs window sampling"):
        ClipSampling(16, "uniform", position=0.5)


def test_an_unknown_sampling_is_refused():
    with pytest.raises(ValueError, match="unknown sampling 'random'"):
        ClipSampling(8, "random")


def smooth_frames(height, width, count=2, seed=0):
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.integers(0, 256, (count, 3, 24, 40)).astype(np.float32))
    frames = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")
    return frames.permute(0, 2, 3, 1).round().clamp(0, 255).numpy().astype(np.uint8)


@pytest.mark.parametrize("height,width", [(448, 796), (448, 448), (600, 448)])
def test_preprocessing_matches_the_checkpoint_image_processor(height, width):
    from transformers.models.videomae.image_processing_pil_videomae import VideoMAEImageProcessorPil

    frames = smooth_frames(height, width)
    processor = VideoMAEImageProcessorPil(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, image_mean=[0.45] * 3, image_std=[0.225] * 3
    )
    expected = processor(list(frames), return_tensors="pt")["pixel_values"][0]  # (T, 3, 224, 224)
    ours = preprocess(frames)
    assert ours.shape == expected.shape == (2, 3, 224, 224)
    # the PIL path rounds to uint8 after resizing: one grey level is 1 / 255 / 0.225 = 0.0174
    assert (ours - expected).abs().max() < 0.02


def test_large_frames_are_preprocessed_a_few_at_a_time_with_the_same_result(monkeypatch):
    import pipeline.video as video

    frames = smooth_frames(448, 796, count=7)
    whole = preprocess(frames)
    groups = []
    resize = video._resize_and_normalise
    monkeypatch.setattr(video, "_resize_and_normalise", lambda chunk, spec: groups.append(len(chunk)) or resize(chunk, spec))
    monkeypatch.setattr(video, "FLOAT_FRAMES_BYTES", 3 * 4 * 448 * 796 * 3)  # three frames' float32 at a time
    assert torch.equal(preprocess(frames), whole)
    assert groups == [3, 3, 1]
