import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.backbone import reference_view_feature
from pipeline.fusion import FUSIONS, Dropout, HeadConfig, PooledCrossViewAttention, build_head, head_inputs, masked_mean

CONFIG = dict(dim=32, num_views=5, frames=4, num_patches=196, hidden=48, heads=4, dropout=0.1)


def inputs(batch=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 5, 5, 32, generator=generator)  # (B, V, 1 + T, D)


def test_pooled_feature_is_the_mean_over_all_backbone_tokens():
    hidden = torch.randn(2, 1 + 196 * 4, 32)  # a last_hidden_state, patch-major with time fastest
    patches = hidden[:, 1:].reshape(2, 196, 4, 32)
    cached = torch.cat([hidden[:, :1], patches.mean(1)], 1)  # what the cache stores per view
    torch.testing.assert_close(reference_view_feature(cached, 196), hidden.mean(1))
    config = HeadConfig(fusion="crossview", **CONFIG)
    torch.testing.assert_close(head_inputs(cached[:, None], config)[:, 0], hidden.mean(1))
    temporal = HeadConfig(fusion="temporal", **CONFIG)  # the per-frame patch means, frame by frame, without CLS
    assert torch.equal(head_inputs(cached[:, None], temporal)[:, 0], patches.mean(1))


def test_pooled_attention_equals_multihead_attention_then_masked_mean():
    torch.manual_seed(0)
    ours = PooledCrossViewAttention(32, 4, dropout=0.0).eval()
    reference = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    reference.in_proj_weight.data, reference.in_proj_bias.data = ours.qkv.weight.data, ours.qkv.bias.data
    reference.out_proj.weight.data, reference.out_proj.bias.data = ours.out.weight.data, ours.out.bias.data
    x = torch.randn(3, 5, 32)
    present = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 0, 1], [0, 0, 0, 1, 0]], dtype=torch.bool)
    attended, _ = reference(x, x, x, key_padding_mask=~present)
    torch.testing.assert_close(ours(x, present), masked_mean(attended, present), atol=1e-6, rtol=1e-5)


def textbook_crossview(head, features, present):
    """The crossview head with its attention written as nn.MultiheadAttention computes it: every query view's output,
    then the masked mean."""
    attention = head.attention
    batch, slots, dim = features.shape
    x = head.norm(features)
    q, k, v = attention.qkv(x).view(batch, slots, 3, attention.heads, -1).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    weights = attention.dropout(scores.masked_fill(~present[:, None, None, :], float("-inf")).softmax(-1))
    per_query = attention.out((weights @ v).transpose(1, 2).reshape(batch, slots, dim))
    return head.classifier(head.projector(masked_mean(per_query, present)))


