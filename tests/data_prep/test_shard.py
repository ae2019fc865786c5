"""data_prep/shard.py end to end: real Ray tasks, a local folder and the local S3 server as outputs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from cluster import storage
from data_prep import make_demo_data as demo
from data_prep import manifest
from data_prep.schema import ShardConfig
from data_prep.shard import verify, write
from data_prep.sources import InputError, Reason
from data_prep.wnids import wnid_to_label
from tests.data_prep.conftest import reference_shard_digest
from trainer.config import build_config

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(REPO / "data_prep" / "shard.py")


def shard_config(input_url, output, *overrides: str) -> ShardConfig:
    return build_config("shard", ShardConfig, [f"input={input_url}", f"output={output}", "progress=false",
                                               "workers=2", *overrides])


def read_shards(output: str, split: str) -> dict[str, tuple[str, dict[str, bytes]]]:
    """key -> (shard name, {extension: bytes}) over every shard file of the split."""
    out = {}
    for info in storage.list_files(output):
        name = info.url.rsplit("/", 1)[-1]
        if not (name.startswith(f"{split}-") and name.endswith(".tar")):
            continue
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(info.url))) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                assert member.mtime == 0 and member.uid == 0 and member.uname == ""
                out.setdefault(key, (name, {}))[1][ext] = tar.extractfile(member).read()
    return out


def shards_of(rows: list[dict]) -> set[str]:
    return {r["shard"] for r in rows}


def snapshot(output: str) -> dict[str, bytes]:
    prefix = output.rstrip("/") + "/"
    return {info.url[len(prefix):]: storage.read_bytes(info.url) for info in storage.list_files(output)}


def test_every_valid_image_arrives_once_with_its_label_and_bytes(demo_tree, store_root, ray_local):
    output = storage.join(store_root, "imagenet-wds")
    report = write(shard_config(demo_tree.root, output, "samples_per_shard=8"))
    usable = [f for f in demo_tree.of_split("train") if f.usable]
    assert not report.failed and report.samples == len(usable) and report.rejected == 2
    assert report.shards == report.shards_written == -(-len(usable) // 8) and "samples written" in report.line()

    rows = manifest.read_table(manifest.samples_url(output, "train")).to_pylist()
    shards = read_shards(output, "train")
    assert sorted(r["source"] for r in rows) == sorted(f.path for f in usable)
    assert sorted(shards) == sorted(r["key"] for r in rows)
    kinds = {f.path: f.kind for f in usable}
    for row in rows:
        shard, files = shards[row["key"]]
        source = (demo_tree.root / row["source"]).read_bytes()
        assert row["shard"] == shard and row["label"] == wnid_to_label()[row["wnid"]] == int(files["cls"])
        assert row["wnid"] == row["source"].split("/")[1]
        assert hashlib.sha256(files["jpg"]).hexdigest() == row["sha256"] and len(files["jpg"]) == row["bytes"]
        meta = json.loads(files["json"])
        assert (meta["wnid"], meta["label"], meta["source"]) == (row["wnid"], row["label"], row["source"])
        assert (meta["width"], meta["height"]) == Image.open(io.BytesIO(files["jpg"])).size == (row["width"], row["height"])
        converted = kinds[row["source"]] in ("cmyk", "png")
        assert row["converted"] == meta["converted"] == converted
        if converted:
            assert Image.open(io.BytesIO(files["jpg"])).mode == "RGB" and files["jpg"][:3] == b"\xff\xd8\xff"
        else:
            assert files["jpg"] == source  # byte for byte (grayscale JPEG included)
    # Shuffled across shards with the seed: the first shard mixes classes.
    assert len({r["wnid"] for r in rows if r["shard"] == "train-000000.tar"}) > 1
    rejected = {r["source"]: r["reason"] for r in manifest.read_table(manifest.rejected_url(output, "train")).to_pylist()}
    by_kind = {f.kind: f.path for f in demo_tree.files}
    assert rejected == {by_kind["truncated"]: Reason.TRUNCATED, by_kind["empty"]: Reason.ZERO_BYTES}
    shard_rows = manifest.read_table(manifest.shards_url(output, "train")).to_pylist()
    assert {r["shard"]: r["samples"] for r in shard_rows} == {s: sum(r["shard"] == s for r in rows) for s in shards_of(rows)}
    for shard_row in shard_rows:  # the shard digest, against an independent computation over the stored file
        stored = storage.read_bytes(storage.join(output, shard_row["shard"]))
        assert (len(stored), reference_shard_digest(stored)) == (shard_row["bytes"], shard_row["digest"])

    # A re-run is a no-op; verify passes, then catches a tampered shard.
    before = snapshot(output)
    again = write(shard_config(demo_tree.root, output, "samples_per_shard=8"))
    assert again.shards_skipped == report.shards and again.shards_written == 0 and snapshot(output) == before
    assert verify(shard_config(demo_tree.root, output)).problems == []
    victim = rows[5]
    url = storage.join(output, victim["shard"])
    data = bytearray(storage.read_bytes(url))
    data[victim["offset"] + victim["bytes"] // 2] ^= 0xFF
    storage.write_bytes(url, bytes(data))
    problems = verify(shard_config(demo_tree.root, output)).problems
    assert any(victim["shard"] in p and "digest" in p for p in problems)
    assert any(victim["key"] in p and "image bytes" in p for p in problems)


def _sample_set(output: str, split: str, with_key: bool = True) -> list[tuple]:
    rows = manifest.read_table(manifest.samples_url(output, split)).to_pylist()
    return sorted((r["key"] if with_key else "", r["sha256"], r["label"]) for r in rows)


def test_all_input_forms_give_the_same_samples(demo_tree, tmp_path, ray_local):
    write(shard_config(demo_tree.root, tmp_path / "from-folders"))
    write(shard_config(demo_tree.root, tmp_path / "from-folders", "split=val"))
    demo.to_archives(demo_tree, tmp_path / "archives")
    write(shard_config(tmp_path / "archives", tmp_path / "from-tars"))
    write(shard_config(tmp_path / "archives" / "ILSVRC2012_img_val.tar", tmp_path / "from-tars", "split=val"))
    assert _sample_set(str(tmp_path / "from-folders"), "train") == _sample_set(str(tmp_path / "from-tars"), "train")
    reference_val = _sample_set(str(tmp_path / "from-folders"), "val", with_key=False)
    assert len(reference_val) == len(demo_tree.of_split("val"))
    assert _sample_set(str(tmp_path / "from-tars"), "val", with_key=False) == reference_val
    for labels in ("kaggle", "devkit"):
        demo.to_flat_val(demo_tree, tmp_path / f"flat-{labels}", labels=labels)
        out = tmp_path / f"from-flat-{labels}"
        write(shard_config(tmp_path / f"flat-{labels}", out, "split=val"))
        assert _sample_set(str(out), "val", with_key=False) == reference_val


def test_resized_variant_keeps_aspect_and_flags_resized_images(demo_tree, tmp_path, ray_local):
    out = tmp_path / "resized"
    write(shard_config(demo_tree.root, out, "split=val", "resize=56"))
    rows = manifest.read_table(manifest.samples_url(str(out), "val")).to_pylist()
    for row in rows:
        w, h = Image.open(demo_tree.root / row["source"]).size
        assert row["resized"] == (min(w, h) > 56)
        assert min(row["width"], row["height"]) == min(56, w, h)
        assert abs(row["width"] / row["height"] - w / h) < 0.05


def test_changed_settings_on_the_same_output_are_refused(demo_tree, tmp_path, ray_local):
    write(shard_config(demo_tree.root, tmp_path / "out", "split=val"))
    with pytest.raises(InputError, match="seed"):
        write(shard_config(demo_tree.root, tmp_path / "out", "split=val", "seed=7"))


def _ray_address(ray) -> str:
    return ray.get_runtime_context().gcs_address


def test_kill_9_mid_run_then_rerun_equals_an_uninterrupted_run(demo_tree, tmp_path, ray_local):
    overrides = ["samples_per_shard=1", "workers=1"]
    reference = tmp_path / "uninterrupted"
    write(shard_config(demo_tree.root, reference, *overrides))

    output = tmp_path / "interrupted"
    parts = output / "manifest" / "parts"
    env = {**os.environ, "RAY_ADDRESS": _ray_address(ray_local)}
    command = [sys.executable, SCRIPT, f"input={demo_tree.root}", f"output={output}", "progress=false", *overrides]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if parts.is_dir() and len(list(parts.glob("*.json"))) >= 3:
            break
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it spawned; Ray ends its tasks
    proc.wait()
    done_at_kill = len(list(parts.glob("*.json")))
    total = len(list(reference.glob("train-*.tar")))
    assert not (output / "manifest" / "train.parquet").exists(), "the run finished before it could be killed"
    print(f"killed after {done_at_kill} of {total} shards")
    assert 3 <= done_at_kill < total

    # Damage on top of the kill: a complete shard truncated, another one's record lost.
    first, second = sorted(output.glob("train-*.tar"))[:2]
    first.write_bytes(first.read_bytes()[:1000])
    (parts / (second.name[:-4] + ".json")).unlink()

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    summary = rerun.stdout.strip().splitlines()[-1]
    assert summary.startswith("shard train:") and "already complete" in summary
    assert snapshot(str(output)) == snapshot(str(reference))


def test_cli_help_documents_every_key_and_errors_are_one_line(tmp_path):
    shown = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True)
    assert shown.returncode == 0
    import dataclasses

    documented = shown.stdout.split("keys:", 1)[1].split("usage:", 1)[0]
    for field in dataclasses.fields(ShardConfig):
        if field.name != "experiment":
            assert f"\n{field.name}:" in shown.stdout and f"\n  {field.name} " in documented, field.name
    bad = subprocess.run([sys.executable, SCRIPT, "input=x", "output=y", "split=tran"], capture_output=True, text=True)
    assert bad.returncode == 2 and "split" in bad.stderr and "train" in bad.stderr
    missing = subprocess.run([sys.executable, SCRIPT, f"input={tmp_path}/none", f"output={tmp_path}/out"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no images for split 'train'" in missing.stderr


def test_extracted_folders_can_be_read_from_s3(demo_tree, s3_bucket, tmp_path, ray_local):
    storage.upload_dir(demo_tree.root / "val", f"{s3_bucket}/imagenet/val")
    write(shard_config(f"{s3_bucket}/imagenet", tmp_path / "from-s3", "split=val"))
    write(shard_config(demo_tree.root, tmp_path / "from-disk", "split=val"))
    assert _sample_set(str(tmp_path / "from-s3"), "val") == _sample_set(str(tmp_path / "from-disk"), "val")
