"""The FID/IS feature network: torch-fidelity's Inception-v3 (the TF-2015 graph ported to PyTorch).

    weights = load_inception_weights(None)            # torch-fidelity's release file, hash-checked
    net = InceptionFeatures(weights, device="cuda")
    pool, logits = net(images_uint8_nchw)             # [B, 2048] float32, [B, 1008] float32

``pool`` is the 2048-d pool3 layer of FID; ``logits`` are torch-fidelity's ``logits_unbiased`` (the
final layer without its bias), which its Inception Score uses. The network itself resizes to 299 with
TF1-compatible bilinear interpolation and maps uint8 [0, 255] to [-1, 1], so callers hand it uint8
images of any size, exactly as torch-fidelity's own pipeline does.

Weights are read safely (safetensors, or ``torch.load(weights_only=True)``) from torch-fidelity's
default URL, a local path, an ``s3://`` URL or another URL, then handed to torch-fidelity's class as
an in-memory serialization of plain tensors (its own loader unpickles without ``weights_only``).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from cluster import storage

# The weights file torch-fidelity downloads by default (the hash prefix in its name is checked).
DEFAULT_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
EXTRACTOR_NAME = "inception-v3-compat"
FID_LAYER = "2048"
IS_LAYER = "logits_unbiased"
FEATURE_DIM = 2048
NUM_LOGITS = 1008
# What the protocol tag says about the network and its input handling.
NETWORK_DESCRIPTION = (f"torch-fidelity {EXTRACTOR_NAME}: pool3 {FEATURE_DIM}-d for FID, {IS_LAYER} for IS; "
                       "uint8 input resized to 299 by TF1-compatible bilinear inside the network")


class InceptionWeightsError(ValueError):
    """Weights that cannot be read or do not fit the Inception-v3 architecture."""


@dataclass(frozen=True)
class InceptionWeights:
    state_dict: Mapping[str, torch.Tensor]
    source: str          # where they came from (URL or path)
    fingerprint: str     # sha256 of the tensors (names, dtypes, shapes, values): format-independent


def load_inception_weights(source: str | None = None) -> InceptionWeights:
    """Read Inception-v3 weights from ``source`` (None: torch-fidelity's default URL).

    ``source`` may be a local path or ``s3://`` URL (``.safetensors``, or a PyTorch ``.pth``/``.pt``
    file read with ``weights_only=True``), or an ``http(s)://`` URL (cached by torch.hub; a hash
    prefix in the file name, as in the default URL, is verified).
    """
    source = source or DEFAULT_WEIGHTS_URL
    try:
        if source.startswith(("http://", "https://")):
            state = torch.hub.load_state_dict_from_url(source, map_location="cpu", progress=False,
                                                       check_hash=True, weights_only=True)
        else:
            data = storage.read_bytes(source)
            if source.endswith(".safetensors"):
                from safetensors.torch import load as load_safetensors

                state = load_safetensors(data)
            else:
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except storage.StorageError:
        raise
    except Exception as err:  # noqa: BLE001 - any parse/download failure is one clear error
        raise InceptionWeightsError(f"cannot load Inception weights from {source}: {type(err).__name__}: {err}") from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InceptionWeightsError(f"{source} does not hold a state dict of tensors")
    return InceptionWeights(dict(state), source, tensor_fingerprint(state))


def tensor_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over sorted names, dtypes, shapes and values (the same for .pth and .safetensors)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_extractor(weights: InceptionWeights, device: str | torch.device = "cpu") -> torch.nn.Module:
    """torch-fidelity's Inception-v3 with ``weights`` (strict key/shape check), eval mode, no grad."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    # torch-fidelity reads its weights with torch.load(weights_only=False); what it gets here is our
    # own serialization of tensors that were already loaded safely.
    buffer = io.BytesIO()
    torch.save(dict(weights.state_dict), buffer)
    buffer.seek(0)
    try:
        net = FeatureExtractorInceptionV3(EXTRACTOR_NAME, [FID_LAYER, IS_LAYER], feature_extractor_weights_path=buffer)
    except RuntimeError as err:  # load_state_dict: missing/unexpected keys or shape mismatches
        raise InceptionWeightsError(f"{weights.source} does not fit torch-fidelity's Inception-v3: "
                                    f"{str(err).splitlines()[0]} ...") from None
    return net.to(device)


