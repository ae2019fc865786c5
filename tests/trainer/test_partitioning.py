"""ZeRO-3 construction (trainer/partitioning.py) on 2 real processes over gloo.

* Models built under ``zero.Init`` are partitioned from construction on: no rank's memory grows by
  the whole model, and the init a parent module applies to its children (TiTok's truncated normal,
  zero biases, unit norms) reaches the partitions with the plain build's statistics.
* Weights loaded into a partitioned model (``init_from`` of both stages) equal the source exactly.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.config import build_config
from trainer.schema import GeneratorTrainConfig, TokenizerTrainConfig

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

# ~40M parameters: 160 MB of fp32, well above the RSS noise of a process.
TOKENIZER = ["experiment=demo", "trainer.num_workers=2", "deepspeed.zero_stage=3", "data.image_size=64",
             "model.image_size=64", "model.patch_size=8", "model.vit_enc_width=512", "model.vit_dec_width=512",
             "model.vit_enc_num_layers=6", "model.vit_dec_num_layers=6", "model.vit_enc_num_heads=8",
             "model.vit_dec_num_heads=8"]
GENERATOR = ["experiment=demo", "trainer.num_workers=2", "deepspeed.zero_stage=3", "model.model_type=UViT"]


def _status(key: str) -> int:
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _worker(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of 2: build, gather, load; results as JSON + tensors under ``out``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK="0", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from trainer import models
    from trainer.distributed import barrier, setup_worker
    from trainer.partitioning import build_model, copy_state_into, gathered

    setup_worker(False)
    # The first parameter init under zero.Init imports torch._dynamo (torch's decompositions); that
    # ~100 MB of code is no part of the model, so it is loaded before the build is measured.
    importlib.import_module("torch._dynamo")

    result: dict = {}
    cfg = build_config("tokenizer", TokenizerTrainConfig, TOKENIZER)
    torch.manual_seed(rank)
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    model = build_model(cfg, lambda: models.build_tokenizer(cfg.model))
    result["build_growth"] = _status("VmHWM") - before
    result["partitions"] = {name: [p.data.numel(), p.ds_tensor.numel(), p.ds_numel] for name, p in model.named_parameters()}
    full = {}
    for name, param in model.named_parameters():
        with gathered([param], modifier_rank=None):
            full[name] = param.data.detach().clone()
    if rank == 0:
        torch.save(full, Path(out) / "tokenizer_gathered.pt")

    # init_from into a partitioned generator: every parameter equals the source's.
    gen_cfg = build_config("generator", GeneratorTrainConfig, GENERATOR)
    source = Path(out) / "generator_export"
    if rank == 0:
        torch.manual_seed(123)
        models.build_generator(gen_cfg.model).save_pretrained(str(source))
    barrier()
    target = build_model(gen_cfg, lambda: models.build_generator(gen_cfg.model))
    missing, unexpected = copy_state_into(target, models.load_generator(str(source)).state_dict())
    reference = models.load_generator(str(source)).state_dict()
    mismatched = []
    for name, param in target.named_parameters():
        with gathered([param], modifier_rank=None):
            if not torch.equal(param.data, reference[name]):
                mismatched.append(name)
    result.update(missing=missing, unexpected=unexpected, mismatched=mismatched,
                  generator_partitioned=all(p.data.numel() == 0 for p in target.parameters()))
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def zero3_results(tmp_path_factory) -> tuple[list[dict], dict]:
    out = tmp_path_factory.mktemp("zero3")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Two plain processes (not multiprocessing.spawn, whose resource tracker would outlive the test).
    code = f"from tests.trainer.test_partitioning import _worker; import sys; _worker(int(sys.argv[1]), {port}, {str(out)!r})"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "DS_ACCELERATOR": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(rank)], cwd=REPO, env=env) for rank in (0, 1)]
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0, 0], codes
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return ranks, torch.load(out / "tokenizer_gathered.pt")


def test_zero3_model_is_partitioned_from_construction(zero3_results) -> None:
    from trainer import models

    ranks, _ = zero3_results
    cfg = build_config("tokenizer", TokenizerTrainConfig, TOKENIZER)
    with torch.device("meta"):
        full_bytes = 4 * sum(p.numel() for p in models.build_tokenizer(cfg.model).parameters())
    for result in ranks:
        for name, (data, partition, numel) in result["partitions"].items():
            assert data == 0 and partition == -(-numel // 2), name  # placeholder + this rank's half
        # The whole model never sits on a rank: half of it plus one module's transient copy.
        assert result["build_growth"] < 0.75 * full_bytes, (result["build_growth"], full_bytes)


def test_parent_init_reaches_the_partitions(zero3_results) -> None:
    from trainer import models

    _, gathered = zero3_results
    cfg = build_config("tokenizer", TokenizerTrainConfig, TOKENIZER)
    torch.manual_seed(0)
    plain = dict(models.build_tokenizer(cfg.model).named_parameters())
    assert set(gathered) == set(plain)
    for name, reference in plain.items():
        value = gathered[name]
        # The config's dtype (fp32 here) whatever the accelerator supports: DeepSpeed's own choice was
        # bf16 on CPUs without fp16 kernels.
        assert value.shape == reference.shape and value.dtype == reference.dtype == torch.float32, name
        if name.endswith("bias") and torch.all(reference == 0):
            assert torch.all(value == 0), name          # TiTok zeroes the biases its children made
        elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight")):
            assert torch.all(value == 1), name
        elif reference.numel() >= 4096:                 # random: same distribution, not the same draws
            assert value.std().item() == pytest.approx(reference.std().item(), rel=0.1), name
            assert value.mean().item() == pytest.approx(reference.mean().item(), abs=0.1 * reference.std().item())
    # A module's own init survives partitioning: the pixel decoder's output conv starts as the identity.
    assert torch.equal(gathered["decoder.conv_out.weight"], plain["decoder.conv_out.weight"])
    assert gathered["decoder.conv_out.weight"][:, :, 1, 1].equal(torch.eye(3))
    # The decisive case: a Linear's default init (kaiming uniform, std 1/sqrt(3 fan_in)) would be 0.009 here.
    assert gathered["encoder.transformer.0.mlp.c_proj.weight"].std().item() == pytest.approx(0.02, rel=0.05)


def test_weights_load_into_partitions_exactly(zero3_results) -> None:
    ranks, _ = zero3_results
    for result in ranks:
        assert result["missing"] == [] and result["unexpected"] == []
        assert result["mismatched"] == []
        assert result["generator_partitioned"]
