"""Frozen perceptual losses: LPIPS on VGG16 and the ConvNeXt-S logit loss the TiTok authors add.

Both take images in [0, 1] NCHW (the system's image contract) and do the range change and
normalisation their networks expect. The networks are frozen, stay in eval mode whatever
``.train()`` is called with (dropout in LPIPS and stochastic depth in ConvNeXt would otherwise make
the loss random), and their weights are never part of a ``state_dict``: they come from the configured
files, and a training checkpoint should not carry ~250 MB of constants.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cluster.storage import StorageError
from trainer.losses.config import PerceptualLossConfig
from trainer.losses.weights import check_keys, load_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONVNEXT_INPUT_SIZE = 224  # the authors resize to ConvNeXt's training resolution whatever the image size


class FrozenNet(nn.Module):
    """A module whose parameters never train, never leave eval mode and stay out of state dicts."""

    def __init__(self) -> None:
        super().__init__()
        self.register_state_dict_post_hook(_drop_own_keys)
        self.register_load_state_dict_pre_hook(_keep_own_tensors)

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenNet":
        return super().train(False)


def _drop_own_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _keep_own_tensors(module: nn.Module, state_dict: dict, prefix: str, *_args) -> None:
    # The weights come from the configured files only: a state dict neither needs them nor replaces
    # them (one holding them anyway, e.g. a foreign loss module's, is overridden by the current values).
    tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        state_dict[prefix + name] = tensor.detach()


class LPIPSVGG16(FrozenNet):
    """LPIPS v0.1 with the VGG16 trunk (the ``lpips`` package's network), on [0, 1] images.

    Per image: sum over the 5 VGG stages of the spatial mean of ``w_l . (f_l(x) - f_l(y))**2``, with
    ``f_l`` the channel-normalised relu{1_2,2_2,3_3,4_3,5_3} features of the [-1, 1] images.
    """

    def __init__(self) -> None:
        super().__init__()
        import lpips

        with warnings.catch_warnings():  # lpips builds torchvision's vgg16 with the deprecated `pretrained=`
            warnings.simplefilter("ignore", UserWarning)
            # No download here: pnet_rand skips the VGG weights, pretrained=False the linear layers (see load_weights).
            self.net = lpips.LPIPS(net="vgg", version="0.1", pretrained=False, pnet_rand=True, verbose=False)
        self.freeze()

    def vgg16_keys(self) -> dict[str, str]:
        """Our parameter name -> torchvision ``vgg16`` state-dict key (the lpips slices keep torchvision's indices)."""
        return {f"net.net.{name}": "features." + name.split(".", 1)[1] for name in self.net.net.state_dict()}

    def load_weights(self, vgg16: dict[str, torch.Tensor], linear: dict[str, torch.Tensor],
                     vgg16_source: str = "vgg16 weights", linear_source: str = "LPIPS linear weights") -> None:
        """Load a torchvision vgg16 state dict (classifier keys ignored) and the LPIPS linear layers."""
        names = self.vgg16_keys()
        own = dict(self.named_parameters())
        check_keys(vgg16, {tv: own[ours] for ours, tv in names.items()}, vgg16_source, ignore_prefixes=("classifier.",))
        lin_expected = {f"lin{k}.model.1.weight": lin.model[-1].weight for k, lin in enumerate(self.net.lins)}
        check_keys(linear, lin_expected, linear_source)
        with torch.no_grad():
            for ours, tv in names.items():
                own[ours].copy_(vgg16[tv])
            for key, param in lin_expected.items():
                param.copy_(linear[key])

    def forward(self, reconstructions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS distance, shape (N,)."""
        return self.net(reconstructions, targets, normalize=True).flatten()


class ConvNeXtLogitLoss(FrozenNet):
    """Mean squared difference of torchvision ConvNeXt-S ImageNet logits of two image batches.

    Images are resized to 224x224 (bilinear, antialiased) and normalised with the ImageNet mean/std.
    """

    def __init__(self) -> None:
        super().__init__()
        # Imported here, not at the top: torchvision brings torch._dynamo (~1.4 s), and every process
        # that reads a training config imports this module (the driver, Ray Train's controller).
        import torchvision

        self.net = torchvision.models.convnext_small()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.freeze()

    def load_weights(self, state: dict[str, torch.Tensor], source: str = "convnext weights") -> None:
        check_keys(state, self.net.state_dict(), source)
        self.net.load_state_dict(state)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        images = F.interpolate(images, size=CONVNEXT_INPUT_SIZE, mode="bilinear", align_corners=False, antialias=True)
        return self.net((images - self.mean) / self.std)

    def forward(self, reconstructions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Scalar: mean over batch and classes of the squared logit difference."""
        return F.mse_loss(self.logits(reconstructions), self.logits(targets))


class PerceptualLoss(nn.Module):
    """``(w_lpips * mean LPIPS + w_convnext * ConvNeXt loss) / (w_lpips + w_convnext)`` (the authors' mix)."""

    def __init__(self, lpips_weight: float, convnext_weight: float, lpips: Optional[LPIPSVGG16] = None,
                 convnext: Optional[ConvNeXtLogitLoss] = None) -> None:
        super().__init__()
        if (lpips is None) != (lpips_weight == 0) or (convnext is None) != (convnext_weight == 0):
            raise ValueError("a perceptual network is needed exactly when its weight is non-zero")
        if lpips is None and convnext is None:
            raise ValueError("PerceptualLoss needs LPIPS or ConvNeXt")
        self.lpips_weight = lpips_weight
        self.convnext_weight = convnext_weight
        self.lpips = lpips
        self.convnext = convnext

    def forward(self, reconstructions: torch.Tensor,
                targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mixed loss (scalar) and its unweighted parts ``{"lpips": ..., "convnext": ...}``."""
        parts: dict[str, torch.Tensor] = {}
        total = reconstructions.new_zeros(())
        if self.lpips is not None:
            parts["lpips"] = self.lpips(reconstructions, targets).mean()
            total = total + self.lpips_weight * parts["lpips"]
        if self.convnext is not None:
            parts["convnext"] = self.convnext(reconstructions, targets)
            total = total + self.convnext_weight * parts["convnext"]
        return total / (self.lpips_weight + self.convnext_weight), parts


def build_perceptual_loss(cfg: PerceptualLossConfig) -> PerceptualLoss:
    """Build the frozen networks named by ``cfg`` and load their weights (path, s3:// or http(s) URL)."""
    lpips = convnext = None
    if cfg.lpips_weight > 0:
        lpips = LPIPSVGG16()
        linear_source = cfg.lpips_linear_weights or _packaged_lpips_linear_weights()
        lpips.load_weights(_load("vgg16_weights", cfg.vgg16_weights), _load("lpips_linear_weights", linear_source),
                           cfg.vgg16_weights, linear_source)
    if cfg.convnext_weight > 0:
        convnext = ConvNeXtLogitLoss()
        convnext.load_weights(_load("convnext_weights", cfg.convnext_weights), cfg.convnext_weights)
    return PerceptualLoss(cfg.lpips_weight, cfg.convnext_weight, lpips, convnext)


def _packaged_lpips_linear_weights() -> str:
    from importlib.resources import files

    return str(files("lpips") / "weights" / "v0.1" / "vgg.pth")


def _load(field: str, url: str) -> dict[str, torch.Tensor]:
    try:
        return load_state_dict(url)
    except (OSError, StorageError, RuntimeError, ValueError) as err:
        raise ValueError(f"tokenizer.losses.perceptual.{field}={url}: cannot load: {err}") from err
