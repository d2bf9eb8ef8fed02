"""jlora.notebook: the live plot draws each metric as rows arrive; the answers table marks
right and wrong answers."""



def test_live_plot_draws_each_metric_as_rows_arrive():
  from jlora import notebook
  plot = notebook.LivePlot(["loss", ("eval_loss", "accuracy")])
  rows = [{"step": 0, "eval_loss": 3.0, "accuracy": 0.0},
          {"step": 1, "loss": 2.5}, {"step": 2, "loss": float("nan"), "lr": 1e-3},
          {"step": 3, "loss": 2.0, "eval_loss": 1.5, "accuracy": 0.5}]
  for row in rows:
    plot(row)
  assert plot.points == {"eval_loss": [(0, 3.0), (3, 1.5)], "accuracy": [(0, 0.0), (3, 0.5)],
                         "loss": [(1, 2.5), (3, 2.0)]}  # NaN and unplotted keys skipped
  loss_ax, eval_ax = plot.axes
  assert [list(line.get_xdata()) for line in loss_ax.lines] == [[1, 3]]
  assert sorted(line.get_label() for line in eval_ax.lines) == ["accuracy", "eval_loss"]


def test_answers_table_marks_right_and_wrong_answers():
  from jlora import notebook
  table = notebook.answers_table(
      [{"prompt": "What is 1 plus 1?", "answer": "2"}, {"prompt": "a|b", "answer": "3"}],
      {"before": ["5", "x"], "after": ["2", "3 "]}, check=lambda text, ans: text.strip() == ans)
  lines = table.splitlines()
  assert lines[0] == "| prompt | answer | before | after |"
  assert lines[2] == "| What is 1 plus 1? | 2 | `5` ✗ | `2` ✓ |"
  assert lines[3] == "| a\\|b | 3 | `x` ✗ | `3` ✓ |"
