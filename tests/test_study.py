"""``jlora study``: the verdict rules and the LR fit on synthetic numbers (each rule must
be able to say "not reproduced"), the study machinery end to end at the smoke budget
(results rows, plots, report), resume after a kill, diverged arms, the data split and
the CLI's one-line errors."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from jlora import cli
from jlora.study import assets, runner, verdicts
from jlora.study.verdicts import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED


# --- the LR optimum and the verdict rules --------------------------------------------------

def _parabola(lrs, best, curvature=0.3, floor=2.0):
  return [floor + curvature * (math.log10(lr) - math.log10(best)) ** 2 for lr in lrs]


def test_lr_optimum_recovers_the_vertex_of_a_parabola_in_log_lr():
  grid = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
  for best in (2e-4, 7e-4, 1.3e-3, 5e-3):
    o = verdicts.lr_optimum(grid, _parabola(grid, best))
    assert o.bracketed and o.fitted
    assert o.lr == pytest.approx(best, rel=1e-9)
    assert o.loss == min(_parabola(grid, best))


def test_lr_optimum_at_the_grid_edge_is_not_bracketed_and_diverged_arms_count_as_worst():
  grid = [1e-4, 3e-4, 1e-3, 3e-3]
  o = verdicts.lr_optimum(grid, _parabola(grid, 1e-5))
  assert (o.lr, o.bracketed, o.fitted) == (1e-4, False, False)
  # A diverged neighbour (None / NaN) is worse than any finite loss: it brackets the best
  # point, but no parabola goes through it.
  grid = [1e-3, 3e-3, 1e-2]
  o = verdicts.lr_optimum(grid, [2.5, 2.1, None])
  assert (o.lr, o.bracketed, o.fitted) == (3e-3, True, False)
  assert verdicts.lr_optimum(grid, [float("nan")] * 3) is None
  # Order of the points does not matter.
  o = verdicts.lr_optimum([1e-2, 1e-4, 1e-3], _parabola([1e-2, 1e-4, 1e-3], 8e-4))
  assert o.lr == pytest.approx(8e-4, rel=1e-9)


def _opt(lr, bracketed=True):
  return verdicts.Optimum(lr, 2.0, bracketed, bracketed)


def test_lr_ratio_rule():
  full = _opt(1e-4)
  assert verdicts.lr_ratio({"r4": _opt(1e-3), "r32": _opt(1.5e-3)}, full).outcome == REPRODUCED
  assert verdicts.lr_ratio({"r4": _opt(1e-4)}, full).outcome == NOT_REPRODUCED  # 1x
  assert verdicts.lr_ratio({"r4": _opt(1e-3), "r32": _opt(4e-3)}, full).outcome == \
      NOT_REPRODUCED  # one rank at 40x
  assert verdicts.lr_ratio({"r4": _opt(1e-3, False)}, full).outcome == INCONCLUSIVE
  assert verdicts.lr_ratio({"r4": None}, full).outcome == INCONCLUSIVE


def test_layers_rule():
  assert verdicts.layers(3.00, 2.90, 2.895, 0.01).outcome == REPRODUCED
  assert verdicts.layers(2.80, 2.90, 2.90, 0.01).outcome == NOT_REPRODUCED  # attn better
  assert verdicts.layers(3.00, 2.90, 2.80, 0.01).outcome == NOT_REPRODUCED  # mlp << all
  assert verdicts.layers(3.00, 2.90, 3.10, 0.01).outcome == NOT_REPRODUCED  # all << mlp
  assert verdicts.layers(2.905, 2.90, 2.90, 0.01).outcome == INCONCLUSIVE
  assert verdicts.layers(None, 2.9, 2.9, 0.01).outcome == INCONCLUSIVE


def _curves(final_by_rank, early_spread=0.0):
  """Synthetic curves: equal (up to ``early_spread``, growing with rank) for 10 steps."""
  out = {}
  for k, r in enumerate(final_by_rank):
    out[r] = [(s, 3.0 - 0.05 * s + early_spread * k) for s in range(1, 11)]
  return out


def test_rank_rule():
  final = {1: 2.6, 4: 2.5, 16: 2.45}
  assert verdicts.rank(_curves(final), final, 5, 0.02, 0.01).outcome == REPRODUCED
  wide = _curves(final, early_spread=0.2)  # ranks apart from the first updates
  assert verdicts.rank(wide, final, 5, 0.02, 0.01).outcome == NOT_REPRODUCED
  flat = {1: 2.5, 4: 2.5, 16: 2.5}
  assert verdicts.rank(_curves(flat), flat, 5, 0.02, 0.01).outcome == INCONCLUSIVE
  backwards = {1: 2.4, 4: 2.5, 16: 2.6}  # the highest rank ends worst
  assert verdicts.rank(_curves(backwards), backwards, 5, 0.02, 0.01).outcome == \
      NOT_REPRODUCED
  # Step 1 is before any update: a spread there is not held against the rule.
  c = _curves(final)
  c[16][0] = (1, 9.0)
  assert verdicts.rank(c, final, 5, 0.02, 0.01).outcome == REPRODUCED


def test_late_loss_is_the_mean_of_the_last_quarter():
  rows = [{"step": 0, "eval_loss": 9.0}] + [{"step": s, "loss": float(s)} for s in range(1, 9)]
  r = runner.ArmResult(runner.Arm("a", "s", 1, {}), "h", "done", {}, rows, 1.0)
  assert r.late_loss() == 7.5  # steps 7 and 8 (> 6 = 3/4 of 8)
  assert runner.ArmResult(r.arm, "h", "diverged", {}, rows, 1.0).late_loss() is None


def test_batch_flops_capacity_and_rl_rules():
  assert verdicts.batch({2: 0.00, 8: 0.02, 32: 0.08}, 0.01).outcome == REPRODUCED
  assert verdicts.batch({2: 0.08, 8: 0.02, 32: 0.00}, 0.01).outcome == NOT_REPRODUCED
  assert verdicts.batch({2: 0.01, 32: 0.015}, 0.01).outcome == INCONCLUSIVE
  assert verdicts.flop_ratio(0.69).outcome == REPRODUCED
  assert verdicts.flop_ratio(0.90).outcome == NOT_REPRODUCED
  assert verdicts.flop_ratio(0.60).outcome == NOT_REPRODUCED
  assert verdicts.capacity(4, 3.0).outcome == REPRODUCED
  assert verdicts.capacity(16, 3.0).outcome == NOT_REPRODUCED
  assert verdicts.capacity(None, 3.0).outcome == INCONCLUSIVE
  assert verdicts.matches(0.50, 0.52, 0.05, "accuracy").outcome == REPRODUCED
  assert verdicts.matches(0.30, 0.52, 0.05, "accuracy").outcome == NOT_REPRODUCED


# --- data, model, configs ---------------------------------------------------------------------

def test_text_split_is_disjoint_deterministic_and_by_content(tmp_path, monkeypatch):
  monkeypatch.setenv("JLORA_CACHE", str(tmp_path / "cache"))
  corpus = tmp_path / "cache" / "corpora" / "fortunes"
  corpus.mkdir(parents=True)
  docs = [f"saying number {i}: {'x' * (i % 7 + 1)}" for i in range(400)]
  (corpus / "a").write_text("\n%\n".join(docs[:250]) + "\n%\n")
  (corpus / "b").write_text("\n%\n".join(docs[250:]))
  train, test = assets.text_split("fortunes", str(tmp_path / "one"))
  read = lambda p: [json.loads(line)["text"] for line in open(p)]  # noqa: E731
  tr, te = read(train), read(test)
  assert sorted(tr + te) == sorted(docs) and not set(tr) & set(te)
  assert 5 <= len(te) <= 40  # ~5%
  # Another file layout of the same documents: the same split.
  (corpus / "a").write_text("\n%\n".join(docs[::2]))
  (corpus / "b").write_text("\n%\n".join(docs[1::2]))
  train2, test2 = assets.text_split("fortunes", str(tmp_path / "two"))
  assert sorted(read(test2)) == sorted(te) and sorted(read(train2)) == sorted(tr)


def test_arm_hash_follows_the_resolved_config(tmp_path):
  values = {"data": {"source": "task:arithmetic"}, "train": {"steps": 3}}
  arm = runner.Arm("a", "s", 1, {"lora": {"rank": 2}})
  cfg, h = runner.arm_config(values, arm, str(tmp_path))
  assert cfg.lora.rank == 2 and cfg.train.steps == 3 and cfg.run_dir.endswith(f"a-{h}")
  assert runner.arm_config(values, arm, str(tmp_path / "elsewhere"))[1] == h
  other = runner.arm_config({**values, "train": {"steps": 4}}, arm, str(tmp_path))[1]
  assert other != h
  with pytest.raises(ValueError, match="lora.rnak"):
    runner.arm_config(values, runner.Arm("b", "s", 1, {"lora": {"rnak": 2}}), str(tmp_path))


def test_a_diverged_arm_is_kept_and_marked(tmp_path):
  model = assets.tiny_model(str(tmp_path / "model"), hidden=32)
  values = {"model": {"path": model, "remat": False},
            "data": {"source": "task:arithmetic", "chat": False, "seq_len": 32,
                     "batch_size": 8, "prefetch": 0},  # 8 fake devices in tests
            "train": {"steps": 4, "log_every": 1, "checkpoint_every": 4, "grad_clip": 0.0},
            "eval": {"batches": 1, "examples": 0}}
  arms = [runner.Arm("ok", "s", 1e-3, {"train": {"lr": 1e-3}}),
          runner.Arm("boom", "s", 1e30, {"train": {"lr": 1e30}})]
  results = runner.run_arms("t", arms, values, str(tmp_path / "out"), log=lambda _: None)
  ok, boom = results
  assert ok.status == "done" and math.isfinite(ok.final())
  assert boom.status == "diverged" and boom.final() is None and "non-finite" in boom.message
  rows = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
  assert {r["arm"] for r in rows} == {"ok", "boom"}
  assert [r["status"] for r in rows if r["arm"] == "boom"][0] == "diverged"
  # Running again skips both (the diverged arm is not retried).
  log = []
  again = runner.run_arms("t", arms, values, str(tmp_path / "out"), log=log.append)
  assert [r.status for r in again] == ["done", "diverged"]
  assert all("skipped" in line for line in log)


def test_compute_flops_difference_is_the_weight_gradients():
  """FullFT minus rank-1 LoRA gradient FLOPs ~ the gradient matmuls of the weights only
  FullFT trains, 2 x tokens x weights, counted independently from the shapes: the layer's
  projections, the unembedding, and the embedding (whose gradient XLA counts as a
  matmul's)."""
  from jlora.study import compute
  cfg = compute.layer_config(256)
  tokens = compute.SEQ
  lora_f, full_f = compute.xla_flops(cfg, 1, tokens, rank=1)
  d, f = cfg.hidden_size, cfg.intermediate_size
  q = d * cfg.num_heads * cfg.head_dim
  kv = d * cfg.num_kv_heads * cfg.head_dim
  weights = 2 * q + 2 * kv + 3 * d * f
  expected = 2 * tokens * (weights + 2 * cfg.vocab_size * d)
  assert 0.95 < (full_f - lora_f) / expected < 1.05
  assert 0.6 < lora_f / full_f < 0.8


# --- end to end (smoke budget) ----------------------------------------------------------------

def _study(*args):
  return subprocess.run([sys.executable, "-m", "jlora.cli", "study", *args],
                        capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["layers", "lr", "batch", "capacity", "compute", "rl"])
def test_every_study_at_the_smoke_budget(name, tmp_path):  # rank: in the kill test below
  out = tmp_path / name
  _check_smoke(name, out, _study(name, "--budget", "smoke", "--out", str(out)))


def _check_smoke(name, out, done):
  assert done.returncode == 0, done.stderr[-3000:]
  report = (out / "report.md").read_text()
  assert "**Verdict: " in report and "jlora study " + name in report
  verdict = report.split("**Verdict: ")[1].split(".**")[0]
  assert verdict in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)
  for png in [line.split("(")[1].rstrip(")") for line in report.splitlines()
              if line.startswith("![")]:
    assert (out / png).stat().st_size > 1000
  assert any(line.startswith("![") for line in report.splitlines())
  record = json.loads((out / "study.json").read_text())
  assert record["verdict"] == verdict and record["wall_s"] > 0
  assert record["invocations"][0]["machine"]["cpu"]
  rows = [json.loads(line) for line in open(out / "results.jsonl")]
  assert rows and (out / "results.csv").read_text().count("\n") == len(rows) + 1
  if name == "compute":
    assert all(r["FLOP ratio"] > 0 for r in rows)
    return
  arms = {}
  for r in rows:
    arms.setdefault(r["arm"], []).append(r)
  assert len(arms) >= 2
  for arm, rs in arms.items():  # every logged step of a finished arm, once
    if rs[0]["status"] == "done":
      cfg = json.loads(open(next((out / "arms").glob(f"{arm}-*")) / "config.json").read())
      steps = cfg["train"]["steps"]
      every = cfg["train"]["log_every"]
      assert [r["step"] for r in rs] == [0] + list(range(every, steps + 1, every)), arm
      assert all(math.isfinite(r["loss"]) for r in rs[1:])


