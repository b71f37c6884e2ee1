"""The benchmark's shared parts: the matmul replay must replay exactly the matmuls a function runs, no more, no
less; the host description must say what the figures were measured on."""

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bench.common import PeakTreeMemory, count_flops, host_description, replayed_matmuls


def test_replay_has_the_functions_matmul_flops_and_leaves_out_everything_else():
    model = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.LayerNorm(24), nn.Linear(24, 4))
    inputs = torch.randn(8, 12)

    def step() -> None:
        F.cross_entropy(model(inputs), torch.zeros(8, dtype=torch.long)).backward()

    seconds, flops = replayed_matmuls(step)
    # forward: 2 linears; backward: both weight gradients and the second layer's input gradient
    assert flops == 2 * 8 * (12 * 24 + 24 * 4) + 2 * 8 * (12 * 24 + 24 * 4) + 2 * 8 * 24 * 4
    assert flops == count_flops(step)  # GELU, LayerNorm and the loss do no matmul FLOPs
    assert seconds() > 0


def test_replay_keeps_batched_and_transposed_operands():
    a, b = torch.randn(3, 5, 7), torch.randn(3, 6, 7).transpose(1, 2)  # b is a non-contiguous (3, 7, 6) view
    seconds, flops = replayed_matmuls(lambda: torch.bmm(a, b))
    assert flops == 2 * 3 * 5 * 7 * 6
    assert seconds() > 0


def test_replay_sees_linears_under_inference_mode():
    model = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 4))
    inputs = torch.randn(2, 8, 12)

    def forward() -> None:
        with torch.inference_mode():
            model(inputs)

    _, flops = replayed_matmuls(forward)
    assert flops == 2 * 16 * (12 * 24 + 24 * 4)


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no oneDNN bf16 on this CPU: nothing to prepack")
def test_a_prepacked_replay_runs_bf16_linears_as_prepacked_fused_products_with_the_same_flops():
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)).to(torch.bfloat16)
    inputs = torch.randn(2, 8, 32, dtype=torch.bfloat16)

    def forward() -> None:
        with torch.inference_mode():
            model(inputs)

    (plain_seconds, plain_flops), (packed_seconds, packed_flops) = (
        replayed_matmuls(forward, prepacked_linears=packed) for packed in (False, True))
    assert packed_flops == plain_flops == 2 * 16 * (32 * 64 + 64 * 16)
    products = {"aten.mm", "aten.addmm", "mkldnn._linear_pointwise"}
    for seconds, want in ((plain_seconds, {"aten.addmm"}), (packed_seconds, {"mkldnn._linear_pointwise"})):
        with OpNames() as ran:
            assert seconds() > 0
        assert ran.names & products == want


class OpNames(TorchDispatchMode):
    def __enter__(self):
        self.names = set()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_the_host_description_reads_the_first_cpu_and_the_unified_caches(tmp_path):
    (tmp_path / "cpuinfo").write_text(
        "processor\t: 0\nmodel name\t: Test CPU 9000\ncpu family\t: 6\nmodel\t\t: 143\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n\n"
        "processor\t: 1\nmodel name\t: Other CPU\ncpu family\t: 7\nmodel\t\t: 1\nflags\t\t: fpu\n\n")
    for index, (level, kind, size) in enumerate([("1", "Data", "48K"), ("2", "Unified", "2048K"), ("3", "Unified", "99M")]):
        folder = tmp_path / "cache" / f"index{index}"
        folder.mkdir(parents=True)
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (folder / name).write_text(value + "\n")
    host = host_description(str(tmp_path / "cpuinfo"), str(tmp_path / "cache"))
    assert host["cpu"] == "Test CPU 9000" and host["cpu_family_model"] == "6/143" and host["amx_bf16"] is True
    assert host["l2_cache"] == "2048K" and host["l3_cache"] == "99M" and "l1_cache" not in host
    assert host["cores"] >= 1 and host["torch"] == torch.__version__


