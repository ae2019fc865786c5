"""Images/s of trainer.sample (class-conditional generation: generator decoding + tokenizer decoder)
against a straightforward implementation of the same algorithm, in the same process on the same
weights.

    python bench/sampling_throughput.py [--preset small|titok_l32|titok_b64|titok_s128] [--device cpu|cuda]
                                        [--batch 32] [--reference-samples 4] [--rounds 3] [--threads N]

Variants:

* ``reference``: one sample at a time, step by step as the authors' ``generate()`` runs: separate
  conditional and unconditional forward passes, Gumbel noise of shape (K, codebook) per step drawn
  from the sample's own CPU generator, then the tokenizer decodes the one image;
* ``ours b1``: :func:`trainer.sample.sample_images` with ``batch_size=1`` (one [cond; uncond] pass
  of 2 rows per step, one uniform per token);
* ``ours bN``: the same with ``batch_size=N`` (N samples per pass).

``small`` (default) is a small generator and tokenizer decoder that runs on a laptop CPU;
``titok_*`` build the published architectures with random weights (for a GPU machine) and the
published decoding settings. Before timing, both implementations decode with temperature 0
(no randomness: argmax draws, confidence = logits) and must produce the same tokens. Printed:
images/s per variant, the ratio to ``reference``, and a breakdown (generator alone, decoder alone,
and what codebook-sized CPU Gumbel noise would cost per image).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.model_throughput import interleaved_rates  # noqa: E402
from trainer.models import (GeneratorConfig, PixelDecoderConfig, TiTokConfig, build_generator,  # noqa: E402
                            build_tokenizer, published_generator_config, published_tokenizer_config)
from trainer.sample import SamplingConfig, sample_images, sample_tokens  # noqa: E402

# The authors' decoding settings per published model (docs/checkpoint_format.md §1).
PUBLISHED_SAMPLING = {
    "titok_l32": dict(num_steps=8, guidance_scale=4.5, guidance_decay="linear", randomize_temperature=9.5),
    "titok_b64": dict(num_steps=8, guidance_scale=3.0, guidance_decay="linear", randomize_temperature=11.0),
    "titok_s128": dict(num_steps=64, guidance_scale=6.9, guidance_decay="power-cosine", randomize_temperature=2.8),
}


def small_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A 4-layer generator over L-32's token space and a 64px tokenizer decoder (CPU-sized)."""
    generator = build_generator(GeneratorConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                                intermediate_size=1024, image_seq_len=32))
    tokenizer = build_tokenizer(TiTokConfig(
        image_size=64, num_latent_tokens=32, vit_enc_model_size=None, vit_dec_model_size=None, vit_enc_width=128,
        vit_enc_num_layers=1, vit_enc_num_heads=4, vit_dec_width=128, vit_dec_num_layers=2, vit_dec_num_heads=4,
        pixel_decoder=PixelDecoderConfig(hidden_channels=32, num_res_blocks=1)))
    return generator, tokenizer


# ----------------------------------------------------------------------------------------------
# The straightforward implementation: one sample, one step at a time, the authors' algorithm as written
# (docs/checkpoint_format.md §4).


def _gumbel(uniform: torch.Tensor) -> torch.Tensor:
    return -torch.log((-torch.log(uniform.clamp(min=1e-20))).clamp(min=1e-20))


@torch.inference_mode()
def reference_tokens(generator, label: int, seed: int, s: SamplingConfig) -> torch.Tensor:
    cfg = generator.config
    device = next(generator.parameters()).device
    rng = torch.Generator().manual_seed(seed)
    mask_id, length, steps = cfg.mask_token_id, cfg.image_seq_len, s.num_steps
    ids = torch.full((1, length), mask_id, dtype=torch.long, device=device)
    labels = torch.tensor([label], device=device)
    null = torch.ones(1, dtype=torch.bool, device=device)
    cfg_scale = s.guidance_scale if s.guidance_decay == "constant" else 0.0
    for step in range(steps):
        ratio = (step + 1) / steps
        tau = s.randomize_temperature * (1.0 - ratio)
        is_mask = ids == mask_id
        if s.guidance_decay == "power-cosine":
            cfg_scale = (s.guidance_scale - 1) * (1 - math.cos(math.pi * (step / steps) ** s.guidance_scale_pow)) / 2 + 1
        if cfg_scale != 0:
            cond = generator(ids, labels).float()
            uncond = generator(ids, labels, null).float()
            if s.guidance_decay == "power-cosine":
                logits = uncond + (cond - uncond) * cfg_scale
            else:
                logits = cond + (cond - uncond) * cfg_scale
        else:
            logits = generator(ids, labels).float()
        if s.softmax_temperature_annealing:
            logits = logits / (0.5 + 0.8 * (1 - ratio))
        noise = _gumbel(torch.rand(logits.shape, generator=rng)).to(device)
        sampled = (logits + tau * noise).argmax(dim=-1)
        sampled_logits = logits.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        sampled = torch.where(is_mask, sampled, ids)
        sampled_logits = torch.where(is_mask, sampled_logits, torch.inf)
        mask_len = math.floor(length * math.acos(ratio) / (math.pi / 2))
        mask_len = max(1, min(int(is_mask.sum()) - 1, mask_len))
        confidence = sampled_logits + tau * _gumbel(torch.rand(sampled_logits.shape, generator=rng)).to(device)
        cutoff = confidence.sort(dim=-1).values[:, mask_len - 1:mask_len]
        ids = sampled if step == steps - 1 else torch.where(confidence <= cutoff, mask_id, sampled)
        if s.guidance_decay == "linear":
            cfg_scale = ratio * s.guidance_scale
    return ids