@pytest.mark.slow
def test_a_killed_study_continues_with_the_same_results(tmp_path):
  whole_dir = tmp_path / "whole"  # uninterrupted: also the rank study's smoke check
  _check_smoke("rank", whole_dir, _study("rank", "--budget", "smoke", "--out", str(whole_dir)))
  out = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, "-m", "jlora.cli", "study", "rank", "--budget",
                           "smoke", "--out", str(out)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 600
  while time.time() < deadline:  # kill once the first arm is finished and the second began
    first = list(out.glob("arms/r1-*/arm.json"))
    second = list(out.glob("arms/r4-*/config.json"))
    if first and second:
      break
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (out / "report.md").exists()
  again = _study("rank", "--budget", "smoke", "--out", str(out))
  assert again.returncode == 0, again.stderr[-2000:]
  assert "r1: finished earlier (done), skipped" in again.stdout
  # Timings differ, and so does the hash: it covers the model's path (each DIR makes its own
  # tiny model). Losses, steps and everything else must be identical.
  strip = lambda r: {k: v for k, v in r.items()  # noqa: E731
                     if k not in ("elapsed_s", "step_s", "data_s", "tokens_per_s", "hash")}
  load = lambda d: [strip(json.loads(line)) for line in open(d / "results.jsonl")]  # noqa
  assert load(out) == load(whole_dir)
  record = json.loads((out / "study.json").read_text())
  assert len(record["invocations"]) == 2


