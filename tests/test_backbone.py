import pytest
import torch
from transformers import TimesformerConfig, TimesformerModel

from pipeline.backbone import (
    LORA_KINDS_PER_LAYER, LoraSettings, adapter_hash, add_lora, autocast_context, encode_clips, load_adapter,
    load_backbone, reference_view_feature, save_tiny_backbone, set_num_frames, tiny_config, weights_hash,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("bb") / "tiny", seed=0, num_frames=8)


def clips(frames, batch=2, seed=0):
    return torch.randn(batch, frames, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def hidden(model, x):
    return model(pixel_values=x).last_hidden_state


@pytest.mark.parametrize("frames", [4, 12])
def test_any_frame_count_equals_a_model_built_for_it(tiny_dir, frames):
    loaded = load_backbone(str(tiny_dir), frames)
    assert loaded.config.num_frames == frames
    assert all(layer.config.num_frames == frames for layer in loaded.encoder.layer)
    native = TimesformerModel(tiny_config(num_frames=frames)).eval()
    reference = TimesformerModel.from_pretrained(str(tiny_dir)).state_dict()
    expected_time = torch.nn.functional.interpolate(
        reference["embeddings.time_embeddings"].transpose(1, 2), size=frames, mode="linear", align_corners=False
    ).transpose(1, 2)
    native.load_state_dict({**reference, "embeddings.time_embeddings": expected_time})
    x = clips(frames)
    torch.testing.assert_close(hidden(loaded, x), hidden(native, x), atol=1e-5, rtol=1e-5)


def test_the_num_frames_trap_is_real(tiny_dir):
    """Resampling the embeddings without telling the layers runs, but gives other features."""
    model = load_backbone(str(tiny_dir), 8)
    set_num_frames(model, 4)
    good = hidden(model, clips(4))
    model.config.num_frames = 8  # layers now split 4-frame tokens as if there were 8 frames
    with torch.inference_mode():
        stale = model(pixel_values=clips(4)).last_hidden_state
    assert not torch.allclose(good, stale, atol=1e-3)


def lora_params_per_layer(hidden_size, intermediate, r):
    qkv = r * (hidden_size + 3 * hidden_size)
    out = r * (2 * hidden_size)
    mlp_in, mlp_out = r * (hidden_size + intermediate), r * (intermediate + hidden_size)
    return 2 * qkv + 2 * out + out + mlp_in + mlp_out  # spatial + temporal qkv/out, temporal_dense, MLP


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("r", [2, 8])
def test_lora_adapts_the_seven_kinds_in_every_layer(tiny_dir, r):
    from peft.tuners.lora import LoraLayer

    model = add_lora(load_backbone(str(tiny_dir), 8), LoraSettings(r=r, alpha=2 * r))
    names = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert len(names) == LORA_KINDS_PER_LAYER * 2
    assert sum(n.endswith("temporal_attention.output.dense") for n in names) == 2
    assert sum(n.endswith(".attention.output.dense") and "temporal" not in n for n in names) == 2
    assert trainable(model) == 2 * lora_params_per_layer(32, 64, r)


def test_base_size_lora_count_matches_the_reference():
    with torch.device("meta"):
        base = TimesformerModel(TimesformerConfig())
    model = add_lora(base, LoraSettings(r=32))
    assert trainable(model) == 221_184 * 32 == 12 * lora_params_per_layer(768, 3072, 32)


def test_adapter_round_trip_in_both_folder_forms(tiny_dir, tmp_path):
    adapted = add_lora(load_backbone(str(tiny_dir), 4), LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    adapted.eval()
    adapted.save_pretrained(tmp_path / "run" / "adapter")
    x = clips(4)
    want = hidden(adapted, x)
    base_out = hidden(load_backbone(str(tiny_dir), 4), x)
    assert not torch.allclose(want, base_out, atol=1e-3)
    for folder in (tmp_path / "run", tmp_path / "run" / "adapter"):
        loaded = load_adapter(load_backbone(str(tiny_dir), 4), folder).eval()
        torch.testing.assert_close(hidden(loaded, x), want)
    with pytest.raises(FileNotFoundError, match="no LoRA adapter"):
        load_adapter(load_backbone(str(tiny_dir), 4), tmp_path)


def test_hashes_identify_weights_and_adapters(tiny_dir, tmp_path):
    first, second = load_backbone(str(tiny_dir), 8), load_backbone(str(tiny_dir), 8)
    assert weights_hash(first) == weights_hash(second)
    with torch.no_grad():
        second.encoder.layer[0].output.dense.weight[0, 0] += 1e-3
    assert weights_hash(first) != weights_hash(second)
    adapted = add_lora(first, LoraSettings(r=2))
    adapted.save_pretrained(tmp_path / "a")
    before = adapter_hash(tmp_path / "a")
    with torch.no_grad():
        next(p for n, p in adapted.named_parameters() if "lora_B" in n).fill_(0.5)
    adapted.save_pretrained(tmp_path / "a")
    assert adapter_hash(tmp_path / "a") != before


def test_encoded_tokens_are_cls_and_per_frame_patch_means(tiny_dir):
    model = load_backbone(str(tiny_dir), 4)
    x = clips(4)
    full = hidden(model, x)  # (B, 1 + N*T, D)
    with torch.inference_mode():
        tokens = encode_clips(model, x)
    assert tokens.shape == (2, 5, 32)
    torch.testing.assert_close(tokens[:, 0], full[:, 0])
    # independent layout check: frame t's patches are tokens 1 + n*T + t (patch-major, time fastest)
    for t in range(4):
        torch.testing.assert_close(tokens[:, 1 + t], full[:, 1 + t :: 4].mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference_view_feature(tokens, 196), full.mean(1), atol=1e-5, rtol=1e-5)


def test_frames_are_really_distinguished(tiny_dir):
    """The per-frame rows follow their own frame: changing frame 2 changes row 3 most."""
    model = load_backbone(str(tiny_dir), 4)
    x = clips(4, batch=1)
    y = x.clone()
    y[:, 2] = torch.randn_like(y[:, 2])
    with torch.inference_mode():
        delta = (encode_clips(model, x) - encode_clips(model, y)).abs().mean(-1)[0]
    assert delta.argmax().item() == 3


def test_bf16_autocast_is_close_to_fp32(tiny_dir):
    model = load_backbone(str(tiny_dir), 4)
    x = clips(4)
    with torch.inference_mode():
        exact = encode_clips(model, x)
        with autocast_context(torch.device("cpu")):
            fast = encode_clips(model, x)
    assert fast.dtype == torch.float32
    assert (fast - exact).abs().max() < 0.1 * exact.abs().max()
