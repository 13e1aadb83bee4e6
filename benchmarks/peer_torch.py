r"""PyTorch / Hugging Face / TRL peer of the instruct benchmarks, at shapes given by the caller.

Run (from the repository root; needs torch, transformers, trl, datasets, tokenizers, not JAX):

  python benchmarks/peer_torch.py --phase=sft --hf_config=/tmp/gpt2.json --json_out=/tmp/p.json

`--hf_config` is a JSON dict of a transformers config (`model_type`: gpt2, the default, or
any causal LM family, e.g. gpt_neox); every model is built from it
with random weights (`torch.manual_seed(--seed)`), with attn/resid/embd dropout set to 0 (the
JAX model has none) and bos/eos ids outside the vocabulary (GPT2Config's 50256 default for a
smaller vocabulary) set to None; no phase uses them. Nothing is downloaded (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are set);
PPO's tokenizer is a local `tokenizers` WordLevel vocabulary. Every timer is
`time.perf_counter()` preceded by `torch.cuda.synchronize()` on cuda. `--dtype=bfloat16` is
autocast (`torch.autocast(device, torch.bfloat16)`, float32 weights and optimiser state; for
PPO `PPOConfig(bf16=True)`, i.e. accelerate's autocast); float32 runs without autocast.
Phases (`--phase`):

- peak: 2 n^3 / median time of `--peak_reps` [n, n] @ [n, n] `torch.mm` calls in float32 (in
  bfloat16 with `--dtype=bfloat16`; after 2 warm-ups; n = `--peak_size`), and memory bandwidth: `torch.add(x, 1, out=y)` on a 256 MiB
  float32 tensor, bytes = read + write = 512 MiB, GB/s = 1e9 bytes/s over the median time.
- sft: one training step of the causal LM (`GPT2LMHeadModel`) in train mode: forward with `labels` (-100 on
  the first T/2 positions; HF shifts them, so its token-mean cross-entropy, on logits upcast
  to float32, covers the predictions of tokens T/2 .. T-1 of each row), backward,
  `clip_grad_norm_(1.0)`, `torch.optim.AdamW(lr=1e-5, betas=(0.9, 0.95), eps=1e-8,
  weight_decay=0.1)` over all parameters (torch's default fused/foreach choice, recorded),
  `zero_grad(set_to_none=True)`, `loss.item()`. One [B, T] batch of uniform random tokens,
  attention mask all ones, is reused. `--warmup` untimed steps, then `--steps` timed ones;
  tokens/s = B * T / median step time.
- rollout: `model.generate` in eval mode under `torch.inference_mode()` on B left-padded
  prompts (row lengths uniform in [P/2, P], tokens uniform in [1, V), pad id 0, attention mask
  0 on the padding): do_sample, temperature 1, top_k 0, top_p 1, use_cache, `max_new_tokens =
  min_new_tokens = R` and `eos_token_id=None` (no stop: every row gets R tokens, checked).
  1 warm-up then `--reps` timed calls; tokens/s = B * R / median. Prefill / decode split as on
  the JAX side: the same with R = 1 gives T(1); decode s/step = (T(R) - T(1)) / (R - 1),
  prefill = T(1) - decode s/step.
- ppo: `trl.experimental.ppo.PPOTrainer.train()` itself. Policy the causal LM, reference
  = a deep copy, value and reward models `AutoModelForSequenceClassification` (GPT-2 backbone +
  `score` head, num_labels 1) of the same config with their own random weights. The dataset is
  B left-padded prompts as for rollout; pad id V and EOS id V + 1 lie outside the model's
  vocabulary, so no sampled token is ever taken for padding or EOS and every response is R
  tokens (checked). No stop token, `missing_eos_penalty=None`, `num_sample_generations=0`,
  kl_coef 0.05, lr 1e-5, `total_episodes = iterations * B` (one rollout batch per iteration),
  `local_rollout_forward_batch_size = B`, no logging / saving / evaluation. TRL's optimiser is
  the Trainer default (`--optim` adamw_torch_fused, betas (0.9, 0.999), weight decay 0) over
  policy and value parameters together; TRL does not clip gradients in this loop.
  Phases come from a timeline of synchronized marks, taken by module-level wrappers (installed
  for the run, then removed) around the names `ppo_trainer.train()` calls:
    iteration = from the previous iteration's `on_step_end` callback (or `on_train_begin`) to
                this one's `on_step_end`;
    rollout   = the `batch_generation` call (HF generate with TRL's GenerationConfig, output
                scores stacked into logits);
    scoring   = from the end of `batch_generation` to the start of the first `forward(model,
                ...)` of the PPO epochs: leaving `unwrap_model_for_generation`, policy
                log-probs from the generation logits, the reference `forward`, the value
                and reward models' `get_reward`, rewards with the KL penalty, GAE, whitening,
                `gc.collect()` (the ref / value / reward calls are also reported alone);
    update    = from that first forward to the first `accelerator.gather_for_metrics` of the
                metrics block: epochs x minibatches of policy+value forward, losses, backward,
                `optimizer.step()`, `zero_grad()` and TRL's per-minibatch statistics (plus
                four scalar reductions for the metrics);
    other     = iteration - (rollout + scoring + update): the previous iteration's trailing
                `del` / `gc.collect()`, the next dataloader batch, entering
                `unwrap_model_for_generation`, the metrics' `.item()` gathers, `self.log`,
                the LR scheduler step and callbacks.
  `get_reward` and `batch_generation` are also called by `generate_completions`, which
  `num_sample_generations=0` disables. Python garbage collection time (TRL calls `gc.collect()`
  twice an iteration) is also reported per phase (`gc_in_<phase>_s`, from `gc.callbacks`).
  Iteration 0 is the warm-up; each key's median is over the rest (`fractions`: the phase
  medians over the median iteration); every iteration's numbers are kept. The last
  iteration's trailing `gc.collect()` (after its `on_step_end`) falls in no iteration.

Every phase records the peak RSS (`ru_maxrss`), `torch.cuda.max_memory_allocated()` on cuda,
library versions, `torch.get_num_threads()` and the parameter count, writes one JSON dict to
`--json_out` and prints a one-line summary. On a shared CPU, `--threads` above the number of
idle cores can make every phase several times slower (OpenMP barriers wait for descheduled
threads): here, with other jobs running on 2 cores, the 5.4M-parameter SFT step took 0.55 s
with one thread and 3.4 s with two.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402  (after the offline settings)
import transformers  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model  # noqa: E402  (benchmarks/machine.py; it imports no JAX here)

PHASES = ("peak", "sft", "rollout", "ppo")
BANDWIDTH_BYTES = 256 * 2 ** 20


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--phase", required=True, choices=PHASES)
  p.add_argument("--hf_config", default="",
                 help="JSON file of transformers config fields (not for peak).")
  p.add_argument("--json_out", required=True, help="Write the results as one JSON dict here.")
  p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0: cpu_count.")
  for name, default, what in [("seed", 0, "Seed of the weights and the data"),
                              ("peak_size", 2048, "Peak matmul n"),
                              ("peak_reps", 10, "Timed peak matmuls and adds"),
                              ("batch", 0, "Rows; 0: 8 for sft, 16 for rollout and ppo"),
                              ("length", 128, "SFT length"), ("warmup", 2, "Untimed SFT steps"),
                              ("steps", 10, "Timed SFT steps"),
                              ("prompt_length", 32, "Prompt length"),
                              ("new_tokens", 64, "Generated tokens per row"),
                              ("reps", 5, "Timed generate calls"),
                              ("iterations", 3, "PPO iterations, the first untimed"),
                              ("epochs", 4, "PPO epochs"),
                              ("num_minibatches", 1, "PPO minibatches")]:
    p.add_argument(f"--{name}", type=int, default=default, help=f"{what}.")
  args = p.parse_args(argv)
  args.batch = args.batch or (8 if args.phase == "sft" else 16)
  if args.phase != "peak" and not args.hf_config:
    p.error(f"--hf_config is required for --phase={args.phase}")
  if args.device == "cuda" and not torch.cuda.is_available():
    p.error(f"--device=cuda but torch {torch.__version__} sees no CUDA device")
  if args.phase == "sft" and (args.length < 2 or args.steps < 1):
    p.error("--length must be >= 2 and --steps >= 1")
  if args.phase in ("rollout", "ppo") and (args.new_tokens < 2 or args.prompt_length < 2):
    p.error("--new_tokens and --prompt_length must be >= 2")
  if args.phase == "ppo" and (args.iterations < 2 or args.batch % args.num_minibatches):
    p.error("--iterations must be >= 2 and --batch divisible by --num_minibatches")
  return args


def sync(device: str) -> None:
  if device == "cuda":
    torch.cuda.synchronize()


def clock(device: str) -> float:
  sync(device)
  return time.perf_counter()


def autocast(args):
  if args.dtype == "bfloat16":
    return torch.autocast(args.device, dtype=torch.bfloat16)
  return contextlib.nullcontext()


def timed_calls(device: str, fn, warmup: int, reps: int) -> tuple[list, list]:
  """Seconds of `reps` synchronized calls of fn() after `warmup` untimed ones; their outputs."""
  for _ in range(warmup):
    fn()
  times, outs = [], []
  for _ in range(reps):
    start = clock(device)
    outs.append(fn())
    times.append(clock(device) - start)
  return times, outs


def summary(times: list[float]) -> dict:
  return {"median": statistics.median(times), "min": min(times), "max": max(times), "all": times}


DROPOUT_KEYS = ("attn_pdrop", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_dropout",
                "summary_first_dropout")


def load_config(path: str, **overrides):
  """The transformers config of a JSON dict (`model_type` picks the family, default gpt2),
  dropout off, and bos / eos ids outside the vocabulary dropped."""
  with open(path) as f:
    d = json.load(f)
  model_type = d.pop("model_type", "gpt2")
  d.update({k: 0.0 for k in DROPOUT_KEYS})  # Keys another family does not read are kept, unused.
  d.update(overrides)
  for key in ("bos_token_id", "eos_token_id"):  # GPT2Config's 50256 default; unused here
    if not 0 <= (d.get(key) if d.get(key) is not None else 50256) < d.get("vocab_size", 50257):
      d[key] = None
  return transformers.AutoConfig.for_model(model_type, **d)


def causal_lm(config):
  return transformers.AutoModelForCausalLM.from_config(config)


def count_params(model) -> int:
  return sum(p.numel() for p in model.parameters())  # tied weights are yielded once


def left_padded_prompts(gen: torch.Generator, vocab: int, batch: int, length: int, pad: int):
  """[B, P] tokens uniform in [1, vocab), rows P/2..P long, left-padded with `pad`; and mask."""
  lengths = torch.randint(max(1, length // 2), length + 1, (batch,), generator=gen)
  mask = (torch.arange(length)[None] >= length - lengths[:, None]).long()
  tokens = torch.randint(1, vocab, (batch, length), generator=gen)
  return torch.where(mask > 0, tokens, torch.full_like(tokens, pad)), mask


def bench_peak(args) -> dict:
  n, dev = args.peak_size, args.device
  dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
  a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
  mm = summary(timed_calls(dev, lambda: torch.mm(a, b), 2, args.peak_reps)[0])
  x = torch.randn(BANDWIDTH_BYTES // 4, device=dev)
  y = torch.empty_like(x)
  add = summary(timed_calls(dev, lambda: torch.add(x, 1, out=y), 2, args.peak_reps)[0])
  return {
      "matmul_s": mm, "peak_gflops": 2 * n ** 3 / mm["median"] / 1e9, "add_s": add,
      "bandwidth_bytes": 2 * BANDWIDTH_BYTES,
      "bandwidth_gbs": 2 * BANDWIDTH_BYTES / add["median"] / 1e9,
      "float32_matmul_precision": torch.get_float32_matmul_precision()
  }


def bench_sft(args) -> dict:
  dev, (bsz, length) = args.device, (args.batch, args.length)
  config = load_config(args.hf_config)
  torch.manual_seed(args.seed)
  model = causal_lm(config).to(dev)
  model.train()
  params = list(model.parameters())
  opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
  gen = torch.Generator().manual_seed(args.seed + 1)
  tokens = torch.randint(0, config.vocab_size, (bsz, length), generator=gen).to(dev)
  labels = tokens.clone()
  labels[:, :length // 2] = -100
  mask = torch.ones_like(tokens)

  def step() -> float:
    with autocast(args):
      loss = model(input_ids=tokens, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()

  times, losses = timed_calls(dev, step, args.warmup, args.steps)
  if not all(math.isfinite(v) for v in losses):
    raise FloatingPointError(f"non-finite SFT loss {losses}")
  s = summary(times)
  return {
      "params": count_params(model), "attn_implementation": config._attn_implementation,
      "step_s": s, "tokens_per_s": bsz * length / s["median"], "losses": losses,
      "optimizer": adamw_implementation(opt, params)
  }


def adamw_implementation(opt, params) -> dict:
  """The optimiser's fused/foreach flags and the implementation its step() uses: the flag that
  is set, else torch's default pick for these parameters (`_default_to_fused_or_foreach`)."""
  fused, foreach = opt.defaults.get("fused"), opt.defaults.get("foreach")
  out = {"class": type(opt).__name__, "fused": fused, "foreach": foreach}
  if fused or foreach is not None:
    out["implementation"] = "fused" if fused else "foreach" if foreach else "for-loop"
    return out
  try:
    from torch.optim.optimizer import _default_to_fused_or_foreach
    fused, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    out["implementation"] = "fused" if fused else "foreach" if foreach else "for-loop"
  except (ImportError, TypeError) as e:
    out["implementation"] = f"unknown ({e})"
  return out