def test_study_errors_are_one_line_and_write_nothing(tmp_path, capsys):
  out = tmp_path / "s"
  notes = tmp_path / "notes.txt"
  notes.write_text("my notes")
  for args, says in ((["nope"], "unknown study 'nope'"),
                     (["rank", "--budget", "huge"], "unknown budget 'huge'"),
                     (["rank", "--set", "lora.rnak=2"], "lora.rnak"),
                     (["rank", "--model", str(tmp_path / "missing")], "no such file"),
                     (["rank", "--model", str(notes)], "notes.txt")):
    assert cli.main(["study", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err
    assert not out.exists()  # not even a lock file
  # --out must be new, empty or a study's own directory; the user's files stay as they were.
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "thesis.tex").write_text("mine")
  for where, says in ((notes, f"--out {notes}: exists and is not a directory"),
                      (mine, f"--out {mine}: a directory that holds no study (no study.json): "
                             "choose a new or empty directory")):
    assert cli.main(["study", "rank", "--budget", "smoke", "--out", str(where)]) == 2
    assert capsys.readouterr().err == f"jlora: error: {says}\n"
  assert notes.read_text() == "my notes" and os.listdir(mine) == ["thesis.tex"]


def test_a_full_disk_while_a_study_writes_its_plot_is_one_line(small_disk, capsys):
  out = small_disk.path / "compute"
  small_disk.fill(free_kib=28)  # the study's record and results fit, its plot does not
  assert cli.main(["study", "compute", "--budget", "smoke", "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert err == f"jlora: error: study {out}: no space left on device ({out}/compute.png)\n"
  assert sorted(os.listdir(out)) == [".lock", "results.csv", "results.jsonl", "study.json"]
  small_disk.empty()  # then the same command finishes the study
  assert cli.main(["study", "compute", "--budget", "smoke", "--out", str(out)]) == 0
  assert (out / "report.md").exists() and (out / "compute.png").stat().st_size > 1000
  assert len(json.loads((out / "study.json").read_text())["invocations"]) == 2
