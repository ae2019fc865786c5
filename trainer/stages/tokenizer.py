"""Tokenizer stage: the three TiTok recipes on one loop.

* ``proxy_codes`` (paper stage 1): a frozen MaskGIT-VQGAN turns each image into a grid of proxy
  codes; the TiTok decoder predicts them. loss = CE(proxy_code_logits, codes) + quantizer loss.
* ``decoder_finetune`` (paper stage 2): encoder, latent tokens and quantizer frozen; the decoder and
  the MaskGIT-VQGAN pixel decoder learn with L2 + perceptual + adversarial losses.
* ``single_stage``: the pixel losses from the first step, everything trainable.

The discriminator of the pixel recipes has its own DeepSpeed engine and optimizer.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from trainer.batch_layout import StepLayout
from trainer.distributed import WorkerContext, build_engine, compute_dtype
from trainer.partitioning import build_model, copy_state_into, gathered
from trainer.schema import TokenizerRecipe, TokenizerTrainConfig
from trainer.stages.base import StepOutput, TrainStage
from trainer.tracking import image_grid, to_uint8_images

PREVIEW_IMAGES = 8


class TokenizerStage(TrainStage):
    name = "tokenizer"

    def __init__(self, cfg: TokenizerTrainConfig, ctx: WorkerContext, layout: StepLayout | None = None) -> None:
        super().__init__(cfg, ctx, layout)
        from trainer import models

        self.cfg: TokenizerTrainConfig = cfg
        self.recipe = cfg.tokenizer.recipe
        # At ZeRO-3 built partitioned (zero.Init); the teacher below stays whole on every rank.
        model = build_model(cfg, lambda: models.build_tokenizer(cfg.model))
        has_pixel_decoder = False
        if cfg.tokenizer.init_from:
            has_pixel_decoder = _load_init_weights(model, cfg.tokenizer.init_from)
        self.teacher = None
        # Stage 2 takes its pixel decoder from the teacher unless the export it starts from has one.
        if self.recipe == TokenizerRecipe.proxy_codes or (
                self.recipe == TokenizerRecipe.decoder_finetune and not has_pixel_decoder):
            if not cfg.tokenizer.teacher_weights:
                raise ValueError(f"tokenizer.recipe={self.recipe.value} needs tokenizer.teacher_weights "
                                 "(MaskGIT-VQGAN weights, path or URL)")
            self.teacher = models.load_maskgit_vqgan(cfg.tokenizer.teacher_weights).to(self.device).eval()
            self.teacher.requires_grad_(False)
        if self.recipe == TokenizerRecipe.decoder_finetune:
            if self.teacher is not None:
                with gathered([*model.pixel_decoder.parameters(), *model.pixel_quantize.parameters()]):
                    model.load_proxy_decoder_from(self.teacher)
                self.teacher = None  # stage 2 needs the teacher only to initialise the pixel decoder
            for frozen in (model.encoder, model.quantize):
                frozen.requires_grad_(False)
            model.latent_tokens.requires_grad_(False)
        if cfg.trainer.activation_checkpointing:
            model.set_grad_checkpointing(True)
        self.engines["model"] = build_engine(model, cfg, accumulation=self.layout.accumulation)
        if cfg.trainer.compile:
            self.engines["model"].compile()
        self.pixel_loss = None
        if self.recipe != TokenizerRecipe.proxy_codes:
            from trainer.losses import build_discriminator, build_pixel_loss

            self.pixel_loss = build_pixel_loss(cfg.tokenizer.losses).to(self.device)
            if cfg.tokenizer.losses.gan_enabled:
                discriminator = build_discriminator(cfg.tokenizer.discriminator)
                self.engines["discriminator"] = build_engine(discriminator, cfg, optim=cfg.tokenizer.discriminator_optim,
                                                             accumulation=self.layout.accumulation)
        self.init_ema()

    # --- data ---------------------------------------------------------------------------------
    def batches(self, layout: StepLayout, start_step: int) -> Iterator[Any]:
        from trainer.data import step_batches

        data = self.cfg.data
        return step_batches(data.train_shards, layout, self.ctx.rank, image_size=data.image_size,
                            num_workers=data.loader_workers, seed=self.cfg.seed, shuffle_buffer=data.shuffle_buffer,
                            start_step=start_step, uint8=True, device=self.device,
                            decoded_cache_mb=data.decoded_cache_mb)

    def _images(self, batch: Any) -> torch.Tensor:
        """The batch's images as ``input_dtype`` NCHW in [0, 1] on the device; uint8 NHWC batches (the
        reader's) are converted there, after the copy."""
        from trainer.data import to_float_images

        images = batch[0] if isinstance(batch, (tuple, list)) else batch["images"]
        if images.dtype == torch.uint8:
            return to_float_images(images, self.device, self.input_dtype)
        return images.to(self.device, dtype=self.input_dtype, non_blocking=True)

    # --- step ---------------------------------------------------------------------------------
    def train_step(self, batch: Any, step: int, weight: float = 1.0) -> StepOutput:
        images = self._images(batch)
        engine = self.engines["model"]
        if self.recipe == TokenizerRecipe.proxy_codes:
            with torch.no_grad(), self._autocast():
                codes = self.teacher.encode_to_codes(images)
            proxy_code_logits, aux = engine(images)
            loss_ce = F.cross_entropy(proxy_code_logits.float(), codes)
            loss = loss_ce + aux["quantizer_loss"]
            finite = self.step_engine(engine, loss, weight)
            accuracy = (proxy_code_logits.detach().argmax(1) == codes).float().mean()
            metrics = {"loss": loss.item(), "loss_ce": loss_ce.item(), "loss_quantizer": float(aux["quantizer_loss"]),
                       "proxy_code_accuracy": accuracy.item()}
            return StepOutput(metrics, finite, images.shape[0], self._code_counts(aux))

        disc_engine = self.engines.get("discriminator")
        reconstructions, aux = engine(images)
        loss, terms = self.pixel_loss.generator_loss(images, reconstructions, aux, step,
                                                     disc_engine.module if disc_engine is not None else None)
        finite = self.step_engine(engine, loss, weight)
        metrics = {"loss": loss.item(), **{k: float(v) for k, v in terms.items()}}
        if disc_engine is not None and self.pixel_loss.discriminator_active(step):
            d_loss, d_terms = self.pixel_loss.discriminator_loss(images, reconstructions.detach(), step, disc_engine)
            finite = self.step_engine(disc_engine, d_loss, weight) and finite
            metrics.update({"loss_discriminator": d_loss.item(), **{k: float(v) for k, v in d_terms.items()}})
        metrics["psnr"] = float(_psnr(reconstructions.detach(), images))
        return StepOutput(metrics, finite, images.shape[0], self._code_counts(aux))

    def _autocast(self):
        if self.cfg.deepspeed.precision.value == "fp32":
            import contextlib

            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=compute_dtype(self.cfg.deepspeed))

    def _code_counts(self, aux: dict) -> torch.Tensor | None:
        token_ids = aux.get("token_ids")
        if token_ids is None:
            return None
        return torch.bincount(token_ids.detach().reshape(-1).long(), minlength=self.cfg.model.codebook_size)

    # --- preview, export ----------------------------------------------------------------------
    @torch.no_grad()
    def preview(self, batch: Any, step: int) -> np.ndarray | None:
        """Inputs over reconstructions (stage 1: decoded argmax proxy codes and the teacher's own)."""
        images = self._images(batch)[:PREVIEW_IMAGES]
        engine = self.engines["model"]
        was_training = engine.module.training
        engine.module.eval()
        try:
            output, _ = engine(images)
            rows = [to_uint8_images(images)]
            if self.recipe == TokenizerRecipe.proxy_codes:
                rows.append(to_uint8_images(self.teacher.decode_codes(output.argmax(1))))
                rows.append(to_uint8_images(self.teacher.decode_codes(self.teacher.encode_to_codes(images))))
            else:
                rows.append(to_uint8_images(output))
        finally:
            engine.module.train(was_training)
        return image_grid(rows)

    def export_config(self) -> dict:
        from trainer.models import tokenizer_config_to_json

        return tokenizer_config_to_json(self.cfg.model)

    def stage_state(self) -> dict[str, torch.Tensor]:
        return {f"pixel_loss.{k}": v for k, v in self.pixel_loss.state_dict().items()} if self.pixel_loss else {}

    def load_stage_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.pixel_loss is not None:
            self.pixel_loss.load_state_dict({k[len("pixel_loss."):]: v for k, v in state.items()
                                             if k.startswith("pixel_loss.")})


def _load_init_weights(model: torch.nn.Module, url: str) -> bool:
    """Start from an export (ours or the authors'); stage-1 exports have no pixel decoder keys.

    Returns whether the export carried the pixel decoder.
    """
    from trainer.models import load_tokenizer

    source = load_tokenizer(url)
    missing, unexpected = copy_state_into(model, source.state_dict())  # also into ZeRO-3 partitions
    allowed_missing = ("pixel_decoder.", "pixel_quantize.")
    bad = [k for k in missing if not k.startswith(allowed_missing)] + list(unexpected)
    if bad:
        raise ValueError(f"tokenizer.init_from={url} does not fit model: {bad[:5]}{'...' if len(bad) > 5 else ''}")
    return not any(k.startswith(allowed_missing) for k in missing)


def _psnr(reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    mse = (reconstructions.float().clamp(0, 1) - images.float()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean()
