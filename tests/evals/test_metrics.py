"""The numeric core: sufficient statistics, FID/IS formulas, PSNR/SSIM, Inception weight loading.

Each quantity is checked against an independent computation (numpy/scipy formulas, a reference
implementation written differently) or against torch-fidelity itself.
"""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch

from evals.inception import (InceptionFeatures, InceptionWeightsError, build_extractor, load_inception_weights,
                             tensor_fingerprint)
from evals.stats import FeatureSums, FidStats, frechet_distance, inception_score, load_stats
from evals.quality import psnr, ssim


def test_merged_sums_equal_one_pass_mean_and_covariance() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(0.3, 0.2, (301, 16)).astype(np.float32) + rng.uniform(0, 1, 16).astype(np.float32)
    parts = [FeatureSums(16) for _ in range(3)]
    for part, rows in zip(parts, np.array_split(features, [7, 150])):
        for batch in np.array_split(rows, 3):
            part.add(torch.from_numpy(batch))
    stats = FeatureSums.merged(parts, 16).to_stats()
    assert stats.count == 301
    np.testing.assert_allclose(stats.mu, features.astype(np.float64).mean(0), rtol=1e-13)
    np.testing.assert_allclose(stats.sigma, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="at least 2"):
        FeatureSums(16).to_stats()
    with pytest.raises(ValueError, match=r"\[B, 16\]"):
        parts[0].add(torch.zeros(2, 15))


def test_frechet_distance_matches_the_sqrtm_formula() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(40, 12)), rng.normal(0.5, 1.5, size=(50, 12))
    s1 = FidStats(a.mean(0), np.cov(a, rowvar=False), 40)
    s2 = FidStats(b.mean(0), np.cov(b, rowvar=False), 50)
    covmean = scipy.linalg.sqrtm(s1.sigma @ s2.sigma).real
    expected = np.sum((s1.mu - s2.mu) ** 2) + np.trace(s1.sigma + s2.sigma - 2 * covmean)
    assert frechet_distance(s1, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(s1, s1) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(s1, FidStats(np.zeros(3), np.eye(3), 2))


def test_inception_score_matches_the_formula() -> None:
    rng = np.random.default_rng(2)
    logits = torch.from_numpy(rng.normal(0, 3, (200, 30)).astype(np.float32))
    mean, std = inception_score(logits)
    # Independent: the same fixed permutation (numpy RandomState(2020)), ten splits, exp(E KL(p || p_split)).
    p = torch.softmax(logits.double(), 1).numpy()[np.random.RandomState(2020).permutation(200)]
    scores = []
    for part in np.array_split(p, 10):
        kl = (part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1).mean()
        scores.append(np.exp(kl))
    assert mean == pytest.approx(np.mean(scores), rel=1e-12)
    assert std == pytest.approx(np.std(scores), rel=1e-9)
    assert mean > 1.5  # the logits are far from uniform: a real signal, not a degenerate 1.0
    with pytest.raises(ValueError, match="at least 10"):
        inception_score(logits[:9])


def test_stats_npz_round_trip_and_adm_layout(store_root: str) -> None:
    from cluster import storage

    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 8))
    stats = FidStats(x.mean(0), np.cov(x, rowvar=False), 30, "test")
    url = storage.join(store_root, "ref.npz")
    stats.save(url)
    back = load_stats(url)
    assert back.count == 30 and back.stats_id == stats.stats_id
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    # ADM's reference batches: mu/sigma next to other arrays, float64, no count.
    buffer = io.BytesIO()
    np.savez(buffer, arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=stats.mu, sigma=stats.sigma)
    adm = storage.join(store_root, "VIRTUAL_ref.npz")
    storage.write_bytes(adm, buffer.getvalue())
    loaded = load_stats(adm)
    assert loaded.count is None and loaded.stats_id == stats.stats_id
    images_only = storage.join(store_root, "samples.npz")
    buffer = io.BytesIO()
    np.savez(buffer, arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    storage.write_bytes(images_only, buffer.getvalue())
    with pytest.raises(ValueError, match="expected 'mu' and 'sigma'"):
        load_stats(images_only)


def _reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. with scipy's Gaussian filter (sigma 1.5, truncate 3.5 -> 11 taps), valid region."""
    c1, c2, pad = 0.01**2, 0.03**2, 5
    values = []
    for ch in range(x.shape[0]):
        a, b = x[ch], y[ch]

        def g(t: np.ndarray) -> np.ndarray:
            return scipy.ndimage.gaussian_filter(t, sigma=1.5, truncate=3.5, mode="reflect")

        mx, my = g(a), g(b)
        vx, vy, cxy = g(a * a) - mx**2, g(b * b) - my**2, g(a * b) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        values.append(s[pad:-pad, pad:-pad].mean())
    return float(np.mean(values))


def test_psnr_and_ssim_match_independent_formulas() -> None:
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 1, (3, 3, 24, 20))
    y = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    mse = ((x - y) ** 2).reshape(3, -1).mean(1)
    np.testing.assert_allclose(psnr(ty, tx).numpy(), 10 * np.log10(1 / mse), rtol=1e-12)
    got = ssim(ty, tx).numpy()
    for i in range(3):
        assert got[i] == pytest.approx(_reference_ssim(y[i], x[i]), rel=1e-9)
    assert ssim(tx, tx).numpy() == pytest.approx(np.ones(3), rel=1e-12)


