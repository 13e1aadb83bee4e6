"""Shared pieces of the experiment configs in `configs/`, and their validation.

An experiment config is an ml_collections `ConfigDict` made by `get_config(arg)` in a file
under `configs/`. Those files start from `base_config()` here and pick presets, so every field
is defined (and commented) in one place. `validate` turns impossible combinations into errors
that name the config key.
"""

from __future__ import annotations

import importlib.util
import numbers
import os

import ml_collections

from instruct.data import feedback
from instruct.data import hindsight
from instruct.data import mixture
from instruct.data.builders import BUILDERS, RECORDS_FORMAT, builder_class
from instruct.data.tokenization import DEFAULT_TOKENIZER
from instruct.model.config import ModelConfig, preset
from instruct.objectives import RANKING_LOSSES
from instruct.sharding import DEFAULT_RULES
from instruct.stages import table

ASSETS_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "data")
NORMALIZATIONS = ("demonstrations", "policy_samples", "none")


def embedded_files(stem: str) -> dict[str, str]:
  """Paths of a shipped dataset's splits, e.g. `embedded_files('demos')`."""
  return {
      split: os.path.join(ASSETS_DATA, f"{stem}_{split}.jsonl") for split in ("train", "validation")
  }


def model_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """`config.model` for an architecture preset of `instruct.model.config.PRESETS`.

  `hf_checkpoint` (default '') names a Hugging Face checkpoint (local directory or cached hub
  name): when set, the architecture comes from its config.json (only the numerics fields
  dtype, scan_layers, remat, dropout_rate and init_std are kept from here) and the initial
  parameters from its weights (see instruct/hf/).
  """
  fields = preset(name, **overrides)
  fields.setdefault("hf_checkpoint", "")
  if fields.get("attention_bias") is None:
    # None means "as use_bias"; a typed placeholder keeps it settable from the command line
    # (--config.model.attention_bias=False), which a plain None field is not.
    fields["attention_bias"] = ml_collections.config_dict.placeholder(bool)
  return ml_collections.ConfigDict(fields)


# yapf: disable
def base_config() -> ml_collections.ConfigDict:
  """Every field of a supervised (pretrain / SFT / RM) experiment, with defaults."""
  c = ml_collections.ConfigDict()
  c.stage = "sft"              # A record of instruct.stages.table: 'pretrain' (loss on all
  # tokens) | 'sft' (loss on completions) | 'rm'.
  c.seed = 0                   # Parameter init and the data order derive from it.
  c.init_from = ""             # Workdir of an earlier stage whose final params initialise this.
  c.model = model_config("tiny")  # c.model.hf_checkpoint: start from a Hugging Face checkpoint.

  c.data = data_config()
  c.data.kind = "demonstrations"   # 'demonstrations' {prompt, completion} | 'text' {text} |
  # 'comparisons' (reward model; see configs/rm.py) | 'scored_text' (configs/pretrain.py) |
  # 'hindsight' (configs/sft.py).
  c.data.train_file = embedded_files("demos")["train"]
  c.data.validation_file = embedded_files("demos")["validation"]
  c.data.buckets = (64, 128)       # Padded lengths; the longest is the maximum length.
  c.data.shuffle = True
  # Pretrain / SFT: a weighted mixture of record files instead of train_file /
  # validation_file: {name: {train_file, validation_file, weight}} (instruct/data/mixture.py).
  c.data.mixture = ml_collections.ConfigDict()
  c.data.mixture_size = 0          # Rows per epoch of the mixture; 0: its components' together.

  c.optimizer = optimizer_config()
  c.train = train_config()
  c.train.grad_accum_steps = 1      # Microbatches per step (same gradient, less memory).
  c.train.eval_every = 50           # Validation loss / perplexity; <= 0 disables.
  c.train.eval_batches = -1         # -1: the whole validation split.
  c.mesh = mesh_config()
  return c
# yapf: enable


