"""Images/s of trainer.models' TiTok against a reference-style implementation of the same network,
measured in the same process on the same weights and inputs.

    python bench/model_throughput.py [--preset titok_s128] [--batch 4] [--rounds 7] [--threads N]
                                     [--device cpu|cuda] [--bf16] [--compile]

Variants (identical parameters, outputs checked equal before timing):

* ``ours``: batch-first tensors, one packed projection, ``F.scaled_dot_product_attention``;
* ``reference``: the authors' style, ``nn.MultiheadAttention`` on sequence-first tensors
  (the layout the published code runs);
* ``math``: reference layout with attention written out as softmax(QK^T / sqrt(d)) V.

Measured: ``encode`` (images -> tokens, no grad; what pre-tokenization runs), ``encode+decode``
(images -> tokens -> pixels through the MaskGIT-VQGAN pixel decoder, no grad) and ``train step`` (stage 1: proxy-code logits, cross-entropy + quantizer loss, backward,
AdamW step). Prints images/s and the ratio to ``reference``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from trainer.models import build_tokenizer, maybe_compile, published_tokenizer_config  # noqa: E402
from trainer.models.blocks import PackedSelfAttention  # noqa: E402


class ReferenceAttention(nn.Module):
    """nn.MultiheadAttention on (L, B, W) tensors, as the authors' ResidualAttentionBlock runs it."""

    def __init__(self, ours: PackedSelfAttention) -> None:
        super().__init__()
        width = ours.out_proj.in_features
        self.mha = nn.MultiheadAttention(width, ours.num_heads)
        self.mha.load_state_dict({k: v for k, v in ours.state_dict().items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(0, 1)
        return self.mha(x, x, x, need_weights=False)[0].transpose(0, 1)


class MathAttention(ReferenceAttention):
    """Reference layout, attention materialised: softmax(Q K^T / sqrt(d)) V."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(0, 1)  # (L, B, W)
        length, batch, width = x.shape
        heads = self.mha.num_heads
        q, k, v = F.linear(x, self.mha.in_proj_weight, self.mha.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(length, batch * heads, width // heads).transpose(0, 1) for t in (q, k, v))
        attn = torch.softmax(q @ k.transpose(1, 2) / (width // heads) ** 0.5, dim=-1)
        out = (attn @ v).transpose(0, 1).reshape(length, batch, width)
        return self.mha.out_proj(out).transpose(0, 1)


def variant(model: nn.Module, attention: type | None) -> nn.Module:
    """A copy of ``model`` whose attention modules are swapped for ``attention`` (None: ours)."""
    import copy

    clone = copy.deepcopy(model)
    if attention is not None:
        for module in list(clone.modules()):
            if hasattr(module, "attn") and isinstance(module.attn, PackedSelfAttention):
                module.attn = attention(module.attn)
    return clone


def interleaved_rates(steps: dict[str, callable], batch: int, rounds: int, sync) -> dict[str, float]:
    """Median images/s of each step function, timed in alternating rounds (A B C A B C ...) so that
    a change in machine load hits every variant alike."""
    for step in steps.values():  # warm-up: allocations, kernel selection, compilation
        step()
    sync()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: batch / statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="titok_s128", help="titok_s128 | titok_b64 | titok_l32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per variant (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile each variant")
    parser.add_argument("--variants", default="reference,ours,math", help="comma list; the first gives the tokens "
                        "the others are compared with")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    torch.manual_seed(0)
    cfg = published_tokenizer_config(args.preset)
    images = torch.rand(args.batch, 3, cfg.image_size, cfg.image_size, device=device)
    proxy_codes = torch.randint(0, cfg.pixel_decoder.codebook_size, (args.batch, cfg.grid_size, cfg.grid_size),
                                device=device)
    attention = {"ours": None, "reference": ReferenceAttention, "math": MathAttention}
    names = [n.strip() for n in args.variants.split(",")]
    print(f"{args.preset}: batch {args.batch}, {cfg.image_size}px, device {device}, threads {torch.get_num_threads()}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}{', compiled' if args.compile else ''}")

    # Inference: the published (stage-2) model, encode + decode.
    full = build_tokenizer(cfg).to(device).eval()
    results: dict[str, dict[str, float]] = {n: {} for n in names}
    models = {name: maybe_compile(variant(full, attention[name]), args.compile) for name in names}
    del full
    with torch.no_grad(), autocast:
        reference_tokens = next(iter(models.values())).encode(images)
        for name, model in models.items():
            results[name]["token agreement"] = (model.encode(images) == reference_tokens).float().mean().item()
        steps = {name: (lambda m=model: m.encode(images)) for name, model in models.items()}
        for name, value in interleaved_rates(steps, args.batch, args.rounds, sync).items():
            results[name]["encode"] = value
        steps = {name: (lambda m=model: m.decode_tokens(m.encode(images))) for name, model in models.items()}
        for name, value in interleaved_rates(steps, args.batch, args.rounds, sync).items():
            results[name]["encode+decode"] = value
    del models, steps

    # Training: stage 1 (no pixel decoder), one AdamW step per batch.
    stage1_cfg = published_tokenizer_config(args.preset)
    stage1_cfg.finetune_decoder = False
    stage1 = build_tokenizer(stage1_cfg).to(device).train()

    def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        with autocast:
            logits, aux = model(images)
            loss = F.cross_entropy(logits.float(), proxy_codes) + aux["quantizer_loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps = {}
    for name in names:
        model = maybe_compile(variant(stage1, attention[name]), args.compile)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        steps[name] = (lambda m=model, o=optimizer: train_step(m, o))
    for name, value in interleaved_rates(steps, args.batch, args.rounds, sync).items():
        results[name]["train step"] = value

    base = results.get("reference")
    columns = ("encode", "encode+decode", "train step")
    print(f"{'variant':<10}" + "".join(f"{c + ' img/s':>20}{'ratio':>7}" for c in columns) + f"{'tokens = first':>16}")
    for name in names:
        r = results[name]
        cells = "".join(f"{r[c]:20.3f}{(r[c] / base[c]) if base else float('nan'):7.2f}" for c in columns)
        print(f"{name:<10}{cells}{r['token agreement']:16.3f}")

if __name__ == "__main__":
    main()
