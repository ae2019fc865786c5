"""Sampling (trainer.sample) with tiny random models on the CPU: per-sample reproducibility, the
decoding schedule, classifier-free guidance, the categorical draw, and the command line end to end
on local and S3 exports."""

from __future__ import annotations

import io
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO_ROOT
from trainer.sample import SamplingConfig

NUM_CLASSES, NUM_TOKENS, CODEBOOK, IMAGE_SIZE = 3, 8, 16, 32


def tiny_generator(seed: int = 1, model_type: str = "ViT"):
    from trainer.models import GeneratorConfig, build_generator

    torch.manual_seed(seed)
    cfg = GeneratorConfig(model_type=model_type, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, image_seq_len=NUM_TOKENS, condition_num_classes=NUM_CLASSES,
                          codebook_size=CODEBOOK)
    return build_generator(cfg).eval()


def tiny_tokenizer(seed: int = 0):
    from trainer.models import PixelDecoderConfig, TiTokConfig, build_tokenizer

    torch.manual_seed(seed)
    cfg = TiTokConfig(image_size=IMAGE_SIZE, patch_size=8, num_latent_tokens=NUM_TOKENS, codebook_size=CODEBOOK,
                      token_size=4, vit_enc_model_size=None, vit_dec_model_size=None, vit_enc_width=32,
                      vit_enc_num_layers=1, vit_enc_num_heads=2, vit_dec_width=32, vit_dec_num_layers=1,
                      vit_dec_num_heads=2,
                      pixel_decoder=PixelDecoderConfig(hidden_channels=32, channel_mult=[1, 1, 1, 1], num_res_blocks=1,
                                                       z_channels=8, codebook_size=32))
    return build_tokenizer(cfg).eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: extra threads only add synchronisation, which stalls badly on a loaded machine
    (60 s instead of 6 for this file on 2 busy cores). Tests that need threads set them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    return tiny_generator(), tiny_tokenizer()


def labels_and_seeds(n: int, first_seed: int = 100) -> tuple[torch.Tensor, list[int]]:
    return torch.arange(n) % NUM_CLASSES, [first_seed + 7 * i for i in range(n)]


class ForwardLog:
    """Records the ids and batch size of every generator forward (a hook: the model runs as is)."""

    def __init__(self, generator) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._handle = generator.register_forward_pre_hook(self._record)

    def _record(self, module, args) -> None:
        tokens, _, drop = (*args, None)[:3]
        self.calls.append((tokens.clone(), None if drop is None else drop.clone()))

    def close(self) -> None:
        self._handle.remove()


# ----------------------------------------------------------------------------------------------
# Reproducibility


