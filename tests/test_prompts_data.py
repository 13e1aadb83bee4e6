"""Tests of prompt data for RL: records, builder, encoding and batching."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from instruct import data
from instruct.assets import make_assets
from tests.conftest import write_lines
from tests.test_data import DEMO_FILES, _assert_batches_equal, _take

_ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'instruct', 'assets', 'data')
PROMPT_FILES = {
    'train': os.path.join(_ASSETS, 'prompts_train.jsonl'),
    'validation': os.path.join(_ASSETS, 'prompts_validation.jsonl'),
}
PROMPT_LENGTH = 32  # Every shipped prompt fits (checked below).


def _prompt_batches(data_dir, tokenizer, split='train', files=None, **kwargs):
  args = dict(global_batch_size=16, prompt_length=PROMPT_LENGTH, seed=0, shuffle=True, repeat=True,
              data_dir=data_dir)
  args.update(kwargs)
  return data.make_prompt_batches(files or PROMPT_FILES, split, tokenizer, **args)


def _prompts(batch, tokenizer):
  """Returns the decoded prompts of the real rows of a prompt batch."""
  return [
      tokenizer.decode(tokens[mask == 1])
      for tokens, mask in zip(batch['prompt_tokens'], batch['prompt_mask']) if mask.any()
  ]


def _file_prompts(path):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line)['prompt'] for line in f if line.strip()]


def _assert_left_padded(batch, pad_id):
  tokens, mask = batch['prompt_tokens'], batch['prompt_mask']
  assert tokens.dtype == np.int32 and mask.dtype == np.int32
  real = mask.any(axis=1)
  assert (mask[real, -1] == 1).all()  # Every prompt ends in the last column.
  assert (np.diff(mask, axis=1) >= 0).all()  # Padding is a prefix.
  assert (tokens[mask == 0] == pad_id).all()
  assert not (tokens[mask == 1] == pad_id).any()


# ---------------------------------------------------------- encode/collate


def test_encode_prompt_keeps_the_end(tokenizer):
  prompt = 'Reverse the words: cat dog\nAnswer:'
  tokens, truncated = data.encode_prompt(tokenizer, prompt, 32)
  assert tokens.dtype == np.int32 and not truncated
  assert tokenizer.decode(tokens) == prompt
  assert tokenizer.eos_token_id not in tokens
  long = 'Say the words: ' + ' '.join(['apple'] * 40) + ' moon\nAnswer:'
  full = tokenizer.encode(long, add_special_tokens=False)
  tokens, truncated = data.encode_prompt(tokenizer, long, 8)
  assert truncated and tokens.tolist() == full[-8:]
  assert tokenizer.decode(tokens).endswith('moon\nAnswer:')
  with pytest.raises(ValueError, match='max_length must be positive'):
    data.encode_prompt(tokenizer, prompt, 0)
  with pytest.raises(ValueError, match='no tokens'):
    data.encode_prompt(tokenizer, '', 8)


def test_collate_prompts_left_pads_with_dummy_rows():
  rows = [(np.full(n, n + 1, np.int32), None, False) for n in (3, 6, 1)]
  batch = data.collate_prompts(rows, 4, prompt_length=6, pad_id=1)
  assert sorted(batch) == ['prompt_mask', 'prompt_tokens']
  assert batch['prompt_tokens'].shape == batch['prompt_mask'].shape == (4, 6)
  assert batch['prompt_mask'].tolist() == [[0, 0, 0, 1, 1, 1], [1] * 6, [0, 0, 0, 0, 0, 1], [0] * 6]
  assert batch['prompt_tokens'].tolist() == [[1, 1, 1, 4, 4, 4], [7] * 6, [1, 1, 1, 1, 1, 2],
                                             [1] * 6]
  _assert_left_padded(batch, 1)
  with pytest.raises(ValueError, match='prompt_length=5'):
    data.collate_prompts(rows, 4, 5, 1)
  with pytest.raises(ValueError, match='3 rows for a batch of 2'):
    data.collate_prompts(rows, 2, 6, 1)


# ---------------------------------------------------------------- builder


@pytest.mark.parametrize('bad_line, fragment', [
    ('{"prompt": ', 'invalid JSON'),
    ('{"completion": " c"}', "missing field 'prompt'"),
    ('{"prompt": " \\n"}', "'prompt' is empty or whitespace-only"),
    ('{"prompt": ["p"]}', "'prompt' must be of type str, got list"),
])
def test_bad_prompt_record_names_file_and_line(tmp_path, bad_line, fragment):
  good = json.dumps({'prompt': 'Say hi.\nAnswer:', 'completion': ' hi'})
  path = write_lines(tmp_path / 'prompts.jsonl', [good, '', bad_line])
  with pytest.raises(data.RecordError) as info:
    data.load_split('prompts', {'train': str(path)}, 'train', str(tmp_path / 'tfds'))
  message = str(info.value)
  assert message.startswith(f'{path}:3: ') and fragment in message


def test_shipped_prompts_round_trip(data_dir, tokenizer):
  expected = make_assets.make_prompt_records()
  longest = 0
  for split, path in PROMPT_FILES.items():
    with open(path, encoding='utf-8') as f:
      lines = f.readlines()
    assert ''.join(lines) == ''.join(json.dumps(r) + '\n' for r in expected[f'prompts_{split}'])
    source = data.load_split('prompts', PROMPT_FILES, split, data_dir)
    assert len(source) == len(lines) == {'train': 512, 'validation': 96}[split]
    examples = [source[i] for i in range(len(source))]
    assert all(list(ex) == ['prompt'] for ex in examples)
    prompts = [ex['prompt'] for ex in examples]
    assert sorted(prompts) == sorted(_file_prompts(path))
    lengths = [len(data.encode_prompt(tokenizer, p, 1000)[0]) for p in prompts]
    longest = max(longest, *lengths)
  print(f'longest shipped prompt: {longest} tokens')
  assert longest <= PROMPT_LENGTH


def test_demonstration_files_work_as_prompt_files(data_dir, tokenizer):
  source = data.load_split('prompts', DEMO_FILES, 'validation', data_dir)
  demos = data.read_jsonl(DEMO_FILES['validation'], data.DEMONSTRATION_SCHEMA)
  assert len(source) == len(demos)
  assert sorted(source[i]['prompt'] for i in range(len(source))) == sorted(
      d['prompt'] for d in demos)
  batch = next(_prompt_batches(data_dir, tokenizer, 'validation', files=DEMO_FILES))
  _assert_left_padded(batch, tokenizer.pad_token_id)
  assert set(_prompts(batch, tokenizer)) <= {d['prompt'] for d in demos}


# --------------------------------------------------------------- batching


def test_prompt_batches_order_hosts_and_resume(data_dir, tokenizer):
  first = _take(_prompt_batches(data_dir, tokenizer, seed=1), 3)
  again = _take(_prompt_batches(data_dir, tokenizer, seed=1), 3)
  _assert_batches_equal(first, again)
  other = next(_prompt_batches(data_dir, tokenizer, seed=2))
  assert _prompts(other, tokenizer) != _prompts(first[0], tokenizer)
  train = set(_file_prompts(PROMPT_FILES['train']))
  for batch in first:
    assert batch['prompt_tokens'].shape == (16, PROMPT_LENGTH)
    assert batch['prompt_mask'].all(axis=1).sum() < 16  # Padding happens.
    _assert_left_padded(batch, tokenizer.pad_token_id)
    assert set(_prompts(batch, tokenizer)) <= train
  hosts = [
      _take(_prompt_batches(data_dir, tokenizer, seed=1, process_index=p, process_count=2), 3)
      for p in range(2)
  ]
  assert hosts[0][0]['prompt_tokens'].shape == (8, PROMPT_LENGTH)
  for g in range(3):
    for key in first[g]:
      np.testing.assert_array_equal(np.concatenate([hosts[0][g][key], hosts[1][g][key]]),
                                    first[g][key])
  # 512 prompts, global batch 96: 5 batches per epoch; resume across it.
  def make():
    return _prompt_batches(data_dir, tokenizer, global_batch_size=96)

  expected = _take(make(), 7)
  batches = make()
  _take(batches, 4)
  state = json.loads(json.dumps(batches.get_state()))
  assert state == {'epoch': 0, 'batch': 4}
  resumed = make()
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 3), expected[4:])
  assert batches.num_truncated == 0


def test_prompt_eval_covers_every_prompt_once(data_dir, tokenizer):
  got, num_batches, num_dummy = [], 0, 0
  for p in range(2):  # 96 prompts; 3 global batches of 40, 24 dummy rows.
    for batch in _prompt_batches(data_dir, tokenizer, 'validation', global_batch_size=40,
                                 shuffle=False, repeat=False, process_index=p, process_count=2):
      num_batches += 1
      assert batch['prompt_tokens'].shape == (20, PROMPT_LENGTH)
      _assert_left_padded(batch, tokenizer.pad_token_id)
      dummy = ~batch['prompt_mask'].any(axis=1)
      assert (batch['prompt_tokens'][dummy] == tokenizer.pad_token_id).all()
      num_dummy += int(dummy.sum())
      got += _prompts(batch, tokenizer)
  assert num_batches == 6 and num_dummy == 24
  assert sorted(got) == sorted(_file_prompts(PROMPT_FILES['validation']))


def test_prompt_batches_truncate_and_errors(data_dir, tokenizer):
  batches = _prompt_batches(data_dir, tokenizer, 'validation', prompt_length=8,
                            global_batch_size=32, repeat=False)
  for batch in batches:
    _assert_left_padded(batch, tokenizer.pad_token_id)
    for prompt in _prompts(batch, tokenizer):
      assert prompt.endswith('\nAnswer:')
  assert batches.num_truncated > 0
  with pytest.raises(ValueError, match='prompt_length must be positive'):
    _prompt_batches(data_dir, tokenizer, prompt_length=0)
  with pytest.raises(ValueError, match='with make_prompt_batches'):
    data.make_batches('prompts', PROMPT_FILES, 'train', tokenizer, global_batch_size=8,
                      buckets=(64,), seed=0, shuffle=False, repeat=False, data_dir=data_dir)
