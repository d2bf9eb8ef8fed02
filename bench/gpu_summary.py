"""Issue 22's (and issue 35's group step) targets against what ``bench/gpu_suite.sh`` measured (its .json files).

    python -m bench.gpu_summary bench/gpu_out
"""

from __future__ import annotations

import json
import os
import sys


def _load(out: str, name: str) -> dict | None:
  path = os.path.join(out, f"{name}.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def checks(out: str) -> list[str]:
  """One line per target: the measured value, the target, met or not."""
  lines = []
  mark = lambda ok: "met" if ok else "NOT met"  # noqa: E731
  kernel = _load(out, "kernel")
  row = next((r for r in (kernel or {}).get("rows", []) if r["M"] == 8192 and r["r"] == 16),
             None)
  if row:
    speedup, over_base = row["ref_fb"] / row["fused_fb"], row["fused_fb"] / row["base_fb"]
    lines.append(f"kernel M=8192 r=16 fwd+bwd: fused {speedup:.2f}x the XLA reference "
                 f"(>= 1.15: {mark(speedup >= 1.15)}), {over_base:.2f}x the base matmul "
                 f"(<= 1.1: {mark(over_base <= 1.1)})")
  steps = {(r["model"], r["what"]): r for name in ("jlora", "peft")
           for r in (_load(out, name) or {}).get("rows", [])}
  for model in sorted({m for m, _ in steps}):
    lora, full = steps.get((model, "LoRA")), steps.get((model, "full FT"))
    peft = steps.get((model, "PEFT LoRA"))
    if lora and full:
      ratio = lora["ms"] / full["ms"]
      target = 0.75 if "1b" in model else 1.0
      lines.append(f"{model}: LoRA/full time {ratio:.3f} (< {target}: "
                   f"{mark(ratio < target if target == 1.0 else ratio <= target)}), "
                   f"LoRA MFU {lora['mfu']:.1%}" +
                   (f" (>= 40%: {mark(lora['mfu'] >= 0.40)})" if "1b" in model else ""))
    if lora and peft:
      vs = lora["tokens_per_s"] / peft["tokens_per_s"]
      lines.append(f"{model}: jlora LoRA tokens/s {vs:.2f}x PEFT LoRA's (>= 1.3: "
                   f"{mark(vs >= 1.3)})")
  group = _load(out, "group")
  if group:
    lines.append(f"{group['adapters']} adapters x {group['rows']} rows together: "
                 f"{group['ratio']:.2f}x the solo step's tokens/s (>= 5: "
                 f"{mark(group['ratio'] >= 5)})")
  return lines


if __name__ == "__main__":
  print("\n".join(checks(sys.argv[1] if len(sys.argv) > 1 else "bench/gpu_out")))