@torch.inference_mode()
def reference_images(generator, tokenizer, labels: list[int], seeds: list[int], s: SamplingConfig) -> torch.Tensor:
    images = []
    for label, seed in zip(labels, seeds):
        tokens = reference_tokens(generator, label, seed, s)
        image = tokenizer.decode_tokens(tokens).clamp(0, 1).mul(255).round().to(torch.uint8)
        images.append(image.permute(0, 2, 3, 1))
    return torch.cat(images)


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="small | titok_l32 | titok_b64 | titok_s128")
    parser.add_argument("--batch", type=int, default=32, help="samples per batch of the batched variant")
    parser.add_argument("--reference-samples", type=int, default=4, help="samples per timed call of the "
                        "one-at-a-time variants (reference, ours b1)")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per variant (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":  # float32 as the evaluation runs it
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    if args.preset == "small":
        generator, tokenizer = small_models()
        settings = dict(PUBLISHED_SAMPLING["titok_l32"])
    else:
        generator = build_generator(published_generator_config(args.preset))
        tokenizer = build_tokenizer(published_tokenizer_config(args.preset))
        settings = dict(PUBLISHED_SAMPLING[args.preset])
    generator, tokenizer = generator.to(device).eval(), tokenizer.to(device).eval()
    g, t = generator.config, tokenizer.config
    n_ref, batch = args.reference_samples, args.batch
    print(f"{args.preset}: generator {g.model_type} {g.hidden_size}x{g.num_hidden_layers} "
          f"({sum(p.numel() for p in generator.parameters()) / 1e6:.1f}M), K={g.image_seq_len}, "
          f"codebook {g.codebook_size}; decoder to {t.image_size}px; sampling {settings}; device {device}, "
          f"threads {torch.get_num_threads()}")

    labels = [(7 * i) % g.condition_num_classes for i in range(max(batch, n_ref))]
    seeds = [1000 + i for i in range(len(labels))]
    on_device = torch.tensor(labels, device=device)

    # Same algorithm: with temperature 0 nothing is random and the tokens must agree.
    greedy = SamplingConfig(**{**settings, "randomize_temperature": 0.0, "batch_size": n_ref})
    ours = sample_tokens(generator, on_device[:n_ref], seeds[:n_ref], greedy)
    ref = torch.cat([reference_tokens(generator, labels[i], seeds[i], greedy) for i in range(n_ref)])
    agreement = (ours == ref).float().mean().item()
    print(f"temperature-0 token agreement, ours vs reference: {agreement:.4f}")

    one = SamplingConfig(**settings, batch_size=1)
    many = SamplingConfig(**settings, batch_size=batch)
    calls = {
        "reference": (lambda: reference_images(generator, tokenizer, labels[:n_ref], seeds[:n_ref], one), n_ref),
        "ours b1": (lambda: sample_images(generator, tokenizer, on_device[:n_ref], seeds[:n_ref], one), n_ref),
        f"ours b{batch}": (lambda: sample_images(generator, tokenizer, on_device[:batch], seeds[:batch], many),
                           batch),
    }
    rates = interleaved_rates({name: fn for name, (fn, _) in calls.items()}, 1, args.rounds, sync)
    rates = {name: rate * calls[name][1] for name, rate in rates.items()}
    print(f"{'variant':<12}{'images/s':>12}{'ratio':>8}")
    for name, rate in rates.items():
        print(f"{name:<12}{rate:12.3f}{rate / rates['reference']:8.2f}")

    # Breakdown of the batched variant: generator alone, decoder alone.
    tokens = sample_tokens(generator, on_device[:batch], seeds[:batch], many)
    parts = {
        "generator": lambda: sample_tokens(generator, on_device[:batch], seeds[:batch], many),
        "decoder": lambda: tokenizer.decode_tokens(tokens),
    }
    with torch.inference_mode():
        part_rates = interleaved_rates(parts, batch, args.rounds, sync)
    gen_ms, dec_ms = (1000.0 / part_rates[k] for k in ("generator", "decoder"))
    rng = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(many.num_steps):
        _gumbel(torch.rand(batch, g.image_seq_len, g.codebook_size, generator=rng))
    noise_ms = (time.perf_counter() - start) * 1000.0 / batch
    print(f"per image at b{batch}: generator {gen_ms:.2f} ms, decoder {dec_ms:.2f} ms; codebook-sized CPU Gumbel "
          f"noise for all steps would add {noise_ms:.2f} ms (not used: one uniform per token instead)")


if __name__ == "__main__":
    main()
