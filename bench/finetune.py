"""finetune step speed and memory, base-size TimeSformer (random weights), T=8, with and without
gradient checkpointing:

    python -m bench.finetune [--frames 8] [--views 1]

Each variant runs in its own process so that its peak RSS is its own. Activation memory is the
peak RSS during training steps minus the resident size before the first step.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from transformers import TimesformerConfig, TimesformerModel

from bench.common import peak_resident_mb
from pipeline import backbone as bb
from pipeline.fusion import HeadConfig, build_head
from pipeline.skill_model import SkillModel


def resident_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def one_variant(frames: int, views: int, checkpointing: bool, steps: int = 3) -> dict:
    torch.manual_seed(0)
    backbone = bb.add_lora(TimesformerModel(TimesformerConfig(num_frames=frames)), bb.LoraSettings(r=32, alpha=64))
    if checkpointing:  # after LoRA, as finetune does: peft would otherwise hook the tuple-valued embeddings
        backbone.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    head_config = HeadConfig(dim=768, num_views=views, frames=frames, hidden=1536, heads=16)
    model = SkillModel(backbone, build_head(head_config), head_config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    clips = torch.randn(1, views, frames, 3, 224, 224)
    present = torch.ones(1, views, dtype=torch.bool)
    labels = torch.tensor([1])
    before = resident_mb()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        with bb.autocast_context(torch.device("cpu")):
            loss = F.cross_entropy(model(clips, present).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    peak = peak_resident_mb()
    return {"checkpointing": checkpointing, "step_s": round(min(times[1:]), 2), "peak_rss_mb": round(peak),
            "activation_mb": round(peak - before)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--views", type=int, default=1, help="views per take (clips per step)")
    parser.add_argument("--variant", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(one_variant(args.frames, args.views, args.variant == "on")))
        return
    results = []
    for variant in ("off", "on"):
        out = subprocess.run([sys.executable, "-m", "bench.finetune", "--frames", str(args.frames), "--views",
                              str(args.views), "--variant", variant], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    off, on = results
    print(json.dumps({"frames": args.frames, "clips_per_step": args.views, "without_checkpointing": off,
                      "with_checkpointing": on, "activation_memory_ratio": round(on["activation_mb"] / off["activation_mb"], 3)},
                     indent=2))


if __name__ == "__main__":
    main()
