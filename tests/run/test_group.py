"""jlora.run.group: runs trained together over one base (``jlora train A.toml B.toml``):
each run ends where its solo run ends, in its own run directory that works alone; a group
that cannot train is refused before any run directory exists; a run that diverges leaves
the group while the others finish."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from jlora import cli
from jlora.objectives import sft
from jlora.run import config, trained
from tests.helpers import recipe, write_toml


def _rows(run):
  return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _group(model_dir, tmp_path):
  """Three runs that differ in rank, targets, LR, schedule, steps, data seed and rows."""
  a = recipe(model_dir, tmp_path / "a")  # the conftest's trained_run recipe
  b = recipe(model_dir, tmp_path / "b", lr=1e-2, steps=6, seed=3)
  b["lora"] = {"rank": 2, "targets": "attn"}
  c = recipe(model_dir, tmp_path / "c", schedule="cosine", warmup_steps=2, grad_clip=0.05)
  c["data"] = {**c["data"], "batch_size": 16, "seed": 5}
  c["lora"] = {"rank": 8, "alpha": 8.0, "rslora": True}
  return {"a": a, "b": b, "c": c}


def test_each_run_of_a_group_ends_where_its_solo_run_ends(model_dir, trained_run, tmp_path,
                                                          capsys):
  runs = _group(model_dir, tmp_path)
  paths = [write_toml(tmp_path / f"{n}.toml", v) for n, v in runs.items()]
  assert cli.main(["train", *paths, "--no-progress"]) == 0
  out = capsys.readouterr().out
  assert all(f"{p}: done: " in out for p in paths)
  solos = {"a": trained_run[0]}
  for name in ("b", "c"):
    solo = {**runs[name], "run_dir": str(tmp_path / f"solo_{name}")}
    sft.run(config.from_dict(solo), progress=False, log=lambda _: None)
    solos[name] = solo["run_dir"]
  for name, solo in solos.items():
    got, want = _rows(tmp_path / name), _rows(type(tmp_path)(solo))
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
      for key in ("loss", "grad_norm", "eval_loss", "accuracy", "lr"):
        if key in w:
          np.testing.assert_allclose(g[key], w[key], rtol=2e-5, err_msg=f"{name} {key}")
    got, want = (load_file(os.path.join(d, "adapters.safetensors"))
                 for d in (tmp_path / name, solo))
    assert got.keys() == want.keys()
    for k in want:  # Adam turns f32 rounding into update noise of about lr x rel. error
      np.testing.assert_allclose(got[k], want[k], rtol=0, atol=3e-4, err_msg=f"{name} {k}")
    summary = json.load(open(tmp_path / name / "summary.json"))
    assert summary["steps"] == runs[name]["train"]["steps"]
    assert json.load(open(tmp_path / name / "config.json"))["run_dir"] == str(tmp_path / name)
  # the clipped run moved (0.05 clips every step) and the attention-only run has no MLP
  assert not any("mlp" in k for k in load_file(tmp_path / "b" / "adapters.safetensors"))
  # a group's run directory is a solo run's: export, generate and resume work on it alone
  out_dir = trained.export_run(str(tmp_path / "b"), str(tmp_path / "peft"))
  assert json.load(open(os.path.join(out_dir, "adapter_config.json")))["r"] == 2
  # `jlora generate a b c`: each run's answer from one batch is what the run alone answers,
  # sampled ones too (greedy ones: tests/models/test_generate.py)
  dirs = [str(tmp_path / n) for n in "abc"]
  alone = [trained.generate(d, "1+1=", max_new_tokens=5, temperature=1.0, seed=3)
           for d in dirs]
  assert cli.main(["generate", *dirs, "--prompt", "1+1=", "--max-new-tokens", "5",
                   "--temperature", "1.0", "--seed", "3"]) == 0
  assert capsys.readouterr().out == "".join(f"== {d}\n{t}\n" for d, t in zip(dirs, alone))
  assert len(set(alone)) > 1  # the adapters answer differently (one key stream for all)
  other = tmp_path / "other"  # a run on another base: one line, before anything loads
  other.mkdir()
  saved = json.load(open(tmp_path / "b" / "config.json"))
  json.dump({**saved, "model": {**saved["model"], "path": "/another/base"}},
            open(other / "config.json", "w"))
  assert cli.main(["generate", dirs[0], str(other), "--prompt", "1+1="]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"jlora: error: {other}: model.path = '/another/base', but {dirs[0]} has "
                 f"{saved['model']['path']!r}: runs that generate together share model"], err
  longer = {**runs["c"], "train": {**runs["c"]["train"], "steps": 10}}
  assert cli.main(["train", write_toml(tmp_path / "c10.toml", longer), "--resume",
                   "--no-progress"]) == 0
  assert [r["step"] for r in _rows(tmp_path / "c")][-3:] == [8, 9, 10]


@pytest.mark.parametrize("change, says", [
    ({"b": {"model": {"dtype": "bfloat16"}}}, "b.toml: model.dtype = 'bfloat16', but "),
    ({"b": {"data": {"seq_len": 32}}}, "b.toml: data.seq_len = 32, but "),
    ({"b": {"train": {"grad_accum": 2}}}, "b.toml: train.grad_accum = 2, but "),
    ({"b": {"run_dir": "a"}}, "b.toml: run_dir "),
    ({"b": {"train": {"method": "full"}}}, "b.toml: train.method = 'full'"),
    ({"b": {"lora": {"full": ["layers/input_norm/scale"]}}}, "b.toml: lora.full = "),
    ({"b": {"data": {"source": "/no/such.jsonl"}}}, "b.toml: "),  # its own preflight
    ({"b": {"lora": {"rank": "x"}}}, "b.toml: "),  # its config does not parse
])
def test_a_group_with_one_bad_run_is_refused_before_any_run_dir_exists(
    model_dir, tmp_path, capsys, change, says):
  runs = {n: recipe(model_dir, tmp_path / n) for n in "ab"}
  for name, sections in change.items():
    for section, values in sections.items():
      if section == "run_dir":
        runs[name]["run_dir"] = str(tmp_path / values)
      else:
        runs[name][section] = {**runs[name].get(section, {}), **values}
  paths = [write_toml(tmp_path / f"{n}.toml", v) for n, v in runs.items()]
  assert cli.main(["train", *paths, "--no-progress"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"jlora: error: {tmp_path}/{says}"), err
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_diverging_run_stops_alone_and_the_others_finish(model_dir, tmp_path, capsys):
  ok = recipe(model_dir, tmp_path / "ok", steps=6)
  boom = recipe(model_dir, tmp_path / "boom", lr=1e30, grad_clip=0.0, steps=6)
  paths = [write_toml(tmp_path / f"{n}.toml", v) for n, v in (("ok", ok), ("boom", boom))]
  assert cli.main(["train", *paths, "--no-progress"]) == 1
  err = capsys.readouterr().err
  assert f"jlora: {paths[1]}: loss, gradient or parameters became non-finite at step" in err
  assert (tmp_path / "ok" / "summary.json").exists()
  assert not (tmp_path / "boom" / "summary.json").exists()
  rows = _rows(tmp_path / "boom")
  assert all(np.isfinite(r["loss"]) for r in rows[1:])  # as a solo run records it
  assert [r["step"] for r in _rows(tmp_path / "ok")] == list(range(7))
  solo = {**ok, "run_dir": str(tmp_path / "solo")}
  sft.run(config.from_dict(solo), progress=False, log=lambda _: None)
  for g, w in zip(_rows(tmp_path / "ok"), _rows(tmp_path / "solo")):
    np.testing.assert_allclose(g.get("loss", 0), w.get("loss", 0), rtol=2e-5)


def test_advise_checks_each_run_and_the_group(model_dir, tmp_path, capsys):
  a = write_toml(tmp_path / "a.toml", recipe(model_dir, tmp_path / "a"))
  b = write_toml(tmp_path / "b.toml", {**recipe(model_dir, tmp_path / "b"),
                                       "lora": {"rank": 2, "targets": "attn"}})
  assert cli.main(["advise", a, b]) == 0
  out = capsys.readouterr().out
  assert f"== {a}" in out and f"== {b}" in out and "MLP layers not adapted" in out
  c = write_toml(tmp_path / "c.toml", {**recipe(model_dir, tmp_path / "a")})
  assert cli.main(["advise", a, c]) == 2
  assert "c.toml: run_dir" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["nf4", "gguf"])
def test_a_group_on_a_quantised_base_trains_like_its_solo_runs_and_moe_is_refused(
    request, tmp_path, capsys, fmt):
  """Stacked adapters over one quantised base: nf4, and a GGUF's own blocks (the 32-weight
  kinds, two stacks mixing kinds per layer: ``helpers.SMALL_GGUF_KINDS``)."""
  def runs(model, name, **lora):
    out = {n: recipe(model, tmp_path / name / n, steps=4, seed=i)
           for i, n in enumerate("ab")}
    out["b"]["lora"] = {"rank": 2, **lora}
    for v in out.values():
      v["model"] = {**v["model"], "quantize": fmt}
    (tmp_path / name).mkdir()
    return out
  quant_models = request.getfixturevalue("quant_models")
  quant = runs(request.getfixturevalue("gguf_small") if fmt == "gguf"
               else quant_models["llama_tied"], fmt)
  paths = [write_toml(tmp_path / fmt / f"{n}.toml", v) for n, v in quant.items()]
  assert cli.main(["train", *paths, "--no-progress"]) == 0
  for n, values in quant.items():
    solo = {**values, "run_dir": str(tmp_path / fmt / f"solo_{n}")}
    sft.run(config.from_dict(solo), progress=False, log=lambda _: None)
    got, want = (load_file(os.path.join(d, "adapters.safetensors"))
                 for d in (tmp_path / fmt / n, solo["run_dir"]))
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5, err_msg=f"{n} {k}")
  if fmt == "gguf":
    return  # the MoE refusal below is the group's, whatever the format
  moe = runs(quant_models["qwen3_moe"], "moe")
  paths = [write_toml(tmp_path / "moe" / f"{n}.toml", v) for n, v in moe.items()]
  capsys.readouterr()
  assert cli.main(["train", *paths, "--no-progress"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "a.toml: adapters on MoE experts" in err[0], err
  assert not (tmp_path / "moe" / "a").exists() and not (tmp_path / "moe" / "b").exists()
