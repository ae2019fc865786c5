"""Sampling from a generator: MaskGIT/MUSE-style iterative parallel decoding with guidance.

(The sampling functions land with the generator issue; the settings are defined here because the
training config embeds them for preview grids.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingConfig:
    """Decoding settings; defaults are TiTok-L-32's published inference config."""

    num_steps: int = 8
    guidance_scale: float = 4.5
    # "constant" | "linear" | "power-cosine" (the authors' schedules; see ../shared/spec section 4)
    guidance_decay: str = "linear"
    guidance_scale_pow: float = 3.0
    randomize_temperature: float = 9.5
    softmax_temperature_annealing: bool = True
    batch_size: int = 32
