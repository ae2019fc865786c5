"""Generator stage: MaskGIT-style masked-token modelling over pre-tokenized images.

Per micro-batch: draw a mask ratio from the cosine schedule for every sequence, replace that many
random positions with the mask id, drop the class label (-> null class) with probability
``model.class_label_dropout`` for classifier-free guidance, and train with label-smoothed
cross-entropy weighted 1 on masked and ``generator.loss_weight_unmasked_token`` on visible tokens
(the authors' recipe). A sample's randomness (mask ratio, masked positions, label drop) comes from a
generator seeded by its position in the run's order, so a resumed run repeats it exactly on any
number of workers.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from trainer.batch_layout import StepLayout
from trainer.distributed import WorkerContext, build_engine
from trainer.partitioning import build_model, copy_state_into
from trainer.schema import GeneratorTrainConfig
from trainer.stages.base import StepOutput, TrainStage


def sample_generators(seed: int, positions: torch.Tensor) -> list[torch.Generator]:
    """One generator per sample, seeded by the sample's position in the run's order: a sample's mask
    and label drop do not depend on which rank or micro-batch it lands in (nor on resizes)."""
    return [torch.Generator().manual_seed((seed * 1_000_003 + int(p) * 7_919 + 17) % (2**63 - 1))
            for p in positions.tolist()]


def cosine_mask_ratio(t: torch.Tensor) -> torch.Tensor:
    """MaskGIT's schedule: t ~ U(0,1) -> ratio arccos(t) / (pi/2), clamped to [1e-6, 1]."""
    return (torch.arccos(t) / (math.pi / 2)).clamp(1e-6, 1.0)


def random_masking(tokens: torch.Tensor, mask_id: int, generators: list[torch.Generator]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked input ids, bool mask of the masked positions); at least one position per row.

    Row ``i`` draws its mask ratio, then its order of positions, from ``generators[i]``."""
    batch, length = tokens.shape
    draws = torch.stack([torch.rand(1 + length, generator=g) for g in generators])
    ratio = cosine_mask_ratio(draws[:, 0])
    num_masked = (length * ratio).round().clamp(min=1).long()
    # The rank of each position in a random order; the lowest `num_masked` ranks are masked.
    order = draws[:, 1:].argsort(dim=1).argsort(dim=1)
    mask = order < num_masked[:, None]
    masked = torch.where(mask.to(tokens.device), torch.full_like(tokens, mask_id), tokens)
    return masked, mask.to(tokens.device)


def masked_token_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, label_smoothing: float,
                      unmasked_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, masked-token accuracy). Weights: 1 on masked, ``unmasked_weight`` on visible tokens."""
    per_token = F.cross_entropy(logits.float().transpose(1, 2), targets, label_smoothing=label_smoothing,
                                reduction="none")
    weights = mask.float() + (~mask).float() * unmasked_weight
    loss = (per_token * weights).sum() / weights.sum().clamp_min(1e-8)
    correct = (logits.detach().argmax(-1) == targets) & mask
    accuracy = (correct.float().sum(1) / mask.float().sum(1).clamp_min(1)).mean()
    return loss, accuracy