def bench_rollout(args) -> dict:
  dev, bsz, plen, new = args.device, args.batch, args.prompt_length, args.new_tokens
  config = load_config(args.hf_config)
  torch.manual_seed(args.seed)
  model = causal_lm(config).to(dev).eval()
  model.generation_config.update(bos_token_id=None, eos_token_id=None, pad_token_id=0)
  gen = torch.Generator().manual_seed(args.seed + 1)
  prompts = [[t.to(dev) for t in left_padded_prompts(gen, config.vocab_size, bsz, plen, 0)]
             for _ in range(args.reps + 1)]

  def generate(r: int) -> int:
    tokens, mask = prompts[len(lengths) % len(prompts)]
    with torch.inference_mode(), autocast(args):
      out = model.generate(input_ids=tokens, attention_mask=mask, do_sample=True, temperature=1.0,
                           top_k=0, top_p=1.0, max_new_tokens=r, min_new_tokens=r,
                           eos_token_id=None, pad_token_id=0, use_cache=True)
    lengths.append(out.shape[1] - plen)
    if lengths[-1] != r or out.shape[0] != bsz:
      raise AssertionError(f"generate returned {tuple(out.shape)}, not {(bsz, plen + r)}")
    return lengths[-1]

  lengths = []
  times, generated = timed_calls(dev, lambda: generate(new), 1, args.reps)
  one = timed_calls(dev, lambda: generate(1), 1, args.reps)[0]
  call_s, one_s = statistics.median(times), statistics.median(one)
  decode_s = (call_s - one_s) / (new - 1)
  return {
      "params": count_params(model), "attn_implementation": config._attn_implementation,
      "call_s": summary(times), "one_token_call_s": summary(one),
      "generated_tokens_per_s": bsz * new / call_s, "generated_length": min(generated),
      "decode_s_per_step": decode_s, "prefill_s": one_s - decode_s,
      "decode_fraction": decode_s * new / call_s
  }


