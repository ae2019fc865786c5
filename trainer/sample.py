"""Sampling from a generator: MaskGIT/MUSE-style iterative parallel decoding with guidance.

    python -m trainer.sample generator=<export dir|hub id> output=<dir|s3://...> [tokenizer=<export>]
                             [num_samples=64] [labels=[1,2]] [seed=0] [sampling.num_steps=8] ...

Library: :func:`sample_tokens` (token ids) and :func:`sample_images` (uint8 images), used by the
evaluation workers, the trainer's preview grids and the command line.

Decoding follows the authors' ``generate()`` (bytedance/1d-tokenizer, modeling/maskgit.py): all K
tokens start masked; at step s of T (r = (s+1)/T) the generator predicts every position with
classifier-free guidance, the logits are divided by ``0.5 + 0.8 (1 - r)`` (softmax temperature
annealing), every masked position draws a token at temperature ``tau = randomize_temperature *
(1 - r)``, and the ``floor(K * arccos(r) / (pi/2))`` least confident new tokens (sampled logit +
tau * Gumbel noise) are masked again. Two deliberate differences, neither changing the distribution
of the samples:

* Every random draw of sample i comes from its own ``torch.Generator`` seeded with seeds[i], so a
  sample depends only on (label, seed) and the settings: the same image alone, in any batch, on any
  worker (batches are padded to ``batch_size`` rows, so the arithmetic has one shape throughout).
* A token is drawn from softmax(logits / tau) by inverting its CDF with one uniform number per
  position, not as argmax(logits + tau * Gumbel) with one number per position *and* codebook entry:
  the same categorical distribution (Gumbel-max), with 4096x fewer random numbers. They are drawn
  on the CPU (reproducible across devices), where Gumbel noise of codebook size (1M numbers per
  L-32 image) takes 10-25 ms of CPU time per image (bench/sampling_throughput.py), while the L-32
  model needs ~175 GFLOP per image, a few ms on a current GPU.

Command line: sample ``i`` gets class ``labels[i % len(labels)]`` (default ``i % num_classes``, the
balanced order of the generation eval) and seed ``sample_seed(seed, i)``: ``seed=0
num_samples=50000`` draws the images that ``evals/run.py eval.kind=generation eval.seed=0`` scores
with the same ``sampling`` settings. Written to ``output``: ``samples.npz`` (``arr_0`` uint8
[N, H, W, 3], the layout of the ADM evaluation suite, streamed to storage batch by batch;
``labels`` int64 [N]) and ``samples.png`` (a grid of the first ``grid_images``). ``--help`` prints
every setting.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import numpy as np
from omegaconf import MISSING

from trainer.config import EXIT_CONFIG_ERROR, ConfigError, load_config

if TYPE_CHECKING:
    import torch
    from torch import nn

GUIDANCE_DECAYS = ("constant", "linear", "power-cosine")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class SamplingConfig:
    """Decoding settings; defaults are TiTok-L-32's published inference config."""

    num_steps: int = 8
    guidance_scale: float = 4.5
    # "constant" | "linear" | "power-cosine" (the authors' schedules; docs/checkpoint_format.md §4)
    guidance_decay: str = "linear"
    guidance_scale_pow: float = 3.0
    randomize_temperature: float = 9.5
    softmax_temperature_annealing: bool = True
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.guidance_decay not in GUIDANCE_DECAYS:
            raise ConfigError("guidance_decay", f"{self.guidance_decay!r} is not a valid choice; "
                                                f"valid: {', '.join(GUIDANCE_DECAYS)}")
        if self.num_steps < 1 or self.batch_size < 1:
            raise ConfigError("num_steps", f"num_steps and batch_size must be >= 1, got {self.num_steps}, "
                                           f"{self.batch_size}")
        if self.randomize_temperature < 0:
            raise ConfigError("randomize_temperature", f"must be >= 0, got {self.randomize_temperature}")


