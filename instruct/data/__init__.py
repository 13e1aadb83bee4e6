"""Data layer: local record files, TFDS preparation, tokenization, batching.

Numpy only and per host: nothing here imports jax or model code.
"""

from instruct.data.builders import Comparisons
from instruct.data.builders import Demonstrations
from instruct.data.builders import LocalFilesConfig
from instruct.data.builders import PlainText
from instruct.data.builders import Prompts
from instruct.data.builders import RECORDS_FORMAT
from instruct.data.builders import load_split
from instruct.data.comparisons import MAX_RESPONSES
from instruct.data.comparisons import MIN_RESPONSES
from instruct.data.comparisons import collate_comparisons
from instruct.data.comparisons import encode_comparison
from instruct.data.comparisons import parse_comparison
from instruct.data.comparisons import read_comparisons
from instruct.data.pipeline import Batches
from instruct.data.pipeline import make_batches
from instruct.data.pipeline import make_comparison_batches
from instruct.data.prompts import collate_prompts
from instruct.data.prompts import encode_prompt
from instruct.data.prompts import make_prompt_batches
from instruct.data.public import FORMAT_KINDS
from instruct.data.records import DEMONSTRATION_SCHEMA
from instruct.data.records import PROMPT_SCHEMA
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
    'Comparisons',
    'DEFAULT_TOKENIZER',
    'DEMONSTRATION_SCHEMA',
    'Demonstrations',
    'FORMAT_KINDS',
    'LocalFilesConfig',
    'MAX_RESPONSES',
    'MIN_RESPONSES',
    'PROMPT_SCHEMA',
    'PlainText',
    'Prompts',
    'RECORDS_FORMAT',
    'RecordError',
    'TEXT_SCHEMA',
    'check_special_tokens',
    'collate_comparisons',
    'collate_prompts',
    'encode_comparison',
    'encode_demonstration',
    'encode_prompt',
    'encode_text',
    'load_split',
    'load_tokenizer',
    'make_batches',
    'make_comparison_batches',
    'make_prompt_batches',
    'parse_comparison',
    'read_comparisons',
    'read_jsonl',
    'read_text_records',
]