def test_same_seed_gives_the_same_images_and_other_seeds_others(models) -> None:
    from trainer.sample import sample_images

    generator, tokenizer = models
    labels, seeds = labels_and_seeds(6)
    settings = SamplingConfig(num_steps=4, batch_size=6)
    first = sample_images(generator, tokenizer, labels, seeds, settings)
    assert first.dtype == torch.uint8 and first.shape == (6, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert first.device == labels.device and first.is_contiguous()
    assert torch.equal(first, sample_images(generator, tokenizer, labels, seeds, settings))
    other = sample_images(generator, tokenizer, labels, [s + 1 for s in seeds], settings)
    assert all(not torch.equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("model_type", ["ViT", "UViT"])
def test_a_sample_depends_only_on_its_label_and_seed(model_type: str) -> None:
    """Sample i's tokens are the same in one batch of 10, in batches of 4 or 1, alone, and as part of
    a different list (another position, other neighbours)."""
    from trainer.sample import sample_tokens

    generator = tiny_generator(2, model_type)
    labels, seeds = labels_and_seeds(10)
    settings = SamplingConfig(num_steps=5, guidance_decay="linear", guidance_scale=3.0, randomize_temperature=4.5,
                              batch_size=10)
    together = sample_tokens(generator, labels, seeds, settings)
    for batch_size in (4, 1):
        split = SamplingConfig(**{**settings.__dict__, "batch_size": batch_size})
        assert torch.equal(sample_tokens(generator, labels, seeds, split), together)
    small = SamplingConfig(**{**settings.__dict__, "batch_size": 2})
    for i in (0, 7, 9):
        assert torch.equal(sample_tokens(generator, labels[i:i + 1], seeds[i:i + 1], small), together[i:i + 1])
    order = [9, 3, 7]
    shuffled = sample_tokens(generator, labels[order], [seeds[i] for i in order], small)
    assert torch.equal(shuffled, together[order])
    assert len({tuple(row.tolist()) for row in together}) == 10  # the seeds do differ


@pytest.mark.parametrize("threads", [1, 2])
def test_images_are_the_same_alone_or_in_a_batch(models, threads: int) -> None:
    """Images: bit-identical wherever a sample falls, at one batch_size (the decoder's rounding
    depends on the batch shape, which padding keeps fixed; with 2 threads the batch of 4 splits
    evenly, see sample_images)."""
    from trainer.sample import sample_images

    generator, tokenizer = models
    labels, seeds = labels_and_seeds(6)
    settings = SamplingConfig(num_steps=2, batch_size=4)
    torch.set_num_threads(threads)
    try:
        together = sample_images(generator, tokenizer, labels, seeds, settings)
        parts = [sample_images(generator, tokenizer, labels[a:b], seeds[a:b], settings) for a, b in ((0, 3), (3, 4),
                                                                                                     (4, 6))]
        alone = sample_images(generator, tokenizer, labels[5:6], seeds[5:6], settings)
    finally:
        torch.set_num_threads(1)
    assert torch.equal(torch.cat(parts), together)
    assert torch.equal(alone, together[5:6])


def test_models_keep_their_mode(models) -> None:
    from trainer.sample import sample_images

    generator, tokenizer = models
    generator.train(), tokenizer.train()
    try:
        labels, seeds = labels_and_seeds(2)
        sample_images(generator, tokenizer, labels, seeds, SamplingConfig(num_steps=2, batch_size=2))
        assert generator.training and tokenizer.training
    finally:
        generator.eval(), tokenizer.eval()


# ----------------------------------------------------------------------------------------------
# The decoding schedule


@pytest.mark.parametrize("num_steps", [1, 2, 8, 12])
def test_nothing_is_masked_after_the_last_step_and_masking_follows_the_cosine_schedule(models, num_steps) -> None:
    from trainer.sample import num_to_remask, sample_tokens

    generator, _ = models
    labels, seeds = labels_and_seeds(5)
    settings = SamplingConfig(num_steps=num_steps, guidance_decay="constant", guidance_scale=2.0, batch_size=5)
    log = ForwardLog(generator)
    try:
        tokens = sample_tokens(generator, labels, seeds, settings)
    finally:
        log.close()
    assert tokens.shape == (5, NUM_TOKENS) and tokens.dtype == torch.long
    assert ((tokens >= 0) & (tokens < CODEBOOK)).all()  # never the mask id
    # The ids the generator saw before each step: all masked first, then the arccos schedule
    # (at least 1, at most one fewer than before), the same in every row; fixed tokens never change.
    masked: list[int] = []
    previous = None
    assert len(log.calls) == num_steps
    for step, (ids, _) in enumerate(log.calls):
        ids = ids[:5]  # the conditional half
        counts = (ids == generator.mask_token_id).sum(-1)
        assert (counts == counts[0]).all()
        expected = NUM_TOKENS if step == 0 else max(1, min(masked[-1] - 1, num_to_remask(step - 1, NUM_TOKENS,
                                                                                         num_steps)))
        masked.append(int(counts[0]))
        assert masked[-1] == expected, (step, masked)
        if previous is not None:
            fixed = previous != generator.mask_token_id
            assert torch.equal(ids[fixed], previous[fixed])
        previous = ids
    if num_steps > 1:
        fixed = previous != generator.mask_token_id
        assert torch.equal(tokens[fixed], previous[fixed])


def test_num_to_remask_is_the_arccos_schedule() -> None:
    from trainer.sample import num_to_remask

    # K = 32, T = 8 (TiTok-L-32): floor(32 * arccos(r) / (pi / 2)) for r = 1/8 .. 8/8.
    assert [num_to_remask(s, 32, 8) for s in range(8)] == [29, 26, 24, 21, 18, 14, 10, 0]
    assert num_to_remask(0, 128, 64) == math.floor(128 * math.acos(1 / 64) / (math.pi / 2)) == 126


def test_temperatures_anneal_as_published() -> None:
    from trainer.sample import temperatures_at

    s = SamplingConfig(num_steps=8, randomize_temperature=9.5)
    assert temperatures_at(0, s) == pytest.approx((0.5 + 0.8 * 7 / 8, 9.5 * 7 / 8))
    assert temperatures_at(7, s) == (0.5, 0.0)  # greedy last step
    s.softmax_temperature_annealing = False
    assert temperatures_at(3, s) == pytest.approx((1.0, 9.5 * 4 / 8))


# ----------------------------------------------------------------------------------------------
# Guidance


@pytest.mark.parametrize("decay, scale, pow_, expected", [
    ("constant", 4.5, 3.0, {0: 4.5, 3: 4.5, 7: 4.5}),
    ("linear", 4.5, 3.0, {0: 0.0, 1: 4.5 / 8, 4: 2.25, 7: 4.5 * 7 / 8}),
    # MDT's power-cosine: (g-1) (1 - cos(pi (s/T)^pow)) / 2 + 1; S-128: g=6.9, T=64, pow 3.
    ("power-cosine", 6.9, 3.0, {0: 1.0, 32: 5.9 * (1 - math.cos(math.pi / 8)) / 2 + 1,
                                48: 5.9 * (1 - math.cos(math.pi * 0.421875)) / 2 + 1,
                                63: 5.9 * (1 - math.cos(math.pi * (63 / 64) ** 3)) / 2 + 1}),
    ("power-cosine", 6.9, 1.0, {16: 5.9 * (1 - math.cos(math.pi / 4)) / 2 + 1}),
])
def test_guidance_schedules_give_the_published_scale(decay, scale, pow_, expected) -> None:
    from trainer.sample import guidance_scale_at

    steps = 64 if decay == "power-cosine" else 8
    settings = SamplingConfig(num_steps=steps, guidance_scale=scale, guidance_decay=decay, guidance_scale_pow=pow_)
    for step, value in expected.items():
        assert guidance_scale_at(step, settings) == pytest.approx(value, rel=1e-12, abs=1e-12), step
    assert 6.8 < guidance_scale_at(63, SamplingConfig(num_steps=64, guidance_scale=6.9,
                                                      guidance_decay="power-cosine")) < 6.9


def test_guidance_combines_cond_and_uncond_as_the_authors() -> None:
    from trainer.sample import guide

    cond, uncond = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    linear = SamplingConfig(guidance_decay="linear")
    assert torch.allclose(guide(cond, uncond, 1.5, linear), cond + 1.5 * (cond - uncond))
    cosine = SamplingConfig(guidance_decay="power-cosine")
    assert torch.allclose(guide(cond, uncond, 1.5, cosine), uncond + 1.5 * (cond - uncond))
    assert torch.allclose(guide(cond, uncond, 1.0, cosine), cond)


def test_guidance_zero_skips_the_unconditional_pass_and_changes_nothing(models) -> None:
    from trainer.sample import _decode, sample_tokens

    generator, _ = models
    labels, seeds = labels_and_seeds(6)
    settings = SamplingConfig(num_steps=5, guidance_scale=0.0, guidance_decay="constant", batch_size=6)
    log = ForwardLog(generator)
    try:
        skipped = sample_tokens(generator, labels, seeds, settings)
    finally:
        log.close()
    assert [ids.shape[0] for ids, _ in log.calls] == [6] * 5  # conditional rows only
    with torch.inference_mode():
        weighted_zero = _decode(generator, labels, seeds, settings, always_unconditional=True)
    assert torch.equal(skipped, weighted_zero)


def test_guided_steps_run_one_forward_over_cond_and_null_class_rows(models) -> None:
    from trainer.sample import sample_tokens

    generator, _ = models
    labels, seeds = labels_and_seeds(4)
    log = ForwardLog(generator)
    try:
        sample_tokens(generator, labels, seeds, SamplingConfig(num_steps=4, guidance_scale=2.0, batch_size=4))  # linear
    finally:
        log.close()
    # Linear decay: scale 0 on step 0 (conditional only), then one batched [cond; uncond] call.
    assert [ids.shape[0] for ids, _ in log.calls] == [4, 8, 8, 8]
    for ids, drop in log.calls[1:]:
        assert torch.equal(ids[:4], ids[4:]) and drop.tolist() == [False] * 4 + [True] * 4
    assert log.calls[0][1] is None


def test_guidance_changes_the_samples(models) -> None:
    from trainer.sample import sample_tokens

    generator, _ = models
    labels, seeds = labels_and_seeds(8)
    plain = sample_tokens(generator, labels, seeds, SamplingConfig(num_steps=4, guidance_scale=0.0, batch_size=8))
    guided = sample_tokens(generator, labels, seeds, SamplingConfig(num_steps=4, guidance_scale=20.0,
                                                                    guidance_decay="constant", batch_size=8))
    assert not torch.equal(plain, guided)


def spec_greedy_tokens(generator, label: int, s: SamplingConfig) -> torch.Tensor:
    """The authors' generate() (docs/checkpoint_format.md §4) written out for one sample at temperature 0
    (nothing random): separate cond/uncond passes, the authors' lagging linear scale, argmax draws,
    row-0 re-mask count."""
    mask_id, length, steps = generator.mask_token_id, generator.config.image_seq_len, s.num_steps
    ids, labels = torch.full((1, length), mask_id), torch.tensor([label])
    scale = s.guidance_scale if s.guidance_decay == "constant" else 0.0
    for step in range(steps):
        ratio = (step + 1) / steps
        is_mask = ids == mask_id
        if s.guidance_decay == "power-cosine":
            scale = (s.guidance_scale - 1) * (1 - math.cos(math.pi * (step / steps) ** s.guidance_scale_pow)) / 2 + 1
        logits = generator(ids, labels)
        if scale != 0:
            cond, uncond = logits, generator(ids, labels, torch.ones(1, dtype=torch.bool))
            logits = uncond + (cond - uncond) * scale if s.guidance_decay == "power-cosine" else \
                cond + (cond - uncond) * scale
        logits = logits / (0.5 + 0.8 * (1 - ratio))
        sampled = torch.where(is_mask, logits.argmax(-1), ids)
        confidence = torch.where(is_mask, logits.gather(-1, sampled.clamp(max=CODEBOOK - 1)[..., None])[..., 0],
                                 torch.inf)
        mask_len = max(1, min(int(is_mask[0].sum()) - 1, math.floor(length * math.acos(ratio) / (math.pi / 2))))
        cutoff = confidence.sort(-1).values[:, mask_len - 1:mask_len]
        ids = sampled if step == steps - 1 else torch.where(confidence <= cutoff, mask_id, sampled)
        if s.guidance_decay == "linear":
            scale = ratio * s.guidance_scale
    return ids


@pytest.mark.parametrize("model_type, decay, scale, steps", [
    ("ViT", "constant", 3.0, 4), ("ViT", "linear", 4.5, 8), ("UViT", "power-cosine", 6.9, 12),
    ("ViT", "constant", 0.0, 5)])
def test_greedy_decoding_equals_the_spec_loop(model_type: str, decay: str, scale: float, steps: int) -> None:
    """At temperature 0 (argmax draws, no noise) the batched sampler and that loop, one sample
    at a time, give the same tokens. Weights of std 0.5 (not 0.02) so that the class matters."""
    from trainer.sample import sample_tokens

    generator = tiny_generator(3, model_type)
    with torch.no_grad():
        for weight in (p for p in generator.parameters() if p.dim() > 1):
            weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(weight.numel()))
    settings = SamplingConfig(num_steps=steps, guidance_scale=scale, guidance_decay=decay, randomize_temperature=0.0,
                              batch_size=NUM_CLASSES)
    labels = torch.arange(NUM_CLASSES)
    ours = sample_tokens(generator, labels, [0] * NUM_CLASSES, settings)
    with torch.inference_mode():
        expected = torch.cat([spec_greedy_tokens(generator, int(label), settings) for label in labels])
    assert torch.equal(ours, expected)
    assert len({tuple(row.tolist()) for row in ours}) > 1  # the classes do steer the samples


# ----------------------------------------------------------------------------------------------
# The categorical draw


def test_inverse_cdf_draw_follows_softmax_over_temperature() -> None:
    """Inverse-CDF draws from fixed logits: frequencies match softmax(logits / tau) (the distribution
    of the authors' argmax(logits + tau * Gumbel)); tau 0 is argmax."""
    from trainer.sample import _draw

    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, -30.0]]).expand(20000, 5)
    uniform = torch.rand(20000, generator=generator, dtype=torch.float64)
    for tau in (0.5, 1.0, 3.0):
        draws = _draw(logits.unsqueeze(0), tau, uniform.unsqueeze(0))[0]
        freq = torch.bincount(draws, minlength=5).double() / draws.numel()
        probs = torch.softmax(logits[0].double() / tau, -1)
        # 4.5 standard errors of a binomial proportion
        assert ((freq - probs).abs() <= 4.5 * (probs * (1 - probs) / draws.numel()).sqrt() + 1e-12).all(), tau
    assert (_draw(logits.unsqueeze(0), 0.0, uniform.unsqueeze(0)) == 0).all()
    # The edges of [0, 1): never an index past the codebook, never a zero-probability entry.
    edges = torch.tensor([[0.0, 1.0 - 2**-53]], dtype=torch.float64)
    assert _draw(logits[:1].expand(2, 5).unsqueeze(0), 1e-3, edges).tolist() == [[0, 0]]
    assert _draw(torch.tensor([[[0.0, -math.inf, 0.0]]]).expand(1, 2, 3), 1.0, edges).tolist() == [[0, 2]]