def local_tokenizer(vocab: int):
  """WordLevel tokenizer over `vocab` ids + <pad> = vocab, <eos> = vocab+1, <unk> = vocab+2."""
  import tokenizers
  words = {f"t{i}": i for i in range(vocab)}
  words.update({"<pad>": vocab, "<eos>": vocab + 1, "<unk>": vocab + 2})
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                              eos_token="<eos>", unk_token="<unk>",
                                              padding_side="left")


class Timeline:
  """Synchronized marks per PPO iteration, taken by wrappers around TRL's module-level names."""

  PHASE_AFTER = {
      "begin": "other", "rollout_start": "rollout", "rollout_end": "scoring",
      "update_start": "update", "update_end": "other", "end": "other"
  }

  def __init__(self, device: str):
    self.device, self.iterations, self.phase, self.gc_start = device, [{}], "other", 0.0

  def mark(self, key: str, first_only: bool = False) -> float:
    t = clock(self.device)
    if not (first_only and key in self.iterations[-1]):
      self.iterations[-1][key], self.phase = t, self.PHASE_AFTER[key]
    return t

  def gc_callback(self, event: str, info: dict) -> None:
    """Python garbage collection time (explicit `gc.collect()` and automatic), by phase."""
    if event == "start":
      self.gc_start = time.perf_counter()
    else:
      self.add(f"gc_in_{self.phase}_s", time.perf_counter() - self.gc_start)

  def add(self, key: str, seconds: float) -> None:
    it = self.iterations[-1]
    it[key] = it.get(key, 0.0) + seconds

  def timed(self, name: str, fn, *a, **kw):
    """fn(*a, **kw), its synchronized seconds added to the iteration's `name`."""
    start = clock(self.device)
    out = fn(*a, **kw)
    self.add(name, clock(self.device) - start)
    return out


