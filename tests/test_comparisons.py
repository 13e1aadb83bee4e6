"""Tests of comparison data: records, builder, batching and the shipped set."""

from __future__ import annotations

import collections
import json
import logging
import os

import numpy as np
import pytest

from instruct import data
from instruct.assets import make_assets
from tests.conftest import write_lines
from tests.test_data import _assert_batches_equal, _take

_ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'instruct', 'assets', 'data')
COMPARISON_FILES = {
    'train': os.path.join(_ASSETS, 'comparisons_train.jsonl'),
    'validation': os.path.join(_ASSETS, 'comparisons_validation.jsonl'),
}
_RANKED = {'prompt': 'Pick one.\nAnswer:', 'responses': [' a', ' b', ' c'], 'ranking': [2, 0, 1]}


@pytest.fixture(scope='module')
def shipped():
  """The shipped comparison files: split -> (raw JSON records, parsed)."""
  out = {}
  for split, path in COMPARISON_FILES.items():
    with open(path, encoding='utf-8') as f:
      raw = [json.loads(line) for line in f if line.strip()]
    parsed, num_skipped = data.read_comparisons(path)
    assert num_skipped == 0
    out[split] = (raw, parsed)
  return out


def _line(**fields):
  record = dict(_RANKED)
  record.update(fields)
  return json.dumps({k: v for k, v in record.items() if v is not None})


def _shape(raw):
  return ('ranking' if 'ranking' in raw else 'best' if 'best' in raw else 'pair')


def _rows(batch):
  """Returns the real rows of a comparison batch as hashable tuples."""
  rows = []
  for tokens, attention, ranks, real in zip(batch['tokens'], batch['attention_mask'],
                                            batch['ranks'], batch['response_mask']):
    if real.any():
      k = int(real.sum())
      sequences = tuple(tuple(tokens[j][attention[j] == 1].tolist()) for j in range(k))
      rows.append((sequences, tuple(ranks[:k].tolist())))
  return rows


def _expected_row(tokenizer, example, max_length=64):
  sequences, ranks, _ = data.encode_comparison(tokenizer, example, max_length)
  return (tuple(tuple(s.tolist()) for s in sequences), tuple(ranks.tolist()))


# ---------------------------------------------------------------- records


@pytest.mark.parametrize('bad_line, fragment', [
    ('{"prompt": "p", "responses": ', 'invalid JSON'),
    ('["p", "a", "b"]', 'expected a JSON object, got list'),
    (_line(prompt=None), "missing field 'prompt'"),
    (_line(prompt=3), "'prompt' must be of type str, got int"),
    (_line(prompt='  '), "'prompt' is empty or whitespace-only"),
    (_line(responses=[' a'], ranking=[0]), 'has 1 responses; a comparison needs between 2 and 9'),
    (_line(responses=[f' r{i}' for i in range(10)], ranking=list(
        range(10))), 'has 10 responses; a comparison needs between 2 and 9'),
    (_line(responses=' a b'), "'responses' must be a list of strings, got str"),
    (_line(responses=[' a', 3, ' c']), 'response 1 must be a string, got int'),
    (_line(responses=[' a', ' \n', ' c']), 'response 1 is empty or whitespace-only'),
    (_line(responses=[' a', ' b', 'a ']), 'response 0 and response 2 are duplicates'),
    (_line(ranking=[0, 1]), "'ranking' has 2 entries but there are 3 "
     'responses'),
    (_line(ranking=[0, 3, 1]), "'ranking' index 3 is out of range: with 3 "
     'responses the indices are 0..2'),
    (_line(ranking=[0, -1, 1]), "'ranking' index -1 is out of range"),
    (_line(ranking=[1, 0, 1]), "'ranking' repeats index 1; it must be a "
     'permutation of 0..2'),
    (_line(ranking=[0, True, 2]), "'ranking' entry 1 must be an integer, got "
     'bool'),
    (_line(ranking='012'), "'ranking' must be a list of response indices"),
    (_line(ranking=None, best=3), "'best'=3 is out of range: with 3 "
     'responses'),
    (_line(ranking=None, best='0'), "'best' must be an integer"),
    (_line(best=0), "has both 'ranking' and 'best'"),
    (_line(ranking=None), "'responses' needs either 'ranking'"),
    (json.dumps({'prompt': 'p', 'ranking': [0, 1]}), "missing field 'responses'"),
    (json.dumps({'prompt': 'p', 'answer': ' a'}), 'matches none of the comparison shapes'),
    (json.dumps({'prompt': 'p', 'chosen': ' a'}), "missing field 'rejected'"),
    (json.dumps({'prompt': 'p', 'chosen': ' a', 'rejected': 'a'
                }), "field 'chosen' and field 'rejected' are duplicates"),
    (json.dumps({'prompt': 'p', 'chosen': ' a', 'rejected': ''}), "field 'rejected' is empty"),
    (json.dumps({'prompt': 'p', 'chosen': ' a', 'rejected': ' b', 'best': 0
                }), 'mixes the chosen/rejected shape'),
])
def test_bad_records_name_file_and_line(tmp_path, bad_line, fragment):
  path = write_lines(tmp_path / 'comparisons.jsonl', [_line(), '', bad_line])
  with pytest.raises(data.RecordError) as info:
    data.read_comparisons(path)
  message = str(info.value)
  assert message.startswith(f'{path}:3: ')
  assert fragment in message


