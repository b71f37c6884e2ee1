"""fit-head's compiled training step: AdamW parity, padding, compiled = eager, and the stage's --compile."""

import json

import pytest
import torch

from pipeline.config import read_saved_config
from pipeline.fusion import HeadConfig, build_head
from pipeline.head_training import FitHeadConfig, cosine_with_warmup
from pipeline.head_step import CompiledHeadTrainer, adamw_scalars, adamw_update
from tests.cachegen import split_view_cache
from tests.test_fit_head import fit

BETAS = (0.9, 0.999)


@pytest.mark.parametrize("grad_scale", [1.0, 1e-7])  # 1e-7: gradients near eps, where eps shapes the update
def test_adamw_update_equals_torch_adamw(grad_scale):
    torch.manual_seed(0)
    shapes = {"weight": (6, 4), "bias": (6,)}
    reference = {name: torch.nn.Parameter(torch.randn(shape)) for name, shape in shapes.items()}
    optimizer = torch.optim.AdamW([{"params": [reference["weight"]]}, {"params": [reference["bias"]], "weight_decay": 0.0}],
                                  lr=1e-2, betas=BETAS, weight_decay=0.1)  # decay on the weight alone
    master = {name: p.detach().clone() for name, p in reference.items()}
    working = {name: p.to(torch.bfloat16) for name, p in master.items()}
    first, second = ({name: torch.zeros(shape) for name, shape in shapes.items()} for _ in range(2))
    for step in range(1, 8):
        grads = {name: torch.randn(shape) * grad_scale for name, shape in shapes.items()}
        for name, parameter in reference.items():
            parameter.grad = grads[name].clone()
        optimizer.step()
        scalars = [torch.tensor(x) for x in adamw_scalars(1e-2, step, BETAS, 0.1)]
        adamw_update(master, working, grads, first, second, *scalars, BETAS, 1e-8, frozenset({"weight"}))
    for name, parameter in reference.items():
        torch.testing.assert_close(master[name], parameter.detach(), rtol=1e-6, atol=1e-6)
        assert torch.equal(working[name], master[name].to(torch.bfloat16))


