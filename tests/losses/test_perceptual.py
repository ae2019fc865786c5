"""LPIPS and the ConvNeXt logit loss against independent computations, on random backbone weights."""

from __future__ import annotations

import hashlib
import http.server
import threading
import warnings
from functools import partial
from pathlib import Path

import lpips
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF

from trainer.losses import PerceptualLossConfig, build_perceptual_loss
from trainer.losses.perceptual import ConvNeXtLogitLoss, LPIPSVGG16, _packaged_lpips_linear_weights
from trainer.losses.weights import load_state_dict, save_state_dict

VGG_RELU_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16.features
LPIPS_SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
LPIPS_SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


def _torchvision_vgg_features(path: str) -> torch.nn.Sequential:
    features = torchvision.models.vgg16().features.eval()
    features.load_state_dict({k.removeprefix("features."): v for k, v in torch.load(path, weights_only=True).items()})
    return features


@pytest.fixture(scope="module")
def linear_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """LPIPS linear layers different from the packaged ones (so the config path visibly matters)."""
    packaged = load_state_dict(_packaged_lpips_linear_weights())
    generator = torch.Generator().manual_seed(3)
    scaled = {k: v * (0.5 + torch.rand(v.shape, generator=generator)) for k, v in packaged.items()}
    path = str(tmp_path_factory.mktemp("lpips") / "linear.pth")
    save_state_dict(scaled, path)
    return path


@pytest.fixture(scope="module")
def lpips_loss(backbone_files, linear_file):
    cfg = PerceptualLossConfig(lpips_weight=1.0, convnext_weight=0.0, lpips_linear_weights=linear_file,
                               **backbone_files)
    return build_perceptual_loss(cfg).lpips


def test_lpips_equals_the_lpips_package_on_the_same_weights(lpips_loss, backbone_files, linear_file, images):
    inputs, reconstructions = images
    # The package's own network: its VGG slices keep torchvision's layer indices.
    with warnings.catch_warnings():  # lpips passes torchvision the deprecated `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        reference = lpips.LPIPS(net="vgg", pnet_rand=True, model_path=linear_file, verbose=False).eval()
    features = _torchvision_vgg_features(backbone_files["vgg16_weights"])
    for slice_ in (reference.net.slice1, reference.net.slice2, reference.net.slice3, reference.net.slice4,
                   reference.net.slice5):
        for index, layer in slice_.named_children():
            layer.load_state_dict(features[int(index)].state_dict())
    with torch.no_grad():
        expected = reference(reconstructions * 2 - 1, inputs * 2 - 1).flatten()  # the package wants [-1, 1]
        got = lpips_loss(reconstructions, inputs)
    assert got.shape == (2,)
    assert expected.min() > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_lpips_equals_the_formula_on_torchvision_vgg_features(lpips_loss, backbone_files, linear_file, images):
    inputs, reconstructions = images
    features = _torchvision_vgg_features(backbone_files["vgg16_weights"])
    linear = torch.load(linear_file, weights_only=True)

    def taps(x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (x * 2 - 1 - LPIPS_SHIFT) / LPIPS_SCALE
        for index, layer in enumerate(features[: VGG_RELU_TAPS[-1] + 1]):
            h = layer(h)
            if index in VGG_RELU_TAPS:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    with torch.no_grad():
        expected = sum(
            ((a - b).pow(2) * linear[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)).sum(1).mean((1, 2))
            for k, (a, b) in enumerate(zip(taps(reconstructions), taps(inputs))))
        torch.testing.assert_close(lpips_loss(reconstructions, inputs), expected, rtol=1e-5, atol=1e-7)
        # Our module's own VGG activations are torchvision's on the same weights.
        ours = lpips_loss.net.net(inputs)
        h = inputs
        for index, layer in enumerate(features[: VGG_RELU_TAPS[-1] + 1]):
            h = layer(h)
            if index in VGG_RELU_TAPS:
                torch.testing.assert_close(ours[VGG_RELU_TAPS.index(index)], h, rtol=0, atol=0)


def test_convnext_loss_equals_torchvision_convnext_on_the_same_weights(backbone_files):
    # 256x256, the training size: the resize to 224 then downsamples (where antialiasing matters).
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(2, 3, 256, 256, generator=generator)
    reconstructions = inputs + 0.2 * torch.randn(inputs.shape, generator=generator)
    loss = ConvNeXtLogitLoss()
    loss.load_weights(load_state_dict(backbone_files["convnext_weights"]))
    reference = torchvision.models.convnext_small().eval()
    reference.load_state_dict(torch.load(backbone_files["convnext_weights"], weights_only=True))

    def logits(x: torch.Tensor) -> torch.Tensor:
        x = TF.resize(x, [224, 224], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        return reference(TF.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))

    with torch.no_grad():
        expected_real, expected_fake = logits(inputs), logits(reconstructions)
        torch.testing.assert_close(loss.logits(inputs), expected_real, rtol=1e-4, atol=1e-5)
        expected = (expected_fake - expected_real).pow(2).mean()
        assert expected > 0
        torch.testing.assert_close(loss(reconstructions, inputs), expected, rtol=1e-4, atol=1e-7)


def test_mixed_perceptual_loss_is_the_weighted_mean_and_frozen(backbone_files, images):
    inputs, reconstructions = images
    perceptual = build_perceptual_loss(PerceptualLossConfig(lpips_weight=1.0, convnext_weight=0.1, **backbone_files))
    perceptual.train()  # must not switch the frozen nets out of eval mode (LPIPS dropout, ConvNeXt stochastic depth)
    assert not any(m.training for m in perceptual.lpips.modules())
    assert not any(m.training for m in perceptual.convnext.modules())
    reconstructions = reconstructions.clone().requires_grad_(True)
    loss, parts = perceptual(reconstructions, inputs)
    torch.testing.assert_close(loss, (parts["lpips"] + 0.1 * parts["convnext"]) / 1.1)
    with torch.no_grad():
        torch.testing.assert_close(parts["lpips"], perceptual.lpips(reconstructions, inputs).mean())
    loss.backward()
    assert reconstructions.grad is not None and reconstructions.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in perceptual.parameters())
    # The frozen nets' weights are not training state: out of state_dict, and loading one keeps them.
    assert perceptual.state_dict() == {}
    before = perceptual.convnext.net.classifier[2].weight.clone()
    perceptual.load_state_dict({}, strict=True)
    assert torch.equal(perceptual.convnext.net.classifier[2].weight, before)
    perceptual.load_state_dict({"convnext.net.classifier.2.weight": torch.zeros_like(before)}, strict=True)
    assert torch.equal(perceptual.convnext.net.classifier[2].weight, before)


