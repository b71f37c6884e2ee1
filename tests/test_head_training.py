"""How fit-head's training loop uses its settings: seeds, weight decay, schedule length, label prior, view slots."""

import math

import numpy as np
import pytest
import torch

from pipeline import head_grid, head_training
from pipeline.fusion import HeadConfig, head_inputs
from pipeline.head_step import CompiledHeadTrainer
from pipeline.head_training import FeatureTable, FitHeadConfig, load_complete_split, stratified_holdout, train_head
from tests.cachegen import DIM, FRAMES, split_view_cache

HEAD = HeadConfig(dim=DIM, num_views=5, frames=FRAMES, hidden=16, heads=4)
VIEWS = ("ego", "exo1", "exo2", "exo3", "exo4")


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    cache = split_view_cache(tmp_path_factory.mktemp("cache") / "cache", train=90, val=8, absent=0.3)
    return FeatureTable(load_complete_split(cache, "train"), cache.spec.views, VIEWS, HEAD)


def settings(**changes) -> FitHeadConfig:
    defaults = dict(cache="c", out="o", epochs=2, lr=1e-2, batch_size=16, hidden=16, heads=4, precision="fp32")
    return FitHeadConfig(**{**defaults, **changes})


def weights(trained) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trained.head.parameters()])


def test_the_seed_sets_the_initialisation_and_the_data_order(table, monkeypatch):
    batches = []
    eager_step = head_training._eager_step
    monkeypatch.setattr(head_training, "_eager_step", lambda *args: batches.append(args[-1].tolist()) or eager_step(*args))
    untrained = [weights(train_head(table, HEAD, settings(lr=1e-12, epochs=1), seed)) for seed in (0, 1, 0)]
    assert torch.equal(untrained[0], untrained[2])  # at lr 1e-12 the weights are the initial ones
    assert (untrained[0] - untrained[1]).abs().max() > 1e-2
    batches.clear()
    for seed in (0, 1, 0):
        train_head(table, HEAD, settings(epochs=2), seed)
    per_run = len(batches) // 3
    first, second, again = (batches[i * per_run : (i + 1) * per_run] for i in range(3))
    assert first == again and first != second
    assert first[: per_run // 2] != first[per_run // 2 :]  # each epoch draws its own order
    assert sorted(sum(first[: per_run // 2], [])) == sorted(sum(first[per_run // 2 :], []))  # the same fit rows


def test_weight_decay_reaches_both_training_paths(table, monkeypatch):
    built = []

    def uncompiled(head, rows_per_step, weight_decay, **options):  # the compiled trainer's own step, run eagerly
        built.append((weight_decay, options))
        return CompiledHeadTrainer(head, rows_per_step, weight_decay, compile=False, **options)

    grouped = []
    decay_groups = head_training.decay_groups
    monkeypatch.setattr(head_training, "decay_groups", lambda *args: grouped.append(args[1:]) or decay_groups(*args))
    monkeypatch.setattr(head_training, "CompiledHeadTrainer", uncompiled)
    for compile in (False, True):
        config = dict(compile=compile, holdout=0, precision="bf16" if compile else "fp32")
        decayed, plain = (weights(train_head(table, HEAD, settings(weight_decay=wd, **config), 0)) for wd in (5.0, 0.0))
        assert decayed.norm() < 0.9 * plain.norm(), compile  # lr 1e-2 x decay 5 shrinks every weight 5% per step
    assert built == [(5.0, {"decay_norms_and_biases": False}), (0.0, {"decay_norms_and_biases": False})]
    assert grouped == [(5.0, False), (0.0, False)]  # the eager path: AdamW groups leaving biases and norms undecayed


def test_the_schedule_spans_every_epoch(table, monkeypatch):
    calls, group_lrs = [], []
    cosine = head_training.cosine_with_warmup
    monkeypatch.setattr(head_training, "cosine_with_warmup", lambda *args: calls.append(args) or cosine(*args))
    eager_step = head_training._eager_step
    monkeypatch.setattr(head_training, "_eager_step", lambda head, optimizer, *args: group_lrs.append(
        [group["lr"] for group in optimizer.param_groups]) or eager_step(head, optimizer, *args))
    config = settings(epochs=3, warmup_ratio=0.2)
    train_head(table, HEAD, config, 0)
    assert all(len(lrs) == 2 and lrs[0] == lrs[1] for lrs in group_lrs)  # decayed or not, every group follows it
    rows = np.flatnonzero(table.usable)
    fit_rows = int((~stratified_holdout(table.labels.numpy()[rows], config.holdout)).sum())
    total = math.ceil(fit_rows / config.batch_size) * config.epochs
    assert [step for step, _, _ in calls] == list(range(total))
    assert {(warmup, steps) for _, warmup, steps in calls} == {(math.ceil(0.2 * total), total)}


def test_the_label_prior_counts_the_takes_the_head_was_fitted_on(tmp_path):
    cache = split_view_cache(tmp_path / "cache", train=60, val=8, absent=0.5)
    data = load_complete_split(cache, "train")
    ego_head = HeadConfig(dim=DIM, num_views=1, hidden=16, heads=4)
    table = FeatureTable(data, cache.spec.views, ("ego",), ego_head)
    trained = train_head(table, ego_head, settings(epochs=1, holdout=0.2), 0)
    usable = np.flatnonzero(table.usable)  # takes with an ego view: about half of them
    labels = table.labels.numpy()[usable]
    fitted = labels[~stratified_holdout(labels, 0.2)]
    expected = np.bincount(fitted, minlength=4) / len(fitted)
    np.testing.assert_allclose(trained.label_prior, expected)
    assert not np.allclose(expected, 0.25)  # the cache's train labels are balanced: only the right rows give this


def test_a_view_selection_reads_its_own_slots(tmp_path):
    cache = split_view_cache(tmp_path / "cache", train=24, val=8, absent=0.4)
    data = load_complete_split(cache, "train")
    two_views = HeadConfig(dim=DIM, num_views=2, hidden=16, heads=4)
    chosen = FeatureTable(data, cache.spec.views, ("exo2", "exo4"), two_views)
    assert torch.equal(chosen.present, torch.from_numpy(data.present[:, [2, 4]]))
    np.testing.assert_array_equal(chosen.usable, data.present[:, [2, 4]].any(1))
    torch.testing.assert_close(chosen.inputs, head_inputs(torch.from_numpy(data.tokens[:, [2, 4]]).float(), two_views))


def test_the_majority_baseline_predicts_trains_most_frequent_label():
    train = np.array([3, 3, 3, 0, 1])
    val = np.array([0, 0, 3, 1])
    assert head_grid._majority_baseline(train, val) == 0.25  # train's label 3, not val's 0


def test_the_holdout_draws_a_share_of_each_label_at_random_rows():
    labels = np.repeat(np.arange(4), [40, 20, 20, 20])
    held = stratified_holdout(labels, 0.25)
    assert np.bincount(labels[held], minlength=4).tolist() == [10, 5, 5, 5]
    assert np.array_equal(held, stratified_holdout(labels, 0.25))  # a fixed seed: the same rows every run
    assert not np.array_equal(held, stratified_holdout(labels, 0.25, seed=1))
    first_rows = np.zeros_like(held)
    for label, count in enumerate([10, 5, 5, 5]):
        first_rows[np.flatnonzero(labels == label)[:count]] = True
    assert not np.array_equal(held, first_rows)
