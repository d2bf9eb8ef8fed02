"""jlora.models.hub: Hugging Face Hub ids, offline: a Hub cache built on disk in the Hub's own
layout (``models--org--name/snapshots/REV``, ``refs/main``), read through huggingface_hub's
real code path with offline mode on. Nothing downloads."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from jlora import cli, models
from jlora.core import lora, optim
from jlora.data import Tokenizer
from jlora.interop import peft
from jlora.models import hub
from tests.helpers import randomize_b, recipe, tiny_model_dir, write_toml

REV = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache, repo, files_dir, rev=REV):
  """Put the files of ``files_dir`` in the Hub cache as repo ``repo`` at revision ``rev``."""
  root = cache / ("models--" + repo.replace("/", "--"))
  shutil.copytree(files_dir, root / "snapshots" / rev)
  (root / "refs").mkdir(parents=True, exist_ok=True)
  (root / "refs" / "main").write_text(rev)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
  """A tiny model directory and a PEFT adapter for it, both local."""
  out = tmp_path_factory.mktemp("local")
  model_dir = tiny_model_dir(str(out))
  _, params, cfg = models.load(model_dir)
  spec = models.lora_spec(cfg, rank=2)
  adapters = randomize_b(lora.init_adapters(params, spec, jax.random.PRNGKey(0)),
                         jax.random.PRNGKey(1))
  adapter_dir = peft.save_peft(str(out / "adapter"), adapters, spec, cfg)
  return model_dir, adapter_dir


@pytest.fixture
def cache(tmp_path, monkeypatch, local):
  from huggingface_hub import constants
  root = tmp_path / "hub"
  _cache_repo(root, "jlora-test/tiny", local[0])
  _cache_repo(root, "jlora-test/tiny-adapter", local[1])
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  return root


def test_a_model_and_an_adapter_load_by_hub_id(cache, local):
  snapshot = str(cache / "models--jlora-test--tiny" / "snapshots" / REV)
  assert hub.resolve("jlora-test/tiny") == snapshot
  assert hub.resolve(f"jlora-test/tiny@{REV}") == snapshot
  _, by_id, cfg = models.load("jlora-test/tiny")
  _, by_path, _ = models.load(local[0])
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), by_id, by_path))
  np.testing.assert_array_equal(Tokenizer.from_model("jlora-test/tiny").encode("12+3"),
                                Tokenizer.from_model(local[0]).encode("12+3"))
  got, spec, _ = peft.load_peft("jlora-test/tiny-adapter", by_id, cfg)
  want, _, _ = peft.load_peft(local[1], by_id, cfg)
  assert spec.rank == 2
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_a_local_path_wins_over_a_hub_id(cache, local, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  shutil.copytree(local[0], tmp_path / "jlora-test" / "tiny")
  assert hub.resolve("jlora-test/tiny") == "jlora-test/tiny"
  assert hub.resolve("/no/such/dir") == "/no/such/dir"  # not an id: the caller's error


@pytest.mark.parametrize("model,message", [
    ("jlora-test/nope", "model 'jlora-test/nope' is neither a local path nor in the Hugging "
                        "Face cache"),
    ("jlora-test/tiny@v9", "model 'jlora-test/tiny@v9' is neither a local path nor in the "
                           "Hugging Face cache"),
])
def test_an_unresolvable_id_is_one_line_and_creates_nothing(cache, tmp_path, capsys, model,
                                                           message):
  values = recipe("unused", tmp_path / "run")
  values["model"]["path"] = model
  assert cli.main(["train", write_toml(tmp_path / "r.toml", values)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and message in err and "HF_HUB_OFFLINE is set" in err, err
  assert not (tmp_path / "run").exists()
  assert not os.path.exists(cache / "models--jlora-test--nope")


def test_a_run_resumes_under_the_id_or_the_path_it_resolves_to(cache, local, tmp_path, capsys):
  from jlora.run import config, rundir
  snapshot = hub.resolve("jlora-test/tiny")
  values = recipe("jlora-test/tiny", tmp_path / "run")
  _, lock = rundir.create(config.from_dict(values), resume=False)  # started by id
  lock.release()
  for same in (snapshot, snapshot + "/", "jlora-test/tiny"):
    values["model"]["path"] = same
    assert rundir.check(config.from_dict(values), resume=True) == str(tmp_path / "run")
  values["model"]["path"] = local[1]  # another directory: refused, naming both
  with pytest.raises(ValueError, match='model.path: "jlora-test/tiny" -> "'):
    rundir.check(config.from_dict(values), resume=True)


def test_a_peft_export_records_a_base_that_loads_elsewhere(cache, local, tmp_path):
  snapshot = hub.resolve("jlora-test/tiny")
  assert hub.base_name("smollm2") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
  assert hub.base_name("jlora-test/tiny") == ("jlora-test/tiny", None)
  assert hub.base_name(f"jlora-test/tiny@{REV}") == ("jlora-test/tiny", REV)
  assert hub.base_name(snapshot) == ("jlora-test/tiny", REV)  # a cache path: its id
  assert hub.base_name(local[0]) == (os.path.abspath(local[0]), None)
  # A run on the Hub id exports an adapter whose config names the id, not a local path.
  from jlora.objectives import sft
  from jlora.run import config
  from jlora.run import trained as trained_lib
  values = recipe("jlora-test/tiny", tmp_path / "run", steps=2)
  sft.run(config.from_dict(values), progress=False, log=lambda _: None)
  out = trained_lib.export_run(str(tmp_path / "run"), str(tmp_path / "peft"))
  saved = peft.read_config(out)
  assert saved["base_model_name_or_path"] == "jlora-test/tiny" and "revision" not in saved
  # PEFT's own loader, in a fresh process offline, finds that base in the Hub cache by id
  # and gives the trained run's logits.
  tokens = [[3, 17, 42, 99, 5, 61]]
  script = ("import json, sys, torch\n"
            "from peft import AutoPeftModelForCausalLM\n"
            "m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)\n"
            "with torch.no_grad():\n"
            f"  print(json.dumps(m.eval()(torch.tensor({tokens})).logits.tolist()))\n")
  done = subprocess.run([sys.executable, "-c", script, out], capture_output=True, text=True,
                        timeout=600, env={**os.environ, "HF_HUB_CACHE": str(cache),
                                          "HF_HUB_OFFLINE": "1"})
  assert done.returncode == 0, done.stderr[-2000:]
  trained = trained_lib.load_trained(str(tmp_path / "run"))
  s = trained.setup
  want = s.model.apply({"params": optim.model_params(trained.trainable, s.frozen, s.plan)},
                       np.asarray(tokens))[0]
  np.testing.assert_allclose(np.asarray(json.loads(done.stdout.strip().splitlines()[-1])),
                             want, atol=1e-4)
