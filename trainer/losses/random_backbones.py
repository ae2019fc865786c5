"""Random-weight stand-ins for the perceptual networks' ImageNet weights (tests, the offline CPU demo).

The files have the key layout of the real torchvision files and load through the same path; only
the values are random. Perceptual losses built from them are meaningful as computations, not as
measures of image similarity.
"""

from __future__ import annotations

import torch
from torch import nn

from cluster import storage
from trainer.losses.weights import save_state_dict

VGG16_FILE = "vgg16_random.pth"
CONVNEXT_SMALL_FILE = "convnext_small_random.pth"


def random_vgg16_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """``features.*`` of a torchvision vgg16 with kaiming-normal convolutions (the classifier is not
    used by LPIPS and the loader ignores it)."""
    import torchvision  # here, not at the top (see perceptual.ConvNeXtLogitLoss)

    torch.manual_seed(seed)
    features = torchvision.models.vgg16().features  # torchvision's own init is kaiming-normal (fan_out)
    return {f"features.{k}": v.clone() for k, v in features.state_dict().items()}


def random_convnext_small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision convnext_small with kaiming-normal weights and layer scale 0.1.

    torchvision's default init (std 0.02, layer scale 1e-6) makes every block nearly the identity, so
    the logits barely depend on the blocks; these values make every weight matter.
    """
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.convnext_small()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
                if module.bias is not None:
                    nn.init.normal_(module.bias, std=0.02)
        for name, param in net.named_parameters():
            if name.endswith("layer_scale"):
                param.fill_(0.1)
    return net.state_dict()


def save_random_backbones(directory: str, seed: int = 0) -> dict[str, str]:
    """Write random VGG16 and ConvNeXt-S weight files under ``directory`` (local or s3://).

    Returns the config overrides that use them, e.g.
    ``{"vgg16_weights": ".../vgg16_random.pth", "convnext_weights": ".../convnext_small_random.pth"}``
    (keys of ``tokenizer.losses.perceptual``; the LPIPS linear layers ship with the lpips package).
    """
    paths = {"vgg16_weights": storage.join(directory, VGG16_FILE),
             "convnext_weights": storage.join(directory, CONVNEXT_SMALL_FILE)}
    save_state_dict(random_vgg16_state(seed), paths["vgg16_weights"])
    save_state_dict(random_convnext_small_state(seed), paths["convnext_weights"])
    return paths
