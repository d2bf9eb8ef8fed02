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


def smooth(values: Sequence[float], window: int) -> list[float]:
  """A centred moving average over ``window`` points (fewer at the ends)."""
  half = window // 2
  return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
          for i in range(len(values))]


def band(ax, points, label: str, style: str = "-", color=None):
  """One arm's curve from ``runner.mean_curve`` points: the raw mean faint, the mean
  smoothed over ~a tenth of the steps on top, and +-1 standard error (smoothed) as a band
  where there are several seeds."""
  steps = [p[0] for p in points]
  mean = [p[1] for p in points]
  window = max(1, len(steps) // 10) | 1
  line, = ax.plot(steps, smooth(mean, window), style, lw=1.4, color=color, label=label)
  if window > 1:
    ax.plot(steps, mean, style, lw=0.7, alpha=0.3, color=line.get_color())
  if all(p[2] is not None for p in points) and len(points) > 1:
    se = smooth([p[2] for p in points], window)
    centre = smooth(mean, window)
    ax.fill_between(steps, [c - e for c, e in zip(centre, se)],
                    [c + e for c, e in zip(centre, se)], alpha=0.2, color=line.get_color(),
                    lw=0)
  return line


def curves(results, out: str, title: str, key: str = "loss", name: str = "curves.png",
           ylabel: str = "training loss (nats/token)", label=None) -> str | None:
  """``key`` against step, one line per arm: the mean over its seeds smoothed, the raw
  mean faint behind it, a band of +-1 standard error (diverged arms dashed)."""
  from jlora.study import runner
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.2))
  drawn = False
  for group in runner.by_arm(results).values():
    points = runner.mean_curve(group, key)
    if points:
      done = all(r.status == "done" for r in group)
      band(ax, points, (label(group[0]) if label else group[0].arm.name) +
           (f" ({len(group)} seeds)" if len(group) > 1 else "") +
           ("" if done else " (" + "/".join(sorted({r.status for r in group})) + ")"),
           "-" if done else "--")
      drawn = True
  if not drawn:
    plt.close(fig)
    return None
  style(ax, "step", ylabel, title + "\n(smoothed, raw mean faint; band: +-1 s.e. over seeds)")
  return save(fig, out, name)


def differences(ax, diffs: dict[str, Any], tol: float | None, ylabel: str) -> None:
  """Paired differences (``verdicts.Estimate`` by label) with 2-s.e. error bars, zero and
  the +-``tol`` band marked: what the verdict rules read."""
  names = [k for k, d in diffs.items() if d is not None]
  ax.errorbar(range(len(names)), [diffs[k].mean for k in names],
              yerr=[diffs[k].noise for k in names], fmt="o", capsize=5, color="k")
  ax.axhline(0, color="gray", lw=0.8)
  if tol is not None:
    ax.axhspan(-tol, tol, color="#4a4", alpha=0.15, lw=0, label=f"+-tolerance ({tol:g})")
  ax.set_xticks(range(len(names)), names)
  style(ax, "", ylabel + " (2 s.e.)", "differences, seed by seed")


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


def seeds_line(seeds: int) -> str:
  """The report's header line on seeds."""
  if seeds == 0:
    return "*Deterministic: no seeds (a count, not a training run).*"
  if seeds == 1:
    return ("*1 seed: no standard errors; the verdict compares means with the tolerance "
            "alone.*")
  return (f"*{seeds} seeds: every number is the mean +- one standard error over them (seed "
          "k moves the adapter init and the data order; the base and the held-out set are "
          "fixed); differences are taken seed by seed.*")


def write(out: str, *, title: str, claim: str, figure: str, rule: str,
          verdict: verdicts.Verdict, measured: Sequence[str], table: Sequence[dict],
          plots: Sequence[str | None], record: dict, notes: Sequence[str] = (),
          seeds: int = 1) -> str:
  """report.md; returns its path. ``seeds``: how many seeds each arm trained at (0: the
  study is deterministic, e.g. a FLOP count)."""
  first = record["invocations"][0]
  lines = [f"# {title}", "", seeds_line(seeds), "", f"**The finding.** {claim}", "",
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


def write_index(out: str, studies: Sequence[tuple[Any, dict]], budget: str, seeds: int,
                cmd: str) -> str:
  """``index.md`` of ``jlora study all``: one row per study (finding, the post's figure,
  jlora's measurement, verdict, seeds, wall time) linking each report."""
  lines = ["# LoRA Without Regret's findings, measured by jlora", "",
           f"Budget `{budget}`; {seeds} seed(s) per arm (compute: deterministic). "
           "Measurements are means +- one standard error over seeds; a verdict is "
           "\"inconclusive\" where a difference is within 2 standard errors of zero or "
           "crosses its tolerance (each report states its rule).", "",
           "| finding | the post | jlora's measurement | verdict | seeds | wall |",
           "| --- | --- | --- | --- | ---: | ---: |"]
  for study, result in studies:
    report_path = os.path.relpath(result["report"], out)
    cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731
    n = 0 if study.name == "compute" else seeds
    lines.append(f"| [{cell(study.title)}]({report_path}) | {cell(study.figure)} | "
                 f"{cell(result['headline'])} | {result['verdict']} | {n or '-'} | "
                 f"{result['wall_s'] / 60:.0f} min |")
  lines += ["", "How it ran:", "", "```", cmd, "```", ""]
  path = os.path.join(out, "index.md")
  fs.write_text(path, "\n".join(lines))
  return path
