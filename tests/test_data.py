"""Tests of the data layer: records, TFDS builders, tokenization, batching."""

from __future__ import annotations

import json
import os
import types

import numpy as np
import pytest

from instruct import data
from instruct.data import builders
from instruct.data import pipeline
from tests.conftest import write_lines

_ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'instruct', 'assets', 'data')
DEMO_FILES = {
    'train': os.path.join(_ASSETS, 'demos_train.jsonl'),
    'validation': os.path.join(_ASSETS, 'demos_validation.jsonl'),
}


@pytest.fixture(scope='module')
def demos_train(data_dir):
  return data.load_split('demonstrations', DEMO_FILES, 'train', data_dir)


@pytest.fixture(scope='module')
def demos_validation(data_dir):
  return data.load_split('demonstrations', DEMO_FILES, 'validation', data_dir)


def _demo_line(prompt='Say hi.\nAnswer:', completion=' hi'):
  return json.dumps({'prompt': prompt, 'completion': completion})


def _demo_encoder(tokenizer, max_length):

  def encode(example):
    return data.encode_demonstration(tokenizer, example['prompt'], example['completion'],
                                     max_length)

  return encode


def _take(batches, n):
  return [next(batches) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def _real_rows(batch):
  """Returns the real (unpadded) token rows of a batch as tuples."""
  rows = []
  for tokens, mask in zip(batch['tokens'], batch['attention_mask']):
    if mask.any():
      rows.append(tuple(tokens[mask == 1].tolist()))
  return rows


# ---------------------------------------------------------------- records


@pytest.mark.parametrize('bad_line, fragment', [
    ('{"prompt": "p", "completion": ', 'invalid JSON'),
    ('["prompt", "completion"]', 'expected a JSON object, got list'),
    ('{"prompt": "p"}', "missing field 'completion'"),
    ('{"prompt": "p", "completion": "   "}', "'completion' is empty"),
    ('{"prompt": 3, "completion": "c"}', "'prompt' must be of type str, got int"),
])
def test_read_jsonl_errors_name_file_and_line(tmp_path, bad_line, fragment):
  path = write_lines(tmp_path / 'demos.jsonl', [_demo_line(), '', bad_line])
  with pytest.raises(data.RecordError) as info:
    data.read_jsonl(path, data.DEMONSTRATION_SCHEMA)
  message = str(info.value)
  assert message.startswith(f'{path}:3: ')
  assert fragment in message


def test_read_jsonl_skips_blank_lines_and_extra_fields(tmp_path):
  line = json.dumps({'prompt': 'p', 'completion': ' c', 'extra': 1})
  path = write_lines(tmp_path / 'demos.jsonl', ['', line, '   ', line])
  records = data.read_jsonl(path, data.DEMONSTRATION_SCHEMA)
  assert records == [{'prompt': 'p', 'completion': ' c'}] * 2


def test_read_jsonl_empty_and_missing_files(tmp_path):
  empty = write_lines(tmp_path / 'empty.jsonl', ['', ''])
  with pytest.raises(ValueError, match='empty.jsonl'):
    data.read_jsonl(empty, data.TEXT_SCHEMA)
  with pytest.raises(FileNotFoundError, match='missing.jsonl'):
    data.read_jsonl(tmp_path / 'missing.jsonl', data.TEXT_SCHEMA)


def test_read_text_records_splits_txt_paragraphs(tmp_path):
  path = tmp_path / 'corpus.txt'
  path.write_text('First line\nstill first.\n\n\nSecond.\n  \nThird.', encoding='utf-8')
  assert data.read_text_records(path) == [{'text': 'First line\nstill first.'}, {'text': 'Second.'},
                                          {'text': 'Third.'}]


# --------------------------------------------------------------- builders


def test_load_split_round_trips_shipped_demos(demos_train, demos_validation, data_dir):
  for split, source in [('train', demos_train), ('validation', demos_validation)]:
    expected = data.read_jsonl(DEMO_FILES[split], data.DEMONSTRATION_SCHEMA)
    assert len(source) == len(expected)
    examples = [source[i] for i in range(len(source))]
    assert all(isinstance(v, str) for ex in examples for v in ex.values())
    assert ({ex['prompt'] for ex in examples} == {ex['prompt'] for ex in expected})
  again = data.load_split('demonstrations', DEMO_FILES, 'train', data_dir)
  assert [again[i] for i in range(5)] == [demos_train[i] for i in range(5)]


def test_builder_raises_record_error_then_recovers(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  path = write_lines(tmp_path / 'bad.jsonl', [_demo_line(), _demo_line(), '{"prompt": "p"}'])
  files = {'train': str(path)}
  for _ in range(2):  # A leftover incomplete directory must not break retry.
    with pytest.raises(data.RecordError, match=f'{path}:3: missing field'):
      data.load_split('demonstrations', files, 'train', data_dir)
  old_name = data.LocalFilesConfig(files=files).name
  write_lines(path, [_demo_line(), _demo_line(completion=' bye')])
  assert data.LocalFilesConfig(files=files).name != old_name
  source = data.load_split('demonstrations', files, 'train', data_dir)
  assert sorted(source[i]['completion'] for i in range(2)) == [' bye', ' hi']


def test_load_split_rejects_unknown_kind(tmp_path):
  with pytest.raises(ValueError, match="allowed kinds.*'demonstrations'"):
    data.load_split('images', DEMO_FILES, 'train', str(tmp_path))


# ----------------------------------------------------------- tokenization


def test_tokenizer_special_tokens(tokenizer):
  assert tokenizer.pad_token_id != tokenizer.eos_token_id
  with pytest.raises(ValueError, match='distinct from EOS'):
    data.check_special_tokens(types.SimpleNamespace(pad_token_id=0, eos_token_id=0))
  with pytest.raises(OSError, match='offline by default'):
    data.load_tokenizer('no-such-org/no-such-tokenizer')


def test_pad_token_from_the_config(tokenizer, tmp_path):
  """A tokenizer that declares no pad token (Pythia's, GPT-2's) is refused with the
  fix in the message; `pad_token` declares an existing vocabulary token."""
  pad = tokenizer.pad_token
  no_pad = data.load_tokenizer()
  no_pad.pad_token = None
  no_pad.save_pretrained(tmp_path)
  with pytest.raises(ValueError, match='--config.data.pad_token=TOKEN'):
    data.load_tokenizer(str(tmp_path))
  loaded = data.load_tokenizer(str(tmp_path), pad_token=pad)
  assert loaded.pad_token_id == tokenizer.pad_token_id and len(loaded) == len(tokenizer)
  with pytest.raises(ValueError, match="pad_token='<new>' is not a token"):
    data.load_tokenizer(str(tmp_path), pad_token='<new>')
  with pytest.raises(ValueError, match='distinct from EOS'):
    data.load_tokenizer(str(tmp_path), pad_token=tokenizer.eos_token)


def test_encode_demonstration_masks_completion_and_eos(tokenizer, demos_train):
  eos = tokenizer.eos_token
  for i in range(20):
    example = demos_train[i]
    tokens, mask, truncated = data.encode_demonstration(tokenizer, example['prompt'],
                                                        example['completion'], 128)
    assert tokens.dtype == np.int32 and mask.dtype == np.int32
    assert not truncated
    assert tokens[-1] == tokenizer.eos_token_id
    assert tokenizer.pad_token_id not in tokens
    assert tokenizer.decode(tokens[mask == 1]) == example['completion'] + eos
    assert tokenizer.decode(tokens[mask == 0]) == example['prompt']


def test_encode_demonstration_truncation_keeps_completion(tokenizer):
  prompt = 'Say the words: ' + ' '.join(['apple'] * 40) + ' moon\nAnswer:'
  completion = ' fish bird'
  tokens, mask, truncated = data.encode_demonstration(tokenizer, prompt, completion, 16)
  assert truncated and len(tokens) == 16
  eos = tokenizer.eos_token
  assert tokenizer.decode(tokens[mask == 1]) == completion + eos
  assert tokenizer.decode(tokens[mask == 0]).endswith('moon\nAnswer:')
  # Too short even for the completion: one prompt token, completion cut.
  tokens, mask, truncated = data.encode_demonstration(tokenizer, prompt, completion, 2)
  assert truncated and mask.tolist() == [0, 1]
  assert tokenizer.eos_token_id not in tokens


def test_encode_text(tokenizer):
  tokens, mask, truncated = data.encode_text(tokenizer, 'The red door.', 64)
  assert not truncated and mask.tolist() == [1] * len(tokens)
  assert tokenizer.decode(tokens) == 'The red door.' + tokenizer.eos_token
  tokens, mask, truncated = data.encode_text(tokenizer, 'The red door.', 3)
  assert truncated and len(tokens) == 3 and len(mask) == 3


# --------------------------------------------------------------- batching


def _batches(source, tokenizer, **kwargs):
  args = dict(global_batch_size=32, buckets=(16, 32, 64), seed=0, shuffle=True, repeat=True)
  args.update(kwargs)
  return data.Batches(source, _demo_encoder(tokenizer, max(args['buckets'])),
                      pad_id=tokenizer.pad_token_id, **args)


def test_batches_use_smallest_fitting_bucket(demos_train, tokenizer):
  buckets = (8, 16, 24, 32, 64)
  seen = set()
  for batch in _take(_batches(demos_train, tokenizer, buckets=buckets), 16):
    shape = batch['tokens'].shape
    assert shape[0] == 32 and shape[1] in buckets
    longest = batch['attention_mask'].sum(axis=1).max()
    index = buckets.index(shape[1])
    assert longest <= shape[1] and (index == 0 or longest > buckets[index - 1])
    assert all(v.dtype == np.int32 for v in batch.values())
    padding = batch['attention_mask'] == 0
    assert (batch['tokens'][padding] == tokenizer.pad_token_id).all()
    assert not (batch['tokens'][~padding] == tokenizer.pad_token_id).any()
    assert not batch['loss_mask'][padding].any()
    # Right padding: real tokens form a prefix of every row.
    assert (np.diff(batch['attention_mask'], axis=1) <= 0).all()
    seen.add(shape[1])
  assert len(seen) > 1


def test_batches_order_is_deterministic(demos_train, tokenizer):
  first = _take(_batches(demos_train, tokenizer, seed=1), 3)
  _assert_batches_equal(first, _take(_batches(demos_train, tokenizer, seed=1), 3))
  other = next(_batches(demos_train, tokenizer, seed=2))
  assert _real_rows(other) != _real_rows(first[0])
  ordered = next(_batches(demos_train, tokenizer, shuffle=False))
  encode = _demo_encoder(tokenizer, 64)
  assert _real_rows(ordered)[0] == tuple(encode(demos_train[0])[0].tolist())


def _synthetic(n):
  """Returns a source of `n` examples and an encode giving unique rows.

  Example i encodes to `(i % 5) + 1` copies of token `i + 2` (0 and 1 are
  EOS and pad), so a row's first token identifies its example.
  """
  source = [{'id': str(i)} for i in range(n)]

  def encode(example):
    i = int(example['id'])
    tokens = np.full(i % 5 + 1, i + 2, np.int32)
    return tokens, np.ones_like(tokens), i % 7 == 0

  return source, encode


def _synthetic_batches(n, **kwargs):
  source, encode = _synthetic(n)
  args = dict(global_batch_size=8, buckets=(4, 8), pad_id=1, seed=0, shuffle=True, repeat=True)
  args.update(kwargs)
  return data.Batches(source, encode, **args)


def _ids(batch):
  """Returns the example ids of the real rows of a synthetic batch."""
  real = batch['attention_mask'].any(axis=1)
  return (batch['tokens'][real, 0] - 2).tolist()


def test_host_sharding_concatenates_to_global_batch(demos_train, tokenizer):
  one = _take(_batches(demos_train, tokenizer, buckets=(64,)), 3)
  hosts = [
      _take(_batches(demos_train, tokenizer, buckets=(64,), process_index=p, process_count=2), 3)
      for p in range(2)
  ]
  assert hosts[0][0]['tokens'].shape == (16, 64)
  for g in range(3):
    for key in one[g]:
      np.testing.assert_array_equal(np.concatenate([hosts[0][g][key], hosts[1][g][key]]),
                                    one[g][key])
  with pytest.raises(ValueError, match='single bucket'):
    _batches(demos_train, tokenizer, process_count=2)
  with pytest.raises(ValueError, match='global_batch_size.*process_count'):
    _batches(demos_train, tokenizer, global_batch_size=30, process_count=4, buckets=(64,))


def test_host_shards_are_disjoint():
  hosts = [_synthetic_batches(40, buckets=(8,), process_index=p, process_count=4) for p in range(4)]
  for _ in range(5):  # One epoch: 40 examples, 5 global batches of 8.
    ids = [_ids(next(h)) for h in hosts]
    assert all(len(part) == 2 for part in ids)
    flat = sum(ids, [])
    assert len(set(flat)) == 8


def test_resume_matches_uninterrupted_across_epochs():
  # 21 examples, global batch 8: 2 batches per epoch, 5 dropped per epoch.
  expected = _take(_synthetic_batches(21), 7)
  batches = _synthetic_batches(21)
  _take(batches, 3)
  state = json.loads(json.dumps(batches.get_state()))
  assert state == {'epoch': 1, 'batch': 1}
  resumed = _synthetic_batches(21)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 4), expected[3:])
  epoch_ids = _ids(expected[0]) + _ids(expected[1])
  assert len(set(epoch_ids)) == 16
  assert _ids(expected[2]) + _ids(expected[3]) != epoch_ids
  with pytest.raises(ValueError, match="'batch' and 'epoch'"):
    resumed.set_state({'epoch': 0})
  with pytest.raises(ValueError, match='out of range'):
    resumed.set_state({'epoch': 0, 'batch': 2})


