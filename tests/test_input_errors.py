"""Bad input files on the command line: one `error:` line naming the file and line (or the
config key), exit status 1, no traceback; `config.data.skip_invalid` skips and counts.

Every error here is raised by the config's validation or while the data loads, before anything
is compiled.
"""

import gzip
import json
import os
import subprocess
import sys

import pytest

from instruct import config_lib
from instruct import data as data_lib
from instruct import metrics as metrics_lib
from instruct.rl import driver
from instruct.stages import rm as rm_stage
from tests.test_sharding import ROOT, load_config


def _demo(i: int, completion: str = " ok") -> str:
  return json.dumps({"prompt": f"Say {i}.\nAnswer:", "completion": completion})


def _write(path, lines: list, prefix: bytes = b"", gzipped: bool = False):
  """Writes `lines` (str, or bytes taken as they are) one a line after `prefix`."""
  body = prefix + b"".join(
      (x if isinstance(x, bytes) else x.encode("utf-8")) + b"\n" for x in lines)
  with (gzip.open(path, "wb") if gzipped else open(path, "wb")) as f:
    f.write(body)
  return str(path)


def _train(tmp_path, tfds_dir, config: str, *overrides: str) -> subprocess.CompletedProcess:
  """`python -m instruct.train` on a tiny preset in a fresh workdir under `tmp_path`."""
  command = [
      sys.executable, "-m", "instruct.train", f"--config=configs/{config}.py:tiny",
      f"--workdir={tmp_path / 'run'}", f"--config.data.tfds_dir={tfds_dir}", *overrides
  ]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def _error_line(result: subprocess.CompletedProcess) -> str:
  """The one `error:` line of a failed run (after checking status 1 and no traceback)."""
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, result.stderr[-3000:]
  return errors[0]


def _rm_from_scratch() -> list[str]:
  """The flag that lets the rm stage start without `init_from`, where the config has one."""
  return ["--config.rm.random_init=True"] if "random_init" in config_lib.rm_config() else []


def _comparisons_with_three_responses(tmp_path) -> str:
  """18 pairs and, from line 3 on, 9 comparisons of 3 responses."""
  record = {"prompt": "Pick.\nAnswer:", "responses": [" a", " b", " c"], "ranking": [2, 0, 1]}
  pair = {"prompt": "Pick.\nAnswer:", "chosen": " a", "rejected": " b"}
  return _write(tmp_path / "k3.jsonl", [json.dumps(pair), json.dumps(pair), json.dumps(record)] * 9)


def test_comparison_with_more_responses_than_max_responses(tmp_path, tfds_dir):
  path = _comparisons_with_three_responses(tmp_path)
  result = _train(tmp_path, tfds_dir, "rm", f"--config.data.train_file={path}",
                  "--config.rm.max_responses=2", *_rm_from_scratch())
  assert _error_line(result) == (
      f"error: {path}:3: has 3 responses, more than config.rm.max_responses=2")


def test_skip_invalid_skips_comparisons_with_too_many_responses(tmp_path, tfds_dir):
  path = _comparisons_with_three_responses(tmp_path)
  config = load_config("rm", "tiny")
  config.data.tfds_dir = tfds_dir
  config.data.train_file = path
  config.rm.max_responses = 2
  tokenizer = data_lib.load_tokenizer(config.data.tokenizer)
  with pytest.raises(data_lib.RecordError, match=f"^{path}:3: has 3 responses"):
    rm_stage.make_task(config, tokenizer, None, None).make_data("train", True)
  for key in ("rm", "data"):
    config[key].skip_invalid = True
    batches = rm_stage.make_task(config, tokenizer, None, None).make_data("train", True)
    assert (batches.num_examples, batches.num_skipped) == (18, 9)
    assert batches.data_metrics("train") == {"train_skipped": 9, "train_truncated": 0}
    assert next(batches)["tokens"].shape[:2] == (16, 2)
    config[key].skip_invalid = False


def test_a_directory_as_train_file_is_named_as_one(tmp_path, tfds_dir):
  directory = tmp_path / "demos"
  directory.mkdir()
  _write(directory / "part.jsonl", [_demo(i) for i in range(20)])
  line = _error_line(_train(tmp_path, tfds_dir, "sft", f"--config.data.train_file={directory}"))
  assert line.startswith(f"error: config.data.train_file='{directory}' is a directory"), line


