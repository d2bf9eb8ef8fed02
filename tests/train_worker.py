"""Runs ``jlora train`` in a subprocess and SIGKILLs itself at a chosen point, like a
preempted or crashed job: ``python -m tests.train_worker CONFIG MODE N [--resume]``
(CONFIG: one recipe, or several joined by commas: a group trained together).

MODE ``none``: not killed (the reference run, on the same devices). MODE ``step``: killed
while dispatching step N (mid-training, checkpoint saves possibly in flight). MODE
``save``: killed during the N-th checkpoint save, after every file of it is written to
orbax's temporary directory and before the atomic rename that commits it. MODES
``sigterm`` / ``sigint``: the process sends itself that signal (through the OS, as a
scheduler or Ctrl-C would) while dispatching step N, and exits as jlora decides.
"""

import os
import signal
import sys


def main():
  config, mode, n, *rest = sys.argv[1:]
  n = int(n)
  calls = {"count": 0}

  def kill_on_nth(fn, sig=signal.SIGKILL):
    def wrapped(*args, **kwargs):
      calls["count"] += 1
      if calls["count"] == n:
        os.kill(os.getpid(), sig)
      return fn(*args, **kwargs)
    return wrapped

  signals = {"step": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigint": signal.SIGINT}
  if mode in signals:
    from jlora.infra import mesh as mesh_lib
    mesh_lib.global_batch = kill_on_nth(mesh_lib.global_batch, signals[mode])
  elif mode == "save":
    from orbax.checkpoint._src.path import atomicity
    cls = atomicity.AtomicRenameTemporaryPath
    finalize = cls.finalize

    async def finalize_or_die(self, *args, **kwargs):
      if not self.get_final().name.isdigit():  # an item inside a step, not the step itself
        return await finalize(self, *args, **kwargs)
      calls["count"] += 1
      if calls["count"] == n:
        os.kill(os.getpid(), signal.SIGKILL)
      return await finalize(self, *args, **kwargs)
    cls.finalize = finalize_or_die
  elif mode != "none":
    raise SystemExit(f"unknown mode {mode}")
  from jlora import cli
  command = os.environ.get("JLORA_WORKER_COMMAND", "train")  # or "rl"
  sys.exit(cli.main([command, *config.split(","), "--no-progress", *rest]))


if __name__ == "__main__":
  main()