def test_bad_inputs_are_refused(models) -> None:
    from trainer.sample import sample_images, sample_tokens

    generator, tokenizer = models
    with pytest.raises(ValueError, match="one seed per sample"):
        sample_tokens(generator, torch.tensor([0, 1]), [1], SamplingConfig())
    with pytest.raises(ValueError, match="seeds"):
        sample_tokens(generator, torch.tensor([0]), [-1], SamplingConfig())
    other = tiny_tokenizer()
    other.config.num_latent_tokens = 4
    with pytest.raises(ValueError, match="tokenizer decodes 4 tokens"):
        sample_images(generator, other, torch.tensor([0]), [1], SamplingConfig())


def test_sampling_config_rejects_unknown_schedules() -> None:
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="guidance_decay.*valid: constant, linear, power-cosine"):
        SamplingConfig(guidance_decay="cosine")


# ----------------------------------------------------------------------------------------------
# Command line


def write_exports(root: str, generator, tokenizer) -> tuple[str, str]:
    """A tokenizer export and a generator run whose resolved config names it (as the trainer writes)."""
    import yaml

    from cluster import storage
    from trainer.checkpoint import write_export
    from trainer.models import generator_config_to_json, tokenizer_config_to_json

    tokenizer_url = write_export(storage.join(root, "tok"), 40, tokenizer.state_dict(),
                                 tokenizer_config_to_json(tokenizer.config), {"stage": "tokenizer"})
    run_dir = storage.join(root, "gen")
    generator_url = write_export(run_dir, 200, generator.state_dict(), generator_config_to_json(generator.config),
                                 {"stage": "generator"})
    storage.write_text(storage.join(run_dir, "config.yaml"), yaml.safe_dump({"generator": {"tokenizer": tokenizer_url}}))
    return generator_url, tokenizer_url


