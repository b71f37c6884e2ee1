"""Feature extraction: decode every take's views, run the backbone, commit whole shards to the cache.

Decoding runs in DataLoader worker processes (overlapping the model) when `workers > 0`. Clips
are batched across the takes and views of one shard, never across shards, so a resumed run
forms exactly the batches an uninterrupted run would and writes identical features. A file that
crashes the decoder itself costs only its view (pipeline.decoder_crashes): the run goes on, and
so does a rerun after a crash of the main process. Views whose features are known already are not
decoded: `--retry-failed` decodes only the failed views of a committed shard again and keeps the
others' features, and `--reuse OTHER` copies what another cache holds (pipeline.feature_reuse).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import time
import warnings
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import backbone as bb
from pipeline import decoder_crashes
from pipeline.cache import CacheError, CacheSpec, FeatureCache, TakeRecord
from pipeline.cache_upkeep import refresh_committed_shards, uncommit_damaged_shards
from pipeline.config import ConfigError, device_problem, foreign_output, output_problem, save_config, with_absolute_paths
from pipeline.decoder_crashes import CrashGuard, decoding, triage
from pipeline.distributed import Ranks, barrier, barrier_sharing_main_error, shared_by_main
from pipeline.feature_reuse import FeatureDonor, KnownFeatures, known_features
from pipeline.skill_model import read_model_spec
from pipeline.takes import VIEWS, Take, load_takes, video_files
from pipeline.video import SAMPLING_NAMES, ClipSampling, VideoError, decode_clip, preprocess
from pipeline.views import GROUPS, parse_view_setting
from pipeline.writer_lock import first_writer, joining_writer, split_lock_path


DEFAULT_SHARD_SIZE = 16
DEFAULT_FRAMES = 16


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of `skillpipe extract`; saved as `<cache>/extract-<split>.json`."""

    root: Path  # egoexo download root (holds annotations/ and takes/)
    split: Literal["train", "val"] = "train"
    cache: Path = Path("cache/features")  # feature cache folder (one zarr store)
    backbone: str | None = None  # hub id or local folder of a TimeSformer; None: the --adapter run's, else the k600 one
    # T frames sampled per view; None: the finetune run's (--adapter, or a full-tune run's --backbone), else DEFAULT_FRAMES
    frames: int | None = None
    # over the whole take, or the reference's 4T-frame window (centred); None: the finetune run's, else uniform
    sampling: Literal["uniform", "window"] | None = None
    views: tuple[str, ...] = VIEWS
    adapter: Path | None = None  # peft LoRA adapter folder (or a finetune run holding adapter/)
    device: str = "cpu"  # cpu | cuda | cuda:N
    precision: Literal["bf16", "fp32"] = "bf16"  # bf16 autocast (CPU AMX / CUDA), or exact fp32
    batch_size: int | None = None  # clips per backbone forward; None: 1 on CPU (fastest per clip here), 16 on CUDA
    workers: int = 1  # decoding processes (0 = decode in the main process)
    shard_size: int | None = None  # takes per zarr shard (the unit of commit and resume); None: the cache's, 16 for a new one
    # fused attention + torch.compile: 1.2-1.5x faster forwards with frozen weights (2026-12-05) after a one-off
    # compile (~30-60 s per process); bf16-rounding-level differences from the eager features: in the fingerprint
    compile: bool = False
    # with compile: the weights frozen into the graph (bb.compiled_encode_clips), x0.82-0.94 of the time per forward for ~20 s
    # more compile per process; None: as the cache was extracted, True for a new cache; ignored without compile
    frozen_weights: bool | None = None
    # decode again the failed views of committed shards (after the files were fixed or fetched); the shards' other
    # views keep their committed features, so a file that broke since costs nothing already extracted
    retry_failed: bool = False
    # another cache whose features of the same takes, made the same way, are copied instead of extracted again
    reuse: Path | None = None

    def __post_init__(self):
        # the other stages' view settings (ego+exos, exos, ego+exo2) name views too
        object.__setattr__(self, "views", tuple(name for item in self.views
                                                for name in (parse_view_setting(item) if "+" in item or item in GROUPS else (item,))))
        problems = []
        if self.frames is not None and self.frames < 1:
            problems.append(f"frames must be >= 1, got {self.frames}")
        if self.sampling is not None and self.sampling not in SAMPLING_NAMES:
            problems.append(f"sampling must be one of {sorted(SAMPLING_NAMES)}, got {self.sampling!r}")
        unknown = [v for v in self.views if v not in VIEWS]
        if unknown or not self.views or len(set(self.views)) != len(self.views):
            problems.append(f"views must be distinct names from {list(VIEWS)}, got {list(self.views)}")
        problems += [f"{name} must be >= 1, got {size}" for name, size in (("batch_size", self.batch_size),
                                                                           ("shard_size", self.shard_size))
                     if size is not None and size < 1]
        if self.workers < 0:
            problems.append(f"workers must be >= 0, got {self.workers}")
        if not self.compile:  # a setting of the compiled forward (a compiled run's saved config may carry it)
            object.__setattr__(self, "frozen_weights", None)
        problems += filter(None, [device_problem(self.device), output_problem("cache", self.cache)])
        if foreign := foreign_output(self.cache, "FeatureCache"):
            problems.append(f"cache {self.cache} holds another kind of output ({foreign}); use another folder")
        if self.reuse is not None and Path(self.reuse).resolve() == Path(self.cache).resolve():
            problems.append(f"reuse must be another cache than {self.cache}")
        if problems:
            raise ConfigError("; ".join(f"ExtractConfig.{problem}" for problem in problems))  # each begins with its field

    @property
    def clip_sampling(self) -> ClipSampling:
        """Of a config resolved by with_run_defaults (frames and sampling set)."""
        return ClipSampling(self.frames, self.sampling)

    @property
    def clips_per_forward(self) -> int:
        return bb.clips_per_forward(self.batch_size, self.device)