def test_shapes_parse_to_ranks():

  def parse(record):
    return data.parse_comparison(record, 'f.jsonl', 1)

  assert parse(dict(_RANKED, extra=1)) == {
      'prompt': _RANKED['prompt'], 'responses': [' a', ' b', ' c'], 'ranks': [1, 2, 0]
  }
  assert parse({'prompt': 'p', 'chosen': ' yes', 'rejected': ' no'
               }) == {'prompt': 'p', 'responses': [' yes', ' no'], 'ranks': [0, 1]}
  best = parse({'prompt': 'p', 'responses': [' a', ' b', ' c', ' d'], 'best': 1})
  assert best['ranks'] == [1, 0, 1, 1]  # The others are tied.
  assert data.MIN_RESPONSES == 2 and data.MAX_RESPONSES == 9
  nine = parse(
      {'prompt': 'p', 'responses': [f' r{i}' for i in range(9)], 'ranking': list(range(8, -1, -1))})
  assert nine['ranks'] == list(range(8, -1, -1))


def test_skip_invalid_counts_and_survives_reuse(tmp_path, caplog):
  lines = [
      _line(), '{"prompt": ',
      _line(ranking=[0, 0, 1]), '',
      json.dumps({'prompt': 'q', 'chosen': ' x', 'rejected': ' y'}), '[1, 2]',
      _line(responses=[' a', ' b'], ranking=None, best=1)
  ]
  path = write_lines(tmp_path / 'mixed.jsonl', lines)
  records, num_skipped = data.read_comparisons(path, skip_invalid=True)
  assert num_skipped == 3
  assert [r['ranks'] for r in records] == [[1, 2, 0], [0, 1], [1, 0]]
  with pytest.raises(data.RecordError, match=f'{path}:2: invalid JSON'):
    data.read_comparisons(path)
  files = {'train': str(path)}
  data_dir = str(tmp_path / 'tfds')
  with pytest.raises(data.RecordError, match=f'{path}:2: '):
    data.load_split('comparisons', files, 'train', data_dir)
  with caplog.at_level(logging.WARNING):
    source = data.load_split('comparisons', files, 'train', data_dir, skip_invalid=True)
  assert "Split 'train': skipped 3 invalid records" in caplog.text
  assert len(source) == 3 and source.num_skipped == 3
  again = data.load_split('comparisons', files, 'train', data_dir,
                          skip_invalid=True)  # Reuses the prepared dataset.
  assert again.num_skipped == 3 and again[0] == source[0]
  assert data.load_split('comparisons', files, 'train[:1]', data_dir,
                         skip_invalid=True).num_skipped == 3
  strict = data.LocalFilesConfig(files=files).name
  assert data.LocalFilesConfig(files=files, skip_invalid=True).name == (strict + '-skip-invalid')
  assert data.LocalFilesConfig(files=files, max_responses=2).name == strict + '-max2'
  all_bad = write_lines(tmp_path / 'bad.jsonl', ['{', '[]'])
  with pytest.raises(ValueError, match=r'no valid records.*2 invalid'):
    data.read_comparisons(all_bad, skip_invalid=True)