# yapf: disable
def data_config() -> ml_collections.ConfigDict:
  """`config.data`'s fields shared by every stage: where records come from and how they are
  tokenized (each stage adds its files and shapes)."""
  d = ml_collections.ConfigDict()
  d.format = RECORDS_FORMAT        # 'records': the stage's JSON-lines records. Or a public
  # dataset's published files (instruct/data/public.py):
  # 'hh_rlhf' (comparisons, demonstrations, prompts) |
  # 'summarize_from_feedback' (comparisons) |
  # 'tldr' (demonstrations, prompts). train_file and
  # validation_file may then be directories: an HH-RLHF
  # subset (or the repository root), the comparisons/
  # directory, the TL;DR directory.
  d.skip_invalid = False           # Skip and count invalid records (bad JSON or UTF-8, missing
  # fields, ...) instead of failing; see also config.rm.skip_invalid.
  d.allow_truncation = True        # Examples longer than the length limit (max of buckets; RL:
  # prompt_length) are cut, counted and logged per split (metrics: {split}_truncated). False:
  # an error naming the file and the first such line.
  d.tokenizer = DEFAULT_TOKENIZER  # Local directory (or cached hub name).
  d.pad_token = ""                 # A vocabulary token to pad with when the tokenizer declares
  # none (Pythia: "<|padding|>"); "" = the tokenizer's own.
  d.tfds_dir = ""                  # Where TFDS prepares datasets; '' = $TFDS_DATA_DIR or
  # ~/tensorflow_datasets.
  return d
# yapf: enable


# yapf: disable
def optimizer_config() -> ml_collections.ConfigDict:
  """An optimiser (`instruct.optim.make_optimizer`): AdamW with warmup and decay."""
  o = ml_collections.ConfigDict()
  o.learning_rate = 1e-3  # Peak learning rate.
  o.schedule = "cosine"   # 'cosine' | 'linear' | 'constant' after linear warmup.
  o.warmup_steps = 10
  o.end_lr_fraction = 0.1  # Final LR as a fraction of the peak.
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.eps_style = "pytorch"  # Where Adam's eps enters: 'pytorch' (optax.adamw) | 'tf'
  # (TensorFlow's Adam; instruct.optim.tf_adam_eps).
  o.weight_decay = 0.0    # Decoupled (AdamW); applied to matrices only.
  o.grad_clip_norm = 1.0  # Global-norm clipping; <= 0 disables.
  return o
# yapf: enable


# yapf: disable
def train_config() -> ml_collections.ConfigDict:
  """`config.train`: the loop's length and cadence (`instruct.loop`)."""
  t = ml_collections.ConfigDict()
  t.num_steps = 100
  t.global_batch_size = 16    # Sequences (RL: prompts) per step over all hosts and devices.
  t.log_every = 10
  t.checkpoint_every = 50
  t.keep_checkpoints = 3
  t.stop_at_step = -1         # Stop early (with a checkpoint) at this step; -1: never.
  # Resume a workdir under a config that differs from its saved one in more than the
  # resumable keys (instruct/workdir.py); by default that is refused.
  t.allow_config_change = False
  return t
# yapf: enable


# yapf: disable
def mesh_config() -> ml_collections.ConfigDict:
  """`config.mesh`: the device mesh and the one rule table (instruct/sharding.py)."""
  m = ml_collections.ConfigDict()
  m.shape = (-1, 1, 1)         # -1 takes the remaining devices (of a slice, with dcn_shape).
  # Several slices (TPU multi-slice; GPU nodes): how each axis repeats across slices over the
  # data-centre network; `shape` is then one slice's mesh. () or all 1: one slice.
  m.dcn_shape = ()
  m.axis_names = ("data", "fsdp", "tensor")
  m.rules = DEFAULT_RULES      # Logical axis -> mesh axes (see instruct/sharding.py).
  return m
# yapf: enable


def validate(config: ml_collections.ConfigDict, data_parallel: int, process_count: int) -> None:
  """Validates a config of any stage (its record's validation); ValueError names the key."""
  table.get(config.get("stage")).check(config, data_parallel, process_count)