def tiny_batch(rows: int = 40, views: int = 5, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(rows, views, 16, generator=generator)
    present = torch.rand(rows, views, generator=generator) > 0.3
    present[:, 0] = True
    labels = torch.randint(0, 4, (rows,), generator=generator)
    return inputs, present, labels


def tiny_trainer(compile: bool, rows_per_step: int = 8) -> CompiledHeadTrainer:
    torch.manual_seed(0)
    head = build_head(HeadConfig(dim=16, num_views=5, hidden=24, heads=4, dropout=0.0))
    return CompiledHeadTrainer(head, rows_per_step, weight_decay=0.01, compile=compile)


@pytest.mark.parametrize(("warmup", "total"), [(0, 7), (3, 12), (5, 5)])
def test_cosine_with_warmup_equals_transformers_schedule(warmup, total):
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    expected = []
    for _ in range(total + 2):
        expected.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert [cosine_with_warmup(step, warmup, total) for step in range(total + 2)] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("total", [7, 12, 25, 81, 120])
def test_warmup_steps_round_up_as_hf_trainers_warmup_ratio(total):
    from transformers import TrainingArguments

    from pipeline.head_training import warmup_steps_for
    hf = TrainingArguments(output_dir="unused", warmup_steps=0.1, report_to=[])  # a float < 1: a ratio, as warmup_ratio
    assert warmup_steps_for(0.1, total) == hf.get_warmup_steps(total)


def test_a_padded_short_batch_gives_the_update_of_the_batch_alone():
    inputs, present, labels = tiny_batch()
    padded, alone = tiny_trainer(compile=False, rows_per_step=8), tiny_trainer(compile=False, rows_per_step=5)
    rows = torch.tensor([3, 1, 4, 15, 9])
    loss_padded = padded.step(inputs, present, labels, rows, lr=1e-3)
    loss_alone = alone.step(inputs, present, labels, rows, lr=1e-3)
    torch.testing.assert_close(loss_padded, loss_alone)
    for name in padded.master:
        torch.testing.assert_close(padded.master[name], alone.master[name])


def test_compiled_step_matches_the_same_step_run_eagerly():
    inputs, present, labels = tiny_batch()
    compiled, eager = tiny_trainer(compile=True), tiny_trainer(compile=False)
    losses = {"compiled": [], "eager": []}
    for step in range(6):
        rows = torch.arange(step * 8, step * 8 + 8) % len(inputs)
        rows = rows[:5] if step == 5 else rows  # the short last batch reuses the same graph
        losses["compiled"].append(float(compiled.step(inputs, present, labels, rows, lr=1e-2)))
        losses["eager"].append(float(eager.step(inputs, present, labels, rows, lr=1e-2)))
    assert losses["compiled"] == pytest.approx(losses["eager"], abs=2e-2)  # bf16 rounding differs between fused kernels
    with torch.no_grad():  # Adam's near-sign updates flip for gradients near 0: compare what the heads compute
        logits = [trainer.copy_to_head().eval()(inputs, present) for trainer in (compiled, eager)]
    torch.testing.assert_close(logits[0], logits[1], atol=2e-2, rtol=0)
    head = compiled.copy_to_head()
    assert torch.equal(head.classifier.weight.detach(), compiled.master["classifier.weight"])


def test_every_head_shape_compiles_past_torchs_per_function_graph_limit_and_one_shape_compiles_once():
    """torch keeps `recompile_limit` graphs per code object, then runs the function uncompiled: a --compile grid of
    3 view settings x 5 fusions has 15 head shapes. Here the limit is 1 and there are two shapes."""
    from torch._dynamo.utils import counters
    inputs, present, labels = tiny_batch()
    graphs = []
    with torch._dynamo.config.patch(recompile_limit=1):
        for rows_per_step in (6, 7, 6):  # batch sizes no other test uses: shapes not compiled yet in this process
            before = counters["stats"]["unique_graphs"]
            tiny_trainer(compile=True, rows_per_step=rows_per_step).step(inputs, present, labels, torch.arange(5), lr=1e-3)
            graphs.append(counters["stats"]["unique_graphs"] - before)
        torch.manual_seed(0)  # the first shape again, decaying every weight: a graph of its own, not past the limit
        head = build_head(HeadConfig(dim=16, num_views=5, hidden=24, heads=4, dropout=0.0))
        before = counters["stats"]["unique_graphs"]
        CompiledHeadTrainer(head, 6, weight_decay=0.01, decay_norms_and_biases=True).step(
            inputs, present, labels, torch.arange(5), lr=1e-3)
        graphs.append(counters["stats"]["unique_graphs"] - before)
    assert graphs == [1, 1, 0, 1]  # the second shape compiled too; the third trainer reused the first one's graph


def test_fit_head_compile_learns_the_split_view_signal(tmp_path):
    cache = split_view_cache(tmp_path / "cache")
    result = fit(cache.root, tmp_path / "run", "--views", "ego+exos", "--compile")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "ego+exos__crossview__seed0" / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.8  # chance 0.25; one side alone tops out at 0.5
    assert read_saved_config(FitHeadConfig, tmp_path / "run" / "ego+exos__crossview__seed0" / "config.json").compile


def test_compile_needs_bf16(tmp_path):
    cache = split_view_cache(tmp_path / "cache")
    result = fit(cache.root, tmp_path / "run", "--compile", "--precision", "fp32")
    assert result.exit_code == 2 and "compile" in result.output


def test_the_compiled_trainer_decays_the_weights_that_hf_trainer_decays():
    from pipeline.weight_decay import decayed_parameter_names

    head = build_head(HeadConfig(dim=16, num_views=5, hidden=24, heads=4))
    decayed = CompiledHeadTrainer(head, 8, weight_decay=0.01, compile=False).decayed
    assert decayed == decayed_parameter_names(head)
    assert "norm.weight" not in decayed and "classifier.bias" not in decayed and "classifier.weight" in decayed
    assert CompiledHeadTrainer(head, 8, 0.01, compile=False, decay_norms_and_biases=True).decayed == \
        {name for name, _ in head.named_parameters()}