# --------------------------------------------------------------- builder


def _key(example):
  return (example['prompt'], tuple(example['responses']), tuple(example['ranks']))


def test_builder_round_trips_shipped_files(shipped, data_dir):
  for split, (raw, expected) in shipped.items():
    source = data.load_split('comparisons', COMPARISON_FILES, split, data_dir)
    assert len(source) == len(raw) and source.num_skipped == 0
    examples = [source[i] for i in range(len(source))]
    for example in examples:
      assert isinstance(example['prompt'], str)
      assert all(isinstance(r, str) for r in example['responses'])
      assert all(isinstance(r, int) for r in example['ranks'])
      k = len(example['responses'])
      assert len(example['ranks']) == k and min(example['ranks']) == 0
      assert all(0 <= r < k for r in example['ranks'])
    assert sorted(map(_key, examples)) == sorted(map(_key, expected))


# ------------------------------------------------------------ encode/collate


def test_encode_comparison_sequences(tokenizer, shipped):
  eos = tokenizer.eos_token
  _, parsed = shipped['validation']
  for example in parsed[:30]:
    sequences, ranks, truncated = data.encode_comparison(tokenizer, example, 64)
    assert not truncated and ranks.dtype == np.int32
    assert ranks.tolist() == example['ranks']
    assert len(sequences) == len(example['responses'])
    for tokens, response in zip(sequences, example['responses']):
      assert tokens.dtype == np.int32
      assert tokenizer.decode(tokens) == example['prompt'] + response + eos
  long = {
      'prompt': 'Say: ' + ' '.join(['apple'] * 40) + '\nAnswer:', 'responses': [' fish', ' bird'],
      'ranks': [0, 1]
  }
  sequences, _, truncated = data.encode_comparison(tokenizer, long, 12)
  assert truncated and all(len(s) == 12 for s in sequences)
  for tokens, response in zip(sequences, long['responses']):
    expected, _, _ = data.encode_demonstration(tokenizer, long['prompt'], response, 12)
    np.testing.assert_array_equal(tokens, expected)


def _encoded_row(lengths, ranks):
  """A synthetic encoded comparison: response j is `lengths[j]` x (j + 2)."""
  sequences = [np.full(n, j + 2, np.int32) for j, n in enumerate(lengths)]
  return sequences, np.asarray(ranks, np.int32), False


def test_collate_comparisons_pads_responses_and_rows():
  rows = [_encoded_row([3, 5], [1, 0]), _encoded_row([9, 2, 4], [0, 2, 1])]
  batch = data.collate_comparisons(rows, 3, max_responses=4, buckets=(4, 8, 16, 32), pad_id=1)
  assert sorted(batch) == ['attention_mask', 'ranks', 'response_mask', 'tokens']
  assert all(v.dtype == np.int32 for v in batch.values())
  assert batch['tokens'].shape == batch['attention_mask'].shape == (3, 4, 16)
  assert batch['ranks'].tolist() == [[1, 0, 4, 4], [0, 2, 1, 4], [4] * 4]
  assert batch['response_mask'].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [0] * 4]
  lengths = batch['attention_mask'].sum(axis=2).tolist()
  assert lengths == [[3, 5, 0, 0], [9, 2, 4, 0], [0] * 4]
  padding = batch['attention_mask'] == 0
  assert (batch['tokens'][padding] == 1).all()
  assert (batch['tokens'][~padding] > 1).all()
  assert (np.diff(batch['attention_mask'], axis=2) <= 0).all()
  # L is the smallest bucket that fits: 8 fits a longest sequence of 8.
  small = data.collate_comparisons([_encoded_row([8, 2], [0, 1])], 1, 2, (4, 8, 16), 1)
  assert small['tokens'].shape == (1, 2, 8)
  with pytest.raises(ValueError, match=r'K=3 .*max_responses=2'):
    data.collate_comparisons(rows, 3, 2, (16,), 1)
  with pytest.raises(ValueError, match='largest bucket'):
    data.collate_comparisons(rows, 3, 4, (4, 8), 1)


