"""Damaged or missing input files are one clear error naming the file or the config key.

Library level: a truncated, empty or bad-header safetensors file, a sharded checkpoint's bad
index, an invalid config.json, a missing or damaged tokenizer, a tokenizer larger than an RL
run's models. Command line (`python -m instruct.train`, `python -m instruct.export`, run as
subprocesses): exit status 1, no traceback, and one `error: ` line that names the file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import ml_collections
import pytest
import torch
import transformers

from instruct import checkpoint as ckpt_lib
from instruct import config_lib
from instruct import hf
from instruct.data import DEFAULT_TOKENIZER, load_tokenizer
from instruct.model import ModelConfig
from instruct.rl import config as rl_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 512  # The embedded tokenizer's size, so `configs/sft.py:tiny` accepts the checkpoint.


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A tiny random GPT-2 saved by transformers: (single-file dir, sharded dir)."""
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=32, n_layer=1,
                                   n_head=2, bos_token_id=0, eos_token_id=0)
  model = transformers.AutoModelForCausalLM.from_config(config)
  root = tmp_path_factory.mktemp("checkpoint")
  model.save_pretrained(root / "single")
  model.save_pretrained(root / "sharded", max_shard_size="20KB")
  assert os.path.exists(root / "sharded" / hf.SAFE_INDEX)
  return str(root / "single"), str(root / "sharded")


def starts(text: str) -> str:
  """A `pytest.raises` pattern: the message starts with `text`."""
  return "^" + re.escape(text)


def copy(src: str, dst) -> str:
  shutil.copytree(src, dst)
  return str(dst)