def test_command_line_writes_npz_and_grid(store_root: str, models, capsys) -> None:
    from cluster import storage
    from evals.npz import array_info, read_rows
    from trainer.sample import main, sample_images, sample_label, sample_seed

    generator, tokenizer = models
    generator_url, _ = write_exports(store_root, generator, tokenizer)
    output = storage.join(store_root, "samples")
    # No tokenizer given: the one named in the generator run's config.yaml.
    assert main([f"generator={generator_url}", f"output={output}", "num_samples=7", "seed=5",
                 "sampling.num_steps=3", "sampling.batch_size=3", "grid_images=5", "grid_columns=2", "device=cpu",
                 "progress=false"]) == 0
    assert "wrote 7 samples" in capsys.readouterr().out
    with np.load(io.BytesIO(storage.read_bytes(storage.join(output, "samples.npz")))) as npz:
        images, labels = npz["arr_0"], npz["labels"]
    assert images.dtype == np.uint8 and images.shape == (7, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert labels.tolist() == [sample_label(i, NUM_CLASSES) for i in range(7)]
    # Exactly the samples the library (and the generation eval) draws for these indices and seed.
    expected = sample_images(generator, tokenizer, torch.tensor(labels), [sample_seed(5, i) for i in range(7)],
                             SamplingConfig(num_steps=3, batch_size=3))
    assert np.array_equal(images, expected.numpy())
    # Stored uncompressed: the evals read row ranges of it directly.
    npz_url = storage.join(output, "samples.npz")
    assert array_info(npz_url, "arr_0").data_offset is not None
    assert np.array_equal(read_rows(npz_url, "arr_0", 2, 5), images[2:5])
    from PIL import Image

    grid = Image.open(io.BytesIO(storage.read_bytes(storage.join(output, "samples.png"))))
    assert grid.size == (2 * (IMAGE_SIZE + 2) + 2, 3 * (IMAGE_SIZE + 2) + 2)  # 5 images, 2 per row


def test_command_line_labels_and_explicit_tokenizer(tmp_path, models) -> None:
    from trainer.sample import main

    generator, tokenizer = models
    generator_url, tokenizer_url = write_exports(str(tmp_path), generator, tokenizer)
    out = tmp_path / "labelled"
    assert main([f"generator={generator_url}", f"tokenizer={tokenizer_url}", f"output={out}", "num_samples=5",
                 "labels=[2,0]", "sampling.num_steps=2", "grid_images=0", "progress=false"]) == 0
    with np.load(out / "samples.npz") as npz:
        assert npz["labels"].tolist() == [2, 0, 2, 0, 2] and npz["arr_0"].shape[0] == 5
    assert not (out / "samples.png").exists()
    assert main([f"generator={generator_url}", f"output={out}", "labels=[3]", "progress=false"]) == 1


def test_command_line_without_a_known_tokenizer_fails_clearly(tmp_path, models, capsys) -> None:
    from trainer.checkpoint import write_export
    from trainer.models import generator_config_to_json
    from trainer.sample import main

    generator, _ = models
    url = write_export(str(tmp_path / "run"), 1, generator.state_dict(), generator_config_to_json(generator.config), {})
    assert main([f"generator={url}", f"output={tmp_path / 'out'}", "progress=false"]) == 1
    assert "set tokenizer=<tokenizer export>" in capsys.readouterr().err
    assert not (tmp_path / "out" / "samples.npz").exists()


def test_help_and_bad_settings() -> None:
    run = [sys.executable, "-m", "trainer.sample"]
    shown = subprocess.run([*run, "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "sampling:" in shown.stdout and "guidance_decay: linear" in shown.stdout and "num_samples" in shown.stdout
    bad = subprocess.run([*run, "generator=g", "output=o", "sampling.guidance_decay=cosine"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "guidance_decay" in bad.stderr and "power-cosine" in bad.stderr