def validate_train(train, data_parallel: int, process_count: int) -> None:
  """The loop's settings, shared by every stage."""
  if train.num_steps < 1:
    raise ValueError(f"config.train.num_steps={train.num_steps} must be positive.")
  if train.stop_at_step == 0 or train.stop_at_step < -1:
    raise ValueError(f"config.train.stop_at_step={train.stop_at_step}; expected a positive "
                     "step or -1 (never).")
  for key in ("log_every", "checkpoint_every"):
    if train[key] < 1:
      raise ValueError(f"config.train.{key}={train[key]} must be positive.")
  del data_parallel, process_count  # Batch divisibility depends on the stage's batch.


def validate_supervised(config: ml_collections.ConfigDict, data_parallel: int,
                        process_count: int) -> None:
  """Raises ValueError naming the key for impossible pretrain / SFT combinations."""
  ModelConfig.from_dict(config.model)
  validate_train(config.train, data_parallel, process_count)
  t = config.train
  batch, accum = t.global_batch_size, t.grad_accum_steps
  if accum < 1 or batch % accum:
    raise ValueError(f"config.train.global_batch_size={batch} is not divisible by "
                     f"config.train.grad_accum_steps={accum}.")
  if (batch // accum) % data_parallel:
    raise ValueError(
        f"config.train.global_batch_size={batch} (per microbatch {batch // accum}) is not "
        f"divisible by the data-parallel size {data_parallel} of config.mesh.shape.")
  if batch % process_count:
    raise ValueError(f"config.train.global_batch_size={batch} is not divisible by the "
                     f"{process_count} processes.")
  if max(config.data.buckets) > config.model.max_length and config.model.position == "learned":
    raise ValueError(f"config.data.buckets={tuple(config.data.buckets)} exceeds "
                     f"config.model.max_length={config.model.max_length}.")
  validate_data_format(config, config.data.kind)
  if config.data.kind == feedback.KIND:
    if config.stage != "pretrain":
      raise ValueError(f"config.data.kind={feedback.KIND!r} is pretraining data; the "
                       f"{config.stage!r} stage reads other records.")
    feedback.Feedback.from_config(config)
  if config.data.get("mixture"):
    if config.stage == "rm":
      raise ValueError("config.data.mixture is read by the pretrain and sft stages; the rm "
                       "stage reads config.data.train_file.")
    mixture.components(config.data.mixture)
    if config.data.get("mixture_size", 0) < 0:
      raise ValueError(f"config.data.mixture_size={config.data.mixture_size}: must be >= 0.")
  if config.data.kind == hindsight.KIND:
    if config.stage != "sft":
      raise ValueError(f"config.data.kind={hindsight.KIND!r} is read by the sft stage; the "
                       f"{config.stage!r} stage reads other records.")
    hindsight.Hindsight.from_config(config)
  if config.optimizer.schedule not in ("cosine", "linear", "constant"):
    raise ValueError(f"config.optimizer.schedule={config.optimizer.schedule!r}; expected "
                     "'cosine', 'linear' or 'constant'.")


def validate_data_format(config: ml_collections.ConfigDict, kind: str,
                         reader: str = "config.data.kind names") -> None:
  """Raises ValueError naming config.data.format unless it provides `kind` records.

  `reader` says what needs `kind` records, for the message. Configs saved before
  `config.data.format` existed read as 'records'.
  """
  data_format = config.data.get("format", RECORDS_FORMAT)
  if data_format == RECORDS_FORMAT:
    for key in ("train_file", "validation_file"):
      if os.path.isdir(config.data.get(key) or ""):
        raise ValueError(f"config.data.{key}={config.data[key]!r} is a directory; "
                         f"config.data.format={RECORDS_FORMAT!r} reads one JSON-lines file per "
                         "split (directories only for the public formats).")
  if data_format == RECORDS_FORMAT and kind not in BUILDERS:
    return  # An unknown kind is reported by the stage's data loading, as before.
  try:
    builder = builder_class(kind, data_format)
  except ValueError as e:
    raise ValueError(f"config.data.format={data_format!r} does not give the {kind!r} records "
                     f"that {reader}: {e}") from e
  if config.data.get("skip_invalid", False) and not builder.SUPPORTS_SKIP_INVALID:
    raise ValueError(f"config.data.skip_invalid=True is not supported for {kind!r} records in "
                     f"config.data.format={data_format!r}.")


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
  """The config argument (`--config=FILE:ARG`) `name,key=value,flag` as a ConfigDict.

  big_vision's convention: `spec` names every accepted key with its default, whose type
  converts the value (bool: true/false/1/0; int; float; str). A bare token sets a bool key to
  True; otherwise the first bare token is `preset` (when `spec` has that key). E.g. with
  `spec = dict(preset="tiny", sweep="lr")`, `"tiny_llama,sweep=seeds"` gives preset
  'tiny_llama' and sweep 'seeds'. Anything else is a ValueError naming the token.
  """
  out = dict(spec)
  preset_given = False
  for token in (t.strip() for t in (arg or "").split(",")):
    if not token:
      continue
    key, eq, value = (part.strip() for part in token.partition("="))
    if not eq and isinstance(spec.get(key), bool):
      out[key] = True
    elif not eq and "preset" in spec and not preset_given:
      out["preset"], preset_given = key, True
    elif key not in spec or not eq:
      raise ValueError(f"config argument {arg!r}: unknown {'key' if eq else 'flag'} {key!r}; "
                       f"expected a preset name, then key=value with keys {sorted(spec)}.")
    else:
      out[key] = _typed(value, spec[key], key, arg)
  return ml_collections.ConfigDict(out)


def _typed(value: str, default, key: str, arg: str):
  try:
    if isinstance(default, bool):
      lowered = value.lower()
      if lowered not in ("true", "false", "1", "0"):
        raise ValueError(value)
      return lowered in ("true", "1")
    if isinstance(default, int):
      return int(value)
    if isinstance(default, float):
      return float(value)
  except ValueError:
    raise ValueError(f"config argument {arg!r}: {key}={value!r} is not a "
                     f"{type(default).__name__}.") from None
  return value


def grid(axes: dict[str, list]) -> list[dict]:
  """Every combination of the values of `axes` (dotted config keys), the last key varying
  fastest: `grid({"a": (1, 2), "b.c": (3, 4)})` has 4 override dicts, for `sweep(add)`."""
  combos = [{}]
  for key, values in axes.items():
    combos = [dict(c, **{key: v}) for c in combos for v in values]
  return combos


def stage_arg(arg: str | None) -> ml_collections.ConfigDict:
  """The stage configs' argument: `PRESET[,sweep=NAME]` (the sweep is read by `sweep`)."""
  return parse_arg(arg, preset="tiny", sweep="")


def scaled(value: float, factors=(0.3, 1.0, 3.0)) -> list[float]:
  """`value` times each factor, to 3 significant digits (sweep values that name trials)."""
  return [float(f"{value * f:.3g}") for f in factors]


def add_sweep(add, arg: str | None, sweeps: dict[str, list[dict]], config_file: str) -> None:
  """Adds the trials of the sweep that `arg` names (`sweep=NAME`; default: the first). The
  argument's other keys are the config's own (`get_config` checks them)."""
  tokens = [t.strip() for t in (arg or "").split(",")]
  name = next((t.split("=", 1)[1].strip() for t in tokens if t.startswith("sweep=")), "") or next(
      iter(sweeps))
  if name not in sweeps:
    raise ValueError(f"{config_file}: unknown sweep {name!r} (config argument {arg!r}); "
                     f"use one of {list(sweeps)}.")
  for overrides in sweeps[name]:
    add(overrides)


def load_config_module(path: str):
  """The module of a config file given by path (its `get_config`, `sweep`, `metrics`)."""
  spec = importlib.util.spec_from_file_location(
      "instruct_config_" + os.path.splitext(os.path.basename(path))[0], path)
  if spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f"No config file at {path}.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file given by path (what `--config=path:arg` does)."""
  return load_config_module(path).get_config(arg)


CPU_PRESETS = ("tiny", "tiny_llama")
# Published architectures (instruct.model.config.PRESETS): GPT-2 124M to 1.5B, Pythia 1B /
# 2.8B / 6.9B, Llama-3.2-1B and Llama-3.1-8B. They load the same Hugging Face
# checkpoints exactly (`--config.model.hf_checkpoint`), so a run started from a checkpoint
# and a later stage started from that run (`--config.init_from`) agree on the architecture.
ACCELERATOR_PRESETS = ("gpt2", "gpt2_medium", "gpt2_large", "gpt2_xl", "pythia_1b", "pythia_2_8b",
                       "pythia_6_9b", "llama_1b", "llama_8b")


def apply_preset(config: ml_collections.ConfigDict, name: str, config_file: str) -> bool:
  """Sets `config.model` (and, for accelerator presets, bf16 / scan / remat / FSDP mesh).

  Accelerator presets, on TPU slices and GPU hosts alike: bf16 compute with float32
  parameters, layers under `nn.scan` (one compiled layer) and fully rematerialised (only each
  layer's input is kept for the backward pass), and the mesh `(1, -1, 1)`: FSDP over every
  device, so parameters, gradients and AdamW moments are split on d_model over all devices
  and the batch over all devices. That needs d_model divisible by the device count (every
  power of two up to 64 for every preset; gpt2_xl's 1600 stops there, the others reach 256
  or more) and the global batch divisible by it; on more devices, or across TPU slices / GPU
  hosts with slow links, add data parallelism, e.g. `--config.mesh.shape='(4,-1,1)'` (4
  replicas of an FSDP group). benchmarks/memory.py gives the memory per device of each preset
  and stage.

  Returns True for the CPU-sized presets; an unknown name is an error naming the file.
  """
  if name in CPU_PRESETS:
    config.model = model_config(name)
    return True
  if name in ACCELERATOR_PRESETS:
    config.model = model_config(name, dtype="bfloat16", scan_layers=True, remat="full")
    config.mesh.shape = (1, -1, 1)
    return False
  raise ValueError(f"Unknown preset {name!r} for {config_file}; use one of "
                   f"{CPU_PRESETS + ACCELERATOR_PRESETS}.")


# yapf: disable
def rm_config() -> ml_collections.ConfigDict:
  """`config.rm`: the reward-model stage's own fields."""
  rm = ml_collections.ConfigDict()
  rm.loss = "pairwise"           # 'pairwise': all ranked pairs of a prompt, weighted 1/C(K,2)
  # (InstructGPT); 'best_of_k': softmax on the best (Ziegler).
  rm.max_responses = 4           # K_max: responses per prompt are padded to this (2..9).
  rm.skip_invalid = False        # Skip and count bad comparison records instead of failing.
  rm.normalization = "demonstrations"  # 'demonstrations': bias so they score mean 0;
  # 'policy_samples': gain+bias so samples are N(0,1);
  # 'none'.
  rm.normalization_file = embedded_files("demos")["train"]  # {prompt, completion} JSON lines.
  rm.normalization_format = RECORDS_FORMAT  # Format of normalization_file (its 'train' split):
  # 'records' | 'hh_rlhf' | 'tldr' (a file or dir).
  rm.random_init = False         # True: train from random weights without `init_from` (else an
  # error: a reward model starts from an SFT model, InstructGPT's 6B RM from its SFT).
  return rm
# yapf: enable


def validate_rm(config: ml_collections.ConfigDict, data_parallel: int, process_count: int) -> None:
  """The supervised checks, then the reward model's own (`config.rm`)."""
  validate_supervised(config, data_parallel, process_count)
  rm = config.rm
  if rm.loss not in RANKING_LOSSES:
    raise ValueError(f"config.rm.loss={rm.loss!r}; expected one of {sorted(RANKING_LOSSES)}.")
  if not 2 <= rm.max_responses <= 9:
    raise ValueError(f"config.rm.max_responses={rm.max_responses} must be in [2, 9].")
  if rm.normalization not in NORMALIZATIONS:
    raise ValueError(f"config.rm.normalization={rm.normalization!r}; expected one of "
                     f"{NORMALIZATIONS}.")
  if config.data.kind != "comparisons":
    raise ValueError(f"config.data.kind={config.data.kind!r}: the rm stage reads "
                     "'comparisons'.")
  if rm.normalization != "none":
    norm_format = rm.get("normalization_format", RECORDS_FORMAT)
    try:
      builder_class("demonstrations", norm_format)
    except ValueError as e:
      raise ValueError(f"config.rm.normalization_format={norm_format!r} cannot be read as "
                       f"demonstrations: {e}") from e
    # Read only after the last step: a wrong path is refused before training starts.
    path = rm.normalization_file
    if norm_format == RECORDS_FORMAT and not os.path.isfile(path):
      what = "is a directory" if os.path.isdir(path) else "is not a file"
      raise ValueError(f"config.rm.normalization_file={path!r} {what}; it should be "
                       "demonstrations ({\"prompt\", \"completion\"} JSON lines) to normalise the "
                       "reward on (or set config.rm.normalization='none').")
    elif norm_format != RECORDS_FORMAT and not os.path.exists(path):
      raise ValueError(f"config.rm.normalization_file={path!r} does not exist.")
  if not (config.init_from or config.model.get("hf_checkpoint", "") or rm.get("random_init")):
    raise ValueError("config.init_from is empty: a reward model starts from an SFT run "
                     "(--config.init_from=SFT_WORKDIR) or a Hugging Face checkpoint "
                     "(--config.model.hf_checkpoint); set --config.rm.random_init=True if "
                     "random initialisation is meant.")


def validate_sampling(sampling, prefix: str = "config.sampling") -> None:
  """Raises ValueError naming `{prefix}.KEY` for sampling settings that would fail silently.

  `sampling`: `config.sampling` or a `sampler.SamplingConfig` (anything with the attributes
  max_new_tokens, temperature, top_k, top_p). Without these checks a negative temperature
  decodes greedily, top_p <= 0 masks every token (a uniform draw over the vocabulary), top_p > 1
  or top_k < 0 turn the filter off, and max_new_tokens < 1 samples empty responses.
  """
  new_tokens = sampling.max_new_tokens
  if not (is_int(new_tokens) and new_tokens >= 1):
    raise ValueError(f"{prefix}.max_new_tokens={new_tokens!r} must be an integer >= 1.")
  if not sampling.temperature >= 0:  # `not >=` also refuses NaN.
    raise ValueError(f"{prefix}.temperature={sampling.temperature!r} must be >= 0 "
                     "(0: greedy).")
  if not (is_int(sampling.top_k) and sampling.top_k >= 0):
    raise ValueError(f"{prefix}.top_k={sampling.top_k!r} must be an integer >= 0 (0: off).")
  if not 0 < sampling.top_p <= 1:
    raise ValueError(f"{prefix}.top_p={sampling.top_p!r} must be in (0, 1] (1: off).")


def is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_fits(length: int, what: str, model, model_name: str) -> None:
  """Refuses `length` tokens on a model with a smaller learned position table, where the
  embedding lookup would silently clamp every later position onto the table's last row."""
  if model is not None and model.position == "learned" and length > model.max_length:
    raise ValueError(f"{what} = {length} tokens exceeds the {model_name}'s learned position "
                     f"table (max_length={model.max_length}); positions past it would be "
                     "silently clamped onto its last row.")


def validate_ptx(config, coef: str, minibatches: str, num_minibatches: int, policy_model) -> None:
  """The pretraining mix (`coef`, e.g. 'config.ppo.ptx_coef=1.0', is on): a pretraining file,
  rows that split into the minibatches, and rows long enough to have a next-token target
  that fit the policy's position table."""
  ptx = config.ptx
  if not ptx.train_file:
    raise ValueError(f"{coef} but config.ptx.train_file is empty: the pretraining mix "
                     "needs pretraining text ({\"text\"} JSON lines or .txt).")
  if ptx.batch_size % num_minibatches:
    raise ValueError(f"config.ptx.batch_size={ptx.batch_size} is not divisible by "
                     f"{minibatches}={num_minibatches}.")
  if not (is_int(ptx.length) and ptx.length >= 2):
    raise ValueError(f"config.ptx.length={ptx.length!r} must be an integer >= 2: a row needs "
                     "a token and its successor for the LM loss.")
  check_fits(ptx.length, "config.ptx.length", policy_model, "policy")
