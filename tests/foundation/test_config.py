"""Config layer: merge order, strict validation, one-line errors with exit code 2, secret masking."""

from __future__ import annotations

import enum
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import pytest

from trainer.schema import TokenizerRecipe

from trainer import config as cfglib
from trainer.config import ConfigError, build_config, load_config

REPO = Path(__file__).resolve().parents[2]


class Color(str, enum.Enum):
    red = "red"
    green = "green"


@dataclass
class Inner:
    size: int = 1
    color: Color = Color.red
    tags: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ConfigError("inner.size", f"must be >= 0, got {self.size}")


@dataclass
class Root:
    experiment: Optional[str] = None
    name: str = "schema"
    lr: float = 0.1
    password: Optional[str] = None
    inner: Inner = field(default_factory=Inner)


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "experiments").mkdir()
    (tmp_path / "toy.yaml").write_text("name: base\nlr: 0.2\ninner:\n  size: 2\n")
    (tmp_path / "experiments" / "big.yaml").write_text(
        "toy:\n  name: big\n  inner:\n    size: 10\n    color: green\n"
        "tokenizer:\n  seed: 3\n")
    (tmp_path / "experiments" / "other.yaml").write_text("tokenizer:\n  seed: 1\n")
    monkeypatch.setenv(cfglib.CONFIG_DIR_ENV, str(tmp_path))
    for entry in ("toy", "nofile"):
        monkeypatch.setitem(cfglib.ENTRIES, entry, f"{__name__}:Root")
    return tmp_path


def test_merge_order_schema_base_experiment_overrides(config_dir: Path) -> None:
    assert build_config("toy", Root).name == "base"            # base file over schema default
    cfg = build_config("toy", Root, ["experiment=big"])
    assert (cfg.name, cfg.lr, cfg.inner.size, cfg.inner.color) == ("big", 0.2, 10, Color.green)
    cfg = build_config("toy", Root, ["experiment=big", "inner.size=7", "inner.tags=[a,b]"])
    assert cfg.inner.size == 7 and cfg.inner.tags == ["a", "b"]
    # An experiment without a section for this entry leaves it untouched.
    assert build_config("toy", Root, ["experiment=other"]).name == "base"
    # Entries without a base file use the schema defaults.
    assert build_config("nofile", Root).name == "schema"


@pytest.mark.parametrize("overrides, key, fragment", [
    (["inner.sise=3"], "inner.sise", "did you mean 'size'"),
    (["bogus=1"], "bogus", "valid keys: experiment, inner, lr, name, password"),
    (["inner.color=blue"], "inner.color", "valid: red, green"),
    (["lr=fast"], "lr", "'fast' is not a valid float"),
    (["inner.size=-1"], "inner.size", "must be >= 0"),
    (["experiment=bgi"], "experiment", "valid: big, other (did you mean 'big'?)"),
    (["novalue"], "", "expected key=value"),
])
def test_errors_name_the_key_and_choices(config_dir: Path, overrides, key, fragment) -> None:
    with pytest.raises(ConfigError) as info:
        build_config("toy", Root, overrides)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"config error: {key}" if key else "config error:")
    assert fragment in message


def test_unknown_key_in_a_file_is_rejected_with_its_source(config_dir: Path) -> None:
    (config_dir / "experiments" / "typo.yaml").write_text("toy:\n  inner:\n    sizee: 1\n")
    with pytest.raises(ConfigError, match=r"inner.sizee: unknown key \(from experiment typo\)"):
        build_config("toy", Root, ["experiment=typo"])
    (config_dir / "experiments" / "badsection.yaml").write_text("toyy:\n  name: x\n")
    with pytest.raises(ConfigError, match="unknown section"):
        build_config("toy", Root, ["experiment=badsection"])


def test_load_config_exits_2_with_one_line(config_dir: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        load_config("toy", Root, ["inner.color=blue"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "inner.color" in err and "red, green" in err


def test_help_prints_the_merged_config(config_dir: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        load_config("toy", Root, ["--help", "experiment=big", "lr=0.5"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "name: big" in out and "lr: 0.5" in out and "size: 10" in out and "experiments: big, other" in out


def test_flatten_and_yaml_mask_secrets(config_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SeCrEt-VaLuE-42")
    cfg = build_config("toy", Root, ["password=hunter2", "name=uses-SeCrEt-VaLuE-42-inline"])
    flat = cfglib.flatten(cfg)
    assert flat["password"] == cfglib.MASK
    assert flat["inner.size"] == "2" and flat["inner.color"] == "red"
    dumped = cfglib.to_yaml(cfg) + repr(flat)
    assert "hunter2" not in dumped and "SeCrEt-VaLuE-42" not in dumped


def test_run_py_rejects_a_misspelled_stage() -> None:
    """The acceptance check: one line naming `stage` and the valid stages, exit code 2."""
    proc = subprocess.run([sys.executable, "trainer/run.py", "stage=tokenzier"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "stage" in lines[0] and "tokenizer" in lines[0] and "generator" in lines[0]
    assert proc.stdout == ""


# Keys required by the default choice of another key (checked in __post_init__, not MISSING).
REQUIRED_BY_CHOICE = {"eval": ["eval.input1=placeholder", "eval.input2=placeholder"]}


def test_shipped_configs_are_valid() -> None:
    """Every entry's base YAML and every experiment section (and every tokenizer recipe) validates.

    Keys the user must always give (``input=``, ``output=``...) get a placeholder value."""
    from omegaconf import OmegaConf

    checked = 0
    for entry in cfglib.ENTRIES:
        schema = cfglib.entry_schema(entry)
        required = [f"{key}=placeholder" for key in sorted(OmegaConf.missing_keys(OmegaConf.structured(schema)))]
        required += REQUIRED_BY_CHOICE.get(entry, [])
        for experiment in [None, *cfglib.available_experiments()]:
            # Every recipe on each tokenizer size, unless the experiment pins one (demo does).
            pinned = experiment and "recipe:" in (cfglib.config_dir() / "experiments" / f"{experiment}.yaml").read_text()
            variants = [[f"tokenizer.recipe={r.value}"] for r in TokenizerRecipe] \
                if entry == "tokenizer" and not pinned else [[]]
            for variant in variants:
                overrides = [f"experiment={experiment}"] if experiment else []
                build_config(entry, schema, [*overrides, *required, *variant])
                checked += 1
    assert checked >= len(cfglib.ENTRIES) * (1 + len(cfglib.available_experiments()))


def test_config_group_overlay_is_chosen_by_a_field_value(config_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/<entry>/<field>/<value>.yaml sits between the base file and the experiment."""
    monkeypatch.setitem(cfglib.GROUPS, "toy", ("inner.color",))
    (config_dir / "toy" / "color").mkdir(parents=True)
    (config_dir / "toy" / "color" / "green.yaml").write_text("lr: 0.7\ninner:\n  tags: [from-green]\n")
    assert build_config("toy", Root).lr == 0.2                       # red: no overlay file
    cfg = build_config("toy", Root, ["inner.color=green"])
    assert cfg.lr == 0.7 and cfg.inner.tags == ["from-green"]
    cfg = build_config("toy", Root, ["experiment=big"])               # the experiment picks green...
    assert cfg.lr == 0.7 and cfg.inner.size == 10                     # ...and still wins over the overlay
    assert build_config("toy", Root, ["inner.color=green", "lr=0.9"]).lr == 0.9
