"""A study's outputs besides its results table: PNG plots (matplotlib, headless), the
record of how it ran (``study.json``: command, versions, machine, wall times over every
invocation) and ``report.md`` (claim, rule, verdict, measurements, plots, command)."""

from __future__ import annotations

import datetime
import io
import json
import os
import platform
import shlex
from typing import Any, Sequence

from jlora.infra import fs
from jlora.study import verdicts


def pyplot():
  """matplotlib's pyplot on the Agg backend (files only: no display needed)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save(fig, out: str, name: str) -> str:
  """The figure as PNG ``out/name``, written whole (a full disk leaves no partial file)."""
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=110)
  pyplot().close(fig)
  fs.write_bytes(os.path.join(out, name), png.getvalue())
  return name


def style(ax, xlabel: str, ylabel: str, title: str | None = None, logx: int | None = None,
          legend: bool = True) -> None:
  """Labels, grid, legend; ``logx``: the base of a log x axis."""
  if logx:
    ax.set_xscale("log", base=logx)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3, which="both")
  if legend and ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)


def curves(results, out: str, title: str, key: str = "loss", name: str = "curves.png",
           ylabel: str = "training loss (nats/token)", label=None) -> str | None:
  """``key`` against step, one line per arm (diverged arms dashed)."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.2))
  drawn = False
  for r in results:
    points = r.curve(key)
    if points:
      steps, values = zip(*points)
      ax.plot(steps, values, "--" if r.status != "done" else "-", lw=1.3,
              label=(label(r) if label else r.arm.name) + ("" if r.status == "done"
                                                          else f" ({r.status})"))
      drawn = True
  if not drawn:
    plt.close(fig)
    return None
  style(ax, "step", ylabel, title)
  return save(fig, out, name)


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> dict:
  import jax
  devices = jax.devices()
  return {"platform": platform.platform(), "cpu": cpu_model(), "cores": os.cpu_count(),
          "devices": f"{len(devices)}x {devices[0].device_kind} ({jax.default_backend()})"}


def versions() -> dict:
  import importlib.metadata as md
  out = {"python": platform.python_version()}
  for name in ("jlora", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain"):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      out[name] = None
  return out


def command(argv: Sequence[str]) -> str:
  argv = list(argv)
  argv[0] = "jlora" if argv and os.path.basename(argv[0]) in ("jlora", "__main__.py") \
      else argv[0]
  return shlex.join(argv)


def record_start(out: str, study: str, budget: str, cmd: str) -> dict:
  """Read (or begin) study.json and open this invocation in it."""
  path = os.path.join(out, "study.json")
  record = {"study": study, "budget": budget, "invocations": []}
  if os.path.isfile(path):
    with open(path) as f:
      record = json.load(f)
  record["invocations"].append({
      "command": cmd, "started": datetime.datetime.now().isoformat(timespec="seconds"),
      "machine": machine(), "versions": versions(), "wall_s": None})
  fs.write_json(path, record)
  return record


def record_end(out: str, record: dict, wall_s: float, **fields) -> dict:
  record["invocations"][-1]["wall_s"] = round(wall_s, 1)
  record.update(fields)
  record["wall_s"] = round(sum(i["wall_s"] or 0 for i in record["invocations"]), 1)
  fs.write_json(os.path.join(out, "study.json"), record)
  return record


def _cell(v: Any) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def markdown_table(rows: Sequence[dict]) -> list[str]:
  if not rows:
    return []
  keys = list(dict.fromkeys(k for r in rows for k in r))
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in rows]
  return lines


def write(out: str, *, title: str, claim: str, figure: str, rule: str,
          verdict: verdicts.Verdict, measured: Sequence[str], table: Sequence[dict],
          plots: Sequence[str | None], record: dict, notes: Sequence[str] = ()) -> str:
  """report.md; returns its path."""
  first = record["invocations"][0]
  lines = [f"# {title}", "", f"**The finding.** {claim}", "",
           f"**In the post.** {figure}", "", f"**Verdict rule.** {rule}", "",
           verdict.line(), "", "## Measured", "", *measured, "", *markdown_table(table), ""]
  for p in plots:
    if p:
      lines += [f"![{p}]({p})", ""]
  if notes:
    lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
  lines += ["## How it ran", "", "```", first["command"], "```", "",
            f"Budget `{record['budget']}`; wall time {record['wall_s']:.0f} s over "
            f"{len(record['invocations'])} invocation(s); started {first['started']}.",
            f"Machine: {first['machine']['cpu']}, {first['machine']['cores']} cores, "
            f"{first['machine']['devices']}; {first['machine']['platform']}.",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in first["versions"].items()) + ".",
            "Per-arm rows: `results.jsonl` / `results.csv`; the record: `study.json`.", ""]
  path = os.path.join(out, "report.md")
  fs.write_text(path, "\n".join(lines))
  return path