# ----------------------------------------------------------------------------------------------
# Per-sample labels and seeds (shared with the generation eval)


def sample_seed(base_seed: int, index: int) -> int:
    """The seed of sample ``index``: a hash of (base seed, index), so any split gives the same image."""
    state = np.random.SeedSequence([base_seed, index]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1  # < 2**63


def sample_label(index: int, num_classes: int) -> int:
    """Class of sample ``index``: round-robin, so N = k * num_classes gives k per class and every
    prefix of the list is as balanced as it can be."""
    return index % num_classes


def run_tokenizer(generator_export: str) -> str | None:
    """The tokenizer a generator run trained on: ``generator.tokenizer`` of ``<run>/config.yaml`` for
    an export at ``<run>/exports/step_*``; None for an export outside a run or a config without it."""
    import yaml

    from cluster import storage
    from trainer.checkpoint import EXPORTS, parse_step

    parts = generator_export.rstrip("/").rsplit("/", 2)
    if len(parts) != 3 or parts[1] != EXPORTS or parse_step(parts[2]) is None:
        return None
    config_url = storage.join(parts[0], "config.yaml")
    if not storage.exists(config_url):
        return None
    tokenizer = ((yaml.safe_load(storage.read_text(config_url)) or {}).get("generator") or {}).get("tokenizer")
    return str(tokenizer) if tokenizer else None


# ----------------------------------------------------------------------------------------------
# Schedules


def guidance_scale_at(step: int, settings: SamplingConfig) -> float:
    """The authors' guidance scale at ``step`` (0-based) of ``settings.num_steps``.

    constant: g. linear: g * step / T (0 on the first step: the authors raise it after each step).
    power-cosine (MDT's): (g - 1) * (1 - cos(pi * (step / T) ** pow)) / 2 + 1, used as
    ``uncond + scale * (cond - uncond)``; the other two as ``cond + scale * (cond - uncond)``.
    """
    g, progress = settings.guidance_scale, step / settings.num_steps
    if settings.guidance_decay == "constant":
        return g
    if settings.guidance_decay == "linear":
        return progress * g
    return (g - 1.0) * (1.0 - math.cos(math.pi * progress ** settings.guidance_scale_pow)) / 2.0 + 1.0


def needs_unconditional(scale: float, settings: SamplingConfig) -> bool:
    """Whether a step with this scale uses the unconditional logits (not when they get weight 0)."""
    return settings.guidance_decay == "power-cosine" or scale != 0.0


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float, settings: SamplingConfig) -> torch.Tensor:
    if settings.guidance_decay == "power-cosine":
        return uncond + (cond - uncond) * scale
    return cond + (cond - uncond) * scale


def temperatures_at(step: int, settings: SamplingConfig) -> tuple[float, float]:
    """(softmax temperature dividing the logits, sampling temperature tau) at ``step``."""
    remaining = 1.0 - (step + 1) / settings.num_steps
    softmax = 0.5 + 0.8 * remaining if settings.softmax_temperature_annealing else 1.0
    return softmax, settings.randomize_temperature * remaining


def num_to_remask(step: int, num_tokens: int, num_steps: int) -> int:
    """The cosine schedule: floor(K * arccos(r) / (pi / 2)) tokens stay masked after step r = (s+1)/T."""
    return math.floor(num_tokens * math.acos((step + 1) / num_steps) / (math.pi / 2))


# ----------------------------------------------------------------------------------------------
# Decoding


def _gumbel(uniform: torch.Tensor) -> torch.Tensor:
    """-log(-log(u)), both logs clamped at 1e-20 as in the authors' code."""
    return -(-uniform.clamp(min=1e-20).log()).clamp(min=1e-20).log()