def saved_config_path(cache_root: Path, split: str) -> Path:
    """Where extract saves the resolved config of a split beside its cache (`--config` takes it back)."""
    return Path(cache_root) / f"extract-{split}.json"


@dataclass
class ExtractSummary:
    total_takes: int
    computed_takes: int = 0
    skipped_takes: int = 0  # already committed by an earlier run
    reused_takes: int = 0  # every view copied from the --reuse cache
    clips: int = 0
    seconds: float = 0.0
    failures: dict = field(default_factory=dict)  # take_uid -> view -> reason, this split


def code_version() -> str:
    try:
        return importlib.metadata.version("skillpipe")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def fingerprint(config: ExtractConfig, weights_sha256: str, architecture: dict) -> dict:
    """Everything that changes the numbers in the cache. Device and batch size are left out."""
    return {
        "backbone": config.backbone,
        "weights_sha256": weights_sha256,
        "backbone_architecture": architecture,
        "adapter_sha256": bb.adapter_hash(config.adapter) if config.adapter else None,
        "frames": config.frames,
        "views": list(config.views),
        "preprocessing": dataclasses.asdict(config.clip_sampling.preprocessing),
        # bf16 autocast is fp16 on GPUs without bf16 (pre-Ampere): other numbers, so another fingerprint
        "precision": "fp16" if config.precision == "bf16" and bb.autocast_dtype(config.device) == torch.float16
                     else config.precision,
        "dtype": "float16",
        "code_version": code_version(),
    } | ({"backbone_forward": bb.COMPILED_FORWARDS[config.frozen_weights]} if config.compile else {})  # eager: as before


