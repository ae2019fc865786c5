"""Every entry point checks what costs nothing first: a missing input is one line naming the key,
exit code 2, before any weights are loaded, Ray starts or anything is downloaded.

Each command runs as a user runs it (a subprocess, no ``RAY_ADDRESS``: a Ray start would be a local
instance of its own) with its Ray temp root, torch hub and HuggingFace caches in folders of the test
and every download address pointed at an unroutable one (192.0.2.1, TEST-NET-1: a connection there
hangs, it is not refused). Then:

* no Ray session folder appeared under ``RAY_TMPDIR`` and no process of the command is alive;
* nothing arrived in the download caches, and the one stderr line is about the missing input, not
  about weights that could not be fetched;
* the command's wall time is printed (``-s``), not asserted: timings are no pass/fail criterion here,
  the absence of the slow steps is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
UNROUTABLE = "http://192.0.2.1:9"
HUB_ID = "someone/tokenizer"   # not a local path: the loaders would ask the (unroutable) hub for it
MARK = "TITOK_CHEAP_CHECK"


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr_lines: list[str]
    seconds: float
    ray_sessions: list[str]
    alive: list[int]
    downloaded: list[str]


def _processes_marked(value: str) -> list[int]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARK) == value and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return found


def run_entry(args: list[str], tmp_path: Path, *, env: dict[str, str] | None = None) -> Outcome:
    """``python <args>`` from the repository root, isolated as the module docstring says."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must fit
    caches = tmp_path / "caches"
    value = uuid.uuid4().hex
    full_env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "TORCH_HOME": str(caches / "torch"),
                "HF_HOME": str(caches / "hf"), "HF_ENDPOINT": UNROUTABLE, MARK: value, **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    try:
        result = subprocess.run([sys.executable, *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                                timeout=300)
        seconds = time.monotonic() - started
        sessions = [str(p) for p in ray_tmp.rglob("session_*")]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    downloaded = [str(p) for p in caches.rglob("*") if p.is_file()] if caches.exists() else []
    print(f"{' '.join(args[:2])}: exit {result.returncode} in {seconds:.1f} s: {result.stderr.strip()[:200]}")
    return Outcome(result.returncode, result.stdout, result.stderr.strip().splitlines(), seconds, sessions,
                   _processes_marked(value), downloaded)


def assert_refused(outcome: Outcome, key: str, *, mentions: str = "") -> str:
    """Exit 2, one stderr line naming ``key`` (and ``mentions``), nothing started, nothing fetched."""
    assert outcome.returncode == 2, outcome.stderr_lines
    assert len(outcome.stderr_lines) == 1, outcome.stderr_lines
    line = outcome.stderr_lines[0]
    assert f"{key}:" in line or f"{key}=" in line, line
    assert mentions in line, line
    assert not outcome.ray_sessions, f"Ray started: {outcome.ray_sessions}"
    assert not outcome.alive, f"processes of the command still running: {outcome.alive}"
    assert not outcome.downloaded, f"downloaded: {outcome.downloaded}"
    for word in ("Inception", "huggingface", "download", "192.0.2.1", "Traceback"):
        assert word not in line, line
    return line


# ----------------------------------------------------------------------------------------------
# Data preparation


def test_shard_missing_input(tmp_path: Path) -> None:
    outcome = run_entry(["data_prep/shard.py", f"input={tmp_path}/imagenet", f"output={tmp_path}/wds"], tmp_path)
    assert_refused(outcome, "input", mentions=f"{tmp_path}/imagenet")
    assert not (tmp_path / "wds").exists()


def test_shard_output_bucket_the_store_refuses_is_one_line(tmp_path: Path, s3_server) -> None:
    """moto, like S3, refuses a one-letter bucket name: the store's error is the one line, before Ray."""
    (tmp_path / "imagenet" / "train" / "n01443537").mkdir(parents=True)
    outcome = run_entry(["data_prep/shard.py", f"input={tmp_path}/imagenet", "output=s3://b/wds"], tmp_path)
    assert_refused(outcome, "output", mentions="cannot create bucket for s3://b/wds: InvalidBucketName (HTTP 400)")


def test_pretokenize_missing_tokenizer_and_shards(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    outcome = run_entry(["data_prep/pretokenize.py", f"tokenizer={tmp_path}/export", f"shards={shards}",
                         f"output={tmp_path}/tokens"], tmp_path)
    assert_refused(outcome, "tokenizer", mentions=f"{tmp_path}/export")
    outcome = run_entry(["data_prep/pretokenize.py", f"tokenizer={HUB_ID}", f"shards={tmp_path}/none/train-*.tar",
                         f"output={tmp_path}/tokens"], tmp_path)
    assert_refused(outcome, "shards", mentions="no shards match")
    assert not (tmp_path / "tokens").exists()


# ----------------------------------------------------------------------------------------------
# Training, sampling, reconstruction


@pytest.mark.parametrize("stage, extra", [
    ("tokenizer", [f"tokenizer.init_from={HUB_ID}"]),
    ("generator", [f"generator.tokenizer={HUB_ID}", f"generator.init_from={HUB_ID}"]),
])
def test_train_missing_shards(tmp_path: Path, stage: str, extra: list[str]) -> None:
    shards = f"{tmp_path}/shards/train-*.tar" if stage == "tokenizer" else f"{tmp_path}/tokens"
    outcome = run_entry(["trainer/run.py", f"stage={stage}", "experiment=demo", f"data.train_shards={shards}",
                         f"output_dir={tmp_path}/run", f"mlflow.tracking_uri={UNROUTABLE}", *extra], tmp_path)
    assert_refused(outcome, "data.train_shards")
    assert not (tmp_path / "run").exists()


def test_generator_of_another_shape_than_the_token_shards(tmp_path: Path) -> None:
    """The token shards' manifest fixes tokens per image and codebook: a demo generator (16 tokens)
    on 32-token shards is refused before Ray, naming the key to set."""
    from data_prep.pretokenize import write_manifest

    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "tokens-000000.parquet").write_bytes(b"")  # listed only; the check reads the manifest
    write_manifest(str(tokens), [], {"num_tokens": 32, "codebook_size": 256})
    outcome = run_entry(["trainer/run.py", "stage=generator", "experiment=demo", f"data.train_shards={tokens}",
                         f"output_dir={tmp_path}/run", "mlflow.enabled=false"], tmp_path)
    assert_refused(outcome, "model.image_seq_len", mentions="set model.image_seq_len=32")


def test_train_output_that_cannot_be_written(tmp_path: Path, tiny_shards: Path) -> None:
    (tmp_path / "taken").write_text("a file where the run's folder would go")
    outcome = run_entry(["trainer/run.py", "stage=tokenizer", "experiment=demo", f"data.train_shards={tiny_shards}",
                         f"output_dir={tmp_path}/taken/run", "mlflow.enabled=false"], tmp_path)
    assert_refused(outcome, "output_dir")


def test_sample_missing_generator(tmp_path: Path) -> None:
    outcome = run_entry(["-m", "trainer.sample", f"generator={tmp_path}/generator", f"tokenizer={HUB_ID}",
                         f"output={tmp_path}/samples"], tmp_path)
    assert_refused(outcome, "generator", mentions=f"{tmp_path}/generator")
    assert not (tmp_path / "samples").exists()


def test_reconstruct_missing_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    outcome = run_entry(["-m", "trainer.reconstruct", f"checkpoint={tmp_path}/export", f"images={tmp_path}/images",
                         f"output={tmp_path}/out"], tmp_path)
    assert_refused(outcome, "checkpoint", mentions=f"{tmp_path}/export")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Evaluation and the demo


@pytest.mark.parametrize("kind, args, key", [
    ("folders", ["eval.input1={tmp}/a", "eval.input2={tmp}/b"], "eval.input1"),
    ("reconstruction", ["eval.checkpoint={tmp}/export", "eval.data={tmp}/val-*.tar"], "eval.checkpoint"),
    ("reconstruction", ["output_dir={tmp}/run", "eval.data={tmp}/val-*.tar"], "output_dir"),
    ("generation", ["eval.checkpoint={tmp}/export", f"eval.tokenizer={HUB_ID}", "eval.reference={tmp}/ref.npz"],
     "eval.checkpoint"),
])
def test_evals_missing_input_before_the_inception_weights(tmp_path: Path, kind: str, args: list[str], key: str) -> None:
    """The weights would come from an unroutable URL: the missing input is reported, not the download."""
    outcome = run_entry(["evals/run.py", f"eval.kind={kind}", *[a.format(tmp=tmp_path) for a in args],
                         f"eval.inception_weights={UNROUTABLE}/weights-inception-2015-12-05-6726825d.pth",
                         f"mlflow.tracking_uri={UNROUTABLE}"], tmp_path)
    assert_refused(outcome, key, mentions=str(tmp_path))
    assert outcome.stdout == ""


def test_demo_missing_inception_weights(tmp_path: Path) -> None:
    outcome = run_entry(["-m", "cluster.demo", f"workdir={tmp_path}/demo", f"inception_weights={tmp_path}/incep.pth"],
                        tmp_path)
    assert_refused(outcome, "inception_weights", mentions=f"{tmp_path}/incep.pth")
    assert not (tmp_path / "demo").exists()


# ----------------------------------------------------------------------------------------------
# Settings a checkpoint fixes are defaults


def _tokenizer_export(root: Path, image_size: int) -> str:
    from trainer.checkpoint import write_export
    from trainer.models import PixelDecoderConfig, TiTokConfig, build_tokenizer, tokenizer_config_to_json

    cfg = TiTokConfig(image_size=image_size, patch_size=8, num_latent_tokens=4, codebook_size=16, token_size=4,
                      vit_enc_model_size=None, vit_dec_model_size=None, vit_enc_width=16, vit_enc_num_layers=1,
                      vit_enc_num_heads=2, vit_dec_width=16, vit_dec_num_layers=1, vit_dec_num_heads=2,
                      is_legacy=False, finetune_decoder=False,
                      pixel_decoder=PixelDecoderConfig(hidden_channels=32, channel_mult=[1, 1], num_res_blocks=1,
                                                       z_channels=8, codebook_size=8))
    return write_export(str(root), 3, build_tokenizer(cfg).state_dict(), tokenizer_config_to_json(cfg), {})


def test_eval_image_size_defaults_to_the_checkpoints(tmp_path: Path) -> None:
    """As pretokenize.py takes the tokenizer's size, evaluations take the checkpoint's (no "set
    eval.image_size=32" chore); an explicit size is kept; folders read shards at 256."""
    import yaml

    from evals.preflight import FOLDERS_IMAGE_SIZE, with_image_size
    from evals.schema import EvalConfig
    from trainer.config import build_config

    tokenizer = _tokenizer_export(tmp_path / "tok", image_size=32)

    def cfg(*overrides: str) -> EvalConfig:
        return build_config("eval", EvalConfig, ["eval.data=shards", "mlflow.enabled=false", *overrides])

    recon = cfg("eval.kind=reconstruction", f"eval.checkpoint={tokenizer}")
    assert recon.eval.image_size is None  # the shipped configs/eval.yaml leaves it to the checkpoint
    assert with_image_size(recon, tokenizer).eval.image_size == 32
    assert with_image_size(cfg("eval.kind=reconstruction", f"eval.checkpoint={tokenizer}", "eval.image_size=48"),
                           tokenizer).eval.image_size == 48
    # A generator export inside its run: the tokenizer its run trained on decides.
    generator_run = tmp_path / "gen"
    generator_run.mkdir()
    (generator_run / "config.yaml").write_text(yaml.safe_dump({"generator": {"tokenizer": tokenizer}}))
    generator = str(generator_run / "exports" / "step_000000003")
    assert with_image_size(cfg("eval.kind=generation", f"eval.checkpoint={generator}"), generator).eval.image_size == 32
    folders = cfg("eval.kind=folders", "eval.input1=a", "eval.input2=b")
    assert with_image_size(folders).eval.image_size == FOLDERS_IMAGE_SIZE == 256