# --------------------------------------------------------------- batching


def _comparison_batches(data_dir, tokenizer, split='train', **kwargs):
  args = dict(global_batch_size=16, max_responses=4, buckets=(32, 64), seed=0, shuffle=True,
              repeat=True, data_dir=data_dir)
  args.update(kwargs)
  return data.make_comparison_batches(COMPARISON_FILES, split, tokenizer, **args)


def test_comparison_batches_order_and_hosts(data_dir, tokenizer):
  first = _take(_comparison_batches(data_dir, tokenizer, seed=1), 3)
  _assert_batches_equal(first, _take(_comparison_batches(data_dir, tokenizer, seed=1), 3))
  other = next(_comparison_batches(data_dir, tokenizer, seed=2))
  assert _rows(other) != _rows(first[0])
  batch = first[0]
  assert batch['tokens'].shape[:2] == (16, 4)
  assert batch['tokens'].shape[2] in (32, 64)
  assert batch['response_mask'].sum(axis=1).min() >= 2
  one = _take(_comparison_batches(data_dir, tokenizer, buckets=(64,)), 3)
  hosts = [
      _take(
          _comparison_batches(data_dir, tokenizer, buckets=(64,), process_index=p, process_count=2),
          3) for p in range(2)
  ]
  assert hosts[0][0]['tokens'].shape == (8, 4, 64)
  for g in range(3):
    for key in one[g]:
      np.testing.assert_array_equal(np.concatenate([hosts[0][g][key], hosts[1][g][key]]),
                                    one[g][key])


def test_comparison_batches_resume(data_dir, tokenizer):
  # 512 records, global batch 96: 5 batches per epoch; cross an epoch.
  def make():
    return _comparison_batches(data_dir, tokenizer, global_batch_size=96)

  expected = _take(make(), 7)
  batches = make()
  _take(batches, 4)
  state = json.loads(json.dumps(batches.get_state()))
  resumed = make()
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 3), expected[4:])
  assert batches.num_truncated == 0 and batches.num_skipped == 0


def test_comparison_eval_covers_every_record_once(data_dir, tokenizer, shipped):
  _, parsed = shipped['validation']  # 96 records; 3 batches of 40.
  got, num_batches = [], 0
  for p in range(2):
    for batch in _comparison_batches(data_dir, tokenizer, 'validation', global_batch_size=40,
                                     buckets=(64,), shuffle=False, repeat=False, process_index=p,
                                     process_count=2):
      num_batches += 1
      assert batch['tokens'].shape == (20, 4, 64)
      dummy = ~batch['response_mask'].any(axis=1)
      assert not batch['attention_mask'][dummy].any()
      assert (batch['ranks'][dummy] == 4).all()
      got += _rows(batch)
  assert num_batches == 6
  assert sorted(got) == sorted(_expected_row(tokenizer, e) for e in parsed)


def test_comparison_batches_errors(data_dir, tokenizer):
  with pytest.raises(ValueError, match='with make_comparison_batches'):
    data.make_batches('comparisons', COMPARISON_FILES, 'train', tokenizer, global_batch_size=8,
                      buckets=(64,), seed=0, shuffle=False, repeat=False, data_dir=data_dir)
  with pytest.raises(ValueError, match='max_responses must be at least 2'):
    _comparison_batches(data_dir, tokenizer, max_responses=1)
  # A record with more responses than max_responses is refused when the split is loaded.
  path = COMPARISON_FILES['train']
  with pytest.raises(data.RecordError,
                     match=rf'^{path}:1: has 4 responses, more than config.rm.max_responses=3$'):
    _comparison_batches(data_dir, tokenizer, max_responses=3)
  rows = [([np.arange(3)] * 4, np.arange(4, dtype=np.int32), False)]
  with pytest.raises(ValueError, match=r'K=4 .*max_responses=3'):
    data.collate_comparisons(rows, 2, 3, (8,), 1)