@contextlib.contextmanager
def patched(module, **names):
  old = {k: getattr(module, k) for k in names}
  for k, v in names.items():
    setattr(module, k, v)
  try:
    yield
  finally:
    for k, v in old.items():
      setattr(module, k, v)


def bench_ppo(args) -> dict:
  import datasets
  from trl.experimental.ppo import PPOConfig, PPOTrainer
  from trl.experimental.ppo import ppo_trainer as trl_ppo
  dev, bsz, plen, new, vocab = (args.device, args.batch, args.prompt_length, args.new_tokens,
                                load_config(args.hf_config).vocab_size)
  pad = vocab
  tokenizer = local_tokenizer(vocab)
  torch.manual_seed(args.seed)
  policy = causal_lm(load_config(args.hf_config))
  ref = copy.deepcopy(policy)
  scalar = lambda: transformers.AutoModelForSequenceClassification.from_config(
      load_config(args.hf_config, num_labels=1, pad_token_id=pad))
  value, reward = scalar(), scalar()
  tokens, _ = left_padded_prompts(torch.Generator().manual_seed(args.seed + 1), vocab, bsz, plen,
                                  pad)
  dataset = datasets.Dataset.from_dict({"input_ids": tokens.tolist()})
  out_dir = tempfile.mkdtemp(prefix="peer_torch_ppo_")
  config = PPOConfig(output_dir=out_dir, per_device_train_batch_size=bsz,
                     gradient_accumulation_steps=1, num_mini_batches=args.num_minibatches,
                     num_ppo_epochs=args.epochs, response_length=new, temperature=1.0,
                     stop_token=None, stop_token_id=None, missing_eos_penalty=None,
                     num_sample_generations=0, kl_coef=0.05, learning_rate=1e-5,
                     total_episodes=args.iterations * bsz, local_rollout_forward_batch_size=bsz,
                     report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                     bf16=args.dtype == "bfloat16", use_cpu=dev == "cpu", seed=args.seed)
  trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref,
                       reward_model=reward, train_dataset=dataset, value_model=value)
  for cb in (transformers.PrinterCallback, transformers.ProgressCallback):
    trainer.remove_callback(cb)
  timeline, lengths = Timeline(dev), []

  class Marks(transformers.TrainerCallback):

    def on_train_begin(self, *a, **kw):
      timeline.mark("begin")

    def on_step_end(self, *a, **kw):
      end = timeline.mark("end")
      timeline.iterations.append({"begin": end})

  trainer.add_callback(Marks())

  def batch_generation(model, queries, *a, **kw):
    timeline.mark("rollout_start")
    query_responses, logits = orig_generation(model, queries, *a, **kw)
    timeline.mark("rollout_end")
    responses = query_responses[:, queries.shape[1]:]
    lengths.append((responses.shape[1], int((responses == pad).sum())))
    return query_responses, logits

  def forward(model, *a, **kw):
    if model is trainer.model:
      timeline.mark("update_start", first_only=True)
      return orig_forward(model, *a, **kw)
    return timeline.timed("ref_forward_s", orig_forward, model, *a, **kw)

  def get_reward(model, *a, **kw):
    name = "reward_forward_s" if model is trainer.reward_model else "value_forward_s"
    return timeline.timed(name, orig_get_reward, model, *a, **kw)

  orig_gather = trainer.accelerator.gather_for_metrics

  def gather_for_metrics(*a, **kw):
    timeline.mark("update_end", first_only=True)
    return orig_gather(*a, **kw)

  steps = []
  trainer.optimizer.optimizer.register_step_post_hook(lambda *a: steps.append(1))
  orig_generation, orig_forward, orig_get_reward = (trl_ppo.batch_generation, trl_ppo.forward,
                                                    trl_ppo.get_reward)
  with patched(trl_ppo, batch_generation=batch_generation, forward=forward,
               get_reward=get_reward), patched(trainer.accelerator,
                                               gather_for_metrics=gather_for_metrics):
    gc.callbacks.append(timeline.gc_callback)
    try:
      start = clock(dev)
      trainer.train()
      train_s = clock(dev) - start
    finally:
      gc.callbacks.remove(timeline.gc_callback)
      shutil.rmtree(out_dir, ignore_errors=True)
  iterations = [phase_seconds(it) for it in timeline.iterations if "end" in it]
  if len(iterations) != args.iterations:
    raise AssertionError(f"{len(iterations)} PPO iterations recorded, not {args.iterations}")
  if any(length != (new, 0) for length in lengths) or len(steps) != (args.iterations * args.epochs
                                                                     * args.num_minibatches):
    raise AssertionError(f"responses (length, pads) {lengths}; {len(steps)} optimizer steps")
  timed = iterations[1:]
  med = {k: statistics.median(it[k] for it in timed) for k in timed[0]}
  models = (policy, ref, value, reward)
  return {
      "params": count_params(policy), "params_all_models": sum(count_params(m) for m in models),
      "attn_implementation": policy.config._attn_implementation, "generated_length": lengths[-1][0],
      "response_pad_tokens": sum(p for _, p in lengths), "optimizer_steps": len(steps),
      "train_s": train_s, "iterations": iterations, **med, "fractions": {
          k: med[k] / med["iteration_s"] for k in ("rollout_s", "scoring_s", "update_s", "other_s")
      }, "optimizer": adamw_implementation(trainer.optimizer.optimizer,
                                           list(trainer.model.parameters())),
      "trl_optim": config.optim
  }


