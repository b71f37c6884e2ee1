import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer

from pipeline.config import (REQUIRED_HELP, ConfigError, device_problem, flag_for, foreign_output, load_config, output_problem,
                             read_saved_config, required_fields, save_config)
from pipeline.extraction import ExtractConfig
from pipeline.finetune import FinetuneConfig
from pipeline.head_training import FitHeadConfig
from stages.cli import app, with_flags


@pytest.mark.parametrize("suffix,text", [
    (".yaml", "root: data\nframes: 8\nviews: [ego, exo1]\n"),
    (".toml", 'root = "data"\nframes = 8\nviews = ["ego", "exo1"]\n'),
    (".json", '{"root": "data", "frames": 8, "views": ["ego", "exo1"]}'),
])
def test_file_then_flags_override(tmp_path, suffix, text):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    config = load_config(ExtractConfig, path, {"frames": 4, "batch_size": None})
    assert config.root == Path("data") and config.views == ("ego", "exo1")
    assert config.frames == 4  # the flag wins
    assert config.batch_size is None and config.clips_per_forward == 1  # flag not given: the default stays


@pytest.mark.parametrize("views,expected", [
    ("ego, exo3", ("ego", "exo3")),
    ("ego+exos", ("ego", "exo1", "exo2", "exo3", "exo4")),  # the view settings of fit-head and finetune
    ("exos", ("exo1", "exo2", "exo3", "exo4")),
    ("exo2+ego", ("ego", "exo2")),
])
def test_extract_views_flag_takes_names_or_view_settings(views, expected):
    assert load_config(ExtractConfig, None, {"root": "r", "views": views}).views == expected


def test_a_saved_config_is_a_config_file_for_its_own_stage_only(tmp_path):
    config = load_config(ExtractConfig, None, {"root": "r", "frames": 8})
    save_config(config, tmp_path / "extract-train.json")  # as extract saves it beside the cache
    assert load_config(ExtractConfig, tmp_path / "extract-train.json", {"frames": 4}) == dataclasses.replace(config, frames=4)
    with pytest.raises(ConfigError, match="is of kind 'ExtractConfig'; this stage reads 'FitHeadConfig'"):
        load_config(FitHeadConfig, tmp_path / "extract-train.json")


@pytest.mark.parametrize("values,message", [
    ({"root": "r", "frames": "eight"}, "ExtractConfig.frames from command line: expected an integer"),
    ({"root": "r", "split": "test"}, "'test' is not one of"),
    ({"root": "r", "views": "ego,cam9"}, "ExtractConfig.views must be distinct names"),
    ({"root": "r", "workers": -1, "shard_size": 0}, "ExtractConfig.shard_size must be >= 1, got 0; ExtractConfig.workers must"),
    ({"root": "r", "views": "ego+cam9"}, "view setting 'ego+cam9': unknown view 'cam9'"),
    ({"root": "r", "frames": True}, "ExtractConfig.frames from command line: expected an integer, got True"),
    ({"root": "r", "compile": "false"}, "ExtractConfig.compile from command line: expected true/false, got 'false'"),
    ({"root": "r", "frame": 3}, "unknown field(s) ['frame'] in command line"),
    ({"frames": 3}, "required field(s) not set: ['root'] (give --root or set them in --config)"),
])
def test_bad_values_name_the_field(values, message):
    with pytest.raises(ConfigError) as info:
        load_config(ExtractConfig, None, values)
    assert message in str(info.value)


def test_saved_config_round_trips(tmp_path):
    config = load_config(ExtractConfig, None, {"root": "r", "adapter": "a", "views": "ego"})
    save_config(config, tmp_path / "c.json")
    assert read_saved_config(ExtractConfig, tmp_path / "c.json") == config