def test_more_responses_than_max_responses_are_invalid_records(tmp_path, data_dir, tokenizer):
  lines = [_line(), _line(responses=[' a', ' b'], ranking=[1, 0])] * 9
  path = write_lines(tmp_path / 'k3.jsonl', lines)
  with pytest.raises(data.RecordError, match=rf'^{path}:1: has 3 responses, more than '
                     r'config.rm.max_responses=2$'):
    data.read_comparisons(path, max_responses=2)
  records, num_skipped = data.read_comparisons(path, skip_invalid=True, max_responses=2)
  assert num_skipped == 9 and all(len(r['responses']) == 2 for r in records)
  assert data.read_comparisons(path, max_responses=3)[1] == 0
  files = {'train': str(path)}
  batches = data.make_comparison_batches(files, 'train', tokenizer, global_batch_size=4,
                                         max_responses=2, buckets=(32,), seed=0, shuffle=False,
                                         repeat=True, data_dir=data_dir, skip_invalid=True)
  assert batches.num_skipped == 9 and batches.num_examples == 9
  assert next(batches)['tokens'].shape[:2] == (4, 2)
  # The prepared strict dataset of a larger limit is not reused for a smaller one.
  data.make_comparison_batches(files, 'train', tokenizer, global_batch_size=4, max_responses=3,
                               buckets=(32,), seed=0, shuffle=False, repeat=True, data_dir=data_dir)
  with pytest.raises(data.RecordError, match=f'{path}:1: has 3 responses'):
    data.make_comparison_batches(files, 'train', tokenizer, global_batch_size=4, max_responses=2,
                                 buckets=(32,), seed=0, shuffle=False, repeat=True,
                                 data_dir=data_dir)


# ----------------------------------------------------------- shipped set


def _solve(prompt):
  """The correct completion of a shipped task prompt."""
  body = prompt[:-len('\nAnswer:')]
  instruction, _, rest = body.partition(': ')
  words = rest.split()
  if body.startswith('Repeat the word'):
    _, _, _, word, count, _ = body.split()
    return ' ' + ' '.join([word] * make_assets.NUMBER_WORDS.index(count))
  solved = {
      'Reverse the words': lambda: words[::-1],
      'Sort the words': lambda: sorted(words),
      'How many words are in': lambda: [make_assets.NUMBER_WORDS[len(words)]],
      'What is the first word of': lambda: words[:1],
      'What is the last word of': lambda: words[-1:],
      'Write in capitals': lambda: [w.upper() for w in words],
  }[instruction]()
  return ' ' + ' '.join(solved)


def _quality(response, answer):
  words, answer = response.split(), answer.split()
  right = sum(a == b for a, b in zip(words, answer))
  return right / max(len(words), len(answer))


def test_shipped_set_is_varied_and_consistent(shipped, tokenizer):
  for split, (raw, parsed) in shipped.items():
    with open(COMPARISON_FILES[split], encoding='utf-8') as f:
      assert f.read() == ''.join(
          json.dumps(r) + '\n'
          for r in make_assets.make_comparison_records()[f'comparisons_{split}'])
    shapes = collections.Counter(map(_shape, raw))
    assert set(shapes) == {'ranking', 'pair', 'best'}
    assert shapes['ranking'] > shapes['pair'] + shapes['best']
    ks = {len(r['responses']) for r, s in zip(parsed, raw) if _shape(s) == 'ranking'}
    assert ks == {2, 3, 4}
    correct_in_ranking = 0
    for record, example in zip(raw, parsed):
      answer = _solve(example['prompt'])
      quality = [_quality(r, answer) for r in example['responses']]
      by_rank = [q for _, q in sorted(zip(example['ranks'], quality))]
      if _shape(record) == 'ranking':
        # Better responses never rank below worse ones.
        assert by_rank == sorted(by_rank, reverse=True), record
        if answer in example['responses']:
          correct_in_ranking += 1
          assert example['responses'][record['ranking'][0]] == answer
      elif _shape(record) == 'pair':
        assert quality[0] > quality[1], record
      else:
        assert len(quality) == 4 and example['responses'][record['best']] == answer
      sequences, _, _ = data.encode_comparison(tokenizer, example, 1000)
      assert max(map(len, sequences)) < 64
    assert correct_in_ranking > shapes['ranking'] // 2
