"""bench/gpu_acceptance.py --cpu: the GPU acceptance script end to end at tiny sizes (< 60 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_acceptance_runs_at_tiny_sizes_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "acceptance.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_acceptance.py"), "--cpu", "--json", str(out)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["tiny"] is True
    stage1, generator = results["tokenizer_stage1"], results["generator"]
    # The micro-batch comes from the capacity plan (capped at 8 for the tiny run) and the step runs.
    assert 1 <= stage1["micro_batch"] <= 8 and stage1["plan_largest_micro_batch"] >= stage1["micro_batch"]
    assert stage1["images_per_s"] > 0 and stage1["flops_per_image"] > 0 and stage1["plan_peak"] > 0
    assert generator["sequences_per_s"] > 0 and generator["flops_per_sequence"] > 0
    # FlopCounterMode's count of the real step against 6 x (params x tokens) of the transformer layers:
    # the same order (the count adds attention scores, embeddings and the head).
    assert 0.5 < generator["flops_per_sequence"] / generator["flops_per_sequence_6nd"] < 4
    assert results["sampling"]["batch"] == 8 and results["sampling"]["images_per_s"] > 0
    assert results["inception"]["images_per_s"] > 0 and results["inception"]["weights"] == "random weights"
    assert results["jpeg_decode"]["images_per_s_per_core"] > 0
    for name in ("L-32 stage 1", "L-32 generator", "L-32 sampling", "Inception features", "JPEG decode"):
        assert name in done.stdout, name


def test_tokenizer_curve_trains_and_scores_each_variant(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "tokenizer_curve.py"), "--steps", "20", "--every", "10",
                           "--variant", "p4:model.patch_size=4,optim.betas=[0.9,0.95]", "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    curve = [line.split() for line in done.stdout.splitlines() if " val PSNR " in line]
    assert [(row[0], int(row[2])) for row in curve] == [("demo", 10), ("demo", 20), ("p4", 10), ("p4", 20)]
    assert all(5 < float(row[5]) < 60 for row in curve)  # dB of a barely trained model: finite, not perfect
    rows = [line.split() for line in done.stdout.split("x first", 1)[1].strip().splitlines()]
    assert [row[0] for row in rows] == ["demo", "p4"] and rows[0][-1] == "1.00"
    assert rows[0][1] != rows[1][1]  # 8 px against 4 px patches: other patch embedding and head sizes
    assert [float(row[2]) for row in rows] == [float(curve[1][5]), float(curve[3][5])]  # the final PSNRs
    by_class = done.stdout.split("final PSNR by class (dB)", 1)[1].split("\n\n", 1)[0].strip().splitlines()
    # classes in ImageNet label order (sorted wnids)
    assert by_class[0].split() == ["run", "jellyfish", "starfish", "chainlink-fence", "orange", "seashore", "volcano"]
    assert [row.split()[0] for row in by_class[1:]] == ["demo", "p4"]
    for row, final in zip(by_class[1:], (curve[1][5], curve[3][5])):
        # 8 validation images a class, so the mean of the class means is the mean over all images
        assert abs(sum(float(v) for v in row.split()[1:]) / 6 - float(final)) < 0.01
    refused = subprocess.run([sys.executable, str(REPO / "bench" / "tokenizer_curve.py"), "--steps", "0"],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert refused.returncode == 2 and "--steps, --every and --threads must be >= 1" in refused.stderr
