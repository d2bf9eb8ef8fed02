#!/usr/bin/env bash
# Everything issue 22 measures on a lent GPU, in one device call of about 6 minutes:
#   kernel  bench.kernel: fused LoRA matmul vs XLA reference vs base matmul, fwd and fwd+bwd,
#           M in {2048, 8192}, K = N = 4096, r in {16, 64}, bf16
#   jlora   bench.train_step --gpu: the step `jlora train` runs, LoRA and full fine-tuning,
#           SmolLM2-135M and the Llama-3.2-1B shape (8 x 2048 tokens, bf16), and a profile
#           (jax.profiler, Perfetto trace) of the slowest LoRA step
#   peft    the same steps in PEFT + torch (SDPA, bf16 autocast), in a process of its own
#   group   bench.group_step: 64 adapters x 4 rows stacked in one step vs the solo step
#           (issue 35), SmolLM2-135M shape, 512 tokens, bf16
# Results land in $OUT (default bench/gpu_out): env.txt (versions, then one line per part
# with its exit code and seconds, also printed), kernel/jlora/peft .txt logs and .json rows,
# profile.tgz: 8 files, the most the device tool brings back.
#
#   bench/gpu_suite.sh --wheels      # here, once: the packages the GPU image lacks -> .whl/
#   bench/gpu_suite.sh --smoke       # here, on CPU: toy shapes, kernels interpreted
#   bench/gpu_suite.sh               # on the GPU (device run, carry [".whl"])
set -u
cd "$(dirname "$0")/.."
mode=${1:-}
if [ "$mode" = "--wheels" ]; then  # grain and its two missing needs, for the image's Python 3.12
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl grain==0.2.18 array_record==0.8.6 portpicker
fi
OUT=${OUT:-bench/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .whl ] && ! $PY -c "import grain" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ date -u; nvidia-smi 2>&1 | head -15; $PY -c "import jax; print(jax.devices())";
  $PY -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|flax|optax|torch|transformers|peft|triton) "
} > "$OUT/env.txt" 2>&1

part() {  # part NAME SECONDS COMMAND...: run one part under a time limit, log and status
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "$name rc=$? $((SECONDS - start))s" | tee -a "$OUT/env.txt"
}

if [ "$mode" = "--smoke" ]; then
  part kernel 300 $PY -m bench.kernel --smoke
  part jlora 300 $PY -m bench.train_step --gpu --smoke --profile "$OUT/profile" \
    --json "$OUT/jlora.json"
  part peft 300 $PY -m bench.train_step --gpu --smoke --who peft --json "$OUT/peft.json"
  part group 300 $PY -m bench.group_step --smoke --json "$OUT/group.json"
else
  part kernel 100 $PY -m bench.kernel --ms 2048,8192 --ranks 16,64 --repeats 20 \
    --json "$OUT/kernel.json"
  part jlora 170 $PY -m bench.train_step --gpu --repeats 10 --peak-tflops 989 \
    --profile "$OUT/profile" --json "$OUT/jlora.json"
  XLA_PYTHON_CLIENT_PREALLOCATE=false part peft 90 $PY -m bench.train_step --gpu --who peft \
    --repeats 10 --peak-tflops 989 --json "$OUT/peft.json"
  part group 90 $PY -m bench.group_step --adapters 64 --rows 4 --seq 512 --layers 30 \
    --dtype bfloat16 --repeats 3 --json "$OUT/group.json"
fi
$PY -m bench.gpu_summary "$OUT" | tee -a "$OUT/env.txt"
if [ -d "$OUT/profile" ]; then
  tar -czf "$OUT/profile.tgz" -C "$OUT" profile && rm -rf "$OUT/profile"
fi
