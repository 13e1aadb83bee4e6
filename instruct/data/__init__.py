"""Data layer: local record files, TFDS preparation, tokenization, batching.

Numpy only and per host: nothing here imports jax or model code.
"""

from instruct.data.builders import Demonstrations
from instruct.data.builders import LocalFilesConfig
from instruct.data.builders import PlainText
from instruct.data.builders import load_split
from instruct.data.pipeline import Batches
from instruct.data.pipeline import make_batches
from instruct.data.records import DEMONSTRATION_SCHEMA
from instruct.data.records import RecordError
from instruct.data.records import TEXT_SCHEMA
from instruct.data.records import read_jsonl
from instruct.data.records import read_text_records
from instruct.data.tokenization import DEFAULT_TOKENIZER
from instruct.data.tokenization import check_special_tokens
from instruct.data.tokenization import encode_demonstration
from instruct.data.tokenization import encode_text
from instruct.data.tokenization import load_tokenizer

__all__ = [
    'Batches',
    'DEFAULT_TOKENIZER',
    'DEMONSTRATION_SCHEMA',
    'Demonstrations',
    'LocalFilesConfig',
    'PlainText',
    'RecordError',
    'TEXT_SCHEMA',
    'check_special_tokens',
    'encode_demonstration',
    'encode_text',
    'load_split',
    'load_tokenizer',
    'make_batches',
    'read_jsonl',
    'read_text_records',
]