def test_num_truncated_counts_occurrences():
  batches = _synthetic_batches(21, shuffle=False)
  _take(batches, 2)  # Rows 0..15; ids 0, 7 and 14 are marked truncated.
  assert batches.num_truncated == 3
  _take(batches, 2)  # The same rows again (from the cache).
  assert batches.num_truncated == 6


def test_eval_covers_every_example_once_with_dummy_rows():
  batches = _synthetic_batches(21, repeat=False, process_index=1, process_count=2, buckets=(8,))
  others = _synthetic_batches(21, repeat=False, process_index=0, process_count=2, buckets=(8,))
  ids, num_batches = [], 0
  for host in (batches, others):
    for batch in host:
      num_batches += 1
      assert batch['tokens'].shape == (4, 8)
      dummy = ~batch['attention_mask'].any(axis=1)
      assert not batch['loss_mask'][dummy].any()
      assert (batch['tokens'][dummy] == 1).all()
      ids += _ids(batch)
  assert num_batches == 6
  assert sorted(ids) == list(range(21))
  with pytest.raises(StopIteration):
    next(batches)
  with pytest.raises(ValueError, match='21 examples'):
    _synthetic_batches(21, global_batch_size=32)


def test_eval_on_shipped_validation(demos_validation, tokenizer):
  batches = _batches(demos_validation, tokenizer, repeat=False, shuffle=False)
  got = [row for batch in batches for row in _real_rows(batch)]
  encode = _demo_encoder(tokenizer, 64)
  expected = [tuple(encode(demos_validation[i])[0].tolist()) for i in range(len(demos_validation))]
  assert got == expected
  assert batches.batches_per_epoch == -(-len(demos_validation) // 32)


def test_make_batches_text_kind(tmp_path, tokenizer):
  path = tmp_path / 'corpus.txt'
  path.write_text('The red door opens.\n\nThe cold ship sails.\n\nA cat.\n', encoding='utf-8')
  batches = data.make_batches('text', {'train': str(path)}, 'train', tokenizer, global_batch_size=4,
                              buckets=(8, 16), seed=0, shuffle=False, repeat=False,
                              data_dir=str(tmp_path / 'tfds'))
  (batch,) = list(batches)
  np.testing.assert_array_equal(batch['loss_mask'], batch['attention_mask'])
  assert batch['attention_mask'].sum(axis=1).tolist()[3] == 0
  texts = sorted(tokenizer.decode(row) for row in _real_rows(batch))
  eos = tokenizer.eos_token
  assert texts == sorted(t + eos for t in ['The red door opens.', 'The cold ship sails.', 'A cat.'])
