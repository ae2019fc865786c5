"""`python -m trainer.reconstruct` end to end on a tiny exported tokenizer and a few image files."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cluster import storage
from trainer.models import build_tokenizer, save_pretrained
from trainer.reconstruct import main

from .conftest import randomize_, tiny_tokenizer_config

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture
def export(tmp_path):
    model = randomize_(build_tokenizer(tiny_tokenizer_config())).eval()
    save_pretrained(model, str(tmp_path / "export"))
    return model, str(tmp_path / "export")


def _image_folder(path, rng) -> dict[str, np.ndarray]:
    path.mkdir()
    exact = {}
    for name in ("b.png", "a.png"):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path / name)
        exact[name] = pixels
    Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(path / "wide.jpg")
    (path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (path / "notes.txt").write_text("ignored")
    return exact


def test_reconstruct_folder(export, tmp_path, store_root, capsys) -> None:
    model, checkpoint = export
    exact = _image_folder(tmp_path / "images", np.random.default_rng(0))
    output = storage.join(store_root, "recon")
    code = main([f"checkpoint={checkpoint}", f"images={tmp_path / 'images'}", f"output={output}", "batch_size=2"])
    assert code == 0
    captured = capsys.readouterr()
    assert "skipped broken.jpg" in captured.err.replace(str(tmp_path / "images") + "/", "")
    lines = [json.loads(line) for line in storage.read_text(storage.join(output, "tokens.jsonl")).splitlines()]
    assert [line["image"] for line in lines] == ["a.png", "b.png", "wide.jpg"]
    # a.png and b.png form the first batch of 2 (sorted names): computed here as one batch too, since
    # a CPU's batched arithmetic differs from one-by-one in the last bits, enough to flip a rounding.
    pixels = torch.stack([torch.from_numpy(exact[name]).permute(2, 0, 1) for name in ("a.png", "b.png")]).float() / 255
    with torch.no_grad():
        tokens = model.encode(pixels)
        decoded = model.decode_tokens(tokens).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for row, line in enumerate(lines[:2]):
        assert line["tokens"] == tokens[row].tolist()
        assert f"{line['image']}: {' '.join(map(str, line['tokens']))}" in captured.out
        expected = decoded[row]
        stem = line["image"].rsplit(".", 1)[0]
        written = np.asarray(Image.open(io.BytesIO(storage.read_bytes(storage.join(output, f"{stem}.png")))))
        assert np.array_equal(written, expected)
    wide = Image.open(io.BytesIO(storage.read_bytes(storage.join(output, "wide.png"))))
    assert wide.size == (32, 32)
    grid = np.asarray(Image.open(io.BytesIO(storage.read_bytes(storage.join(output, "grid.png")))))
    assert grid.shape == (3 * 34 + 2, 2 * 34 + 2, 3)  # one row per image: input | reconstruction
    assert np.array_equal(grid[2:34, 2:34], exact["a.png"])


def test_bad_invocations(export, tmp_path, capsys) -> None:
    _, checkpoint = export
    with pytest.raises(SystemExit) as exit_info:
        main([f"checkpoint={checkpoint}", "images=x"])
    assert exit_info.value.code == 2
    assert "output" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([f"checkpoint={checkpoint}", "images=x", "output=y", "device=tpu"])
    assert "valid: auto, cpu, cuda" in capsys.readouterr().err
    # Bad inputs: one line naming the key, exit 2, before the weights load; nothing is written.
    def refused(*args: str) -> str:
        assert main([*args, f"output={tmp_path / 'out'}"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("input error: ")
        return lines[0]

    assert "images: " in (line := refused(f"checkpoint={checkpoint}", f"images={tmp_path / 'none'}")) \
        and "no such folder" in line
    (tmp_path / "empty").mkdir()
    assert "images: " in (line := refused(f"checkpoint={checkpoint}", f"images={tmp_path / 'empty'}")) \
        and "no image files" in line
    stage1 = tmp_path / "stage1"
    save_pretrained(build_tokenizer(tiny_tokenizer_config(finetune_decoder=False)), str(stage1))
    _image_folder(tmp_path / "imgs", np.random.default_rng(1))
    assert "checkpoint: " in (line := refused(f"checkpoint={stage1}", f"images={tmp_path / 'imgs'}")) \
        and "stage-1" in line
    assert "checkpoint: " in refused(f"checkpoint={tmp_path / 'missing'}", f"images={tmp_path / 'imgs'}")
    assert not (tmp_path / "out").exists()


def test_module_entry_point_help() -> None:
    result = subprocess.run([sys.executable, "-m", "trainer.reconstruct", "--help"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "checkpoint: ???" in result.stdout and "grid_images: 16" in result.stdout
