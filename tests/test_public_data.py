"""Tests of public datasets read in their published formats (data/public.py).

Every file here is written in the exact published layout: Anthropic HH-RLHF
(`<subset>/{train,test}.jsonl.gz`), the summarize-from-feedback comparisons
(`comparisons/batch*.json`) and the filtered Reddit TL;DR
(`{train,valid,test}.jsonl`). Expectations are written out by hand.
"""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from instruct import config_lib
from instruct.rl import config as rl_config
from instruct import data
from instruct.data import builders
from instruct.data import public
from instruct.data import public_rows

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')

# ---------------------------------------------------------- sample rows

_HH_SINGLE = {
    'chosen': '\n\nHuman: What is two plus two?\n\nAssistant: It is four.',
    'rejected': '\n\nHuman: What is two plus two?\n\nAssistant: Five.',
}
_HH_MULTI = {
    'chosen': ('\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?'
               '\n\nHuman: Name a fruit.\n\nAssistant: An apple.'),
    'rejected': ('\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?'
                 '\n\nHuman: Name a fruit.\n\nAssistant: A rock.'),
}
_HH_MULTI_PROMPT = ('\n\nHuman: Hi there.\n\nAssistant: Hello! How can I '
                    'help?\n\nHuman: Name a fruit.\n\nAssistant:')
# The rejected dialogue differs in an earlier Assistant turn.
_HH_MISMATCHED = {
    'chosen': _HH_MULTI['chosen'],
    'rejected': ('\n\nHuman: Hi there.\n\nAssistant: Go away.'
                 '\n\nHuman: Name a fruit.\n\nAssistant: A rock.'),
}
_HH_TEST = {
    'chosen': '\n\nHuman: Say yes.\n\nAssistant: Yes.',
    'rejected': '\n\nHuman: Say yes.\n\nAssistant: No.',
}


def _reddit_info(post_id, subreddit='cats', title='My cat', post='She sleeps all day.'):
  return {'id': post_id, 'post': post, 'title': title, 'subreddit': subreddit}


def _sff_row(info, texts, choice, split, batch='batch3'):
  """A summarize-from-feedback comparison row, as published."""
  return {
      'info': info,
      'summaries': [{
          'text': text, 'policy': policy, 'note': note
      } for text, policy, note in zip(texts, ('sup4_ppo_rm3_kl10', 'ref'), ('A note.', None))],
      'choice': choice,
      'worker': 'ikNmucwunMnYJCQpnq6ZYb57OW7NiD',
      'batch': batch,
      'split': split,
      'extra': {'confidence': 8 if choice else None},
  }


_ARTICLE_INFO = {
    'id': '167f80cc', 'site': 'dailymail', 'title': 'Storm hits town',
    'article': 'A storm hit the town.\n\nNobody was hurt.'
}


