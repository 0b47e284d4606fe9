"""What a Ray Train worker does in each cross-modal step (see :mod:`orchestrator.engine.crossmodal`).

``encode_step`` runs one of the two models over the evaluation set and the corpus; ``stage_step`` runs
one stage of one method and, after the last stage, embeds the evaluation set with the method's query
encoder. Each rank embeds its own shard of every set; the store publishes a partition once all shards
are there. A stage step is given the new model only: its payload does not name the old one.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from methods.nets.clip_models import Tokenizer, clip_input_spec, create_clip, embedding_dim, encode_images
from orchestrator.storage import runfiles
from orchestrator.config.typed import from_dict
from orchestrator.config import TrainingConfig
from orchestrator.engine.crossmodal import recorded_weights, resolve_clip, train_fn
from orchestrator.storage.runfiles import CROSSMODAL_VERSIONS as VERSIONS, seed_dir, state_key
from orchestrator.config.crossmodal import ClipSpec, CrossModalDataConfig, parse_crossmodal
from orchestrator.data.crossmodal import CaptionedArrays, corpus_captions, corpus_draw, eval_set, pair_set
from orchestrator.data.transforms import BatchTransform
from orchestrator.engine.worker import Worker, embed_array
from orchestrator.storage.store import EmbeddingStore


def _load(spec: ClipSpec, data: CrossModalDataConfig, device: torch.device,
          run_dir: runfiles.Run) -> tuple[torch.nn.Module, Tokenizer, BatchTransform]:
    """The model, its tokenizer and its test-time transform. Random weights (no ``pretrained``, no
    ``upstream``) come from a fixed seed, so every step of a run sees the same model."""
    name, weights = resolve_clip(spec, data.synthetic, run_dir)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        clip, tokenizer = create_clip(name, weights)
    inputs = clip_input_spec(name, weights)
    return clip.to(device), tokenizer, BatchTransform(inputs.mean, inputs.std, augment=False, size=inputs.size,
                                                      interpolation=inputs.interpolation)


def _image_size(spec: ClipSpec, data: CrossModalDataConfig) -> int:
    return data.image_size or clip_input_spec(spec.name).size


@torch.no_grad()
def _embed_texts(encode, tokenizer: Tokenizer, texts: Sequence[str], indices: np.ndarray, batch_size: int,
                 device: torch.device) -> np.ndarray:
    chunks = [encode(tokenizer([texts[i] for i in indices[start:start + batch_size]]).to(device)).float().cpu().numpy()
              for start in range(0, len(indices), batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def _write_eval_set(store: EmbeddingStore, key: str, data: CaptionedArrays, encode_image, encode_text,
                    tokenizer: Tokenizer, transform, batch_size: int, worker: Worker, meta: dict) -> None:
    """This rank's shard of the evaluation images and captions, L2-normalised, into ``store``."""
    shard = {"shard": worker.rank, "num_shards": worker.world_size,
             "metadata": {**meta, "normalized": True}}
    images = np.arange(len(data.images))[worker.rank::worker.world_size]
    store.write(key, VERSIONS.get(key, 1), "images",
                embed_array(encode_image, data.images, images, transform, batch_size, worker.device),
                images, images, modality="image", **shard)
    captions = np.arange(len(data.captions))[worker.rank::worker.world_size]
    store.write(key, VERSIONS.get(key, 1), "captions",
                _embed_texts(encode_text, tokenizer, data.captions, captions, batch_size, worker.device),
                data.caption_of[captions], captions, modality="text", caption_of=data.caption_of[captions], **shard)


Partitions = list[tuple[str, str, int, str]]  # (store prefix in the run, method key, version, evaluation set)