def damage_safetensors(file: str, kind: str) -> None:
  with open(file, "rb") as f:
    data = f.read()
  with open(file, "wb") as f:
    if kind == "truncated":
      f.write(data[:len(data) // 2])
    elif kind == "bad_header":  # The 8-byte header size, then something that is not JSON.
      f.write(data[:8] + b"{not json" + data[17:])
    # "empty": nothing.


def shard_files(directory: str) -> list[str]:
  with open(os.path.join(directory, hf.SAFE_INDEX)) as f:
    return sorted(set(json.load(f)["weight_map"].values()))


# ------------------------------------------------------------------------------ HF checkpoints


@pytest.mark.parametrize("kind", ["truncated", "empty", "bad_header"])
def test_damaged_safetensors_name_the_file(checkpoint, tmp_path, kind):
  single, sharded = checkpoint
  path = copy(single, tmp_path / "single")
  damage_safetensors(os.path.join(path, hf.SAFE_WEIGHTS), kind)
  with pytest.raises(ValueError,
                     match=starts(f"{path}/model.safetensors: not a readable safetensors")):
    hf.load_hf_params(path)
  path = copy(sharded, tmp_path / "sharded")
  shard = shard_files(path)[1]
  damage_safetensors(os.path.join(path, shard), kind)
  with pytest.raises(ValueError, match=starts(f"{path}/{shard}: not a readable safetensors")):
    hf.load_hf_params(path)


def test_bad_sharded_index_names_the_index(checkpoint, tmp_path):
  _, sharded = checkpoint
  path = copy(sharded, tmp_path / "missing_shard")
  shard = shard_files(path)[-1]
  os.remove(os.path.join(path, shard))
  with pytest.raises(
      FileNotFoundError, match=starts(f"{path}/{hf.SAFE_INDEX} lists weight file '{shard}', which "
                                      "is not in")):
    hf.load_hf_params(path)
  index = os.path.join(path, hf.SAFE_INDEX)
  with open(index, "w") as f:
    f.write('{"weight_map": {"a": ')
  with pytest.raises(ValueError, match=starts(f"{index}: invalid JSON at line 1 column 22")):
    hf.load_hf_params(path)
  with open(index, "w") as f:
    json.dump({"metadata": {}}, f)
  with pytest.raises(
      ValueError, match=starts(f"{index}: expected a JSON object with a "
                               "non-empty 'weight_map'")):
    hf.load_hf_params(path)


def test_damaged_pickle_names_the_file(checkpoint, tmp_path):
  single, _ = checkpoint
  shutil.copy(os.path.join(single, "config.json"), tmp_path / "config.json")
  (tmp_path / hf.PICKLE_WEIGHTS).write_bytes(b"PK\x03\x04 not a whole zip archive")
  with pytest.raises(
      ValueError, match=starts(f"{tmp_path}/{hf.PICKLE_WEIGHTS}: not a "
                               "readable PyTorch weights file")):
    hf.load_hf_params(str(tmp_path), allow_pickle=True)


# (config.json: a text, or the checkpoint's fields with these changes (None: removed); the
# error after "DIR/config.json: ").
BAD_CONFIGS = [
    ('{"model_type": "gpt2",\n  "n_embd": 32,\n}', "invalid JSON at line 3 column 1"),
    ("[1, 2]", "expected a JSON object, got a list"),
    ({"model_type": None}, "missing 'model_type'"),
    ({"model_type": "mistral"}, "Unsupported Hugging Face model_type 'mistral'"),
    ({"n_embd": None}, "missing 'n_embd'"),
    ({"n_head": "two"}, "n_head='two'; expected a positive integer"),
    ({"activation_function": "relu"}, "This gpt2 checkpoint uses activation_function='relu'"),
]


@pytest.mark.parametrize("content,error", BAD_CONFIGS)
def test_invalid_config_json_names_the_file(checkpoint, tmp_path, content, error):
  single, _ = checkpoint
  path = copy(single, tmp_path / "ckpt")
  file = os.path.join(path, "config.json")
  if isinstance(content, dict):
    fields = dict(hf.read_hf_config(single), **content)
    content = json.dumps({k: v for k, v in fields.items() if v is not None})
  with open(file, "w") as f:
    f.write(content)
  with pytest.raises(ValueError, match=starts(f"{file}: {error}")):
    hf.resolve_model_config({"hf_checkpoint": path})
  with pytest.raises(ValueError, match=starts(f"{file}: {error}")):
    hf.load_hf_params(path)


# ---------------------------------------------------------------------------------- tokenizers


def test_missing_or_damaged_tokenizer_names_the_path(tmp_path):
  for path in ("/no/such/tokenizer", str(tmp_path / "missing")):
    with pytest.raises(
        FileNotFoundError,
        match=starts(f"config.data.tokenizer='{path}': no such tokenizer directory")):
      load_tokenizer(path)
  file = os.path.join(DEFAULT_TOKENIZER, "tokenizer.json")
  with pytest.raises(FileNotFoundError, match=starts(f"config.data.tokenizer='{file}' is a file")):
    load_tokenizer(file)
  with pytest.raises(
      FileNotFoundError, match=starts("config.data.tokenizer='no-org/no-tokenizer' is "
                                      "not a local directory")):
    load_tokenizer("no-org/no-tokenizer")
  (tmp_path / "empty").mkdir()
  with pytest.raises(
      ValueError, match=starts(f"config.data.tokenizer='{tmp_path}/empty' is an "
                               "empty directory")):
    load_tokenizer(str(tmp_path / "empty"))
  truncated = copy(DEFAULT_TOKENIZER, tmp_path / "truncated")
  with open(os.path.join(truncated, "tokenizer.json"), "r+") as f:
    f.truncate(300)
  with pytest.raises(ValueError,
                     match=starts(f"{truncated}/tokenizer.json: invalid JSON at line ")):
    load_tokenizer(truncated)
  wrong = copy(DEFAULT_TOKENIZER, tmp_path / "wrong")
  with open(os.path.join(wrong, "tokenizer.json"), "w") as f:
    json.dump({"version": "1.0", "model": {"type": "Nonsense"}}, f)
  with pytest.raises(
      ValueError, match=starts(f"config.data.tokenizer='{wrong}': the directory "
                               "could not be loaded as a Hugging Face tokenizer")):
    load_tokenizer(wrong)


def test_rl_refuses_a_tokenizer_larger_than_its_models():
  config = rl_config.base_config()
  config.policy_from, config.reward_from = "/runs/sft", "/runs/rm"
  n = len(load_tokenizer(config.data.tokenizer))
  small, fits = ModelConfig(vocab_size=n - 1), ModelConfig(vocab_size=n)
  rl_config.check_tokenizer_fits(config, n, fits, fits)
  rl_config.check_tokenizer_fits(config, n, None, None)
  with pytest.raises(
      ValueError, match=rf"config.data.tokenizer=.* has {n} tokens, more than "
      rf"the policy's vocab_size={n - 1} \(config.policy_from='/runs/sft'\)"):
    rl_config.check_tokenizer_fits(config, n, small, fits)
  with pytest.raises(
      ValueError, match=rf"more than the reward model's vocab_size={n - 1} "
      r"\(config.reward_from='/runs/rm'\)"):
    rl_config.check_tokenizer_fits(config, n, fits, small)


# -------------------------------------------------------------------------------- command line


def run_command(module: str, *args: str) -> str:
  """Runs `python -m module args`; it must fail with exactly one `error: ` line and no
  traceback. Returns that line."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 1, done.stderr[-3000:]
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, done.stderr[-3000:]
  assert not errors[0].startswith("error: unexpected"), errors[0]
  return errors[0]


def train(tmp_path, tfds_dir, *overrides: str) -> str:
  return run_command("instruct.train", "--config=configs/sft.py:tiny",
                     f"--workdir={tmp_path / 'run'}", f"--config.data.tfds_dir={tfds_dir}",
                     *overrides)


def test_train_with_a_damaged_hf_checkpoint(checkpoint, tmp_path, tfds_dir):
  single, sharded = checkpoint
  path = copy(single, tmp_path / "truncated")
  damage_safetensors(os.path.join(path, hf.SAFE_WEIGHTS), "truncated")
  error = train(tmp_path, tfds_dir, f"--config.model.hf_checkpoint={path}")
  assert f"{path}/model.safetensors: not a readable safetensors file" in error
  path = copy(single, tmp_path / "bad_json")
  with open(os.path.join(path, "config.json"), "a") as f:
    f.write(",\n")
  error = train(tmp_path, tfds_dir, f"--config.model.hf_checkpoint={path}")
  assert f"{path}/config.json: invalid JSON at line" in error
  path = copy(sharded, tmp_path / "missing_shard")
  os.remove(os.path.join(path, shard_files(path)[0]))
  error = train(tmp_path, tfds_dir, f"--config.model.hf_checkpoint={path}")
  assert f"{path}/{hf.SAFE_INDEX} lists weight file" in error


def test_train_with_a_missing_or_empty_tokenizer(tmp_path, tfds_dir):
  error = train(tmp_path, tfds_dir, "--config.data.tokenizer=/no/such/dir")
  assert "config.data.tokenizer='/no/such/dir': no such tokenizer directory" in error
  (tmp_path / "empty").mkdir()
  error = train(tmp_path, tfds_dir, f"--config.data.tokenizer={tmp_path / 'empty'}")
  assert f"config.data.tokenizer='{tmp_path / 'empty'}' is an empty directory" in error


def test_export_with_a_bad_workdir_or_out(tmp_path):
  error = run_command("instruct.export", f"--workdir={tmp_path / 'nothing'}",
                      f"--out={tmp_path / 'hf'}")
  assert f"workdir='{tmp_path / 'nothing'}' is not a run directory" in error
  config = config_lib.base_config()
  config.stage = "sft"
  config.model = ml_collections.ConfigDict(dict(ModelConfig().__dict__, hf_checkpoint=""))
  os.makedirs(tmp_path / "untrained")
  ckpt_lib.write_config(str(tmp_path / "untrained"), config)
  error = run_command("instruct.export", f"--workdir={tmp_path / 'untrained'}",
                      f"--out={tmp_path / 'hf'}")
  assert f"workdir='{tmp_path / 'untrained'}' has no checkpoint" in error
  (tmp_path / "file").write_text("")
  error = run_command("instruct.export", f"--workdir={tmp_path / 'untrained'}",
                      f"--out={tmp_path / 'file'}")
  assert f"out_dir='{tmp_path / 'file'}' (--out) is a file" in error