def _row_uniforms(seeds: Sequence[int], num_steps: int, num_tokens: int) -> torch.Tensor:
    """(B, T, 2, K) float64 uniforms in [0, 1): row i from a CPU generator seeded with seeds[i].
    [:, s, 0] draws the tokens of step s, [:, s, 1] the confidence noise of step s."""
    import torch

    rows = []
    for seed in seeds:
        rng = torch.Generator().manual_seed(int(seed))
        rows.append(torch.rand(num_steps, 2, num_tokens, generator=rng, dtype=torch.float64))
    return torch.stack(rows)


def _draw(logits: torch.Tensor, tau: float, uniform: torch.Tensor) -> torch.Tensor:
    """Token ids (...) from softmax(logits (..., V) / tau) by inverse CDF (argmax when tau is 0).

    A float32 CDF: a token's probability is off by at most one rounding of the running sum (~6e-8)."""
    import torch

    if tau == 0.0:
        return logits.argmax(dim=-1)
    cdf = torch.softmax(logits / tau, dim=-1).cumsum_(dim=-1)
    total = cdf[..., -1:].contiguous()
    drawn = torch.searchsorted(cdf, uniform.to(cdf.dtype).unsqueeze(-1) * total, right=True)
    # u * total can round up to total: then the last token of positive probability.
    return torch.minimum(drawn, torch.searchsorted(cdf, total)).squeeze(-1)