def test_weights_load_safely_from_pth_and_safetensors(inception_weights: str, tmp_path) -> None:
    from safetensors.torch import save_file

    from_pth = load_inception_weights(inception_weights)
    path = tmp_path / "w.safetensors"
    save_file(dict(from_pth.state_dict), str(path))
    from_st = load_inception_weights(str(path))
    assert from_pth.fingerprint == from_st.fingerprint == tensor_fingerprint(from_st.state_dict)
    # A pickle that would run code on load is refused (weights_only=True), with the source named.
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(InceptionWeightsError, match="evil.pth"):
        load_inception_weights(str(evil))
    # Tensors of another architecture are refused before anything runs.
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(InceptionWeightsError, match="does not fit"):
        build_extractor(load_inception_weights(str(wrong)))


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_features_follow_torch_fidelity_input_contract(inception_weights: str) -> None:
    net = InceptionFeatures(load_inception_weights(inception_weights))
    images = torch.randint(0, 256, (3, 3, 40, 32), dtype=torch.uint8)
    pool, logits = net(images)
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008)
    assert pool.dtype == logits.dtype == torch.float32
    # Features depend on the image (the random-weights network is not degenerate).
    assert (pool[0] - pool[1]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="uint8"):
        net(images.float())


def test_fid_50k_guard_and_labels() -> None:
    from evals.jobs import check_sample_count, fid_label
    from evals.pool import EvalError
    from evals.tracking import metrics_of

    assert fid_label(50_000) == "FID-50k" and fid_label(10_000, "rFID") == "rFID-10k" and fid_label(1234) == "FID-1234"
    check_sample_count(50_000, 50_000)
    with pytest.raises(EvalError, match="refusing to report FID-50k"):
        check_sample_count(49_999, 50_000)
    result = {"kind": "generation", "fid": 2.5, "is_mean": 200.0, "is_std": 3.0, "count": 50_000,
              "protocol": {"metric": fid_label(50_000)}}
    assert metrics_of(result)["eval/fid_50k"] == 2.5 and metrics_of(result)["eval/is"] == 200.0
    result.update(count=49_000, protocol={"metric": fid_label(49_000)})
    assert "eval/fid_50k" not in metrics_of(result) and metrics_of(result)["eval/fid"] == 2.5


def test_sample_seeds_and_labels_depend_only_on_the_index() -> None:
    from evals.worker import sample_label, sample_seed

    seeds = [sample_seed(0, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert seeds[:10] == [sample_seed(0, i) for i in range(10)]  # pure function of (seed, index)
    assert sample_seed(1, 5) != sample_seed(0, 5)
    labels = [sample_label(i, 1000) for i in range(50_000)]
    assert np.bincount(labels).tolist() == [50] * 1000  # FID-50k: 50 per class