def encode_step(loop: dict, run_dir: runfiles.Run, worker: Worker) -> tuple[dict, dict, Partitions]:
    """The ``old`` or ``new`` model embeds the evaluation set and the corpus into RUN_DIR/store. Returns
    the manifest entry's fields, the chief's own records (none) and the partitions written."""
    cfg = parse_crossmodal(loop["config"])
    role = loop["role"]
    spec: ClipSpec = getattr(cfg.models, role)
    clip, tokenizer, transform = _load(spec, cfg.data, worker.device, run_dir)
    batch_size = cfg.evaluation.batch_size
    store = EmbeddingStore(runfiles.store_dir(run_dir))
    meta = {"model": spec.name, "role": role, "config_digest": cfg.digest()}
    evaluation = eval_set(cfg.data, _image_size(spec, cfg.data))

    def encode_text(tokens: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(clip.encode_text(tokens), dim=-1)

    _write_eval_set(store, role, evaluation, lambda x: encode_images(clip, x), encode_text, tokenizer, transform,
                    batch_size, worker, meta)
    corpus = corpus_captions(cfg.data)
    rows = np.arange(len(corpus))[worker.rank::worker.world_size]
    store.write(role, VERSIONS[role], "corpus", _embed_texts(encode_text, tokenizer, corpus, rows, batch_size, worker.device),
                np.full(len(rows), -1), rows, modality="text", shard=worker.rank, num_shards=worker.world_size,
                metadata={**meta, "normalized": True})
    return ({"role": role, "model": spec.name, "weights": recorded_weights(spec, cfg.data.synthetic),
             "images": len(evaluation.images), "captions": len(evaluation.captions), "corpus": len(corpus)}, {},
            [("store", role, VERSIONS[role], name) for name in ("images", "captions", "corpus")])


class PairBatches:
    """Stage ``pairs`` data: image batches with one of each image's captions, drawn anew every epoch."""

    def __init__(self, clip: torch.nn.Module, tokenizer: Tokenizer, pairs: CaptionedArrays, transform, seed: int,
                 device: torch.device):
        self.clip, self.transform, self.seed, self.device = clip, transform, seed, device
        self.images = torch.from_numpy(pairs.images)
        self.tokens = tokenizer(pairs.captions)
        order = np.argsort(pairs.caption_of, kind="stable")
        self.by_image = order
        self.counts = np.bincount(pairs.caption_of, minlength=len(pairs.images))
        self.starts = np.cumsum(self.counts) - self.counts
        self._epoch, self._choice = -1, np.empty(0, np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if epoch != self._epoch:
            offset = np.random.default_rng([self.seed, 53, epoch]).random(len(self.counts))
            self._choice = self.by_image[self.starts + (offset * self.counts).astype(np.int64)]
            self._epoch = epoch
        idx = indices.cpu()
        images = self.transform(self.images[idx].to(self.device))
        return images, self.tokens[torch.from_numpy(self._choice[idx.numpy()])].to(self.device)


def stage_step(loop: dict, run_dir: runfiles.Run, worker: Worker) -> tuple[dict, dict, Partitions]:
    """One stage of one method for one seed; the last stage also embeds the queries. Returns the manifest
    entry's fields, the chief's records of the stage state and the partitions written."""
    from methods.crossmodal_base import StageContext, TextPairs, create_crossmodal

    seed, stage, spec = loop["seed"], loop["stage"], loop["method"]
    method = create_crossmodal(spec["name"], spec["params"], f"methods.{loop['method_index']}")
    new_spec = from_dict(ClipSpec, loop["new_model"], "models.new")
    data = from_dict(CrossModalDataConfig, loop["data"], "data")
    training = from_dict(TrainingConfig, loop["training"], f"methods.{loop['method_index']}.training.{stage}")
    state: dict[str, torch.Tensor] = {}
    for earlier in loop["earlier"]:
        state.update(seed_dir(run_dir, seed).load_torch(state_key(spec["key"], earlier)))
    dims = {"new_dim": embedding_dim(new_spec.name), "old_dim": loop["old_dim"]}
    torch.manual_seed(seed)
    throughputs: list[dict] = []
    ctx = StageContext(stage=stage, seed=seed, device=worker.device, training=training,
                       train=train_fn(training, worker, seed, f"seed-{seed}/{spec['key']}/{stage}", run_dir, throughputs),
                       **dims)
    if stage == "text":
        store = EmbeddingStore(runfiles.store_dir(run_dir))
        new, old = (store.read(role, VERSIONS[role], "corpus").embeddings for role in ("new", "old"))
        draw = corpus_draw(len(new), data.corpus_size, seed)
        stage_data = TextPairs(*(torch.from_numpy(np.ascontiguousarray(x[draw])).to(worker.device) for x in (new, old)))
        size = len(draw)
    else:
        clip, tokenizer, transform = _load(new_spec, data, worker.device, run_dir)
        stage_data = PairBatches(clip, tokenizer, pair_set(data, seed, _image_size(new_spec, data)), transform, seed,
                                 worker.device)
        size = len(stage_data)
    kept = method.stages()[stage](stage_data, state, ctx)
    written = {}
    if worker.is_chief:
        key = state_key(spec["key"], stage)
        written = runfiles.artefact_records({key: seed_dir(run_dir, seed).save_torch(key, kept)}, f"seed-{seed}")
    partitions: Partitions = []
    if loop["last"]:
        clip, tokenizer, transform = _load(new_spec, data, worker.device, run_dir)
        encoder = method.query_encoder(clip, {**state, **kept}, **dims).to(worker.device).eval()
        _write_eval_set(EmbeddingStore(runfiles.store_dir(seed_dir(run_dir, seed))), spec["key"],
                        eval_set(data, _image_size(new_spec, data)), encoder.encode_image, encoder.encode_text,
                        tokenizer, transform, loop["batch_size"], worker,
                        {"method": spec["name"], "seed": seed, "model": new_spec.name})
        partitions = [(f"seed-{seed}/store", spec["key"], VERSIONS.get(spec["key"], 1), name) for name in ("images", "captions")]
    trained = {"throughput": throughputs[0] if len(throughputs) == 1 else throughputs} if throughputs else {}
    return ({"method": spec["key"], "stage": stage, "seed": seed, "items": size, "params": method.describe(), **trained},
            written, partitions)