class InceptionFeatures:
    """Batched, no-grad FID pool features and IS logits of uint8 NCHW images."""

    def __init__(self, weights: InceptionWeights, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.net = build_extractor(weights, self.device)
        self.fingerprint = weights.fingerprint

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images``: uint8 [B, 3, H, W]. Returns (pool [B, 2048], logits [B, 1008]), float32 on the
        network's device."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        pool, logits = self.net(images.to(self.device, non_blocking=True))
        return pool.float(), logits.float()


def random_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Inception-v3 weights of torch-fidelity's layout, randomly initialised (for offline tests/demos).

    Convolutions get Kaiming-normal (fan-in, ReLU) weights; then every batch norm's running statistics
    are set, layer by layer, to the statistics of its input on a few synthetic images (data-dependent
    init). Without that the pool features are nearly the same for every image (a deep random network
    forgets its input), and neither FID nor IS means anything even as a test signal. The last layer is
    scaled so that the IS logits differ between images by a few units.
    """
    import torchvision

    generator = torch.Generator().manual_seed(seed)
    # torchvision's Inception3 without aux logits and with 1008 classes has exactly torch-fidelity's
    # parameter names and shapes (both follow the TF graph); build_extractor checks that strictly.
    model = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=NUM_LOGITS, init_weights=False)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("conv.weight"):
            value = torch.randn(tensor.shape, generator=generator) * (2.0 / tensor[0].numel()) ** 0.5
        elif name.endswith("bn.weight"):
            value = 1.0 + 0.1 * torch.randn(tensor.shape, generator=generator)
        elif name.endswith("bn.bias"):
            value = 0.1 * torch.randn(tensor.shape, generator=generator)
        elif name == "fc.weight":
            value = torch.randn(tensor.shape, generator=generator) * 8.0 / tensor.shape[1] ** 0.5
        elif name == "fc.bias":
            value = torch.randn(tensor.shape, generator=generator)
        else:  # running statistics (set below), num_batches_tracked
            value = tensor.clone()
        state[name] = value.to(tensor.dtype).contiguous()

    net = build_extractor(InceptionWeights(state, "random", ""))

    def standardize(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]
        module.running_mean.copy_(x.mean((0, 2, 3)))
        module.running_var.copy_(x.var((0, 2, 3), unbiased=False))

    hooks = [m.register_forward_pre_hook(standardize) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    try:
        net(_calibration_images(generator))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: tensor.detach().clone().contiguous() for name, tensor in net.state_dict().items()}


def _calibration_images(generator: torch.Generator, count: int = 16, size: int = 64) -> torch.Tensor:
    """Smooth random colour fields plus noise, uint8 [count, 3, size, size]."""
    low = torch.rand(count, 3, 4, 4, generator=generator) * 255
    images = torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)
    images = images + 20 * torch.randn(count, 3, size, size, generator=generator)
    return images.clamp(0, 255).to(torch.uint8)


def write_random_inception_weights(path: str | Path, seed: int = 0) -> str:
    """Save :func:`random_inception_state_dict` to ``path`` (``.pth`` like the real file, or
    ``.safetensors``); returns the path. ~91 MB."""
    path = str(path)
    state = random_inception_state_dict(seed)
    buffer = io.BytesIO()
    if path.endswith(".safetensors"):
        from safetensors.torch import save

        storage.write_bytes(path, save(state))
    else:
        torch.save(state, buffer)
        storage.write_bytes(path, buffer.getvalue())
    return path
