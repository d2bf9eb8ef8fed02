"""jlora.run.driver: objectives plug in as registered kinds: a new objective is one module
plus one ``driver.register``; it gets a ``jlora`` command, a config section with its
defaults and checks, resume that freezes the section, and the advisor; a config is run by
the objective its sections name; resuming a finished run changes nothing."""

import dataclasses
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from jlora import cli
from jlora.objectives import sft
from jlora.run import build, config, driver, plug
from tests.helpers import recipe, write_toml


@dataclasses.dataclass(frozen=True)
class ScaledSection:
  scale: float = 1.0

  def __post_init__(self):
    if self.scale < 0:
      raise ValueError(f"scaled.scale must be >= 0, got {self.scale}")


def _scaled_objective(s: build.Setup) -> plug.Objective:
  """SFT with its training loss multiplied by ``scaled.scale`` (0: nothing learns)."""
  made = sft.sft_objective(s)

  def loss(trainable, frozen, batch):
    total, count = made.loss(trainable, frozen, batch)
    return total * s.cfg.scaled.scale, count

  return dataclasses.replace(made, loss=loss)


@pytest.fixture
def scaled(monkeypatch):
  """A toy objective registered for one test (the registries restored after)."""
  monkeypatch.setattr(driver, "KINDS", dict(driver.KINDS))
  monkeypatch.setattr(config, "SECTIONS", dict(config.SECTIONS))
  return driver.register(driver.Kind(
      "scaled", "scaled", "SFT with a scaled loss", "x.toml", build.Rules(), _scaled_objective,
      config.Section("scaled", ScaledSection, {"lora": {"rank": 2}})))


def test_a_registered_objective_is_a_command_with_its_own_section(scaled, model_dir, tmp_path,
                                                                  capsys):
  values = recipe(model_dir, tmp_path / "run", steps=2)
  del values["lora"]  # the objective's default rank (2) applies
  toml = write_toml(tmp_path / "r.toml", {**values, "scaled": {"scale": 0.0}})
  assert cli.main(["train", toml, "--no-progress"]) == 2  # a recipe of the other command
  assert "the config has the section [scaled]: run it with jlora scaled" in \
      capsys.readouterr().err
  assert not os.path.exists(tmp_path / "run")
  assert cli.main(["scaled", toml, "--no-progress", "--set", "scaled.scale=-1"]) == 2
  assert "scaled.scale must be >= 0, got -1.0" in capsys.readouterr().err
  assert cli.main(["scaled", toml, "--no-progress"]) == 0
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["scaled"] == {"scale": 0.0} and saved["lora"]["rank"] == 2
  # a zero loss has zero gradients: B stays at its initial zeros, so the objective's own
  # loss (not SFT's) is what trained
  adapters = load_file(str(tmp_path / "run" / "adapters.safetensors"))
  b = [v for k, v in adapters.items() if k.endswith("/b")]
  assert b and all(not np.any(v) for v in b)
  again = config.load(str(tmp_path / "run" / "config.json"))
  assert driver.kind_of(again) is scaled and again.scaled == ScaledSection(0.0)
  assert cli.main(["scaled", toml, "--no-progress", "--resume", "--set", "scaled.scale=1.0",
                   "--set", "train.steps=4"]) == 2
  assert "changed since it started: scaled.scale: 0.0 -> 1.0" in capsys.readouterr().err
  assert cli.main(["advise", str(tmp_path / "run" / "config.json")]) == 0


def test_a_config_is_run_by_the_objective_its_sections_name(model_dir, tmp_path):
  from jlora.objectives import rl
  base = recipe(model_dir, tmp_path / "run")
  # config.json of runs from before objectives owned their sections: "rl": null
  old = config.from_dict({**base, "rl": None})
  assert driver.kind_of(old) is sft.SFT and old.rl is None and "rl" not in old.to_dict()
  with_rl = config.from_dict({**base, "rl": {}})
  assert driver.kind_of(with_rl) is rl.RL and with_rl.rl.group_size == 8
  assert with_rl.lora.rank == 4  # the recipe's rank wins over RL's default (1)
  path = write_toml(tmp_path / "sft.toml", {k: v for k, v in base.items() if k != "lora"})
  assert driver.load(path, kind=rl.RL).lora.rank == 1  # jlora rl adds [rl] and its defaults
  assert driver.load(path).rl is None and driver.load(path).lora.rank == 16
  with pytest.raises(ValueError, match=r"the config has no section \[rl\]: run it with "
                                       "jlora train"):
    rl.run(config.load(path))
  with pytest.raises(ValueError, match="rl: expected a table of settings, got 3"):
    config.from_dict({**base, "rl": 3})
  with pytest.raises(ValueError, match=r"unknown config key 'sections'"):
    config.from_dict({**base, "sections": {}})


def _snapshot(run_dir):
  """{relative path: (size, mtime_ns)} of every file in a run directory."""
  out = {}
  for root, _, files in os.walk(run_dir):
    for f in files:
      st = os.stat(os.path.join(root, f))
      out[os.path.relpath(os.path.join(root, f), run_dir)] = (st.st_size, st.st_mtime_ns)
  return out


def test_resuming_a_finished_run_changes_nothing(trained_run, capsys):
  run, toml = trained_run
  before = _snapshot(run)
  summary = json.load(open(os.path.join(run, "summary.json")))
  assert cli.main(["train", toml, "--resume", "--no-progress"]) == 0
  out = capsys.readouterr().out
  assert f"{run} already finished at step 8 (train.steps = 8): nothing to do" in out
  assert _snapshot(run) == before  # not one file rewritten, no new event file
  assert json.load(open(os.path.join(run, "summary.json"))) == summary
