from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.finetune import FinetuneConfig
from pipeline.head_training import FitHeadConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = {"ego": (32, 32, 64, 1536, 5e-5), "exos": (24, 48, 96, 2048, 3e-5), "ego+exos": (16, 64, 128, 2560, 2e-5)}


@pytest.mark.parametrize("setting", sorted(RECIPES))
def test_published_recipes_load_as_finetune_configs(setting):
    config = load_config(FinetuneConfig, CONFIGS / f"finetune-{setting}.yaml", {"root": "data", "out": "run"})
    assert (config.frames, config.lora_r, config.lora_alpha, config.hidden, config.lr) == RECIPES[setting]
    assert config.views == setting and (config.batch_size, config.grad_accum, config.epochs) == (4, 4, 4)
    assert (config.lora_dropout, config.weight_decay, config.warmup_ratio, config.heads) == (0.1, 0.01, 0.1, 16)
    # HF Trainer's defaults, which the reference was trained with: clipping at 1.0, no decay on biases and norms
    assert config.max_grad_norm == 1.0 and not config.decay_norms_and_biases
    assert (config.sampling, config.train_windows) == ("uniform", "random")


@pytest.mark.parametrize("name, expected", [
    ("fit-head.yaml", ((0, 1, 2), 10, 1536, 0.1, ("crossview", "crossview-nogate", "mean", "concat", "temporal"))),
    ("demo-fit-head.yaml", ((0, 1), 200, 128, 0.0, ("crossview",))),
])
def test_fit_head_configs_load(name, expected):
    config = load_config(FitHeadConfig, CONFIGS / name, {"cache": "c", "out": "o"})
    assert config.views == ("ego", "exos", "ego+exos")
    assert (config.seeds, config.epochs, config.hidden, config.holdout, config.fusions) == expected
