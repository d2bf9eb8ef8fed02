"""Notebook helpers: a live plot of a run's metrics, fed by ``sft.run(on_row=...)``.

Used by the notebooks in ``notebooks/``; IPython is imported only when a plot is drawn, so
the module imports anywhere (outside a notebook the figure is simply not displayed).
"""

from __future__ import annotations

import math
from typing import Sequence

from jlora.study import report


class LivePlot:
  """One panel per metric, redrawn in place each time a row carries one of them.

  ``sft.run(cfg, on_row=LivePlot(["loss", "eval_loss"]))`` draws the training loss as
  it is logged; ``rows`` keeps every point for later use. Row 0 (held-out metrics before
  training) is drawn like any other row. A metric with 20 points or more (the per-step
  training loss) is drawn smoothed over a tenth of its points with the raw points faint
  behind; sparser ones (held-out evaluations every ``eval.every`` steps) as points.
  """

  def __init__(self, keys: Sequence[str | tuple[str, ...]], title: str = "",
               width: float = 4.0, height: float = 3.0):
    import matplotlib.pyplot as plt
    self.panels = [(k,) if isinstance(k, str) else tuple(k) for k in keys]
    self.points: dict[str, list[tuple[int, float]]] = {}
    self.fig, axes = plt.subplots(1, len(self.panels), squeeze=False,
                                  figsize=(width * len(self.panels), height))
    self.axes = list(axes[0])
    if title:
      self.fig.suptitle(title)
    plt.close(self.fig)  # shown through its display handle only, not again at cell end
    self.handle = None

  def __call__(self, row: dict) -> None:
    hit = False
    for key, value in row.items():
      if any(key in panel for panel in self.panels) and _number(value):
        self.points.setdefault(key, []).append((int(row["step"]), float(value)))
        hit = True
    if hit:
      self.draw()

  def draw(self) -> None:
    for ax, panel in zip(self.axes, self.panels):
      ax.clear()
      for key in panel:
        xy = self.points.get(key, [])
        if len(xy) >= 20:  # a noisy per-step curve: smoothed, the raw points faint behind
          steps, values = zip(*xy)
          line, = ax.plot(steps, report.smooth(values, max(1, len(xy) // 10) | 1),
                          label=f"{key} (smoothed)")
          ax.plot(steps, values, lw=0.7, alpha=0.3, color=line.get_color())
        elif xy:
          ax.plot(*zip(*xy), marker=".", label=key)
      ax.set_xlabel("step")
      ax.set_title(", ".join(panel))
      ax.grid(alpha=0.3)
      if len(panel) > 1:
        ax.legend()
    self.fig.tight_layout()
    try:
      from IPython import display
    except ImportError:
      return
    if self.handle is None:
      self.handle = display.display(self.fig, display_id=True)
    else:
      self.handle.update(self.fig)


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and \
      math.isfinite(value)


def answers_table(records: list[dict], columns: dict[str, list[str]], check=None) -> str:
  """A markdown table: each record's prompt, expected answer and each column's text
  (``check(text, answer)`` marks the right ones)."""
  names = list(columns)
  lines = ["| prompt | answer | " + " | ".join(names) + " |",
           "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
  for i, record in enumerate(records):
    cells = []
    for name in names:
      text = " ".join(columns[name][i].split()).replace("|", "\\|")
      right = check is not None and check(columns[name][i], record["answer"])
      mark = "" if check is None else " ✓" if right else " ✗"
      cells.append(f"`{text}`{mark}")
    prompt = " ".join(str(record.get("prompt", "")).split()).replace("|", "\\|")
    lines.append(f"| {prompt} | {record['answer']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
