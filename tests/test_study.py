"""jlora.study: ``jlora study``'s one-line errors that write nothing, and a full disk while a
study writes its plot."""

import json
import os

from jlora import cli


def test_study_errors_are_one_line_and_write_nothing(tmp_path, capsys):
  out = tmp_path / "s"
  notes = tmp_path / "notes.txt"
  notes.write_text("my notes")
  for args, says in ((["nope"], "unknown study 'nope'"),
                     (["rank", "--budget", "huge"], "unknown budget 'huge'"),
                     (["rank", "--set", "lora.rnak=2"], "lora.rnak"),
                     (["rank", "--model", str(tmp_path / "missing")], "no such file"),
                     (["rank", "--model", str(notes)], "notes.txt"),
                     (["all", "--budget", "huge"], "unknown budget 'huge'"),
                     (["all", "--set", "lora.rnak=2"], "lora.rnak")):
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
  # study all checks every study's directory before it runs the first
  (mine / "lr").mkdir()
  (mine / "lr" / "data.csv").write_text("mine")
  os.remove(mine / "thesis.tex")
  assert cli.main(["study", "all", "--budget", "smoke", "--out", str(mine)]) == 2
  assert "a directory that holds no study" in capsys.readouterr().err
  assert sorted(os.listdir(mine)) == ["lr"]


def test_a_full_disk_while_a_study_writes_its_plot_is_one_line(small_disk, capsys,
                                                              monkeypatch):
  from jlora.study import compute
  # what is under test is the writing: the counts stand in for XLA's (tests/study and the
  # e2e smoke studies test them), ~25 s of compiling per invocation saved
  monkeypatch.setattr(compute, "layer_flops", lambda w: ((2 + 6 * 16 / w) * w, 3.0 * w))
  monkeypatch.setattr(compute, "step_ms", lambda *args: 1.0)
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