def test_a_bom_is_accepted_and_too_few_examples_name_file_split_and_key(tmp_path, tfds_dir):
  # The byte order mark at the start of the file is not an error; the 3 records are fewer than
  # one batch of 16, which names the split, its file and the config key.
  path = _write(tmp_path / "bom.jsonl", [_demo(i) for i in range(3)], prefix=b"\xef\xbb\xbf")
  line = _error_line(_train(tmp_path, tfds_dir, "sft", f"--config.data.train_file={path}"))
  assert line.startswith(f"error: train split ({path}) has 3 examples, fewer than one global "
                         "batch of 16 (config.train.global_batch_size)"), line


def test_bytes_that_are_not_utf8_name_file_line_and_column(tmp_path, tfds_dir):
  latin1 = b'{"prompt": "Say \xff.", "completion": " ok"}'
  lines = [_demo(0), latin1] + [_demo(i) for i in range(20)]
  path = _write(tmp_path / "latin1.jsonl", lines)
  line = _error_line(_train(tmp_path, tfds_dir, "sft", f"--config.data.train_file={path}"))
  assert line == f"error: {path}:2: not valid UTF-8 (byte 0xff at column 17)", line


def test_bytes_that_are_not_utf8_in_gzipped_plain_text(tmp_path, tfds_dir):
  paragraphs = [f"Paragraph {i} of the corpus.\n" for i in range(20)]
  lines = ["First paragraph,", "two lines.", "", b"caf\xe9 au lait", ""] + paragraphs
  path = _write(tmp_path / "corpus.txt.gz", lines, gzipped=True)
  line = _error_line(_train(tmp_path, tfds_dir, "pretrain", f"--config.data.train_file={path}"))
  assert line == f"error: {path}:4: not valid UTF-8 (byte 0xe9 at column 4)", line


def test_skip_invalid_skips_bad_lines_and_truncation_is_reported(tmp_path, tfds_dir):
  long = _demo(99, " word" * 200)  # Longer than the 128 tokens of sft.py:tiny's buckets.
  lines = [_demo(i) for i in range(18)] + [b"\xff\xfe not UTF-8", "{bad json", long]
  path = _write(tmp_path / "mixed.jsonl", lines, prefix=b"\xef\xbb\xbf")
  result = _train(tmp_path, tfds_dir, "sft", f"--config.data.train_file={path}",
                  "--config.data.skip_invalid=True", "--config.train.num_steps=1",
                  "--config.train.eval_every=0")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"train split ({path}): skipped 2 invalid records" in result.stderr
  assert (f"train split ({path}): 1 of 19 examples longer than 128 tokens were truncated"
          in result.stderr), result.stderr[-3000:]
  (record,) = metrics_lib.read_metrics(str(tmp_path / "run"))
  assert (record["train_skipped"], record["train_truncated"]) == (2, 1), record
  assert (record["validation_skipped"], record["validation_truncated"]) == (0, 0), record


def test_allow_truncation_false_names_the_first_long_line_and_the_key(tmp_path, tfds_dir):
  long = _demo(99, " word" * 200)
  lines = [_demo(i) for i in range(4)] + [long] + [_demo(i) for i in range(16)] + [long]
  path = _write(tmp_path / "long.jsonl", lines)
  line = _error_line(
      _train(tmp_path, tfds_dir, "sft", f"--config.data.train_file={path}",
             "--config.data.allow_truncation=False"))
  assert line.startswith(f"error: train split ({path}): 2 of 22 examples are longer than 128 "
                         f"tokens, the first at {path}:5; config.data.allow_truncation=False"), line


def test_rl_prompts_longer_than_prompt_length(tmp_path, tfds_dir):
  prompts = [json.dumps({"prompt": f"Say {i}.\nAnswer:"}) for i in range(16)]
  long = json.dumps({"prompt": "Say " + "word " * 40 + "\nAnswer:"})
  path = _write(tmp_path / "prompts.jsonl", prompts[:7] + [long] + prompts[7:])
  config = load_config("ppo", "tiny")
  config.data.tfds_dir = tfds_dir
  config.data.train_file = path
  tokenizer = data_lib.load_tokenizer(config.data.tokenizer)
  prompts_data, ptx = driver.make_data(config, tokenizer, 0)
  assert ptx is None
  assert driver.data_metrics(prompts_data, ptx) == {"train_skipped": 0, "train_truncated": 1}
  config.data.allow_truncation = False
  with pytest.raises(
      ValueError, match=rf"1 of 17 prompts are longer than prompt_length=32 tokens, "
      rf"the first at {path}:8; config.data.allow_truncation=False"):
    driver.make_data(config, tokenizer, 0)