def _write_lines(path, rows, compress=False):
  """Writes JSON lines (gzip when `compress`); returns the path."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  text = ''.join(json.dumps(row) + '\n' for row in rows)
  if compress:
    with gzip.open(path, 'wt', encoding='utf-8') as f:
      f.write(text)
  else:
    with open(path, 'w', encoding='utf-8') as f:
      f.write(text)
  return str(path)


@pytest.fixture
def hh_root(tmp_path):
  """An HH-RLHF checkout: two subsets and the (ignored) red-team data."""
  root = tmp_path / 'hh-rlhf'
  _write_lines(root / 'helpful-base' / 'train.jsonl.gz', [_HH_SINGLE, _HH_MULTI], compress=True)
  _write_lines(root / 'helpful-base' / 'test.jsonl.gz', [_HH_TEST], compress=True)
  _write_lines(root / 'harmless-base' / 'train.jsonl.gz', [_HH_MULTI], compress=True)
  _write_lines(root / 'harmless-base' / 'test.jsonl.gz', [_HH_TEST], compress=True)
  _write_lines(root / 'red-team-attempts' / 'red_team_attempts.jsonl.gz',
               [{'transcript': '\n\nHuman: x\n\nAssistant: y'}], compress=True)
  return root


@pytest.fixture
def sff_dir(tmp_path):
  """A summarize-from-feedback comparisons/ directory of two batches."""
  comparisons = tmp_path / 'comparisons'
  _write_lines(comparisons / 'batch3.json', [
      _sff_row(_reddit_info('t3_a'), [' Cat sleeps.', ' Cat naps a lot. '], 0, 'train'),
      _sff_row(_reddit_info('t3_b', 'dogs', 'My dog', 'He barks.'), [' Dog barks.', ' Loud dog.'],
               1, 'valid1'),
  ])
  _write_lines(comparisons / 'batch10.json', [
      _sff_row(_reddit_info('t3_c', 'AskReddit', 'A question', 'Why is the sky blue?'),
               [' Sky question.', ' Blue sky?'], 1, 'train', 'batch10'),
      _sff_row(_ARTICLE_INFO, ['Storm, no one hurt.', ' A storm hit.'], 0, 'valid2', 'cnndm1'),
  ])
  return comparisons


_TLDR_ROWS = {
    'train': [
        {
            'id': 't3_1', 'subreddit': 'relationships', 'title': 'Help me',
            'post': 'My friend forgot my birthday.', 'summary': 'friend forgot my birthday '
        },
        {
            'id': 't3_2', 'subreddit': 'cooking', 'title': 'Burnt rice',
            'post': 'I burn rice every time.\nWhat am I doing wrong?',
            'summary': ' I always burn rice.'
        },
    ],
    'valid': [{
        'id': 't3_3', 'subreddit': 'pets', 'title': 'New cat', 'post': 'We got a new cat.',
        'summary': 'new cat'
    }],
    'test': [{
        'id': 't3_4', 'subreddit': 'pets', 'title': 'Old dog', 'post': 'Our dog is old.',
        'summary': 'old dog'
    }],
}
_TLDR_PROMPTS = {
    't3_1': ('SUBREDDIT: r/relationships\n\nTITLE: Help me\n\n'
             'POST: My friend forgot my birthday.\n\nTL;DR:'),
    't3_2': ('SUBREDDIT: r/cooking\n\nTITLE: Burnt rice\n\n'
             'POST: I burn rice every time.\nWhat am I doing wrong?\n\n'
             'TL;DR:'),
    't3_3': 'SUBREDDIT: r/pets\n\nTITLE: New cat\n\nPOST: We got a new cat.'
    '\n\nTL;DR:',
}


@pytest.fixture
def tldr_dir(tmp_path):
  """A TL;DR directory: train.jsonl, valid.jsonl and test.jsonl."""
  directory = tmp_path / 'tldr_3_filtered'
  for stem, rows in _TLDR_ROWS.items():
    _write_lines(directory / f'{stem}.jsonl', rows)
  return directory


# ------------------------------------------------------------ HH-RLHF


def test_hh_rlhf_maps_every_field():
  assert public_rows.parse_hh_rlhf(_HH_SINGLE, 'f', 1) == {
      'prompt': '\n\nHuman: What is two plus two?\n\nAssistant:', 'chosen': ' It is four.',
      'rejected': ' Five.'
  }
  assert public.hh_rlhf_comparison(_HH_MULTI, 'f', 1) == {
      'prompt': _HH_MULTI_PROMPT, 'responses': [' An apple.', ' A rock.'], 'ranks': [0, 1]
  }
  assert public.hh_rlhf_demonstration(
      _HH_MULTI, 'f', 1) == {'prompt': _HH_MULTI_PROMPT, 'completion': ' An apple.'}
  assert public.hh_rlhf_prompt(_HH_MULTI, 'f', 1) == {'prompt': _HH_MULTI_PROMPT}


@pytest.mark.parametrize('row, fragment', [
    (_HH_MISMATCHED, "differ before their final Assistant turn"),
    ({'chosen': '\n\nHuman: Hi.', 'rejected': '\n\nHuman: Hi.\n\nAssistant: '
      'No.'}, "field 'chosen' has no Assistant turn"),
    ({'chosen': '\n\nHuman: Hi.\n\nAssistant:   ', 'rejected': '\n\nHuman: Hi.\n\nAssistant: No.'
     }, "final Assistant response of field 'chosen' is empty"),
    ({'chosen': '\n\nHuman: Hi.\n\nAssistant: Yes.'}, "missing field 'rejected'"),
])
def test_hh_rlhf_invalid_rows_name_file_and_line(tmp_path, row, fragment):
  path = _write_lines(tmp_path / 'helpful-base' / 'train.jsonl.gz', [_HH_SINGLE, row],
                      compress=True)
  with pytest.raises(data.RecordError) as info:
    public.read_split('hh_rlhf', 'comparisons', path, 'train')
  assert str(info.value).startswith(f'{path}:2: ')
  assert fragment in str(info.value)
  examples, num_skipped = public.read_split('hh_rlhf', 'comparisons', path, 'train',
                                            skip_invalid=True)
  assert num_skipped == 1 and len(examples) == 1


def test_hh_rlhf_identical_responses_are_invalid_comparisons(tmp_path):
  same = {'chosen': _HH_TEST['chosen'], 'rejected': _HH_TEST['chosen']}
  path = _write_lines(tmp_path / 'train.jsonl', [_HH_TEST, same])
  with pytest.raises(data.RecordError, match=f'^{path}:2: .*duplicates'):
    public.read_split('hh_rlhf', 'comparisons', path, 'train')
  # A demonstration needs only the chosen response.
  examples, num_skipped = public.read_split('hh_rlhf', 'demonstrations', path, 'train')
  assert num_skipped == 0 and examples[1] == {
      'prompt': '\n\nHuman: Say yes.\n\nAssistant:', 'completion': ' Yes.'
  }


def test_hh_rlhf_directories_gzip_and_plain_files(hh_root, tmp_path):
  subset = hh_root / 'helpful-base'
  assert public.hh_rlhf_files(subset, 'train') == [str(subset / 'train.jsonl.gz')]
  assert public.hh_rlhf_files(subset, 'validation') == [str(subset / 'test.jsonl.gz')]
  # The repository root reads every subset with the split's file, by name.
  assert public.hh_rlhf_files(hh_root, 'train') == [
      str(hh_root / 'harmless-base' / 'train.jsonl.gz'),
      str(subset / 'train.jsonl.gz')
  ]
  examples, _ = public.read_split('hh_rlhf', 'prompts', hh_root, 'train')
  assert examples == [{'prompt': _HH_MULTI_PROMPT},
                      {'prompt': _HH_SINGLE['chosen'][:-len(' It is four.')]},
                      {'prompt': _HH_MULTI_PROMPT}]
  plain = tmp_path / 'plain'
  _write_lines(plain / 'test.jsonl', [_HH_TEST])
  assert public.read_split('hh_rlhf', 'comparisons', plain, 'validation') == ([{
      'prompt': '\n\nHuman: Say yes.\n\nAssistant:', 'responses': [' Yes.', ' No.'],
      'ranks': [0, 1]
  }], 0)
  with pytest.raises(FileNotFoundError, match='train.jsonl.gz'):
    public.hh_rlhf_files(plain, 'train')
  with pytest.raises(ValueError, match="No split 'dev'"):
    public.hh_rlhf_files(plain, 'dev')


# -------------------------------------------- summarize from feedback


def test_summarize_from_feedback_splits_choice_and_articles(sff_dir):
  train, num_skipped = public.read_split('summarize_from_feedback', 'comparisons', sff_dir, 'train')
  assert num_skipped == 0
  # Files in name order (batch10.json before batch3.json), rows in order.
  assert train == [
      {
          'prompt': ('SUBREDDIT: r/AskReddit\n\nTITLE: A question\n\n'
                     'POST: Why is the sky blue?\n\nTL;DR:'),
          'responses': [' Sky question.', ' Blue sky?'], 'ranks': [1, 0]
      },
      {
          'prompt': ('SUBREDDIT: r/cats\n\nTITLE: My cat\n\n'
                     'POST: She sleeps all day.\n\nTL;DR:'),
          'responses': [' Cat sleeps.', ' Cat naps a lot.'], 'ranks': [0, 1]
      },
  ]
  validation, _ = public.read_split('summarize_from_feedback', 'comparisons', sff_dir, 'validation')
  assert validation == [
      {
          'prompt': ('Article:\n\nA storm hit the town.\n\nNobody was hurt.'
                     '\n\nTL;DR:'), 'responses': [' Storm, no one hurt.', ' A storm hit.'],
          'ranks': [0, 1]
      },
      {
          'prompt': ('SUBREDDIT: r/dogs\n\nTITLE: My dog\n\n'
                     'POST: He barks.\n\nTL;DR:'), 'responses': [' Dog barks.', ' Loud dog.'],
          'ranks': [1, 0]
      },
  ]
  assert public_rows.SUMMARIZE_SPLITS == {'train': ('train',), 'validation': ('valid1', 'valid2')}
  # A single batch file works too; its rows are still chosen by `split`.
  single, _ = public.read_split('summarize_from_feedback', 'comparisons', sff_dir / 'batch3.json',
                                'validation')
  assert [row['responses'] for row in single] == [[' Dog barks.', ' Loud dog.']]
  with pytest.raises(ValueError, match="No split 'test'"):
    public.read_split('summarize_from_feedback', 'comparisons', sff_dir, 'test')


@pytest.mark.parametrize('change, fragment', [
    ({'choice': 2}, "field 'choice' must be 0 or 1"),
    ({'choice': True}, "field 'choice' must be 0 or 1"),
    ({'split': 'valid3'}, "field 'split' is 'valid3'"),
    ({'summaries': [{'text': ' Only one.'}]}, 'list of 2 summaries'),
    ({'summaries': [{'text': ' Same.'}, {'text': 'Same. '}]}, 'duplicates'),
    ({'info': {'id': 'x', 'title': 't', 'subreddit': 's'}}, "info: missing field 'post'"),
])
def test_summarize_from_feedback_invalid_rows(tmp_path, change, fragment):
  good = _sff_row(_reddit_info('t3_a'), [' A.', ' B.'], 0, 'train')
  bad = dict(good, **change)
  path = _write_lines(tmp_path / 'comparisons' / 'batch5.json', [good, bad])
  with pytest.raises(data.RecordError) as info:
    public.read_split('summarize_from_feedback', 'comparisons', path, 'train')
  assert str(info.value).startswith(f'{path}:2: ')
  assert fragment in str(info.value)
  examples, num_skipped = public.read_split('summarize_from_feedback', 'comparisons', path, 'train',
                                            skip_invalid=True)
  assert len(examples) == 1 and num_skipped == 1


# ---------------------------------------------------------------- TL;DR


def test_tldr_demonstrations_and_prompts(tldr_dir):
  train, num_skipped = public.read_split('tldr', 'demonstrations', tldr_dir, 'train')
  assert num_skipped == 0
  assert train == [
      {'prompt': _TLDR_PROMPTS['t3_1'], 'completion': ' friend forgot my birthday'},
      {'prompt': _TLDR_PROMPTS['t3_2'], 'completion': ' I always burn rice.'},
  ]
  prompts, _ = public.read_split('tldr', 'prompts', tldr_dir, 'validation')
  assert prompts == [{'prompt': _TLDR_PROMPTS['t3_3']}]
  assert public.tldr_files(tldr_dir, 'test') == [str(tldr_dir / 'test.jsonl')]
  bad = _write_lines(
      tldr_dir / 'bad.jsonl',
      [_TLDR_ROWS['test'][0], {'id': 'x', 'subreddit': 's', 'title': 't', 'post': ' '}])
  with pytest.raises(data.RecordError, match=f"^{bad}:2: field 'post' is "):
    public.read_split('tldr', 'prompts', bad, 'train')


# -------------------------------------------------- formats and configs


def test_unsupported_kind_or_format_is_an_error(tldr_dir, tmp_path):
  files = {'train': str(tldr_dir)}
  with pytest.raises(ValueError, match="'tldr' provides no 'comparisons'"):
    data.load_split('comparisons', files, 'train', tmp_path, data_format='tldr')
  with pytest.raises(ValueError, match="Unknown data format 'csv'"):
    data.load_split('prompts', files, 'train', tmp_path, data_format='csv')
  with pytest.raises(ValueError, match='Unknown data kind'):
    data.load_split('texts', files, 'train', tmp_path)
  # The records format refuses directories, naming them as such.
  with pytest.raises(IsADirectoryError, match="split 'train' is a directory"):
    data.load_split('prompts', files, 'train', tmp_path)


def test_config_validation_names_config_data_format():
  config = config_lib.base_config()
  assert config.data.format == 'records' and not config.data.skip_invalid
  config_lib.validate(config, 1, 1)
  config.data.format = 'summarize_from_feedback'
  with pytest.raises(
      ValueError, match=r"config\.data\.format="
      r"'summarize_from_feedback' does not give the "
      r"'demonstrations' records"):
    config_lib.validate(config, 1, 1)
  config.data.format = 'hh_rlhf'
  config_lib.validate(config, 1, 1)
  config.data.format = 'json'
  with pytest.raises(ValueError, match=r"config\.data\.format='json'.*"
                     'Unknown data format'):
    config_lib.validate(config, 1, 1)
  config.data.format = 'records'
  config.data.skip_invalid = True  # Every record kind can skip invalid records.
  config_lib.validate(config, 1, 1)

  rm = config_lib.load_config_file(os.path.join(CONFIGS_DIR, 'rm.py'), 'tiny')
  rm.rm.random_init = True
  rm.data.format = 'tldr'
  with pytest.raises(ValueError, match=r"config\.data\.format='tldr'"):
    config_lib.validate(rm, 1, 1)
  rm.data.format = 'summarize_from_feedback'
  config_lib.validate(rm, 1, 1)
  rm.rm.normalization_format = 'summarize_from_feedback'
  with pytest.raises(ValueError, match=r'config\.rm\.normalization_format'):
    config_lib.validate(rm, 1, 1)

  ppo = config_lib.load_config_file(os.path.join(CONFIGS_DIR, 'ppo.py'), 'tiny')
  ppo.policy_from, ppo.reward_from = '/sft', '/rm'
  ppo.data.format = 'tldr'
  rl_config.validate_rl(ppo, 1, 1)
  ppo.data.format = 'summarize_from_feedback'
  with pytest.raises(ValueError, match=r"config\.data\.format=.*'prompts' "
                     'records that RL samples from'):
    rl_config.validate_rl(ppo, 1, 1)


def test_directory_fingerprint_follows_its_files(tldr_dir):
  files = {'train': str(tldr_dir)}
  name = builders.LocalFilesConfig(files=files, allow_directories=True).name
  assert builders.LocalFilesConfig(files=files, allow_directories=True).name == name
  _write_lines(tldr_dir / 'train.jsonl', _TLDR_ROWS['train'][:1])
  os.utime(tldr_dir / 'train.jsonl', ns=(1, 1))
  assert builders.LocalFilesConfig(files=files, allow_directories=True).name != name


# ---------------------------------------------------------- end to end


def _decode(tokenizer, tokens):
  return tokenizer.decode([int(t) for t in tokens])


def _all(batches):
  return list(batches)


def test_hh_rlhf_end_to_end(hh_root, tokenizer, tmp_path):
  subset = str(hh_root / 'helpful-base')
  files = {'train': subset, 'validation': subset}
  eos = tokenizer.eos_token
  batches = data.make_comparison_batches(files, 'train', tokenizer, global_batch_size=2,
                                         max_responses=2, buckets=(256,), seed=0, shuffle=False,
                                         repeat=False, data_dir=tmp_path, data_format='hh_rlhf')
  rows = set()
  for batch in _all(batches):
    for tokens, mask, ranks, real in zip(batch['tokens'], batch['attention_mask'], batch['ranks'],
                                         batch['response_mask']):
      assert real.tolist() == [1, 1] and ranks.tolist() == [0, 1]
      rows.add(tuple(_decode(tokenizer, t[m == 1]) for t, m in zip(tokens, mask)))
  assert rows == {(_HH_SINGLE['chosen'] + eos, _HH_SINGLE['rejected'] + eos),
                  (_HH_MULTI['chosen'] + eos, _HH_MULTI['rejected'] + eos)}

  demos = data.make_batches('demonstrations', files, 'validation', tokenizer, global_batch_size=2,
                            buckets=(256,), seed=0, shuffle=False, repeat=False, data_dir=tmp_path,
                            data_format='hh_rlhf')
  (batch,) = _all(demos)
  assert batch['attention_mask'][1].sum() == 0  # One record, one dummy row.
  tokens, loss = batch['tokens'][0], batch['loss_mask'][0]
  assert _decode(tokenizer, tokens[batch['attention_mask'][0] == 1]) == (_HH_TEST['chosen'] + eos)
  assert _decode(tokenizer, tokens[loss == 1]) == ' Yes.' + eos

  prompts = data.make_prompt_batches({'train': str(hh_root), 'validation': str(hh_root)}, 'train',
                                     tokenizer, global_batch_size=4, prompt_length=128, seed=0,
                                     shuffle=False, repeat=False, data_dir=tmp_path,
                                     data_format='hh_rlhf')
  (batch,) = _all(prompts)
  decoded = sorted(
      _decode(tokenizer, t[m == 1]) for t, m in zip(batch['prompt_tokens'], batch['prompt_mask'])
      if m.any())
  assert decoded == sorted(
      [_HH_MULTI_PROMPT, _HH_MULTI_PROMPT, '\n\nHuman: What is two plus two?\n\nAssistant:'])
  assert batch['prompt_mask'][:, -1].tolist() == [1, 1, 1, 0]


def test_hh_rlhf_skip_invalid_counts_survive_reuse(tmp_path, tokenizer):
  subset = tmp_path / 'helpful-online'
  _write_lines(subset / 'train.jsonl.gz', [_HH_SINGLE, _HH_MISMATCHED, _HH_MULTI], compress=True)
  _write_lines(subset / 'test.jsonl.gz', [_HH_TEST], compress=True)
  files = {'train': str(subset), 'validation': str(subset)}
  tfds_dir = tmp_path / 'tfds'
  with pytest.raises(data.RecordError, match=f"^{subset / 'train.jsonl.gz'}:2: "):
    data.load_split('demonstrations', files, 'train', tfds_dir, data_format='hh_rlhf')
  for _ in range(2):  # Prepared, then reused.
    source = data.load_split('demonstrations', files, 'train', tfds_dir, skip_invalid=True,
                             data_format='hh_rlhf')
    assert len(source) == 2 and source.num_skipped == 1
  batches = data.make_batches('demonstrations', files, 'validation', tokenizer, global_batch_size=1,
                              buckets=(128,), seed=0, shuffle=False, repeat=False,
                              data_dir=tfds_dir, data_format='hh_rlhf', skip_invalid=True)
  assert batches.num_skipped == 0


def test_summarize_from_feedback_end_to_end(sff_dir, tokenizer, tmp_path):
  files = {'train': str(sff_dir), 'validation': str(sff_dir)}
  eos = tokenizer.eos_token
  expected = {
      'train': {
          ('SUBREDDIT: r/AskReddit\n\nTITLE: A question\n\nPOST: Why is the '
           'sky blue?\n\nTL;DR:', (' Sky question.', ' Blue sky?'), (1, 0)),
          ('SUBREDDIT: r/cats\n\nTITLE: My cat\n\nPOST: She sleeps all day.'
           '\n\nTL;DR:', (' Cat sleeps.', ' Cat naps a lot.'), (0, 1)),
      },
      'validation': {
          ('Article:\n\nA storm hit the town.\n\nNobody was hurt.\n\nTL;DR:',
           (' Storm, no one hurt.', ' A storm hit.'), (0, 1)),
          ('SUBREDDIT: r/dogs\n\nTITLE: My dog\n\nPOST: He barks.\n\nTL;DR:',
           (' Dog barks.', ' Loud dog.'), (1, 0)),
      },
  }
  for split, rows in expected.items():
    batches = data.make_comparison_batches(files, split, tokenizer, global_batch_size=1,
                                           max_responses=3, buckets=(128,), seed=0, shuffle=False,
                                           repeat=False, data_dir=tmp_path,
                                           data_format='summarize_from_feedback')
    got = set()
    for batch in _all(batches):
      real = batch['response_mask'][0]
      assert real.tolist() == [1, 1, 0]
      texts = [
          _decode(tokenizer, t[m == 1])
          for t, m in zip(batch['tokens'][0][:2], batch['attention_mask'][0][:2])
      ]
      prompt = next(prompt for prompt, _, _ in rows if texts[0].startswith(prompt))
      responses = tuple(text[len(prompt):] for text in texts)
      assert all(r.endswith(eos) for r in responses)
      got.add(
          (prompt, tuple(r[:-len(eos)] for r in responses), tuple(batch['ranks'][0][:2].tolist())))
    assert got == rows


def test_tldr_end_to_end(tldr_dir, tokenizer, tmp_path):
  files = {'train': str(tldr_dir / 'train.jsonl'), 'validation': str(tldr_dir)}
  eos = tokenizer.eos_token
  batches = data.make_batches('demonstrations', files, 'train', tokenizer, global_batch_size=2,
                              buckets=(128,), seed=0, shuffle=False, repeat=False,
                              data_dir=tmp_path, data_format='tldr')
  (batch,) = _all(batches)
  texts = sorted((_decode(tokenizer, t[a == 1]), _decode(tokenizer, t[m == 1]))
                 for t, a, m in zip(batch['tokens'], batch['attention_mask'], batch['loss_mask']))
  assert texts == sorted([(_TLDR_PROMPTS['t3_1'] + ' friend forgot my birthday' + eos,
                           ' friend forgot my birthday' + eos),
                          (_TLDR_PROMPTS['t3_2'] + ' I always burn rice.' + eos,
                           ' I always burn rice.' + eos)])

  prompts = data.make_prompt_batches(files, 'validation', tokenizer, global_batch_size=2,
                                     prompt_length=96, seed=0, shuffle=False, repeat=False,
                                     data_dir=tmp_path, data_format='tldr')
  (batch,) = _all(prompts)
  assert batch['prompt_tokens'].shape == (2, 96)
  mask = batch['prompt_mask']
  assert mask[1].sum() == 0
  assert _decode(tokenizer, batch['prompt_tokens'][0][mask[0] == 1]) == (_TLDR_PROMPTS['t3_3'])
  with pytest.raises(ValueError, match="'tldr' provides no 'comparisons'"):
    data.make_comparison_batches(files, 'train', tokenizer, global_batch_size=1, max_responses=2,
                                 buckets=(128,), seed=0, shuffle=False, repeat=False,
                                 data_dir=tmp_path, data_format='tldr')
  assert np.all(batch['prompt_tokens'][1] == tokenizer.pad_token_id)
