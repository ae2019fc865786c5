"""Full-size rehearsal on the CPU: every published experiment through every entry point, 2 workers.

    python bench/rehearse.py [--experiments titok_s128,titok_b64,...] [--phases stage1,resume,...]
                             [--work-dir /tmp/titok-rehearsal] [--timeout-s 1800] [--table]
                             [--set trainer.activation_checkpointing=true ...]

For each experiment (titok_s128, titok_b64, titok_b128_512, titok_l64_512, titok_l32), at its published
model size, fp32, batch 1 per worker, random weights where the real ones are downloads:

===========  ===================================================================================
stage1       trainer/run.py stage=tokenizer, proxy codes of a random full-size MaskGIT-VQGAN,
             ZeRO-3, 2 steps (stops with a checkpoint and an export)
resume       the same command to step 3: resumes from the checkpoint, checkpoints and exports again
reload       the stage-1 export loaded back (trainer.models.load_tokenizer), encoded once
stage2       tokenizer.recipe=decoder_finetune from the stage-1 export, random VGG16/ConvNeXt-S
             perceptual backbones, discriminator engine, ZeRO-3, 1 step
pretokenize  data_prep/pretokenize.py with the stage-2 export, 2 actors
generator    trainer/run.py stage=generator on those tokens, ZeRO-2, 2 steps
sample       python -m trainer.sample to .npz (2 images)
eval         evals/run.py eval.kind=reconstruction with random Inception weights, 2 actors
===========  ===================================================================================

Each command runs as a subprocess under ``timeout``; a watcher polls ``/proc`` every 0.2 s for the
command's process tree and keeps every process's peak RSS (VmHWM): the Ray Train workers' peak per
rank is what the capacity plan (trainer/plan.py, computed in a separate process with the same keys)
is compared with. Results go to ``<work-dir>/results.json`` as each phase ends; a re-run skips
phases that finished (``--redo`` repeats them too), so the five experiments can be run one at a time.
Prints one table: parameters, plan vs measured peak RSS per rank, s/step, checkpoint and export sizes.
Not part of ``make test``: a full-size phase needs up to ~10 GB per worker and minutes per step.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GiB = 2**30
EXPERIMENTS = ("titok_s128", "titok_b64", "titok_b128_512", "titok_l64_512", "titok_l32")
PHASES = ("stage1", "resume", "reload", "stage2", "pretokenize", "generator", "sample", "eval")
TRAINING = ("stage1", "resume", "stage2", "generator")


# ----------------------------------------------------------------------------------------------
# Peak RSS of a process tree


def _tree(root: int) -> list[int]:
    """``root`` and its descendants, as cluster/ray_session.py walks a process tree (psutil)."""
    import psutil

    try:
        return [root, *(child.pid for child in psutil.Process(root).children(recursive=True))]
    except psutil.Error:  # the command has ended
        return []


class TreePeaks(threading.Thread):
    """Polls the process tree under ``root``: peak RSS (VmHWM) and command name of every process."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peaks: dict[int, tuple[str, int]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for pid in _tree(self.root):
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                match = re.search(r"VmHWM:\s+(\d+)", status)
                if match:
                    peak = int(match.group(1)) * 1024
                    name = cmdline.strip() or "?"
                    if peak > self.peaks.get(pid, ("", 0))[1]:
                        self.peaks[pid] = (name, peak)
            self.stop.wait(self.interval)

    def matching(self, pattern: str) -> list[int]:
        return sorted((peak for name, peak in self.peaks.values() if re.search(pattern, name)), reverse=True)


# ----------------------------------------------------------------------------------------------
# Inputs shared by every experiment


def prepare(work: Path) -> dict[str, str]:
    """Demo JPEG shards (train and val), a random full-size MaskGIT-VQGAN, random perceptual backbones
    and random Inception weights, written once."""
    inputs = work / "inputs"
    done = inputs / "inputs.json"
    if done.exists():
        return json.loads(done.read_text())
    import torch

    from bench.reader_throughput import build_shards
    from data_prep.make_demo_data import make_demo_tree
    from evals.inception import write_random_inception_weights
    from trainer.losses import save_random_backbones
    from trainer.models import build_maskgit_vqgan

    inputs.mkdir(parents=True, exist_ok=True)
    tree = make_demo_tree(inputs / "images", classes=4, train_per_class=4, val_per_class=2, min_size=96, max_size=160,
                          quirks=False, seed=0)
    for split in ("train", "val"):
        build_shards(tree.root, inputs / "shards", None, 8, split)
    torch.manual_seed(0)
    teacher = inputs / "maskgit-vqgan-random.bin"
    torch.save(build_maskgit_vqgan().state_dict(), teacher)
    paths = {"shards": str(inputs / "shards"), "teacher": str(teacher),
             **save_random_backbones(str(inputs / "backbones")),
             "inception": write_random_inception_weights(inputs / "inception-random.pth")}
    done.write_text(json.dumps(paths, indent=2))
    return paths


