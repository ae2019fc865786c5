"""Load a foreign state dict safely from a local path, an ``s3://`` URL or an http(s) URL."""

from __future__ import annotations

import io

import torch

from cluster import storage


def load_state_dict(url: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``.pth`` state dict (``torch.load(weights_only=True)``).

    http(s) files go through torch.hub's cache (``$TORCH_HOME``), which also checks the hash prefix
    that torchvision puts in its file names.
    """
    if url.startswith(("http://", "https://")):
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True, check_hash=True,
                                                  progress=False)
    if url.endswith(".safetensors"):
        from safetensors.torch import load, load_file

        return load(storage.read_bytes(url)) if storage.is_remote(url) else load_file(url)
    source = io.BytesIO(storage.read_bytes(url)) if storage.is_remote(url) else url
    state = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{url}: expected a state dict, got {type(state).__name__}")
    return state


def save_state_dict(state: dict[str, torch.Tensor], url: str) -> None:
    """Write a state dict atomically (``.safetensors`` by extension, else ``torch.save``)."""
    with storage.open_write(url) as out:
        if url.endswith(".safetensors"):
            from safetensors.torch import save

            out.write(save({k: v.contiguous() for k, v in state.items()}))
        else:
            torch.save(state, out)


def check_keys(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str,
               ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Raise a ValueError naming ``source`` unless ``state`` has exactly the expected keys and shapes."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and not k.startswith(ignore_prefixes)]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        found = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        parts = [f"{label}: {items[:4]}{' ...' if len(items) > 4 else ''}" for label, items in found if items]
        raise ValueError(f"{source} does not fit the expected architecture; " + "; ".join(parts))