def build_cache_spec(config: ExtractConfig, model: torch.nn.Module, weights_sha256: str) -> CacheSpec:
    model_config = model.config
    num_patches = (model_config.image_size // model_config.patch_size) ** 2
    return CacheSpec(
        fingerprint=fingerprint(config, weights_sha256, bb.architecture(model)),
        views=tuple(config.views),
        frames=config.frames,
        num_patches=num_patches,
        hidden_size=model_config.hidden_size,
        shard_size=config.shard_size,
    )


def with_cache_defaults(config: ExtractConfig) -> ExtractConfig:
    """Fill in a shard size and frozen_weights left unset as the existing cache was begun (a second split or a
    resume follows the first run), else 16 takes per shard and frozen weights."""
    existing = FeatureCache.open(config.cache).spec if (Path(config.cache) / "cache.json").is_file() else None
    begun_unfrozen = existing is not None and existing.fingerprint.get("backbone_forward") == bb.COMPILED_FORWARDS[False]
    return dataclasses.replace(
        config,
        shard_size=config.shard_size or (existing.shard_size if existing else None) or DEFAULT_SHARD_SIZE,
        frozen_weights=not begun_unfrozen if config.compile and config.frozen_weights is None else config.frozen_weights,
    )


def adapter_run(adapter: Path) -> Path | None:
    """The finetune run that wrote the adapter at `adapter` (the run folder or its adapter/), if any."""
    return _finetune_run_holding(bb.resolve_adapter_dir(adapter), "adapter")


def full_tune_run(backbone: str | None) -> Path | None:
    """The `--tune full` finetune run whose backbone/ folder `backbone` is, if any."""
    folder = bb.local_backbone_dir(backbone) if backbone else None
    return _finetune_run_holding(folder, "backbone") if folder else None


def _finetune_run_holding(folder: Path, name: str) -> Path | None:
    run = folder.parent
    is_run = folder.name == name and (run / "head.json").is_file() and (run / "config.json").is_file()
    return run if is_run else None


def with_run_defaults(config: ExtractConfig) -> ExtractConfig:
    """Fill in a backbone, frame count and sampling left unset: those the finetune run trained with (the run of the
    --adapter, or of a --backbone that is a full-tune run's backbone/), else the default checkpoint, 16 frames and
    uniform sampling (load_extraction_model checks that a backbone given with a run's adapter has its weights)."""
    run = adapter_run(config.adapter) if config.adapter else full_tune_run(config.backbone)
    trained = read_model_spec(run) if run else None
    return dataclasses.replace(
        config,
        backbone=config.backbone if config.backbone is not None else trained.backbone if trained else bb.DEFAULT_BACKBONE,
        frames=config.frames or (trained.frames if trained else DEFAULT_FRAMES),
        sampling=config.sampling or (trained.sampling if trained else "uniform"),
    )


def _check_adapter_base(config: ExtractConfig, model: torch.nn.Module, weights_sha256: str) -> None:
    run = adapter_run(config.adapter)
    trained = read_model_spec(run) if run else None
    if trained is None or trained.weights_sha256 is None:  # a bare adapter folder, or a run from before the hash
        return
    # the recorded hash is taken at the run's frame count (time embeddings resized): compare like with like
    same_frames = trained.frames == model.config.num_frames
    ours = weights_sha256 if same_frames else bb.weights_hash(bb.load_backbone(config.backbone, trained.frames))
    if ours != trained.weights_sha256:
        raise ConfigError(f"--adapter {config.adapter} was trained on the backbone {trained.backbone}; {config.backbone} holds "
                          "other weights, so the adapter would not mean what it learnt. Leave --backbone out to use the run's.")
    if changed := bb.architecture_changes(trained.backbone_architecture, model):
        raise ConfigError(f"--adapter {config.adapter} was trained on the backbone {trained.backbone}; {config.backbone} has "
                          f"the same weights but another architecture ({changed}). Leave --backbone out to use the run's.")


def load_extraction_model(config: ExtractConfig) -> tuple[torch.nn.Module, str]:
    """The backbone (with adapter if any) in eval mode on the device, and the fp32 base weights' hash."""
    config = with_run_defaults(config)
    model = bb.load_backbone(config.backbone, config.frames)
    weights_sha256 = bb.weights_hash(model)
    if config.adapter:
        _check_adapter_base(config, model, weights_sha256)
        model = bb.load_adapter(model, config.adapter)
    return bb.prepare_for_inference(model, config.device, config.precision, fused_attention=config.compile), weights_sha256


@dataclass
class DecodedTake:
    shard: int
    position: int  # index of the take inside its shard
    clips: dict[str, torch.Tensor]  # view -> (T, 3, 224, 224) float32
    failures: dict[str, str]  # view -> reason


class ShardTakes(IterableDataset):
    """Decodes the takes of the given shards in order; worker w of W decodes takes w, w+W, ...

    `only`: shard -> take_uid -> views; in those shards only these views are decoded (KnownFeatures.decode)."""

    def __init__(self, shards: list[tuple[int, list[Take]]], views: tuple[str, ...], sampling: ClipSampling,
                 crash_guard: CrashGuard, only: dict[int, dict[str, tuple[str, ...]]]):
        self.shards, self.views, self.sampling, self.crash_guard, self.only = shards, views, sampling, crash_guard, only

    def __iter__(self) -> Iterator[DecodedTake]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        items = [(shard, pos, take) for shard, takes in self.shards for pos, take in enumerate(takes)]
        for shard, position, take in items[worker::num_workers]:
            views = self.only[shard].get(take.take_uid, ()) if shard in self.only else self.views
            yield decode_take(take, views, self.sampling, shard, position, self.crash_guard)


def decode_take(take: Take, views: tuple[str, ...], sampling: ClipSampling, shard: int = 0, position: int = 0,
                crash_guard: CrashGuard | None = None) -> DecodedTake:
    """Decode and preprocess every view; with `crash_guard`, each decode is guarded by a crash marker in its
    folder (pipeline.decoder_crashes) and the views it knows to crash the decoder are failed without decoding."""
    clips, failures, lengths = {}, {}, {}
    for view in views:
        if view not in take.videos:  # a take folder given to predict without this camera
            failures[view] = "no file for this view in the take folder"
            continue
        if crash_guard and (reason := crash_guard.known_crash(take.take_uid, view, take.videos[view])):
            failures[view] = reason
            continue
        guard = decoding(crash_guard.root, take.take_uid, view, take.videos[view], sampling) if crash_guard else nullcontext()
        try:
            with guard:
                sampled, lengths[view] = decode_clip(take.videos[view], sampling)
            clips[view] = preprocess(sampled)
        except VideoError as err:
            failures[view] = str(err)
    longest = max(lengths.values(), default=0)
    if longest - min(lengths.values(), default=0) > max(1, longest // 100):  # frame-aligned views have one length
        warnings.warn(f"take {take.take_uid}: its views have different lengths ({lengths} frames); each is sampled at "
                      "the same relative times of its own length, so they may not show the same moments", stacklevel=2)
    return DecodedTake(shard, position, clips, failures)


def run_extraction(
    config: ExtractConfig,
    on_take: Callable[[int], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    ranks: Ranks = Ranks(),
) -> ExtractSummary:
    """Extract every not-yet-committed shard of the split that this rank owns.

    Under torchrun each rank takes the shards `k % world_size == rank`; rank 0 creates the
    cache and plans the split first. `on_start(total, skipped)` and `on_take(clips)` report progress.
    """
    config = with_run_defaults(config)
    config = with_absolute_paths(config, backbone=bb.resolved_backbone(config.backbone))  # evaluate reads them back
    config = with_cache_defaults(config)
    takes = load_takes(config.root, config.split)  # validates before any compute
    if not takes:
        raise ConfigError(f"{config.root}: split {config.split!r} has no takes")
    lock, subject = split_lock_path(config.cache, config.split), f"split {config.split!r} of the cache {config.cache}"
    # in an existing cache folder a second run stops before loading the model; a new folder waits for the checks
    # that loading makes, which must not leave a folder behind
    lock_first = ranks.is_main and Path(config.cache).is_dir()
    with ExitStack() as held:  # the split's writer lock (pipeline.writer_lock), for the whole run
        setup_error, donor = None, None
        try:
            if lock_first:
                held.enter_context(first_writer(lock, subject))
            model, weights_sha256 = load_extraction_model(config)
            spec = build_cache_spec(config, model, weights_sha256)
            if ranks.is_main and config.reuse:  # refused (made otherwise, not a cache) before this cache is touched
                donor = FeatureDonor(config.reuse, spec)
            if ranks.is_main:
                if not lock_first:
                    held.enter_context(first_writer(lock, subject))
                cache = FeatureCache.open_or_create(config.cache, spec)
                cache.remove_leftovers(config.split)  # of a killed run; the other ranks wait at the barrier below
                cache.plan_split(config.split, [take.take_uid for take in takes])
                uncommit_damaged_shards(cache, config.split)
                refresh_committed_shards(cache, config.split, takes, config.views, config.root)
                # without --reuse: it changes no feature, only what is computed, and the other cache may be gone
                # by the time this config is passed back (there is no flag to clear it)
                save_config(dataclasses.replace(config, reuse=None), saved_config_path(config.cache, config.split))
        except Exception as err:  # noqa: BLE001 (rank 0's reaches every rank: ConfigError/CacheError as such)
            setup_error = err
        barrier_sharing_main_error(ranks, setup_error, (ConfigError, CacheError))
        if config.reuse:  # rank 0's index: the other cache is read and checked once, and no rank fails alone here
            donor = shared_by_main(ranks, donor)
        if not ranks.is_main:
            held.enter_context(joining_writer(lock, subject))
        return _extract_split(config, model, FeatureCache.open_or_create(config.cache, spec), takes, on_take, on_start,
                              ranks, donor)


def _extract_split(config: ExtractConfig, model: torch.nn.Module, cache: FeatureCache, takes: list[Take],
                   on_take: Callable[[int], None] | None, on_start: Callable[[int, int], None] | None,
                   ranks: Ranks, donor: FeatureDonor | None) -> ExtractSummary:
    """run_extraction once the split is planned and locked: this rank's pending shards, then the failure summary."""
    by_uid = {take.take_uid: take for take in takes}
    plan = cache.plan_split(config.split, [take.take_uid for take in takes], create=ranks.is_main)
    owned_shards = [(k, [by_uid[uid] for uid in uids]) for k, uids in enumerate(plan) if ranks.owns(k)]
    done = cache.committed_shards(config.split)
    known = known_features(cache, config.split, config.views, config.root, owned_shards, done, config.retry_failed, donor)
    pending = [(k, takes) for k, takes in owned_shards if k not in done or k in known]
    summary = ExtractSummary(
        total_takes=sum(len(t) for _, t in owned_shards),
        skipped_takes=sum(len(t) - len(known[k].decode if k in known else ()) for k, t in owned_shards if k in done),
        reused_takes=sum(len(t) - len(known[k].decode) for k, t in owned_shards if k in known and k not in done),
    )
    if on_start:
        on_start(summary.total_takes, summary.skipped_takes + summary.reused_takes)
    started = time.perf_counter()
    crashes = triage(config.cache)  # files that crashed the decoder in an earlier run
    while pending:
        try:
            _extract_shards(config, model, cache, pending, crashes, summary, on_take, known)
            break
        except RuntimeError as err:
            if config.workers == 0 or not decoder_crashes.worker_died(err):  # decoding in this process, or another cause
                raise
            cleared: list[str] = []  # a DataLoader worker died: was it the decoder crashing on a file?
            found = triage(config.cache, cleared)
            if found.items() <= crashes.items():  # nothing new (a record for another file of a view is: its reason names it)
                if cleared:
                    raise decoder_crashes.outside_the_file(
                        err, cleared, "Committed shards are kept; rerun the same command to go on.") from err
                raise
            crashes = found  # record those views as failed and go on with the shards not yet committed
            done = cache.committed_shards(config.split)
            pending = [(k, takes) for k, takes in pending if k not in done or k in known and known[k].rewrite]
    summary.seconds = time.perf_counter() - started
    barrier(ranks)
    if ranks.is_main:
        cache.write_failures_summary()
    split_uids = set(by_uid)
    summary.failures = {uid: r for uid, r in cache.read_failures().items() if uid in split_uids}
    return summary


def _as_is(item: DecodedTake) -> DecodedTake:
    return item


def _extract_shards(config: ExtractConfig, model: torch.nn.Module, cache: FeatureCache, pending: list[tuple[int, list[Take]]],
                    crashes: dict[tuple[str, str], str], summary: ExtractSummary, on_take: Callable[[int], None] | None,
                    known: dict[int, KnownFeatures]) -> None:
    """Decode (in DataLoader workers), encode and commit the pending shards, one whole shard at a time.

    Of a shard in `known` only the views still to decode are decoded; its known features are read just before it is
    written (a committed one of this cache uncommitted just before that), then it is left out of `known`."""
    only = {k: entry.decode for k, entry in known.items()}
    loader = DataLoader(
        ShardTakes(pending, config.views, config.clip_sampling, CrashGuard(Path(config.cache), crashes), only),
        batch_size=None,
        num_workers=config.workers,
        collate_fn=_as_is,  # a module-level function: spawned or forkserver workers pickle it
        prefetch_factor=2 if config.workers else None,
        timeout=decoder_crashes.loader_timeout(len(config.views), config.workers),  # an item: a take, view after view
    )
    takes_by_shard = dict(pending)
    encode = bb.compiled_encode_clips(config.frozen_weights) if config.compile else bb.encode_clips
    with decoder_crashes.worker_batches(loader) as batches:
        for shard, decoded in _group_by_shard(batches, {k: len(t) for k, t in pending}):
            shard_takes = takes_by_shard[shard]
            tokens = encode_shard(encode, model, decoded, config)
            present = [{view for view in config.views if view in item.clips} for item in decoded]
            entry = known.get(shard)
            for i, features in enumerate(entry.read() if entry else ()):
                for view, row in features.items():
                    tokens[i, config.views.index(view)] = row
                    present[i].add(view)
            records = [_record(take, views, config.views) for take, views in zip(shard_takes, present)]
            failures = {take.take_uid: item.failures for take, item in zip(shard_takes, decoded) if item.failures}
            if entry and entry.rewrite:  # only now, and first: a reader must not see it while it is rewritten
                cache.uncommit_shard(config.split, shard)
            elif shard in cache.committed_shards(config.split):
                # another writer committed it since the run started (say ranks orphaned by a killed torchrun):
                # rewriting it would delete its data under a committed marker, where readers would see zeros
                continue
            cache.write_shard(config.split, shard, tokens, records, failures,
                              {take.take_uid: video_files(take, config.views, config.root) for take in shard_takes})
            known.pop(shard, None)
            for take, item in zip(shard_takes, decoded):
                if entry is None or take.take_uid in entry.decode:  # not the takes whose every view was known
                    summary.clips += len(item.clips)
                    summary.computed_takes += 1
                    if on_take:
                        on_take(len(item.clips))


def _group_by_shard(batches, sizes: dict[int, int]) -> Iterator[tuple[int, list[DecodedTake]]]:
    """Collect decoded takes (which workers may deliver interleaved) into whole shards, in order."""
    partial: dict[int, dict[int, DecodedTake]] = {}
    for item in batches:
        partial.setdefault(item.shard, {})[item.position] = item
        if len(partial[item.shard]) == sizes[item.shard]:
            got = partial.pop(item.shard)
            yield item.shard, [got[i] for i in range(sizes[item.shard])]


@torch.inference_mode()
def encode_shard(encode: Callable, model: torch.nn.Module, decoded: list[DecodedTake], config: ExtractConfig) -> np.ndarray:
    """(k, V, 1 + T, D) float16 for the shard's takes; absent views stay zero."""
    hidden = model.config.hidden_size
    out = np.zeros((len(decoded), len(config.views), 1 + config.frames, hidden), np.float16)
    slots = [(i, v) for i, item in enumerate(decoded) for v, view in enumerate(config.views) if view in item.clips]
    device = torch.device(config.device)
    for start in range(0, len(slots), config.clips_per_forward):
        batch = slots[start : start + config.clips_per_forward]
        pixels = torch.stack([decoded[i].clips[config.views[v]] for i, v in batch]).to(device)  # (B, T, 3, 224, 224)
        with bb.autocast_context(device, enabled=config.precision == "bf16"):
            tokens = encode(model, pixels)  # (B, 1 + T, D) fp32
        for (i, v), row in zip(batch, tokens.float().cpu().numpy()):
            out[i, v] = row
    return out


def _record(take: Take, present: set[str], views: tuple[str, ...]) -> TakeRecord:
    return TakeRecord(
        take_uid=take.take_uid,
        take_name=take.take_name,
        split=take.split,
        label=int(take.label),
        scenario=take.scenario,
        present=tuple(view in present for view in views),
    )