def _decode(generator: nn.Module, labels: torch.Tensor, seeds: Sequence[int], settings: SamplingConfig,
            always_unconditional: bool = False) -> torch.Tensor:
    """One batch of token ids (B, K) on the generator's device. ``always_unconditional`` runs the
    unconditional pass even when its weight is 0 (to check that skipping it changes nothing)."""
    import torch

    cfg = generator.config
    batch, length, mask_id = labels.shape[0], cfg.image_seq_len, cfg.mask_token_id
    device = labels.device
    uniforms = _row_uniforms(seeds, settings.num_steps, length)
    draws = uniforms[:, :, 0].to(device)                         # (B, T, K)
    confidence_noise = _gumbel(uniforms[:, :, 1]).float().to(device)
    ids = torch.full((batch, length), mask_id, dtype=torch.long, device=device)
    both_labels = torch.cat([labels, labels])
    drop = torch.cat([torch.zeros(batch, dtype=torch.bool), torch.ones(batch, dtype=torch.bool)]).to(device)
    for step in range(settings.num_steps):
        scale = guidance_scale_at(step, settings)
        # Only masked positions draw a token: everything after the forward pass runs on those.
        is_mask = ids == mask_id
        if always_unconditional or needs_unconditional(scale, settings):
            # One forward over [conditional; unconditional] rows (the latter with the null class).
            cond, uncond = generator(torch.cat([ids, ids]), both_labels, drop).float().chunk(2)
            logits = guide(cond[is_mask], uncond[is_mask], scale, settings)
        else:
            logits = generator(ids, labels).float()[is_mask]
        softmax_temperature, tau = temperatures_at(step, settings)
        if softmax_temperature != 1.0:
            logits = logits / softmax_temperature
        drawn = _draw(logits, tau, draws[:, step][is_mask])
        sampled = ids.masked_scatter(is_mask, drawn)
        if step == settings.num_steps - 1:
            return sampled
        # Re-mask the least confident new tokens (confidence: the drawn token's tempered logit plus
        # noise); tokens fixed earlier have infinite confidence.
        confidence = torch.full((batch, length), torch.inf, device=device)
        confidence = confidence.masked_scatter(is_mask, logits.gather(-1, drawn.unsqueeze(-1)).squeeze(-1))
        confidence = confidence + tau * confidence_noise[:, step]
        keep_masked = torch.full((batch,), num_to_remask(step, length, settings.num_steps), device=device)
        # Per row (the authors take row 0's count; all rows agree unless confidences tie).
        keep_masked = torch.minimum(is_mask.sum(-1) - 1, keep_masked).clamp_(min=1)
        cutoff = confidence.sort(dim=-1).values.gather(-1, (keep_masked - 1).unsqueeze(-1))
        ids = torch.where(confidence <= cutoff, mask_id, sampled)
    raise AssertionError("unreachable")


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@contextlib.contextmanager
def _evaluating(*modules: nn.Module) -> Iterator[None]:
    """eval() for the duration, then each module's previous mode."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def _check_inputs(labels: torch.Tensor, seeds: Sequence[int]) -> None:
    if labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    if len(seeds) != labels.shape[0]:
        raise ValueError(f"one seed per sample: {labels.shape[0]} labels but {len(seeds)} seeds")
    if any(not 0 <= int(s) < 2**64 for s in seeds):
        raise ValueError("seeds must be in [0, 2**64)")


def _padded_batches(labels: torch.Tensor, seeds: Sequence[int],
                    batch_size: int) -> Iterator[tuple[torch.Tensor, list[int], int]]:
    """(labels, seeds, real rows) of batches of exactly ``batch_size`` rows: the last one is filled
    up with copies of its last row, so every batch has the same shape wherever a sample falls."""
    import torch

    for start in range(0, labels.shape[0], batch_size):
        rows, row_seeds = labels[start:start + batch_size], [int(s) for s in seeds[start:start + batch_size]]
        real = len(row_seeds)
        if real < batch_size:
            rows = torch.cat([rows, rows[-1:].expand(batch_size - real)])
            row_seeds += row_seeds[-1:] * (batch_size - real)
        yield rows, row_seeds, real


def sample_tokens(generator: nn.Module, labels: torch.Tensor, seeds: Sequence[int],
                  settings: SamplingConfig) -> torch.Tensor:
    """Token ids (N, K) of class-conditional samples, on the device of ``labels``.

    ``labels`` (N,) are class indices and ``seeds`` N integers in [0, 2**64): sample i depends only on
    (labels[i], seeds[i]) and the settings, not on N or on its neighbours. The generator runs on its
    own device, in eval mode, without gradients, on batches of exactly ``settings.batch_size`` rows
    (a short last batch is padded), so every sample meets the same kernels.
    """
    import torch

    _check_inputs(labels, seeds)
    device = _device_of(generator)
    out = [torch.empty(0, generator.config.image_seq_len, dtype=torch.long, device=labels.device)]
    with _evaluating(generator), torch.inference_mode():
        for rows, row_seeds, real in _padded_batches(labels, seeds, settings.batch_size):
            out.append(_decode(generator, rows.to(device), row_seeds, settings)[:real].to(labels.device))
    return torch.cat(out)


def check_pair(generator: nn.Module, tokenizer: nn.Module) -> None:
    """The tokenizer decodes the generator's tokens (same length and codebook, pixel output)."""
    g, t = generator.config, tokenizer.config
    if t.quantize_mode != "vq" or not tokenizer.outputs_pixels:
        raise ValueError("the tokenizer must be a VQ tokenizer that decodes to pixels (not a VAE or a stage-1 "
                         "proxy-code model)")
    if (g.image_seq_len, g.codebook_size) != (t.num_latent_tokens, t.codebook_size):
        raise ValueError(f"generator makes {g.image_seq_len} tokens of a {g.codebook_size}-entry codebook but the "
                         f"tokenizer decodes {t.num_latent_tokens} tokens of {t.codebook_size}")


