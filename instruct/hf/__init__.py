"""Hugging Face checkpoints: import GPT-2, GPT-NeoX (Pythia) and Llama weights, export runs.

Import:

  cfg = model_config_from_hf(transformers.AutoConfig.from_pretrained(path))
  params = load_hf_params(path, cfg, shardings)   # each tensor placed straight into its shards

`path` is a local checkpoint directory (config.json with model.safetensors, or sharded
model-0000x-of-0000y.safetensors with model.safetensors.index.json) or a hub name already in
the Hugging Face cache. Each shard's callback reads only its block of the source tensor
(`safetensors.safe_open(..., framework='numpy').get_slice`, or a memory map for dtypes numpy
lacks, e.g. bfloat16). Pickled `pytorch_model.bin` checkpoints are refused unless
`allow_pickle=True`.

Export (`export(workdir, out_dir)`) writes a run's model as a `...ForCausalLM` (pretrain, sft,
ppo) or `...ForSequenceClassification` (rm) directory; export -> import is the identity on
parameters.

What's where:

  configs.py  HF config <-> ModelConfig (`model_config_from_hf`, `model_config_from_checkpoint`
              for a directory's config.json, `hf_config_from_model_config`, `infer_family`),
              and `resolve_config` for `config.model.hf_checkpoint`.
  files.py    checkpoint directories and cached hub names (`resolve_checkpoint`), config.json,
              sliced reads of safetensors (or pickled) weights.
  mapping.py  the per-family name mapping (`Source`, `param_sources`) and `load_hf_params`.
  exporting.py   HF tensors from our parameters (`iter_hf_tensors`), `write_safetensors`, and
              `export`; its docstring explains how the reward model's bias is recorded.
"""

from instruct.hf.configs import CAUSAL_LM
from instruct.hf.configs import FAMILIES
from instruct.hf.configs import NORMALIZATION_KEY
from instruct.hf.configs import NUMERICS_KEYS
from instruct.hf.configs import SCORE_BIAS_KEY
from instruct.hf.configs import SEQUENCE_CLASSIFICATION
from instruct.hf.configs import family_problems
from instruct.hf.configs import hf_config_from_model_config
from instruct.hf.configs import infer_family
from instruct.hf.configs import model_config_from_checkpoint
from instruct.hf.configs import model_config_from_hf
from instruct.hf.configs import resolve_config
from instruct.hf.configs import resolve_model_config
from instruct.hf.exporting import EXPORT_DTYPES
from instruct.hf.exporting import export
from instruct.hf.exporting import hf_state_dict
from instruct.hf.exporting import iter_hf_tensors
from instruct.hf.exporting import parse_size
from instruct.hf.exporting import write_safetensors
from instruct.hf.files import PICKLE_INDEX
from instruct.hf.files import PICKLE_WEIGHTS
from instruct.hf.files import SAFE_INDEX
from instruct.hf.files import SAFE_WEIGHTS
from instruct.hf.files import read_hf_config
from instruct.hf.files import resolve_checkpoint
from instruct.hf.mapping import PREFIX
from instruct.hf.mapping import Source
from instruct.hf.mapping import load_hf_params
from instruct.hf.mapping import param_sources
