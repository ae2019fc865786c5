"""What a process must import to hold a training run's config and worker function stays light.

Ray Train's controller unpickles ``trainer.loop.train_worker`` and its config for every launch, and
the driver (``trainer/run.py``) reads the config before it can refuse a bad one: both import
``trainer.loop`` on the critical path of a launch. torchvision (it brings ``torch._dynamo``) and
DeepSpeed are needed only where networks are built, in the workers. Measured on 2 cores: 4.9-5.4 s
for ``import ray.train.torch, trainer.loop`` without them against 7.3-7.6 s with torchvision.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torchvision", "torch._dynamo", "deepspeed", "lpips")


def test_the_worker_function_and_its_config_import_no_network_libraries() -> None:
    probe = ("import json, sys; import trainer.loop, trainer.schema, trainer.tracking; "
             f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