def sample_images(generator: nn.Module, tokenizer: nn.Module, labels: torch.Tensor, seeds: Sequence[int],
                  settings: SamplingConfig) -> torch.Tensor:
    """uint8 images (N, H, W, 3) of :func:`sample_tokens` decoded by ``tokenizer``, on the device of
    ``labels`` (decoder output clamped to [0, 1], times 255, rounded).

    Decoded in the same padded batches as the tokens: the pixel decoder's float rounding depends on
    the batch shape (a last bit can flip a uint8 level), never on a sample's neighbours. On a
    multi-threaded CPU keep ``batch_size`` a multiple of the thread count: oneDNN otherwise splits
    one image over two threads, rounding it differently at different positions.
    """
    import torch

    check_pair(generator, tokenizer)
    _check_inputs(labels, seeds)
    size = tokenizer.config.image_size
    generator_device, tokenizer_device = _device_of(generator), _device_of(tokenizer)
    out = [torch.empty(0, size, size, 3, dtype=torch.uint8, device=labels.device)]
    with _evaluating(generator, tokenizer), torch.inference_mode():
        for rows, row_seeds, real in _padded_batches(labels, seeds, settings.batch_size):
            tokens = _decode(generator, rows.to(generator_device), row_seeds, settings).to(tokenizer_device)
            images = tokenizer.decode_tokens(tokens).float().clamp(0, 1).mul(255).round().to(torch.uint8)
            out.append(images[:real].permute(0, 2, 3, 1).to(labels.device))
    return torch.cat(out).contiguous()


# ----------------------------------------------------------------------------------------------
# Command line


@dataclass
class SampleConfig:
    experiment: Optional[str] = None
    generator: str = MISSING            # generator export dir (local / s3://) or hub id
    tokenizer: Optional[str] = None     # null: generator.tokenizer of the generator run's config.yaml
    output: str = MISSING               # folder for samples.npz and samples.png (local / s3://)
    num_samples: int = 64
    labels: Optional[list[int]] = None  # null: sample i gets class i % num_classes; else labels[i % len]
    seed: int = 0                       # sample i gets seed sample_seed(seed, i) (as the generation eval)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    grid_images: int = 64               # first samples in samples.png (0: no grid)
    grid_columns: int = 8
    device: str = "auto"                # auto | cpu | cuda
    progress: bool = True

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ConfigError("num_samples", f"must be >= 1, got {self.num_samples}")
        if self.labels is not None and not self.labels:
            raise ConfigError("labels", "give at least one class, or null for all classes in turn")
        if self.grid_images < 0 or self.grid_columns < 1:
            raise ConfigError("grid_images", "grid_images >= 0 and grid_columns >= 1 required")
        if self.device not in DEVICES:
            raise ConfigError("device", f"{self.device!r} is not a valid choice; valid: {', '.join(DEVICES)}")


class _NpzWriter:
    """``np.savez`` layout written incrementally: stored (uncompressed) ``arr_0.npy`` whose rows are
    appended batch by batch, then small arrays; the file appears (atomically) on close."""

    def __init__(self, url: str, count: int, row_shape: tuple[int, ...], dtype: np.dtype) -> None:
        import zipfile

        from cluster import storage

        self._file_cm = storage.open_write(url)
        self._zip = zipfile.ZipFile(self._file_cm.__enter__(), "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._member = self._zip.open("arr_0.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                  "shape": (count, *row_shape)}
        np.lib.format.write_array_header_1_0(self._member, header)
        self._row_shape, self._dtype, self._left = tuple(row_shape), np.dtype(dtype), count

    def append(self, rows: np.ndarray) -> None:
        if rows.shape[1:] != self._row_shape or rows.dtype != self._dtype or len(rows) > self._left:
            raise ValueError(f"rows {rows.dtype} {rows.shape} do not fit arr_0")
        self._member.write(np.ascontiguousarray(rows).tobytes())
        self._left -= len(rows)

    def close(self, **arrays: np.ndarray) -> None:
        if self._left:
            raise ValueError(f"arr_0 is {self._left} rows short")
        self._member.close()
        for name, array in arrays.items():
            with self._zip.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
        self._zip.close()
        self._file_cm.__exit__(None, None, None)

    def abort(self, exc: BaseException) -> None:
        with contextlib.suppress(Exception):
            self._zip.close()
        with contextlib.suppress(type(exc)):
            self._file_cm.__exit__(type(exc), exc, exc.__traceback__)  # the object is not written