def test_weight_files_with_the_wrong_layout_are_rejected_naming_the_key(tmp_path, backbone_files):
    wrong = str(tmp_path / "wrong.pth")
    save_state_dict({"features.0.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match=r"wrong\.pth does not fit.*missing"):
        build_perceptual_loss(PerceptualLossConfig(lpips_weight=1.0, convnext_weight=0.0, vgg16_weights=wrong))
    with pytest.raises(ValueError, match=r"tokenizer\.losses\.perceptual\.convnext_weights=.*absent\.pth"):
        build_perceptual_loss(PerceptualLossConfig(convnext_weights=str(tmp_path / "absent.pth")))
    # The lpips linear layers must not be confused with a VGG file.
    with pytest.raises(ValueError, match="vgg16_random.pth does not fit"):
        LPIPSVGG16().load_weights(load_state_dict(backbone_files["vgg16_weights"]),
                                  load_state_dict(backbone_files["vgg16_weights"]),
                                  linear_source=backbone_files["vgg16_weights"])


def test_weights_load_from_s3_safetensors_and_http_with_hash_check(s3_bucket, tmp_path, monkeypatch):
    state = {"a.weight": torch.randn(3, 4), "b.bias": torch.arange(5.0)}
    for url in (f"{s3_bucket}/w.pth", f"{s3_bucket}/w.safetensors", str(tmp_path / "w.safetensors")):
        save_state_dict(state, url)
        loaded = load_state_dict(url)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)

    # http(s): through torch.hub's cache, with torchvision's "<name>-<sha256 prefix>.pth" check.
    serve = tmp_path / "www"
    serve.mkdir()
    save_state_dict(state, str(serve / "w.pth"))
    digest = hashlib.sha256((serve / "w.pth").read_bytes()).hexdigest()
    (serve / f"good-{digest[:8]}.pth").write_bytes((serve / "w.pth").read_bytes())
    (serve / "bad-00000000.pth").write_bytes((serve / "w.pth").read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(serve))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        loaded = load_state_dict(f"{base}/good-{digest[:8]}.pth")
        assert all(torch.equal(loaded[k], state[k]) for k in state)
        assert any(Path(tmp_path / "torch_home").rglob(f"good-{digest[:8]}.pth"))
        with pytest.raises(RuntimeError, match="hash"):
            load_state_dict(f"{base}/bad-00000000.pth")
    finally:
        server.shutdown()
        server.server_close()