def phase_seconds(it: dict) -> dict:
  out = {
      "iteration_s": it["end"] - it["begin"], "rollout_s": it["rollout_end"] - it["rollout_start"],
      "scoring_s": it["update_start"] - it["rollout_end"],
      "update_s": it["update_end"] - it["update_start"]
  }
  out["other_s"] = out["iteration_s"] - out["rollout_s"] - out["scoring_s"] - out["update_s"]
  for k in ("ref_forward_s", "value_forward_s", "reward_forward_s", "gc_in_rollout_s",
            "gc_in_scoring_s", "gc_in_update_s", "gc_in_other_s"):
    out[k] = it.get(k, 0.0)
  return out


def one_line(phase: str, r: dict) -> str:
  if phase == "peak":
    return f"peak: {r['peak_gflops']:.1f} GFLOP/s matmul, {r['bandwidth_gbs']:.1f} GB/s add"
  if phase == "sft":
    return f"sft: step {r['step_s']['median']:.4g} s, {r['tokens_per_s']:,.0f} tokens/s"
  if phase == "rollout":
    return (f"rollout: call {r['call_s']['median']:.4g} s, {r['generated_tokens_per_s']:,.0f} "
            f"tokens/s, prefill {r['prefill_s']:.3g} s, decode {r['decode_s_per_step']:.3g} s/step")
  return (f"ppo: iteration {r['iteration_s']:.4g} s = rollout {r['rollout_s']:.3g} + scoring "
          f"{r['scoring_s']:.3g} + update {r['update_s']:.3g} + other {r['other_s']:.3g}")


def main(argv=None) -> dict:
  args = parse_args(argv)
  torch.set_num_threads(args.threads or os.cpu_count())
  import trl
  bench = {"peak": bench_peak, "sft": bench_sft, "rollout": bench_rollout, "ppo": bench_ppo}
  start = time.perf_counter()
  result = bench[args.phase](args)
  result.update({
      "phase": args.phase, "args": vars(args), "wall_s": time.perf_counter() - start,
      "device": args.device, "dtype": args.dtype,
      "dtype_mode": "autocast bfloat16" if args.dtype == "bfloat16" else "float32",
      "torch_version": torch.__version__, "transformers_version": transformers.__version__,
      "trl_version": trl.__version__, "num_threads": torch.get_num_threads(),
      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
      "python": sys.version.split()[0]
  })
  if args.device == "cuda":
    result["cuda_max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    result["cuda_device"] = torch.cuda.get_device_name()
  with open(args.json_out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"{one_line(args.phase, result)}; peak RSS {result['peak_rss_gib']:.2f} GiB; "
        f"{result['num_threads']} threads; wrote {args.json_out}")
  return result


if __name__ == "__main__":
  main()