def sample_to_store(cfg: SampleConfig) -> dict:
    """Draw ``cfg.num_samples`` images and write ``samples.npz`` and ``samples.png``; returns a summary."""
    import time

    import torch
    from tqdm import tqdm

    from cluster import storage
    from trainer.models import load_generator, load_tokenizer
    from trainer.tracking import image_grid, write_png

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is visible")
    tokenizer_url = cfg.tokenizer or run_tokenizer(cfg.generator)
    if not tokenizer_url:
        raise ValueError(f"no tokenizer known for {cfg.generator} (its run's config.yaml names none): "
                         "set tokenizer=<tokenizer export>")
    generator = load_generator(cfg.generator).to(device).eval()
    tokenizer = load_tokenizer(tokenizer_url).to(device).eval()
    check_pair(generator, tokenizer)
    num_classes = generator.config.condition_num_classes
    if cfg.labels is not None and any(not 0 <= label < num_classes for label in cfg.labels):
        raise ValueError(f"labels must be class indices in [0, {num_classes}), got {list(cfg.labels)}")
    labels = torch.tensor([cfg.labels[i % len(cfg.labels)] if cfg.labels else sample_label(i, num_classes)
                           for i in range(cfg.num_samples)], dtype=torch.long)
    seeds = [sample_seed(cfg.seed, i) for i in range(cfg.num_samples)]
    size = tokenizer.config.image_size
    npz_url = storage.join(cfg.output, "samples.npz")
    writer = _NpzWriter(npz_url, cfg.num_samples, (size, size, 3), np.dtype(np.uint8))
    grid: list[np.ndarray] = []
    started = time.perf_counter()
    try:
        with tqdm(total=cfg.num_samples, unit="img", desc="sampling", file=sys.stderr,
                  disable=not cfg.progress) as bar:
            for start in range(0, cfg.num_samples, cfg.sampling.batch_size):
                end = min(start + cfg.sampling.batch_size, cfg.num_samples)
                images = sample_images(generator, tokenizer, labels[start:end].to(device), seeds[start:end],
                                       cfg.sampling).cpu().numpy()
                writer.append(images)
                grid.extend(images[:max(0, cfg.grid_images - len(grid))])
                bar.update(end - start)
        seconds = time.perf_counter() - started
        writer.close(labels=labels.numpy())
    except BaseException as err:
        writer.abort(err)
        raise
    summary = {"samples": cfg.num_samples, "npz": npz_url, "tokenizer": tokenizer_url, "seconds": seconds,
               "images_per_s": cfg.num_samples / seconds if seconds > 0 else None}
    if grid:
        rows = [np.stack(grid[i:i + cfg.grid_columns]) for i in range(0, len(grid), cfg.grid_columns)]
        summary["grid"] = write_png(storage.join(cfg.output, "samples.png"), image_grid(rows))
    return summary


def check_inputs(cfg: SampleConfig) -> None:
    """Before any weights are loaded: the generator and the tokenizer (named, or the one the
    generator's run trained on) exist, and the output can be written (cluster/preflight.py)."""
    from cluster import preflight

    preflight.require_model("generator", cfg.generator)
    if cfg.tokenizer:
        preflight.require_model("tokenizer", cfg.tokenizer)
    elif not preflight.looks_like_hub_id(cfg.generator) and (found := run_tokenizer(cfg.generator)):
        preflight.require_model("tokenizer", found)
    preflight.require_writable("output", cfg.output)


def main(argv: list[str] | None = None) -> int:
    cfg = load_config("sample", SampleConfig, argv, description=__doc__ or "")
    try:
        check_inputs(cfg)
    except ConfigError as err:  # cluster.preflight.BadInput: one line naming the key
        print(str(err), file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        summary = sample_to_store(cfg)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {summary['samples']} samples to {summary['npz']} ({summary['images_per_s']:.2f} images/s)"
          + (f" and {summary['grid']}" if "grid" in summary else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