class GeneratorStage(TrainStage):
    name = "generator"

    def __init__(self, cfg: GeneratorTrainConfig, ctx: WorkerContext, layout: StepLayout | None = None) -> None:
        super().__init__(cfg, ctx, layout)
        from trainer import models

        self.cfg: GeneratorTrainConfig = cfg
        model = build_model(cfg, lambda: models.build_generator(cfg.model))  # partitioned at ZeRO-3
        if cfg.generator.init_from:
            source = models.load_generator(cfg.generator.init_from)
            missing, unexpected = copy_state_into(model, source.state_dict())  # also into ZeRO-3 partitions
            if missing or unexpected:
                raise ValueError(f"generator.init_from={cfg.generator.init_from} does not fit model: "
                                 f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        if cfg.trainer.activation_checkpointing:
            model.set_grad_checkpointing(True)
        self.mask_id = cfg.model.codebook_size
        self.engines["model"] = build_engine(model, cfg, accumulation=self.layout.accumulation)
        if cfg.trainer.compile:
            self.engines["model"].compile()
        self.init_ema()
        self._tokenizer = None

    def batches(self, layout: StepLayout, start_step: int) -> Iterator[Any]:
        from trainer.token_data import load_token_dataset, token_step_batches

        if not self.cfg.data.train_shards:
            raise ValueError("data.train_shards must point at pre-tokenized data (data_prep/pretokenize.py)")
        dataset = load_token_dataset(self.cfg.data.train_shards)
        width = dataset.tokens.shape[1]
        if width != self.cfg.model.image_seq_len:
            raise ValueError(f"token shards hold {width} tokens per image but model.image_seq_len is "
                             f"{self.cfg.model.image_seq_len}")
        top = int(dataset.tokens.max())
        if top >= self.cfg.model.codebook_size:
            raise ValueError(f"token id {top} >= model.codebook_size {self.cfg.model.codebook_size}")
        self._keys = dataset.keys
        return token_step_batches(dataset, layout, self.ctx.rank, self.cfg.seed, start_step=start_step)

    def batch_keys(self, batch: Any) -> list[str]:
        return [self._keys[r] for r in batch.rows.tolist()]

    def train_step(self, batch: Any, step: int, weight: float = 1.0) -> StepOutput:
        """``batch``: a ``TokenBatch``, or ``(tokens, labels)`` (benches: positions then follow the step)."""
        if isinstance(batch, tuple) and not hasattr(batch, "positions"):
            tokens, labels = batch
            positions = torch.arange(tokens.shape[0]) + step * tokens.shape[0]
        else:
            tokens, labels, positions = batch.tokens, batch.labels, batch.positions
        tokens, labels = tokens.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        generators = sample_generators(self.cfg.seed, positions)
        masked, mask = random_masking(tokens, self.mask_id, generators)
        drops = torch.stack([torch.rand(1, generator=g) for g in generators]).view(-1)
        drop = (drops < self.cfg.model.class_label_dropout).to(self.device)
        engine = self.engines["model"]
        logits = engine(masked, labels, drop)
        loss, accuracy = masked_token_loss(logits, tokens, mask, self.cfg.generator.label_smoothing,
                                           self.cfg.generator.loss_weight_unmasked_token)
        finite = self.step_engine(engine, loss, weight)
        metrics = {"loss": loss.item(), "masked_token_accuracy": accuracy.item(),
                   "mask_ratio": mask.float().mean().item()}
        return StepOutput(metrics, finite, tokens.shape[0])

    @torch.no_grad()
    def preview(self, batch: Any, step: int) -> np.ndarray | None:
        """A grid of class-conditional samples decoded by the tokenizer (when one is configured)."""
        if not self.cfg.generator.tokenizer:
            return None
        from trainer import models
        from trainer.sample import sample_images
        from trainer.tracking import image_grid

        if self._tokenizer is None:
            self._tokenizer = models.load_tokenizer(self.cfg.generator.tokenizer).to(self.device).eval()
        module = self.engines["model"].module
        was_training = module.training
        module.eval()
        try:
            labels = batch.labels[:8].to(self.device)
            images = sample_images(module, self._tokenizer, labels, seeds=list(range(labels.shape[0])),
                                   settings=self.cfg.generator.preview_sampling)
        finally:
            module.train(was_training)
        return image_grid([images.cpu().numpy()])

    def export_config(self) -> dict:
        from trainer.models import generator_config_to_json

        return generator_config_to_json(self.cfg.model)

    def flops_per_sample(self) -> float | None:
        m = self.cfg.model
        # 6 * params * tokens for a transformer (forward + backward), embeddings excluded.
        per_layer = 4 * m.hidden_size**2 + 2 * m.hidden_size * m.intermediate_size
        return 6.0 * per_layer * m.num_hidden_layers * (m.image_seq_len + 1)
