"""Saving and loading trained heads without pickle: safetensors weights + a JSON description."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipeline.config import ConfigError
from pipeline.files import read_json, write_bytes_atomic, write_json_atomic
from pipeline.fusion import HeadConfig, build_head
from pipeline.takes import LABEL_NAMES

HEAD_WEIGHTS, HEAD_INFO = "head.safetensors", "head.json"


def save_head(folder: Path, head: torch.nn.Module, config: HeadConfig, view_names: tuple[str, ...], **info) -> None:
    """`head.safetensors` + `head.json` (head config, views in slot order, what its logits mean, the weights' sha256,
    anything in `info`).

    Two atomic writes, not one: the hash in head.json lets a reader tell a pair caught between
    them (new weights, old description) from a whole one.
    """
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in head.state_dict().items()}
    weights = save_safetensors(state)
    write_bytes_atomic(Path(folder) / HEAD_WEIGHTS, weights)
    write_json_atomic(Path(folder) / HEAD_INFO, {"head": dataclasses.asdict(config), "views": list(view_names),
                                                 "label_order": list(LABEL_NAMES), **info,
                                                 "head_sha256": hashlib.sha256(weights).hexdigest()})


def load_head(folder: Path) -> tuple[torch.nn.Module, dict]:
    """The head in eval mode and its `head.json` contents."""
    folder = Path(folder)
    if not (folder / HEAD_INFO).is_file():
        raise FileNotFoundError(f"{folder}: no trained head here ({HEAD_INFO} missing)")
    info = read_json(folder / HEAD_INFO)
    weights = (folder / HEAD_WEIGHTS).read_bytes()
    if "head_sha256" in info and info["head_sha256"] != hashlib.sha256(weights).hexdigest():  # older heads: no hash
        raise ConfigError(f"{folder}: {HEAD_WEIGHTS} is not the one {HEAD_INFO} describes (written while being saved "
                          "again?); save or train it again")
    if info.get("label_order", list(LABEL_NAMES)) != list(LABEL_NAMES):  # heads before 2026-12-05 do not say
        raise ConfigError(f"{folder}: the head's logits are in the label order {info['label_order']}; skillpipe reads them "
                          f"as {list(LABEL_NAMES)}")
    head = build_head(HeadConfig(**info["head"]))
    head.load_state_dict(load_safetensors(weights))
    return head.eval(), info
