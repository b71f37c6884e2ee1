"""The performance harness: `python -m bench [--device cpu|cuda] [--takes N]` prints one JSON object.

Figures: bf16/fp32 matmul peak, backbone FLOP/s (base config, random weights, T=8 and 16, as extract
runs it, as `extract --compile` does, and its matmuls alone: the ceiling; best of
interleaved rounds, so the peak and the backbone see the same quiet moments of a shared machine;
their ratio both as best / best and as the median over rounds of the ratio within a round),
decode fps, end-to-end extract clips/s and its ratio to the slower of decode-only and model-only
(median of paired rounds; on a CPU also extract as one torchrun rank of one thread per core,
`--workers 0`), cache bytes per take, extract peak RSS (and the peak PSS with its decode
worker), and the fit-head cell time (bench.fit_head); first, the host they were measured on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import TimesformerConfig, TimesformerModel

from bench.common import (
    count_flops, host_description, interleaved_rounds, matmul_peak_gflops, median_paired_ratio, replayed_matmuls, timed_seconds,
)
from pipeline.backbone import (
    autocast_context, compiled_encode_clips, encode_clips, prepare_for_inference,
)
from pipeline.demo_data import write_demo_dataset
from pipeline.extraction import ExtractConfig, decode_take
from pipeline.fused_attention import use_fused_attention
from pipeline.takes import VIEWS, load_takes
from pipeline.video import ClipSampling


GOP_FRAMES = 250  # libx264's default keyframe interval, which the demo writer keeps


def backbone_gflops(frames: int, device: str, compiled: bool = False, matmuls_only: bool = False,
                    frozen_weights: bool = True, prepacked: bool = False) -> Callable[[], float]:
    """A measurement of the base-size TimeSformer forward's FLOP/s as extract runs it (bf16 autocast, weights cast
    once; with `compiled`, as `extract --compile` does, `frozen_weights` as `--frozen-weights`), random weights.

    With `matmuls_only`: the forward's FLOPs over the time of its matmuls alone (the same shapes replayed,
    bench.common.replayed_matmuls), i.e. the rate the forward would reach if everything else were free. Its
    fraction of the peak is the ceiling for the backbone's.
    """
    model = prepare_for_inference(TimesformerModel(TimesformerConfig(num_frames=frames)), torch.device(device), "bf16")
    batch = ExtractConfig(root=Path("."), device=device).clips_per_forward  # extract's default: 1 on CPU, 16 on CUDA
    clips = torch.randn(batch, frames, 3, 224, 224, device=device)
    encode = compiled_encode_clips(frozen_weights) if compiled else encode_clips
    if compiled:
        use_fused_attention(model)

    def forward() -> None:
        with torch.inference_mode(), autocast_context(torch.device(device)):
            encode(model, clips)

    if matmuls_only:  # the replay's own FLOPs: the patch convolution is not among them
        replay_seconds, replay_flops = replayed_matmuls(forward, device, prepacked_linears=prepacked)
        return lambda: replay_flops / replay_seconds() / 1e9
    with torch.inference_mode(), autocast_context(torch.device(device)):
        flops = count_flops(encode_clips, model, clips)
    forward()  # warm-up (and compilation)
    return lambda: flops / timed_seconds(forward, device) / 1e9


def save_base_backbone(folder: Path, frames: int) -> Path:
    torch.manual_seed(0)
    TimesformerModel(TimesformerConfig(num_frames=frames)).save_pretrained(folder)
    return folder


def decode_only_s(root: Path, frames: int) -> tuple[float, int]:
    takes = load_takes(root, "train")
    started = time.perf_counter()
    clips = sum(len(decode_take(take, VIEWS, ClipSampling(frames)).clips) for take in takes)
    return time.perf_counter() - started, clips


CHILD_PROLOGUE = ("import json, sys, time, torch; from pipeline.config import build_config; "
                  "from pipeline.extraction import ExtractConfig; c = build_config(ExtractConfig, json.loads(sys.argv[1]))\n")


def _config_argument(config: ExtractConfig) -> str:
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in config.__dict__.items() if v is not None}
    settings["views"] = list(config.views)
    return json.dumps(settings)


def run_in_child(code: str, config: ExtractConfig, *args: str) -> dict:
    """Run `code` in a fresh Python process with the ExtractConfig `c` built from `config` (and `args` from
    sys.argv[2] on); returns the JSON object it prints last. Fresh processes keep peak RSS and first-call
    kernel setup their own."""
    out = subprocess.run([sys.executable, "-c", CHILD_PROLOGUE + code, _config_argument(config), *args],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ranks_extract_s(config: ExtractConfig, script: Path, ranks: int) -> float:
    """extract as `OMP_NUM_THREADS=1 torchrun --nproc-per-node <ranks> ... extract --workers 0` runs it: `ranks` ranks
    of one thread, each decoding its own takes between its forwards (`config` should say workers=0). The slowest
    rank's time from the start of its work (after set-up, as extract's own figure) to its end."""
    script.write_text(CHILD_PROLOGUE + RANK_EXTRACT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), str(script),
               _config_argument(config)]
    repository = str(Path(__file__).resolve().parents[1])  # the script's own folder is a temporary one
    environment = {**os.environ, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [repository, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=environment)
    figures = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"rank"')]
    if len(figures) != ranks:
        raise RuntimeError(f"expected a figure from each of {ranks} ranks, got {figures}:\n{out.stdout}\n{out.stderr}")
    return max(figure["seconds"] for figure in figures)


MODEL_ONLY = """
# `clips` forwards of the backbone exactly as extract loads it, on random pixels
from pipeline.backbone import autocast_context, encode_clips; from pipeline.extraction import load_extraction_model
model, _ = load_extraction_model(c); clips = int(sys.argv[2])
pixels = torch.randn(c.clips_per_forward, c.frames, 3, 224, 224, device=c.device); started = time.perf_counter()
with torch.inference_mode(), autocast_context(torch.device(c.device), enabled=c.precision == "bf16"):
    for _ in range(-(-clips // c.clips_per_forward)):
        encode_clips(model, pixels)
if c.device.startswith("cuda"):
    torch.cuda.synchronize(c.device)  # the last forwards' kernels may still be queued
print(json.dumps({"seconds": time.perf_counter() - started}))
"""

EXTRACT = """
from bench.common import peak_resident_mb; from pipeline.extraction import run_extraction
s = run_extraction(c)
print(json.dumps({"seconds": s.seconds, "clips": s.clips,
                  "peak_rss_mb": peak_resident_mb()}))
"""

# one torchrun rank's extract (bench.__main__.ranks_extract_s): its own shards, from the start of its work to its end
RANK_EXTRACT = """
from pipeline.distributed import torchrun_ranks; from pipeline.extraction import run_extraction
with torchrun_ranks(c.device) as ranks:
    s = run_extraction(c, ranks=ranks)
print(json.dumps({"rank": ranks.rank, "seconds": s.seconds}))
"""

# not timed: reading a 1.2 GB process's smaps_rollup takes ~6 ms, which would slow the run it samples
EXTRACT_TREE_MEMORY = """
from bench.common import PeakTreeMemory; from pipeline.extraction import run_extraction
with PeakTreeMemory() as tree:
    run_extraction(c)
print(json.dumps({"peak_tree_pss_mb": tree.peak_mb}))
"""


# the measurement sizes, whole and --quick
WHOLE = {"rounds": 5, "extract_rounds": 3, "takes": 6}
QUICK = {"rounds": 3, "extract_rounds": 1, "takes": 4}


def diagnostic_rates(device: str) -> dict[str, Callable[[], float]]:
    """Backbone measurements beside the goal's: the compiled forward without frozen weights, and the forward's
    matmuls alone (its ceiling), as they are and prepacked as the frozen forward runs them."""
    return {
        "T8_compiled_unfrozen": backbone_gflops(8, device, compiled=True, frozen_weights=False),
        "T16_compiled_unfrozen": backbone_gflops(16, device, compiled=True, frozen_weights=False),
        "T8_matmuls_only": backbone_gflops(8, device, matmuls_only=True),
        "T16_matmuls_only": backbone_gflops(16, device, matmuls_only=True),
        # the same with the Linears prepacked as the frozen compiled forward runs them (a CPU with oneDNN bf16): its ceiling
        **({"T8_matmuls_prepacked": backbone_gflops(8, device, matmuls_only=True, prepacked=True),
            "T16_matmuls_prepacked": backbone_gflops(16, device, matmuls_only=True, prepacked=True)}
           if device == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported() else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="the goals' figures only, in fewer rounds (~5 min on a 2-core host without AMX, where the "
                             "whole harness takes ~15): no ceilings, unfrozen forward or tree memory, one fit-head cell")
    parser.add_argument("--takes", type=int, help="demo takes (5 clips each) for the extract figures (default 6; 4 with --quick)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--rounds", type=int,
                        help="interleaved rounds of the peak and backbone measurements (>= 3: one round on a noisy "
                             "host can even read the backbone above the peak; default 5, 3 with --quick)")
    parser.add_argument("--extract-rounds", type=int,
                        help="paired rounds of end-to-end extract and model-only, each in fresh processes (one read "
                             "of each swung 1.02-1.26 on one host; default 3, 1 with --quick)")
    parser.add_argument("--skip-fit-head", action="store_true")
    args = parser.parse_args()
    for name, value in (QUICK if args.quick else WHOLE).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.rounds < 1 or args.extract_rounds < 1:
        parser.error("--rounds and --extract-rounds must be >= 1")
    samples = interleaved_rounds({
        "bf16": lambda: matmul_peak_gflops(torch.bfloat16, args.device, repeats=2),
        "fp32": lambda: matmul_peak_gflops(torch.float32, args.device, repeats=2),
        "T8": backbone_gflops(8, args.device),
        "T16": backbone_gflops(16, args.device),
        "T8_compiled": backbone_gflops(8, args.device, compiled=True),
        "T16_compiled": backbone_gflops(16, args.device, compiled=True),
        **({} if args.quick else diagnostic_rates(args.device)),
    }, rounds=args.rounds)
    rates = {name: max(values) for name, values in samples.items()}
    backbone_rates = tuple(name for name in samples if name.startswith("T"))
    figures = {
        "device": args.device,
        "host": host_description(),
        "threads": torch.get_num_threads(),
        "matmul_peak_gflops": {"bf16": round(rates["bf16"], 1), "fp32": round(rates["fp32"], 1)},
        "backbone_gflops": {t: round(rates[t], 1) for t in backbone_rates},
        "backbone_fraction_of_bf16_peak": {t: round(rates[t] / rates["bf16"], 3) for t in backbone_rates},
        "backbone_fraction_of_bf16_peak_median_paired": {
            t: round(median_paired_ratio(samples[t], samples["bf16"]), 3) for t in backbone_rates
        },
        # how close each forward comes to its own matmuls alone: the share of its time they take
        **({"backbone_fraction_of_matmul_ceiling_median_paired": {
            t: round(median_paired_ratio(samples[t], samples[t.split("_")[0] + "_matmuls_only"]), 3)
            for t in ("T8", "T16", "T8_compiled", "T16_compiled")
        }} if "T8_matmuls_only" in samples else {}),
        # the frozen compiled forward against its own matmuls, Linears prepacked as it runs them (CPU only)
        **({"backbone_compiled_fraction_of_prepacked_ceiling_median_paired": {
            t: round(median_paired_ratio(samples[f"{t}_compiled"], samples[f"{t}_matmuls_prepacked"]), 3) for t in ("T8", "T16")
        }} if "T8_matmuls_prepacked" in samples else {}),
        # --frozen-weights against the compiled forward without it (as `--no-frozen-weights`): time ratio, < 1 is faster
        **({"backbone_frozen_over_unfrozen_time_median_paired": {
            t: round(median_paired_ratio(samples[f"{t}_compiled_unfrozen"], samples[f"{t}_compiled"]), 3) for t in ("T8", "T16")
        }} if "T8_compiled_unfrozen" in samples else {}),
    }
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        # as long as a take whose sampled frames lie in different GOPs (x264's default: 250 frames, ~8 s), as in the
        # minutes-long real takes: every sampled frame costs a seek and a partial GOP decode
        write_demo_dataset(folder / "data", takes=args.takes, val_fraction=0.0, frames=GOP_FRAMES * args.frames)
        backbone = save_base_backbone(folder / "base", 8)
        decode_s, clips = decode_only_s(folder / "data", args.frames)
        extracts, models_s, ranks_s = [], [], []
        # a rank per core, and a take each at least: each rank loads its own model (~1.25 GB at base size)
        ranks = min(len(os.sched_getaffinity(0)), args.takes)
        for k in range(args.extract_rounds):  # paired: each extract beside a model-only run, a new cache each round
            config = ExtractConfig(root=folder / "data", split="train", cache=folder / f"cache{k}", backbone=str(backbone),
                                   frames=args.frames, device=args.device, workers=1, shard_size=2)
            extracts.append(run_in_child(EXTRACT, config))
            models_s.append(run_in_child(MODEL_ONLY, config, str(clips))["seconds"])
            if args.device == "cpu":  # a GPU is one device: its ranks are the GPUs, not the cores
                # a take per shard: the ranks' shares of the takes differ by one at most (2-take shards: 4 and 2 of 6)
                ranks_s.append(ranks_extract_s(dataclasses.replace(config, cache=folder / f"cache-ranks{k}", workers=0,
                                                                   shard_size=1), folder / "rank_extract.py", ranks))
        extracts_s = [extract["seconds"] for extract in extracts]
        bottlenecks_s = [max(decode_s, model_s) for model_s in models_s]
        tree_pss_mb = None if args.quick else run_in_child(
            EXTRACT_TREE_MEMORY, dataclasses.replace(config, cache=folder / "cache-memory"))["peak_tree_pss_mb"]
        cache_bytes = sum(p.stat().st_size for p in (folder / "cache0" / "features.zarr").rglob("*") if p.is_file())
        figures.update({
            "decode_fps": round(clips * args.frames / decode_s, 1),
            "decode_clips_per_s": round(clips / decode_s, 2),
            "model_clips_per_s": round(clips / min(models_s), 2),
            "extract_clips_per_s": round(max(extract["clips"] / extract["seconds"] for extract in extracts), 2),
            "extract_vs_bottleneck": round(median_paired_ratio(extracts_s, bottlenecks_s), 3),
            "extract_vs_bottleneck_rounds": [round(e / b, 3) for e, b in zip(extracts_s, bottlenecks_s)],
            "extract_vs_decode_plus_model": round(median_paired_ratio(extracts_s, [decode_s + m for m in models_s]), 3),
            # one torchrun rank of one thread per core, each decoding in its own process (--workers 0), against the
            # same model-only run (one process, every core): CPU only
            **({"extract_ranks": ranks,
                "extract_ranks_vs_bottleneck": round(median_paired_ratio(ranks_s, bottlenecks_s), 3),
                "extract_ranks_vs_bottleneck_rounds": [round(r / b, 3) for r, b in zip(ranks_s, bottlenecks_s)]}
               if ranks_s else {}),
            "cache_bytes_per_take": int(cache_bytes / args.takes),
            "extract_peak_rss_mb": round(max(extract["peak_rss_mb"] for extract in extracts), 1),
            # the extract process with its decode worker, in one more (untimed) run: sampled every 50 ms, pages
            # shared after fork counted once (None without Linux /proc)
            "extract_peak_tree_pss_mb": tree_pss_mb and round(tree_pss_mb, 1),
        })
    if not args.skip_fit_head:
        out = subprocess.run([sys.executable, "-m", "bench.fit_head", "--cells", "1" if args.quick else "3"], capture_output=True, text=True, check=True)
        fit = json.loads(out.stdout)
        figures["fit_head_device"] = "cpu"  # bench.fit_head runs on the CPU whatever --device says
        figures["fit_head_cell_s"] = fit["fit_head_cell_s"]  # training only, warm process: compile excluded
        figures["fit_head_compile_once_s"] = fit["compile_once_s"]
        figures["fit_head_grid_per_cell_s"] = fit["grid_compiled_per_cell_s"]  # through the stage, all included
        figures["fit_head_eager_cell_s"] = fit["fit_head_eager_cell_s"]
        figures["fit_head_plain_loop_s"] = fit["plain_fp32_loop_cell_s"]
        figures["fit_head_plain_over_compiled_median_paired"] = fit["plain_over_compiled_median_paired"]
        figures["fit_head_target_cell_s_scaled_by_plain_loop"] = fit["target_cell_s_scaled_by_plain_loop"]
        figures["fit_head_replay_cell_s"] = fit["replay_cell_s"]  # its matmuls replayed + its AdamW pass alone
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
