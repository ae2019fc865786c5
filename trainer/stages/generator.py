"""Generator stage: MaskGIT-style masked-token modelling over pre-tokenized images.

Per micro-batch: draw a mask ratio from the cosine schedule for every sequence, replace that many
random positions with the mask id, drop the class label (-> null class) with probability
``model.class_label_dropout`` for classifier-free guidance, and train with label-smoothed
cross-entropy weighted 1 on masked and ``generator.loss_weight_unmasked_token`` on visible tokens
(the authors' recipe). All randomness of a micro-batch comes from a generator seeded by
(seed, rank, micro-batch index), so a resumed run repeats it exactly.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from trainer.distributed import WorkerContext, build_engine
from trainer.partitioning import build_model, copy_state_into
from trainer.schema import GeneratorTrainConfig
from trainer.stages.base import StepOutput, TrainStage


def batch_generator(seed: int, rank: int, index: int) -> torch.Generator:
    """A generator private to one micro-batch of one rank."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 1_000_033 + index) % (2**63 - 1))


def cosine_mask_ratio(t: torch.Tensor) -> torch.Tensor:
    """MaskGIT's schedule: t ~ U(0,1) -> ratio arccos(t) / (pi/2), clamped to [1e-6, 1]."""
    return (torch.arccos(t) / (math.pi / 2)).clamp(1e-6, 1.0)


def random_masking(tokens: torch.Tensor, mask_id: int, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked input ids, bool mask of the masked positions); at least one position per row."""
    batch, length = tokens.shape
    ratio = cosine_mask_ratio(torch.rand(batch, generator=generator))
    num_masked = (length * ratio).round().clamp(min=1).long()
    # The rank of each position in a random order; the lowest `num_masked` ranks are masked.
    order = torch.rand(batch, length, generator=generator).argsort(dim=1).argsort(dim=1)
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

    def __init__(self, cfg: GeneratorTrainConfig, ctx: WorkerContext) -> None:
        super().__init__(cfg, ctx)
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
        self.engines["model"] = build_engine(model, cfg)
        if cfg.trainer.compile:
            self.engines["model"].compile()
        self.init_ema()
        self._tokenizer = None

    def batches(self, start_micro_batch: int) -> Iterator[Any]:
        from trainer.token_data import load_token_dataset, token_batches

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
        self._micro_batch = start_micro_batch
        for batch in token_batches("", self.cfg.trainer.batch_size_per_worker, self.ctx.rank, self.ctx.world_size,
                                   self.cfg.seed, start_batch=start_micro_batch, dataset=dataset):
            yield batch
            self._micro_batch += 1

    def train_step(self, batch: Any, step: int) -> StepOutput:
        tokens, labels = (t.to(self.device, non_blocking=True) for t in batch)
        rng = batch_generator(self.cfg.seed, self.ctx.rank, self._micro_batch)
        masked, mask = random_masking(tokens, self.mask_id, rng)
        drop = (torch.rand(tokens.shape[0], generator=rng) < self.cfg.model.class_label_dropout).to(self.device)
        engine = self.engines["model"]
        logits = engine(masked, labels, drop)
        loss, accuracy = masked_token_loss(logits, tokens, mask, self.cfg.generator.label_smoothing,
                                           self.cfg.generator.loss_weight_unmasked_token)
        finite = self.step_engine(engine, loss)
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
            labels = batch[1][:8].to(self.device)
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