# ----------------------------------------------------------------------------------------------
# Commands of one experiment


def _common(ws: int = 2) -> list[str]:
    # The published global batch (256 / 2048) would be 128+ accumulated micro-batches per step here.
    return ["trainer.use_gpu=false", f"trainer.num_workers={ws}", f"trainer.global_batch_size={ws}",
            "trainer.cpus_per_worker=1", "deepspeed.precision=fp32",
            "trainer.batch_size_per_worker=1", "trainer.log_every=1", "trainer.image_log_every=0",
            "trainer.keep_checkpoints=1", "optim.warmup_steps=1", "mlflow.enabled=false"]


def commands(experiment: str, work: Path, inputs: dict[str, str],
             extra: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """Per phase: the entry point's argv (relative to the repo), and for training phases the stage and
    config overrides the plan is computed from; ``extra`` keys (``--set``) go to every training phase."""
    run = work / experiment
    shards = inputs["shards"]
    stage1 = ["stage=tokenizer", f"experiment={experiment}", "tokenizer.recipe=proxy_codes",
              f"tokenizer.teacher_weights={inputs['teacher']}", *_common(), "deepspeed.zero_stage=3",
              f"data.train_shards={shards}/train-*.tar", "data.loader_workers=0", "data.shuffle_buffer=16",
              "trainer.max_steps=3", "trainer.checkpoint_every=2", f"output_dir={run}/stage1", *extra]
    stage1_export = f"{run}/stage1/exports/step_000000003"
    stage2 = ["stage=tokenizer", f"experiment={experiment}", "tokenizer.recipe=decoder_finetune",
              f"tokenizer.init_from={stage1_export}", f"tokenizer.teacher_weights={inputs['teacher']}",
              f"tokenizer.losses.perceptual.vgg16_weights={inputs['vgg16_weights']}",
              f"tokenizer.losses.perceptual.convnext_weights={inputs['convnext_weights']}",
              *_common(), "deepspeed.zero_stage=3", f"data.train_shards={shards}/train-*.tar",
              "data.loader_workers=0", "data.shuffle_buffer=16", "trainer.max_steps=1", "trainer.checkpoint_every=1",
              f"output_dir={run}/stage2", *extra]
    stage2_export = f"{run}/stage2/exports/step_000000001"
    generator = ["stage=generator", f"experiment={experiment}", *_common(), "deepspeed.zero_stage=2",
                 f"data.train_shards={run}/tokens", f"generator.tokenizer={stage2_export}", "trainer.max_steps=2",
                 "trainer.checkpoint_every=2", f"output_dir={run}/generator", *extra]
    return {
        "stage1": {"argv": ["trainer/run.py", *stage1, "trainer.stop_at_step=2"], "plan": stage1,
                   "checkpoint": f"{run}/stage1/checkpoints/step_000000002",
                   "export": f"{run}/stage1/exports/step_000000002"},
        "resume": {"argv": ["trainer/run.py", *stage1], "plan": stage1,
                   "checkpoint": f"{run}/stage1/checkpoints/step_000000003", "export": stage1_export},
        "reload": {"export": stage1_export},
        "stage2": {"argv": ["trainer/run.py", *stage2], "plan": stage2,
                   "checkpoint": f"{run}/stage2/checkpoints/step_000000001", "export": stage2_export},
        "pretokenize": {"argv": ["data_prep/pretokenize.py", f"tokenizer={stage2_export}",
                                 f"shards={shards}/train-*.tar", f"output={run}/tokens", "workers=2",
                                 "cpus_per_worker=1", "progress=false"]},
        "generator": {"argv": ["trainer/run.py", *generator], "plan": generator,
                      "checkpoint": f"{run}/generator/checkpoints/step_000000002",
                      "export": f"{run}/generator/exports/step_000000002"},
        "sample": {"argv": ["-m", "trainer.sample", f"generator={run}/generator/exports/step_000000002",
                            f"tokenizer={stage2_export}", f"output={run}/samples", "num_samples=2",
                            "sampling.batch_size=2", "device=cpu", "progress=false", "grid_images=2"]},
        "eval": {"argv": ["evals/run.py", "eval.kind=reconstruction", f"eval.checkpoint={stage2_export}",
                          f"eval.data={shards}/val-*.tar", f"eval.inception_weights={inputs['inception']}",
                          "eval.num_workers=2", "eval.batch_size=4", "eval.chunk_size=4", "eval.preview_images=0",
                          "eval.progress=false", "mlflow.enabled=false", f"output_dir={run}/stage2"]},
    }


# ----------------------------------------------------------------------------------------------
# Running and measuring


def run_command(argv: list[str], log: Path, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Run ``python <argv>`` in the repo under a timeout, with the process-tree watcher."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        watcher = TreePeaks(proc.pid)
        watcher.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = "timeout"
        finally:
            watcher.stop.set()
            watcher.join()
    text = log.read_text(errors="replace")
    workers = watcher.matching(r"RayTrainWorker")
    actors = watcher.matching(r"^ray::(?!IDLE|RayTrainWorker|TrainController|_|PlacementGroup|Synchron|Dataset|"
                              r"Preemption|DashboardAgent|RuntimeEnv)")
    driver = watcher.peaks.get(proc.pid, ("", 0))[1]
    steps = [(int(m.group(1)), float(m.group(2))) for m in re.finditer(r"step (\d+)/\d+ \| loss \S+ \| ([\d.]+) img/s",
                                                                       text)]
    killed = re.findall(r"(?:OutOfMemoryError|killed.*memory|Task was killed due to the node running low on memory)"
                        r"[^\n]*", text)
    return {"exit": code, "seconds": time.perf_counter() - started, "worker_peaks": workers, "actor_peaks": actors,
            "driver_peak": driver, "step_rates": steps, "oom": killed[:2],
            "error": _last_error(text) if code != 0 else None}


def _last_error(text: str) -> str | None:
    causes = re.findall(r"^(?:training failed: )?([\w.]*(?:Error|Exception)\b[^\n]*)", text, re.M)
    return causes[-1][:300] if causes else text.strip().splitlines()[-1][:300] if text.strip() else None


def _size(path: str | Path) -> int | None:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return None


def plan_of(stage: str, overrides: list[str], timeout: float) -> dict[str, Any]:
    """The capacity plan of a command's config, computed in a fresh process (its probe's memory is
    freed before the run it describes starts)."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--plan-json", stage, json.dumps(overrides)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    match = re.search(r"^PLAN (.*)$", done.stdout, re.M)
    if done.returncode != 0 or not match:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(match.group(1))


def _plan_json(stage: str, overrides: list[str]) -> int:
    from trainer.config import build_config
    from trainer.plan import make_plan, render
    from trainer.schema import STAGE_SCHEMAS, Stage

    cfg = build_config(stage, STAGE_SCHEMAS[Stage(stage)], overrides)
    plan = make_plan(cfg)
    print(render(plan), file=sys.stderr)
    print("PLAN " + json.dumps({
        "trainable": plan.counts.trainable, "frozen": plan.counts.frozen, "peak": plan.peak,
        "peak_phase": plan.peak_phase, "train_peak": plan.train_peak, "runtime": plan.runtime,
        "phases": {k: v + plan.runtime for k, v in plan.phases.items()},
        "checkpoint": sum(plan.checkpoint_bytes.values()), "export": plan.export_bytes,
        "activation_per_sample": plan.activation.bytes_per_sample if plan.activation else None}))
    return 0


def run_phase(experiment: str, phase: str, spec: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0",
           "TITOK_HOME": str(work / "titok-home")}
    env.pop("RAY_ADDRESS", None)
    result: dict[str, Any] = {}
    if phase == "reload":
        started = time.perf_counter()
        code = ("import sys, json, torch; sys.path.insert(0, '.');"
                "from trainer.models import load_tokenizer;"
                f"m = load_tokenizer({spec['export']!r}); s = m.config.image_size;"
                "t = m.encode(torch.rand(1, 3, s, s));"
                "print('RELOAD', json.dumps({'params': sum(p.numel() for p in m.parameters()),"
                " 'tokens': list(t.shape)}))")
        measured = run_command(["-c", code], work / experiment / "logs" / "reload.log", timeout, env)
        match = re.search(r"^RELOAD (.*)$", (work / experiment / "logs" / "reload.log").read_text(), re.M)
        result.update(measured, reloaded=json.loads(match.group(1)) if match else None,
                      seconds=time.perf_counter() - started)
        result["export_bytes"] = _size(Path(spec["export"]) / "model.safetensors")
        return result
    if "plan" in spec:
        stage = spec["plan"][0].split("=", 1)[1]
        result["plan"] = plan_of(stage, spec["plan"][1:], timeout)
    result.update(run_command(spec["argv"], work / experiment / "logs" / f"{phase}.log", timeout, env))
    if "checkpoint" in spec:
        result["checkpoint_bytes"] = _size(spec["checkpoint"])
        result["export_bytes"] = _size(Path(spec["export"]) / "model.safetensors")
    if phase == "sample":
        npz = work / experiment / "samples" / "samples.npz"
        result["npz_bytes"] = _size(npz)
    return result


# ----------------------------------------------------------------------------------------------
# Table


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value / GiB:.2f}"


def table(results: dict[str, dict[str, dict]]) -> str:
    head = (f"{'experiment':<15}{'phase':<12}{'params':>9}{'plan GiB':>9}{'meas GiB':>9}{'ratio':>7}{'s/step':>8}"
            f"{'ckpt GiB':>9}{'export':>8}{'wall s':>8}  status")
    lines = [head]
    for experiment in results:
        for phase in PHASES:
            r = results[experiment].get(phase)
            if r is None:
                continue
            plan = r.get("plan") or {}
            peaks = r.get("worker_peaks") or r.get("actor_peaks") or []
            measured = max(peaks) if peaks else r.get("driver_peak")
            planned = plan.get("peak")
            ratio = f"{measured / planned:.2f}" if measured and planned else "-"
            rates = r.get("step_rates") or []
            batch = 2  # 2 workers x 1 image
            s_step = f"{batch / rates[-1][1]:.1f}" if rates and rates[-1][1] > 0 else "-"
            params = plan.get("trainable") or (r.get("reloaded") or {}).get("params")
            status = "ok" if r.get("exit") == 0 else f"FAILED ({r.get('exit')}): {r.get('error') or ''}"[:120]
            if r.get("oom"):
                status += " [OOM]"
            lines.append(f"{experiment:<15}{phase:<12}{(f'{params / 1e6:.1f}M' if params else '-'):>9}{_g(planned):>9}"
                         f"{_g(measured):>9}{ratio:>7}{s_step:>8}{_g(r.get('checkpoint_bytes')):>9}"
                         f"{_g(r.get('export_bytes')):>8}{r.get('seconds', 0):8.0f}  {status}")
    return "\n".join(lines)


def _finished(results: dict[str, dict[str, dict]], experiment: str, phase: str) -> bool:
    return results.get(experiment, {}).get(phase, {}).get("exit") == 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--plan-json"]:
        return _plan_json(argv[1], json.loads(argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS))
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--work-dir", default="/tmp/titok-rehearsal")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="per command")
    parser.add_argument("--redo", action="store_true", help="run phases again even when recorded")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config key for every training phase (and its plan), e.g. "
                             "trainer.activation_checkpointing=true; use its own --work-dir")
    parser.add_argument("--table", action="store_true", help="only print the table of recorded results")
    parser.add_argument("--clean", action="store_true", help="delete each experiment's run dirs after its last phase")
    args = parser.parse_args(argv)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / "results.json"
    results: dict[str, dict[str, dict]] = json.loads(results_file.read_text()) if results_file.exists() else {}
    if not args.table:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        inputs = prepare(work)
        for experiment in args.experiments.split(","):
            specs = commands(experiment, work, inputs, tuple(args.set))
            for phase in args.phases.split(","):
                if _finished(results, experiment, phase) and not args.redo:
                    continue  # a failed phase runs again
                print(f"== {experiment} {phase}", flush=True)
                result = run_phase(experiment, phase, specs[phase], work, args.timeout_s)
                results.setdefault(experiment, {})[phase] = result
                results_file.write_text(json.dumps(results, indent=2))
                peaks = result.get("worker_peaks") or result.get("actor_peaks") or []
                print(f"   exit {result.get('exit')} in {result.get('seconds', 0):.0f} s; peaks "
                      f"{[round(p / GiB, 2) for p in peaks[:4]]} GiB; plan {(result.get('plan') or {}).get('peak')}",
                      flush=True)
                if result.get("exit") != 0:
                    print(f"   {result.get('error')}", flush=True)
                    break
            if args.clean and all(_finished(results, experiment, p) for p in PHASES):
                shutil.rmtree(work / experiment, ignore_errors=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
