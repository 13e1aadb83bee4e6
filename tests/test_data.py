"""Tests of the data layer: records, TFDS builders, tokenization, batching."""

from __future__ import annotations

import gzip
import json
import logging
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


def _write_bytes(path, content, gzipped=False):
  with (gzip.open(path, 'wb') if gzipped else open(path, 'wb')) as f:
    f.write(content)
  return path


@pytest.mark.parametrize('name', ['demos.jsonl', 'demos.jsonl.gz'])
def test_lines_that_are_not_utf8_name_file_line_and_column(tmp_path, name):
  good = _demo_line().encode('utf-8')
  content = good + b'\n' + b'{"prompt": "\xe2\x82\xac \xc3(", "completion": " c"}\n' + good + b'\n'
  path = _write_bytes(tmp_path / name, content, gzipped=name.endswith('.gz'))
  with pytest.raises(data.RecordError) as info:
    data.read_jsonl(path, data.DEMONSTRATION_SCHEMA)
  assert str(info.value) == f'{path}:2: not valid UTF-8 (byte 0xc3 at column 15)'
  records, num_skipped = data.records.read_records(path, data.DEMONSTRATION_SCHEMA,
                                                   skip_invalid=True, line_numbers=True)
  assert num_skipped == 1 and [n for n, _ in records] == [1, 3]


@pytest.mark.parametrize('name', ['corpus.txt', 'corpus.txt.gz'])
def test_plain_text_that_is_not_utf8_names_the_line_and_skips_the_paragraph(tmp_path, name):
  content = b'One,\r\nstill one.\r\n\r\nTwo \xff\nstill two.\n\nThree.\n'
  path = _write_bytes(tmp_path / name, content, gzipped=name.endswith('.gz'))
  with pytest.raises(data.RecordError, match=rf'^{path}:4: not valid UTF-8 \(byte 0xff at '
                     r'column 5\)$'):
    data.read_text_records(path)
  records, num_skipped = data.records.read_text_file(path, skip_invalid=True, line_numbers=True)
  assert num_skipped == 1
  assert records == [(1, {'text': 'One,\nstill one.'}), (7, {'text': 'Three.'})]


def test_a_byte_order_mark_starts_a_file_and_is_dropped(tmp_path):
  bom = b'\xef\xbb\xbf'
  line = _demo_line().encode('utf-8') + b'\n'
  for name in ('demos.jsonl', 'demos.jsonl.gz'):
    path = _write_bytes(tmp_path / name, bom + line + line, gzipped=name.endswith('.gz'))
    assert data.read_jsonl(path, data.DEMONSTRATION_SCHEMA) == [json.loads(line)] * 2
  text = _write_bytes(tmp_path / 'corpus.txt', bom + b'First.\n\nSecond.\n')
  assert data.read_text_records(text) == [{'text': 'First.'}, {'text': 'Second.'}]
  pretraining = _write_bytes(tmp_path / 'text.jsonl', bom + b'{"text": "First."}\n')
  assert data.read_text_records(pretraining) == [{'text': 'First.'}]
  # Only at the start of the file: elsewhere it is a character of the record.
  later = _write_bytes(tmp_path / 'later.jsonl', line + bom + line)
  with pytest.raises(data.RecordError, match=f'{later}:2: invalid JSON'):
    data.read_jsonl(later, data.DEMONSTRATION_SCHEMA)


def test_damaged_gzip_and_directories_are_errors_naming_the_path(tmp_path):
  line = (_demo_line() + '\n').encode('utf-8')
  cut = _write_bytes(tmp_path / 'cut.jsonl.gz', gzip.compress(line * 2000)[:-40])
  with pytest.raises(data.RecordError, match=rf'^{cut}:\d+: cannot read the gzip data'):
    data.read_jsonl(cut, data.DEMONSTRATION_SCHEMA)
  plain = _write_bytes(tmp_path / 'plain.jsonl.gz', line)
  with pytest.raises(data.RecordError, match=rf'^{plain}:1: cannot read the gzip data'):
    data.read_jsonl(plain, data.DEMONSTRATION_SCHEMA)
  with pytest.raises(IsADirectoryError, match=f'is a directory: {tmp_path}'):
    data.read_text_records(tmp_path)
  with pytest.raises(IsADirectoryError, match=f"split 'train' is a directory: {tmp_path}"):
    data.load_split('demonstrations', {'train': str(tmp_path)}, 'train', str(tmp_path / 'tfds'))


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
  # Several buckets: every host pads to the bucket of the global batch's longest row, so the
  # hosts' shapes agree and their rows concatenate to the one-host batch (its bucket too).
  one = _take(_batches(demos_train, tokenizer, buckets=(18, 20, 22, 24, 26, 28, 30, 32, 64, 128)),
              6)
  hosts = [
      _take(
          _batches(demos_train, tokenizer, buckets=(18, 20, 22, 24, 26, 28, 30, 32, 64, 128),
                   process_index=p, process_count=2), 6) for p in range(2)
  ]
  assert len({b['tokens'].shape[1] for b in one}) > 1  # The buckets are really exercised.
  for g in range(6):
    for key in one[g]:
      np.testing.assert_array_equal(np.concatenate([hosts[0][g][key], hosts[1][g][key]]),
                                    one[g][key])
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