def test_crossview_training_matches_the_textbook_attention_in_output_and_every_gradient():
    """In training: dropout on (the same masks, from the same seed), so the attention weights no longer sum to 1."""
    torch.manual_seed(0)
    head = build_head(HeadConfig(fusion="crossview", **CONFIG)).train()
    for p in head.parameters():
        p.data += 0.1 * torch.randn_like(p)
    features = 1 + 2 * torch.randn(6, 5, 32)
    present = torch.ones(6, 5, dtype=torch.bool)
    present[1, 3], present[4, :3] = False, False
    direction = torch.randn(6, 4)
    results = []
    for forward in (lambda: head(features, present), lambda: textbook_crossview(head, features, present)):
        head.zero_grad()
        torch.manual_seed(1)
        logits = forward()
        (logits * direction).sum().backward()
        results.append((logits.detach(), {name: p.grad.clone() for name, p in head.named_parameters()}))
    (ours, our_grads), (textbook, textbook_grads) = results
    torch.testing.assert_close(ours, textbook, atol=1e-5, rtol=1e-5)
    for name, grad in textbook_grads.items():
        torch.testing.assert_close(our_grads[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("fusion", sorted(set(FUSIONS) - {"concat"}))
def test_an_absent_view_equals_the_take_without_that_slot(fusion):
    torch.manual_seed(0)
    head = build_head(HeadConfig(fusion=fusion, **CONFIG)).eval()
    tokens = inputs()
    full = head_inputs(tokens, HeadConfig(fusion=fusion, **CONFIG))
    present = torch.ones(3, 5, dtype=torch.bool)
    present[:, 2] = False
    garbage = full.clone()
    garbage[:, 2] = 1e4  # whatever sits in an absent slot must not matter
    keep = [0, 1, 3, 4]
    with torch.no_grad():
        masked = head(garbage, present)
        if fusion == "temporal":  # view embeddings are per slot: drop the slot's embedding too
            head.view_embedding.data = head.view_embedding.data[keep]
        removed = head(full[:, keep], present[:, keep])
    torch.testing.assert_close(masked, removed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_only_the_order_dependent_heads_change_with_the_order_of_the_exo_slots(fusion):
    from pipeline.fusion import VIEW_ORDER_DEPENDENT

    torch.manual_seed(0)
    config = HeadConfig(fusion=fusion, **CONFIG)
    head = build_head(config).eval()
    features = head_inputs(inputs(), config)
    present = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    order = [0, 4, 1, 2, 3]  # the exo cameras in other slots (as predict's free-slot rule may place them)
    with torch.no_grad():
        same = torch.allclose(head(features, present), head(features[:, order], present[:, order]), atol=1e-5, rtol=1e-5)
    assert same == (fusion not in VIEW_ORDER_DEPENDENT)


def test_concat_uses_a_learned_token_for_absent_views_not_zeros():
    torch.manual_seed(0)
    head = build_head(HeadConfig(fusion="concat", **CONFIG)).eval()
    features = head_inputs(inputs(), HeadConfig(fusion="concat", **CONFIG))
    present = torch.ones(3, 5, dtype=torch.bool)
    present[:, 3] = False
    with torch.no_grad():
        head.absent.data[3] = 1.0
        a = head(features, present)
        features[:, 3] = -7.0
        b = head(features, present)
        head.absent.data[3] = 2.0
        c = head(features, present)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_every_variant_gives_four_logits_and_trains(fusion):
    config = HeadConfig(fusion=fusion, **CONFIG)
    head = build_head(config)
    logits = head(head_inputs(inputs(), config), torch.ones(3, 5, dtype=torch.bool))
    assert logits.shape == (3, 4)
    logits.sum().backward()
    assert all(p.grad is not None for p in head.parameters() if p.requires_grad)


def test_nogate_variant_has_no_gate_and_calibration_starts_at_reference_values():
    gated = build_head(HeadConfig(fusion="crossview", **CONFIG))
    plain = build_head(HeadConfig(fusion="crossview-nogate", **CONFIG))
    assert gated.projector.gate is not None and plain.projector.gate is None
    assert gated.projector.calibration.std.item() == pytest.approx(0.117)
    assert gated.projector.calibration.mean.item() == pytest.approx(0.0007)
    with pytest.raises(ValueError, match="unknown fusion"):
        build_head(HeadConfig(fusion="sum", **CONFIG))


def test_crossview_is_the_reference_sequence_of_steps():
    """SkillFormer's steps 1-7 written out with stock ops on the head's weights, for a take with an absent view."""
    torch.manual_seed(0)
    head = build_head(HeadConfig(fusion="crossview", **CONFIG)).eval()
    for p in head.parameters():  # move LayerNorm affines and calibration off their identity initialisation
        p.data += 0.1 * torch.randn_like(p)
    features = head_inputs(inputs(), HeadConfig(fusion="crossview", **CONFIG))  # (3, 5, 32)
    present = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 1], [0, 1, 1, 0, 1]], dtype=torch.bool)
    attention = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    attention.in_proj_weight.data, attention.in_proj_bias.data = head.attention.qkv.weight.data, head.attention.qkv.bias.data
    attention.out_proj.weight.data, attention.out_proj.bias.data = head.attention.out.weight.data, head.attention.out.bias.data
    up, up_norm, gate = head.projector.up[0], head.projector.up[2], head.projector.gate
    down, down_norm, calibration = head.projector.down[0], head.projector.down[1], head.projector.calibration
    with torch.no_grad():
        x = F.layer_norm(features, (32,), head.norm.weight, head.norm.bias)  # 1. per-view LayerNorm
        x, _ = attention(x, x, x, key_padding_mask=~present)  # 2. attention across views
        x = torch.stack([x[i][present[i]].mean(0) for i in range(3)])  # 3. mean over the present views
        h = F.layer_norm(F.gelu(F.linear(x, up.weight, up.bias)), (48,), up_norm.weight, up_norm.bias)  # 4.
        h = h * torch.sigmoid(F.linear(h, gate.weight, gate.bias))  # 5. gate
        y = F.layer_norm(F.linear(h, down.weight, down.bias), (32,), down_norm.weight, down_norm.bias)  # 6.
        y = (y - y.mean(-1, keepdim=True)) / y.std(-1, keepdim=True) * calibration.std + calibration.mean  # 7.
        expected = F.linear(y, head.classifier.weight, head.classifier.bias)
        torch.testing.assert_close(head(features, present), expected, atol=1e-5, rtol=1e-4)


def test_dropout_zeroes_a_share_p_keeps_the_mean_and_is_off_in_eval():
    torch.manual_seed(0)
    dropout = Dropout(0.25)
    x = torch.ones(200_000)
    y = dropout(x)
    assert float((y == 0).float().mean()) == pytest.approx(0.25, abs=0.01)
    assert float(y.mean()) == pytest.approx(1.0, abs=0.01)
    assert torch.unique(y).tolist() == [0.0, pytest.approx(1 / 0.75)]
    assert torch.equal(dropout.eval()(x), x)


def test_a_head_saved_and_loaded_round_trips_and_a_mismatched_pair_is_refused(tmp_path):
    import json

    from pipeline.checkpoints import load_head, save_head
    from pipeline.config import ConfigError

    config = HeadConfig(dim=32, num_views=5, hidden=16, heads=4)
    torch.manual_seed(0)
    head = build_head(config)
    save_head(tmp_path / "a", head, config, ("ego", "exo1", "exo2", "exo3", "exo4"))
    loaded, info = load_head(tmp_path / "a")
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), loaded.state_dict().values()))
    save_head(tmp_path / "b", build_head(config), config, info["views"])
    (tmp_path / "a" / "head.safetensors").write_bytes((tmp_path / "b" / "head.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="head.safetensors is not the one head.json describes"):
        load_head(tmp_path / "a")  # new weights beside the old description: a save caught between its two writes
    description = json.loads((tmp_path / "a" / "head.json").read_text())
    assert description["label_order"] == ["Novice", "Early Expert", "Intermediate Expert", "Late Expert"]
    del description["head_sha256"], description["label_order"]  # heads saved before these were recorded still load
    (tmp_path / "a" / "head.json").write_text(json.dumps(description))
    load_head(tmp_path / "a")
    reordered = {**description, "label_order": ["Late Expert", "Intermediate Expert", "Early Expert", "Novice"]}
    (tmp_path / "a" / "head.json").write_text(json.dumps(reordered))
    with pytest.raises(ConfigError, match="logits are in the label order .'Late Expert'"):
        load_head(tmp_path / "a")
