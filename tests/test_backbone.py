import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import TimesformerConfig, TimesformerModel

import pipeline.backbone as backbone
from pipeline.backbone import (
    LORA_KINDS_PER_LAYER, LoraSettings, adapter_hash, add_lora, autocast_context, cast_for_autocast_inference,
    compiled_encode_clips, encode_clips, load_adapter, load_backbone, prepare_for_inference, reference_view_feature, save_tiny_backbone, set_num_frames, tiny_config, weights_hash,
)
from pipeline import fused_attention
from pipeline.fused_attention import FusedSelfAttention, use_fused_attention

NUM_PATCHES = 196  # (224 / 16) ** 2
HIDDEN, INTERMEDIATE, LAYERS = 32, 64, 2  # tiny_config()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("bb") / "tiny", seed=0, num_frames=8)


def clips(frames, batch=1, seed=0):
    return torch.randn(batch, frames, 3, 224, 224, generator=torch.Generator().manual_seed(seed))  # (B, T, 3, H, W)


@torch.inference_mode()
def hidden(model, x):
    return model(pixel_values=x).last_hidden_state  # (B, 1 + N*T, D)


@torch.inference_mode()
def encode(model, x):
    return encode_clips(model, x)  # (B, 1 + T, D)


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_params_per_layer(hidden_size, intermediate, r):
    """Closed form: a LoRA on Linear(i, o) adds r * (i + o) parameters."""
    qkv, out = r * (hidden_size + 3 * hidden_size), r * (hidden_size + hidden_size)
    mlp = r * (hidden_size + intermediate) + r * (intermediate + hidden_size)
    return 2 * qkv + 2 * out + out + mlp  # spatial + temporal (qkv, out dense), temporal_dense, MLP in + out


# --- any frame count --------------------------------------------------------------------------

@pytest.mark.parametrize("frames", [4, 12])
def test_any_frame_count_equals_a_model_built_for_it(tiny_dir, frames):
    loaded = load_backbone(str(tiny_dir), frames)
    assert loaded.config.num_frames == frames
    assert all(layer.config is loaded.config for layer in loaded.encoder.layer)
    saved = TimesformerModel.from_pretrained(str(tiny_dir)).state_dict()
    expected_time = F.interpolate(
        saved["embeddings.time_embeddings"].transpose(1, 2), size=frames, mode="linear", align_corners=False
    ).transpose(1, 2)  # (1, T, D)
    native = TimesformerModel(tiny_config(num_frames=frames)).eval()
    native.load_state_dict({**saved, "embeddings.time_embeddings": expected_time})
    x = clips(frames)
    torch.testing.assert_close(hidden(loaded, x), hidden(native, x), atol=1e-5, rtol=1e-5)


def test_native_frame_count_leaves_the_weights_alone(tiny_dir):
    saved = TimesformerModel.from_pretrained(str(tiny_dir)).state_dict()
    assert saved["embeddings.time_embeddings"].abs().max() > 0  # random, so interpolation is tested
    loaded = load_backbone(str(tiny_dir), 8).state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[name], saved[name]) for name in saved)


def test_the_num_frames_trap_is_real(tiny_dir):
    """Resampling the embeddings without telling the layers runs, but gives other features."""
    model = load_backbone(str(tiny_dir), 8)
    set_num_frames(model, 4)
    x = clips(4)
    good = hidden(model, x)
    model.config.num_frames = 8  # layers now split 4-frame tokens as if there were 8 frames
    stale = hidden(model, x)
    assert stale.shape == good.shape
    assert not torch.allclose(good, stale, atol=1e-3)
    with pytest.raises(ValueError, match="4 frames but the backbone is set up for 8"):
        encode_clips(model, x)


def test_a_tiny_backbone_killed_while_saving_leaves_no_folder_that_looks_complete(tmp_path, monkeypatch):
    import transformers.modeling_utils

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", killed)  # HF writes config.json first
    with pytest.raises(KeyboardInterrupt):
        backbone.save_tiny_backbone(tmp_path / "tiny")
    assert not (tmp_path / "tiny" / "config.json").exists()  # `skillpipe demo` decides by it
    monkeypatch.undo()
    backbone.load_backbone(str(backbone.save_tiny_backbone(tmp_path / "tiny")), 8)


def test_a_local_folder_without_config_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(ValueError, match=str(path)):
            load_backbone(str(path), 8)