# ----------------------------------------------------- checks when loading


def test_skip_invalid_for_records_counts_and_survives_reuse(tmp_path, tokenizer, caplog):
  lines = [_demo_line(), '{"prompt": "p"}', _demo_line(completion=' bye'), '[]']
  files = {'train': str(write_lines(tmp_path / 'demos.jsonl', lines))}
  data_dir = str(tmp_path / 'tfds')
  for kind in ('demonstrations', 'prompts'):
    for _ in range(2):  # Prepared, then reused: the count is kept in the dataset's metadata.
      source = data.load_split(kind, files, 'train', data_dir, skip_invalid=True)
      assert (len(source), source.num_skipped) == ((2, 2) if kind == 'demonstrations' else (3, 1))
  text = tmp_path / 'corpus.txt'
  text.write_bytes(b'One.\n\nTwo \xff.\n\nThree.\n')
  source = data.load_split('text', {'train': str(text)}, 'train', data_dir, skip_invalid=True)
  assert (len(source), source.num_skipped) == (2, 1)
  with caplog.at_level(logging.WARNING):
    batches = data.make_batches('text', {'train': str(text)}, 'train', tokenizer, data_dir=data_dir,
                                global_batch_size=2, buckets=(16,), seed=0, shuffle=False,
                                repeat=True, skip_invalid=True)
  assert f'train split ({text}): skipped 1 invalid records (skip_invalid=True)' in caplog.text
  assert batches.data_metrics('train') == {'train_skipped': 1, 'train_truncated': 0}


def test_truncated_examples_are_counted_when_loading_or_refused(tmp_path, tokenizer, caplog):
  long = _demo_line(completion=' word' * 40)
  lines = [_demo_line()] * 3 + [long] + [_demo_line()] * 4 + [long]
  path = write_lines(tmp_path / 'demos.jsonl', lines)
  args = dict(global_batch_size=4, buckets=(8, 16), seed=0, shuffle=True, repeat=True,
              data_dir=str(tmp_path / 'tfds'))
  with caplog.at_level(logging.WARNING):
    batches = data.make_batches('demonstrations', {'train': str(path)}, 'train', tokenizer, **args)
  assert (f'train split ({path}): 2 of 9 examples longer than 16 tokens were truncated.'
          in caplog.text)
  assert batches.num_truncated_examples == 2 and batches.num_truncated == 0
  assert batches.data_metrics('train') == {'train_skipped': 0, 'train_truncated': 2}
  with pytest.raises(ValueError) as info:
    data.make_batches('demonstrations', {'train': str(path)}, 'train', tokenizer,
                      allow_truncation=False, **args)
  assert str(info.value).startswith(
      f'train split ({path}): 2 of 9 examples are longer than 16 tokens, the first at {path}:4; '
      'config.data.allow_truncation=False refuses')
  text = tmp_path / 'corpus.txt'
  text.write_text('Short.\n\nA long\nparagraph of' + ' words' * 30 + '.\n', encoding='utf-8')
  with pytest.raises(ValueError, match=rf'1 of 2 examples .* the first at {text}:3;'):
    data.make_batches('text', {'train': str(text)}, 'train', tokenizer, allow_truncation=False,
                      **dict(args, global_batch_size=2))


def test_a_split_smaller_than_a_batch_names_split_file_and_key(tmp_path, tokenizer):
  path = write_lines(tmp_path / 'demos.jsonl', [_demo_line()] * 3 + ['{"prompt": "p"}'])
  with pytest.raises(ValueError) as info:
    data.make_batches('demonstrations', {'train': str(path)}, 'train', tokenizer,
                      global_batch_size=4, buckets=(16,), seed=0, shuffle=True, repeat=True,
                      data_dir=str(tmp_path / 'tfds'), skip_invalid=True,
                      batch_size_name='config.train.global_batch_size')
  assert str(info.value).startswith(
      f'train split ({path}) has 3 examples (after skipping 1 invalid ones), fewer than one '
      'global batch of 4 (config.train.global_batch_size)')


def test_prepared_datasets_stay_on_local_disk(monkeypatch):
  """A bucket workdir is fine; a bucket for TFDS's prepared ArrayRecord files is refused
  with the key that named it (the files are read through local paths)."""
  from ml_collections import ConfigDict
  from instruct.stages import common
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
  assert common.tfds_dir(ConfigDict({"data": {"tfds_dir": "/d/tfds"}})) == "/d/tfds"
  assert common.tfds_dir(ConfigDict({"data": {"tfds_dir": ""}})).endswith("tensorflow_datasets")
  with pytest.raises(ValueError, match=r"^config.data.tfds_dir='gs://b/tfds' is a URL"):
    common.tfds_dir(ConfigDict({"data": {"tfds_dir": "gs://b/tfds"}}))
  monkeypatch.setenv("TFDS_DATA_DIR", "gs://b/tfds")
  with pytest.raises(ValueError, match=r"^\$TFDS_DATA_DIR='gs://b/tfds' is a URL"):
    common.tfds_dir(ConfigDict({"data": {"tfds_dir": ""}}))