@pytest.mark.parametrize("device,message", [
    ("gpu", "device must be cpu, cuda or cuda:N, got 'gpu'"),
    ("cpu:1", "device must be cpu, cuda or cuda:N"),
    ("cuda:x", "device must be cpu, cuda or cuda:N"),
    pytest.param("cuda", "torch sees no CUDA device here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_unusable_devices_are_refused_before_any_work(device, message):
    assert message in device_problem(device)
    with pytest.raises(ConfigError, match="ExtractConfig.device"):
        load_config(ExtractConfig, None, {"root": "r", "device": device})


def test_usable_devices_pass():
    assert device_problem("cpu") is None


def test_a_cuda_index_beyond_the_machines_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device_problem("cuda") is None and device_problem("cuda:0") is None
    assert "this machine has 1 CUDA device(s)" in device_problem("cuda:1")


def test_under_torchrun_cuda_means_each_ranks_own_gpu(monkeypatch):
    from pipeline.distributed import local_device

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert local_device("cuda:1") == "cuda:1"  # a single process may pick any GPU
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_device("cuda") == "cuda:1" and local_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="--device cuda:0 under torchrun: give --device cuda"):
        local_device("cuda:0")


def test_a_config_file_is_read_as_utf8_and_bad_bytes_are_a_clear_error(tmp_path):
    from pipeline.config import read_config_file

    good = tmp_path / "good.yaml"
    good.write_bytes("root: /data/Müller\n".encode("utf-8"))
    assert read_config_file(good) == {"root": "/data/Müller"}
    bad = tmp_path / "bad.yaml"
    bad.write_bytes("root: /data/Müller\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="bad.yaml: cannot parse"):
        read_config_file(bad)


def test_an_unknown_field_in_a_config_file_names_the_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("root: r\nlrr: 0.1\n")
    with pytest.raises(ConfigError, match=f"unknown field\\(s\\) \\['lrr'\\] in config file {tmp_path / 'bad.yaml'}"):
        load_config(ExtractConfig, tmp_path / "bad.yaml", {})


def test_an_output_path_under_a_file_is_refused_naming_the_file(tmp_path):
    """A mistyped --out whose parent is a file used to pass, then fail deep in the run (under torchrun on rank 0
    alone, taking its folder's lock)."""
    (tmp_path / "afile").write_text("")
    assert output_problem("out", tmp_path / "afile" / "run" / "deeper") == f"out {tmp_path / 'afile' / 'run' / 'deeper'}: {tmp_path / 'afile'} is a file, not a folder"
    assert output_problem("submission", tmp_path / "afile" / "s.json", folder=False).endswith("afile is a file, not a folder")
    assert output_problem("out", tmp_path / "new" / "run") is None and output_problem("out", tmp_path) is None
    assert output_problem("out", tmp_path / "afile") == f"out {tmp_path / 'afile'} is a file; it must be a folder"


@pytest.mark.parametrize("command, config", [("extract", ExtractConfig), ("fit-head", FitHeadConfig),
                                             ("finetune", FinetuneConfig)])
def test_every_config_field_is_named_by_a_flag_of_its_stage(command, config):
    """Errors name a field by its flag (stages.cli.with_flags): each field's flag must be one its command takes."""
    options = {option for param in typer.main.get_command(app).commands[command].params for option in param.opts}
    for field in dataclasses.fields(config):
        assert flag_for(config, field.name) in options, (command, field.name)


@pytest.mark.parametrize("command, config", [("extract", ExtractConfig), ("fit-head", FitHeadConfig),
                                             ("finetune", FinetuneConfig)])
def test_help_marks_the_fields_without_default_as_required_and_no_other(command, config):
    """typer cannot mark them (a value may come from --config): each such option's help says so itself."""
    params = {param.opts[0]: param for param in typer.main.get_command(app).commands[command].params}
    marked = {flag for flag, param in params.items() if REQUIRED_HELP in (param.help or "")}
    assert marked == {flag_for(config, name) for name in required_fields(config)} and marked


def test_config_errors_name_the_flag_and_the_field_and_leave_other_names_alone():
    assert with_flags("FitHeadConfig.seeds: repeated values [1, 1]") == "--seed (FitHeadConfig.seeds): repeated values [1, 1]"
    assert with_flags("FinetuneConfig.lora_r: must be >= 1") == "--lora-r (FinetuneConfig.lora_r): must be >= 1"
    untouched = "config file /runs/FitHeadConfig.json: cannot parse; OtherConfig.seeds; FitHeadConfig: lr must be > 0"
    assert with_flags(untouched) == untouched


def test_a_float_written_without_a_dot_in_yaml_is_a_number(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-3` as a string; a float field takes it as the number it means."""
    (tmp_path / "fit.yaml").write_text("cache: c\nout: o\nlr: 1e-3\nweight_decay: 5E-2\n")
    config = load_config(FitHeadConfig, tmp_path / "fit.yaml")
    assert (config.lr, config.weight_decay) == (0.001, 0.05)
    (tmp_path / "fit.yaml").write_text("cache: c\nout: o\nlr: fast\n")
    with pytest.raises(ConfigError, match="FitHeadConfig.lr from config file .*expected a number, got 'fast'"):
        load_config(FitHeadConfig, tmp_path / "fit.yaml")


@pytest.mark.parametrize("kind", ["FeatureCache", "FitHeadConfig", "FinetuneConfig"])
def test_an_egoexo4d_download_root_is_no_stages_output_folder(tmp_path, kind):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "takes").mkdir()
    assert "EgoExo4D download root" in foreign_output(tmp_path, kind)
    assert foreign_output(tmp_path / "takes", kind) is None  # a folder inside it is the user's call


def test_the_cli_imports_no_transformers_until_a_backbone_is_built():
    """`skillpipe --help`, status and fit-head never build a backbone: transformers (~2 s to import) stays unloaded,
    also when fit-head sets up a head's optimizer (its weight-decay rule is HF Trainer's)."""
    probe = ("import sys, stages.cli; from pipeline.fusion import HeadConfig, build_head; "
             "from pipeline.weight_decay import decay_groups; "
             "decay_groups(build_head(HeadConfig(dim=16, num_views=5, hidden=24, heads=4)), 0.01); "
             "print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