@pytest.mark.parametrize("broken, message", [
    ("no weights", "not a loadable TimeSformer folder: .*model.safetensors"),
    ("more layers in config.json", r"weights are not in its checkpoint \(e\.g\. \['encoder\.layer\.2\..*would be random"),
    ("other sizes in config.json", "not a loadable TimeSformer: "),
])
def test_a_folder_whose_weights_do_not_make_its_model_is_a_clear_error_not_random_weights(tmp_path, broken, message):
    import json
    import shutil

    folder = backbone.save_tiny_backbone(tmp_path / "tiny")
    config = json.loads((folder / "config.json").read_text())
    if broken == "no weights":
        for weights in folder.glob("*.safetensors"):
            weights.unlink()
    elif broken == "more layers in config.json":  # transformers would initialise the missing layer at random
        config["num_hidden_layers"] += 1
    else:
        config["intermediate_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(backbone.ConfigError, match=message):
        load_backbone(str(folder), 8)
    shutil.rmtree(folder)


def test_a_backbone_for_other_frames_than_skillpipe_feeds_is_refused(tmp_path):
    """A 448 px checkpoint (timesformer-hr) would run on 224 px clips without error: HF resizes its position embeddings
    on every forward, and the cache would pool its 196 patches as 784."""
    with pytest.raises(backbone.ConfigError, match="image_size 448, but skillpipe feeds 224 px"):
        load_backbone(str(backbone.save_tiny_backbone(tmp_path / "hr", image_size=448)), 8)


@pytest.mark.parametrize("mean, std, refused", [
    ([0.45, 0.45, 0.45], [0.225, 0.225, 0.225], False),  # the k600 checkpoint's preprocessor_config.json
    ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], True),  # ImageNet's
    (0.45, 0.5, True),
])
def test_a_folders_preprocessor_config_must_normalise_as_skillpipe_does(tmp_path, mean, std, refused):
    import json

    folder = backbone.save_tiny_backbone(tmp_path / "tiny")
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    if refused:
        with pytest.raises(backbone.ConfigError, match="preprocessor_config.json: the backbone was trained on frames"):
            load_backbone(str(folder), 8)
    else:
        load_backbone(str(folder), 8)
    (folder / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(backbone.ConfigError, match="not a readable preprocessor config"):
        load_backbone(str(folder), 8)


def test_a_video_classification_checkpoint_loads_as_the_k600_one_does(tmp_path):
    """facebook/timesformer-base-finetuned-k600 is a TimesformerForVideoClassification: its classifier comes back as
    unexpected keys (allowed) and every backbone weight is filled from `timesformer.*`."""
    from transformers import TimesformerForVideoClassification

    config = backbone.tiny_config(num_frames=8)
    config.num_labels = 600
    classifier = TimesformerForVideoClassification(config)
    classifier.save_pretrained(tmp_path / "k600-like")
    loaded = load_backbone(str(tmp_path / "k600-like"), 8)
    saved = classifier.timesformer.state_dict()
    assert all(torch.equal(tensor, saved[name]) for name, tensor in loaded.state_dict().items())


def test_a_hub_id_that_cannot_be_fetched_is_a_clear_error(tmp_path):
    """Offline (or a misspelt id): one error naming the backbone and the way out, not transformers' traceback."""
    code = ("from pipeline.backbone import load_backbone\nfrom pipeline.config import ConfigError\n"
            "try:\n    load_backbone('no-such-org/no-such-timesformer', 8)\nexcept ConfigError as err:\n    print(err)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache, no network
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "backbone 'no-such-org/no-such-timesformer': not a local folder" in result.stdout
    assert "--backbone with a folder written by save_pretrained" in result.stdout
    assert "a downloaded model loads from the cache without the hub" in result.stdout


def test_a_hub_id_already_in_the_hub_cache_loads_without_asking_the_hub(tmp_path):
    """Offline (a cluster's compute nodes), huggingface_hub retried its requests for ~25 s before using the cache."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--some-org--tiny-timesformer"
    backbone.save_tiny_backbone(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    code = "from pipeline.backbone import load_backbone\nload_backbone('some-org/tiny-timesformer', 8)\nprint('loaded')\n"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}  # a hub that refuses
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "loaded" in result.stdout, result.stderr[-2000:]
    assert "127.0.0.1" not in result.stderr and "Retrying" not in result.stderr  # the hub was never asked


# --- LoRA --------------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [2, 8])
def test_lora_adapts_the_seven_kinds_in_every_layer(tiny_dir, r):
    from peft.tuners.lora import LoraLayer

    model = add_lora(load_backbone(str(tiny_dir), 8), LoraSettings(r=r, alpha=2 * r))
    names = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert len(names) == LORA_KINDS_PER_LAYER * LAYERS
    kinds = {n.split(".layer.")[1].split(".", 1)[1] for n in names}
    assert kinds == {
        "attention.attention.qkv", "attention.output.dense", "temporal_attention.attention.qkv",
        "temporal_attention.output.dense", "temporal_dense", "intermediate.dense", "output.dense",
    }
    assert trainable(model) == LAYERS * lora_params_per_layer(HIDDEN, INTERMEDIATE, r)
    assert not any(m.training for m in model.modules())  # the eval base stays eval, LoRA dropouts too


def test_base_size_lora_count_matches_the_reference():
    with torch.device("meta"):  # no memory, no init: only shapes count
        base = TimesformerModel(TimesformerConfig())
    model = add_lora(base, LoraSettings(r=32))
    assert trainable(model) == 221_184 * 32 == 12 * lora_params_per_layer(768, 3072, 32)


def test_a_target_pattern_missing_modules_is_refused(tiny_dir, monkeypatch):
    monkeypatch.setattr(backbone, "LORA_TARGETS", r".*\.layer\.\d+\.attention\.attention\.qkv")
    with pytest.raises(RuntimeError, match=f"adapted {LAYERS} modules, expected 7 x {LAYERS}"):
        add_lora(load_backbone(str(tiny_dir), 8), LoraSettings(r=2))


def test_adapter_round_trip_in_both_folder_forms(tiny_dir, tmp_path):
    adapted = add_lora(load_backbone(str(tiny_dir), 4), LoraSettings(r=4, alpha=8))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:  # zeros at init: make the adapter change the outputs
                p.normal_(0, 0.5, generator=generator)
    adapted.save_pretrained(tmp_path / "run" / "adapter")
    x = clips(4)
    want = hidden(adapted, x)
    assert not torch.allclose(want, hidden(load_backbone(str(tiny_dir), 4), x), atol=1e-3)
    for folder in (tmp_path / "run", tmp_path / "run" / "adapter"):
        loaded = load_adapter(load_backbone(str(tiny_dir), 4), folder)
        assert not loaded.training and trainable(loaded) == 0
        torch.testing.assert_close(hidden(loaded, x), want, atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no LoRA adapter"):
        load_adapter(load_backbone(str(tiny_dir), 4), tmp_path)


# --- fingerprints ------------------------------------------------------------------------------

def test_weights_hash_identifies_the_weights(tiny_dir, tmp_path):
    first, second = load_backbone(str(tiny_dir), 8), load_backbone(str(tiny_dir), 8)
    assert weights_hash(first) == weights_hash(second)
    with torch.no_grad():
        second.encoder.layer[0].output.dense.weight[0, 0] += 1e-3
    assert weights_hash(first) != weights_hash(second)
    assert weights_hash(load_backbone(str(tiny_dir), 4)) != weights_hash(first)  # resampled time embeddings
    again = load_backbone(str(save_tiny_backbone(tmp_path / "same", seed=0)), 8)
    other = load_backbone(str(save_tiny_backbone(tmp_path / "other", seed=1)), 8)
    assert weights_hash(again) == weights_hash(first) != weights_hash(other)


def test_adapter_hash_identifies_the_adapter(tiny_dir, tmp_path):
    adapted = add_lora(load_backbone(str(tiny_dir), 8), LoraSettings(r=2))
    adapted.save_pretrained(tmp_path / "a")
    adapted.save_pretrained(tmp_path / "b" / "adapter")
    before = adapter_hash(tmp_path / "a")
    assert adapter_hash(tmp_path / "b") == before  # content, not location
    with torch.no_grad():
        next(p for n, p in adapted.named_parameters() if "lora_B" in n).fill_(0.5)
    adapted.save_pretrained(tmp_path / "a")
    assert adapter_hash(tmp_path / "a") != before


# --- encoding ----------------------------------------------------------------------------------

def test_encoded_tokens_are_cls_and_per_frame_patch_means(tiny_dir):
    model = load_backbone(str(tiny_dir), 4)
    x = clips(4)
    full = hidden(model, x)  # (B, 1 + N*T, D)
    tokens = encode(model, x)
    assert tokens.shape == (1, 1 + 4, HIDDEN) and tokens.dtype == torch.float32
    torch.testing.assert_close(tokens[:, 0], full[:, 0], atol=0, rtol=0)
    for t in range(4):  # frame t's patches are tokens 1 + n*T + t
        torch.testing.assert_close(tokens[:, 1 + t], full[:, 1 + t :: 4].mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference_view_feature(tokens, NUM_PATCHES), full.mean(1), atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_layout_matches_an_independent_embedding_computation():
    """With no layers the output is layernorm(embeddings): rebuild frame t's tokens by hand."""
    torch.manual_seed(0)
    model = TimesformerModel(tiny_config(num_frames=4, num_hidden_layers=0)).eval()
    torch.nn.init.normal_(model.embeddings.time_embeddings)  # zeros at init; make frames differ
    x = clips(4, batch=2)
    emb = model.embeddings
    frame_means = []
    for t in range(4):
        patches = emb.patch_embeddings.projection(x[:, t]).flatten(2).transpose(1, 2)  # (B, N, D), row-major
        patches = patches + emb.position_embeddings[:, 1:] + emb.time_embeddings[:, t]
        frame_means.append(model.layernorm(patches).mean(1))  # (B, D)
    cls = model.layernorm(emb.cls_token + emb.position_embeddings[:, :1]).expand(2, 1, HIDDEN)  # (B, 1, D)
    torch.testing.assert_close(encode_clips(model, x), torch.cat([cls, torch.stack(frame_means, 1)], 1))


def test_frame_rows_follow_their_frames_through_every_layer(tiny_dir):
    """Without time embeddings TimeSformer is frame-permutation equivariant: rows must permute too."""
    model = load_backbone(str(tiny_dir), 4)
    with torch.no_grad():
        model.embeddings.time_embeddings.zero_()
    x, order = clips(4), torch.tensor([2, 0, 3, 1])
    tokens, permuted = encode(model, x), encode(model, x[:, order])
    torch.testing.assert_close(permuted[:, 0], tokens[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(permuted[:, 1:], tokens[:, 1 + order], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(tokens[:, 1], tokens[:, 2], atol=1e-3)  # rows really differ


def test_changing_one_frame_moves_its_row_most(tiny_dir):
    model = load_backbone(str(tiny_dir), 4)
    x = clips(4)
    y = x.clone()
    y[:, 2] = torch.randn(y[:, 2].shape, generator=torch.Generator().manual_seed(5))
    delta = (encode(model, x) - encode(model, y)).abs().mean(-1)[0]  # (1 + T,)
    assert delta.argmax().item() == 1 + 2


# --- precision ---------------------------------------------------------------------------------

def test_bf16_autocast_is_close_to_fp32_and_disabling_is_exact(tiny_dir):
    model = load_backbone(str(tiny_dir), 4)
    x = clips(4)
    exact = encode(model, x)
    with autocast_context(torch.device("cpu"), enabled=False):
        torch.testing.assert_close(encode(model, x), exact, atol=0, rtol=0)
    with autocast_context(torch.device("cpu")):
        fast = encode(model, x)
    assert fast.dtype == torch.float32 and not torch.equal(fast, exact)  # autocast really ran
    assert (fast - exact).abs().max() < 0.1 * exact.abs().max()


@pytest.mark.parametrize("adapter", [False, True])
def test_weights_cast_for_inference_give_bitwise_the_autocast_outputs(tiny_dir, adapter):
    model = load_backbone(str(tiny_dir), 4)
    if adapter:
        model = add_lora(model, LoraSettings(r=4, alpha=8))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:  # zeros at init: make the adapter change the outputs
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        model.eval()
    x = clips(4, batch=2)
    with autocast_context(torch.device("cpu")):
        want = encode(model, x)
        cast = cast_for_autocast_inference(model, torch.device("cpu"))
        got = encode(cast, x)
    linear_weights = [m.weight.dtype for m in cast.modules() if isinstance(m, torch.nn.Linear)]
    assert linear_weights and set(linear_weights) == {torch.bfloat16}
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("short_sequence", [fused_attention.SHORT_SEQUENCE, 0])  # 0: SDPA for the temporal attention too
@pytest.mark.parametrize("adapter", [False, True])
def test_fused_attention_equals_hf_attention(tiny_dir, adapter, short_sequence, monkeypatch):
    monkeypatch.setattr(fused_attention, "SHORT_SEQUENCE", short_sequence)  # default: temporal (4 tokens) matmuls, spatial (197) SDPA
    model = load_backbone(str(tiny_dir), 4)
    if adapter:
        model = add_lora(model, LoraSettings(r=4, alpha=8)).eval()
    x = clips(4, batch=2)
    want = encode(model, x)
    swapped = use_fused_attention(model)
    kinds = {type(m) for m in swapped.modules() if "Attention" in type(m).__name__ and hasattr(m, "qkv")}
    assert kinds == {FusedSelfAttention}
    torch.testing.assert_close(encode(swapped, x), want, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        maps = swapped(pixel_values=x, output_attentions=True).attentions  # falls back to HF's path for the maps
    assert maps is not None and len(maps) == LAYERS


@pytest.mark.filterwarnings("ignore:CUDA is not available")
@pytest.mark.parametrize(("bf16", "dtype"), [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_autocast_falls_back_to_fp16_without_bf16(monkeypatch, bf16, dtype):
    capabilities = {"cuda:0": (8, 0), "cuda:1": (7, 0)}  # an A100 beside a V100: each device is judged on its own
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capabilities[str(device)])
    assert autocast_context(torch.device("cuda:1")).fast_dtype == torch.float16
    assert autocast_context(torch.device("cuda:0")).fast_dtype == torch.bfloat16
    capabilities["cuda"] = (8, 6) if bf16 else (7, 5)  # an RTX 3090, a T4 (bf16 only emulated)
    assert autocast_context(torch.device("cuda")).fast_dtype == dtype
    assert autocast_context(torch.device("cpu")).fast_dtype == torch.bfloat16


def test_the_frozen_weights_forward_follows_each_model_it_is_given_and_needs_no_grad(tiny_dir):
    # the weights are constants of a frozen graph: a second model must get its own graph, not the first's weights
    models = [prepare_for_inference(load_backbone(str(tiny_dir), 2), torch.device("cpu"), "bf16", fused_attention=True)]
    models.append(prepare_for_inference(save_and_load_other_seed(tiny_dir.parent / "other"), torch.device("cpu"), "bf16",
                                        fused_attention=True))
    frozen, x = compiled_encode_clips(frozen_weights=True), clips(2)
    with torch.inference_mode(), autocast_context(torch.device("cpu")):
        for model in models:
            torch.testing.assert_close(frozen(model, x), encode_clips(model, x), atol=1e-2, rtol=1e-2)
        assert not torch.allclose(frozen(models[0], x), frozen(models[1], x), atol=1e-2)
    with pytest.raises(RuntimeError, match="inference_mode"):
        frozen(models[0], x)


def test_the_frozen_weights_forward_really_freezes_them(tiny_dir):
    # what tells a frozen graph from a plain compiled one: it keeps the weights it was compiled with (which is why
    # it only serves models that no longer change); torch.compile(options=...) alone would not freeze them
    model = prepare_for_inference(load_backbone(str(tiny_dir), 2), torch.device("cpu"), "bf16", fused_attention=True)
    frozen, plain, x = compiled_encode_clips(frozen_weights=True), compiled_encode_clips(frozen_weights=False), clips(2)
    with torch.inference_mode(), autocast_context(torch.device("cpu")):
        frozen(model, x), plain(model, x)
        for parameter in model.parameters():
            parameter.mul_(0.5)
        now = encode_clips(model, x)
        torch.testing.assert_close(plain(model, x), now, atol=1e-2, rtol=1e-2)
        assert not torch.allclose(frozen(model, x), now, atol=1e-2)


def test_each_compiled_forward_has_its_own_graphs_and_never_falls_back_to_eager(tiny_dir):
    # torch keeps at most recompile_limit graphs per code object, then runs eagerly with a warning: a frozen cache
    # would get eager features. Each compiled forward has its own code, and the whole forward must compile.
    import torch._dynamo
    with torch._dynamo.config.patch(recompile_limit=1):  # not monkeypatch: its undo deletes the config's entry
        check_own_graphs(tiny_dir)


def check_own_graphs(tiny_dir):
    models = [prepare_for_inference(load_backbone(str(tiny_dir), 2), torch.device("cpu"), "bf16", fused_attention=True),
              prepare_for_inference(save_and_load_other_seed(tiny_dir.parent / "other2"), torch.device("cpu"), "bf16",
                                    fused_attention=True)]
    first, second, x = compiled_encode_clips(frozen_weights=True), compiled_encode_clips(frozen_weights=True), clips(2)
    with torch.inference_mode(), autocast_context(torch.device("cpu")):
        first(models[0], x)
        torch.testing.assert_close(second(models[1], x), encode_clips(models[1], x), atol=1e-2, rtol=1e-2)
        with pytest.raises(Exception, match="fullgraph|recompil"):  # a hard failure, not a silent eager run
            first(models[1], x)
        with pytest.raises(ValueError, match="frames"):  # the backbone's own check, not a failed trace
            second(models[1], clips(3))


def save_and_load_other_seed(folder):
    return load_backbone(str(save_tiny_backbone(folder, seed=1, num_frames=8)), 2)


def test_a_backbone_folder_that_does_not_exist_is_named_as_such(tmp_path):
    with pytest.raises(backbone.ConfigError, match=f"{tmp_path / 'tinyy'}: no such folder"):
        load_backbone(str(tmp_path / "tinyy"), 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(backbone.ConfigError, match="not a TimeSformer folder"):
        load_backbone(str(tmp_path / "empty"), 8)