def test_the_host_description_leaves_out_what_it_cannot_read(tmp_path):
    host = host_description(str(tmp_path / "missing"), str(tmp_path / "missing-caches"))
    assert {"cpu", "cores", "torch"} <= set(host) and "amx_bf16" not in host and "l2_cache" not in host
    (tmp_path / "cpuinfo").write_text("model name\t: No Flags CPU\n")
    assert host_description(str(tmp_path / "cpuinfo"), str(tmp_path / "missing-caches"))["amx_bf16"] is False


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="PSS needs Linux /proc")
def test_the_tree_memory_peak_counts_a_childs_own_memory():
    with PeakTreeMemory() as alone:
        time.sleep(0.3)
    with PeakTreeMemory() as tree:
        subprocess.run([sys.executable, "-c", "import time; b = b'x' * (300 * 2**20); time.sleep(0.5)"], check=True)
    assert alone.peak_mb > 10 and tree.peak_mb - alone.peak_mb > 250  # the child's 300 MiB, beside this process


def test_fused_attention_counts_the_flops_of_the_attention_it_replaces():
    """torch's counter has SDPA formulas for CUDA kernels only: on a CPU it counted fused attention as free."""
    from pipeline.backbone import encode_clips, tiny_config
    from pipeline.fused_attention import use_fused_attention
    from transformers import TimesformerModel

    model = TimesformerModel(tiny_config(num_frames=4)).eval()
    clips = torch.randn(1, 4, 3, 224, 224)
    with torch.inference_mode():
        eager = count_flops(encode_clips, model, clips)
        fused = count_flops(encode_clips, use_fused_attention(model), clips)
    assert fused == eager > 0


def test_timings_on_a_gpu_wait_for_that_gpu(monkeypatch):
    from bench import common

    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    common._sync("cuda:1")
    common._sync("cpu")
    assert synced == ["cuda:1"]  # not the current device (GPU 0 unless set), whose queue says nothing of GPU 1's


def test_a_short_call_is_timed_back_to_back_for_at_least_the_minimum_and_reported_per_call(monkeypatch):
    from bench import common

    calls, timings = [], []

    def timed(function, device="cpu"):
        before = len(calls)
        function()
        timings.append(len(calls) - before)
        return 2.0 * timings[-1]  # 2 s per call, whatever the batch

    monkeypatch.setattr(common, "timed_seconds", timed)
    assert common.best_seconds(lambda: calls.append(1), repeats=3, min_timed_s=9.0) == 2.0
    assert timings == [1, 2, 4, 8, 8, 8, 8]  # doubled until a timing lasts 9 s (8 calls: 16 s), then 3 timings of 8
    timings.clear()
    assert common.best_seconds(lambda: calls.append(1), repeats=2) == 2.0 and timings == [1, 1]  # one call by default


def test_the_ranks_extract_figure_is_the_slowest_ranks_and_their_cache_is_complete(tmp_path):
    """bench's `extract_ranks_vs_bottleneck` run: one-thread torchrun ranks, each extracting its own shards."""
    from bench.__main__ import ranks_extract_s
    from pipeline.backbone import save_tiny_backbone
    from pipeline.cache import FeatureCache
    from pipeline.demo_data import write_demo_dataset
    from pipeline.extraction import ExtractConfig

    write_demo_dataset(tmp_path / "data", takes=4, val_fraction=0.0)
    config = ExtractConfig(root=tmp_path / "data", split="train", cache=tmp_path / "cache", frames=4, workers=0,
                           shard_size=1, backbone=str(save_tiny_backbone(tmp_path / "tiny", num_frames=4)))
    seconds = ranks_extract_s(config, tmp_path / "rank_extract.py", ranks=2)
    assert 0 < seconds < 120
    assert FeatureCache.open(tmp_path / "cache").is_complete("train")
