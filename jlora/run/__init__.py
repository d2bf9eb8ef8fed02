"""One run of any objective: config, build, the train step, the run loop, checkpoints,
run directories, a trained run read back. Objectives plug in through ``driver.Kind``;
nothing here imports ``jlora.objectives``."""
