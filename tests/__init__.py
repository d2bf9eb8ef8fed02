"""jlora's tests. ``XLA_FLAGS``: what every test process compiles with, the jlora and worker
subprocesses the tests start included (tests/conftest.py sets it, with the compile cache)."""

# Compiling dominates a tiny model's test: in tests/run/test_group.py's group test XLA
# compiling took 101 of 140 s. LLVM's lowest level compiles the same HLO (the same
# operations, fusions and order of reductions) with fewer machine-code passes; the test
# runs and the runs they compare with all use it, so bit-exact checks stay bit-exact.
XLA_FLAGS = "--xla_backend_optimization_level=0"
