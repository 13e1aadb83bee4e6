"""Installs `instruct`: InstructGPT-style alignment (SFT, reward model, PPO) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="instruct",
    version="0.1.0",
    description="InstructGPT-style RLHF (SFT, K-wise reward model, PPO-ptx) in JAX/Flax.",
    python_requires=">=3.10",
    packages=find_packages(include=["instruct", "instruct.*", "experiments", "experiments.*"]),
    package_data={"instruct": ["assets/tokenizer/*", "assets/data/*.jsonl"]},
    install_requires=[
        "jax>=0.10,<0.12",
        "flax>=0.12,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "transformers>=5.0,<6",
        "tokenizers>=0.22,<1",
        "tensorflow-datasets>=4.9.9,<5",
        "array-record>=0.8,<1",
        "ml-collections>=1.1,<2",
        "tensorboardX>=2.6,<3",
        "numpy>=2.0,<3",
        "absl-py>=2.1,<3",
        "matplotlib>=3.8,<4",
        "filelock>=3.12,<4",
    ],
    extras_require={
        # nbclient + ipykernel run colabs/*.ipynb in a `python3` kernel (tests/test_colabs.py);
        # yapf, pinned (its output changes between versions), checks the formatting
        # (tests/test_format.py; settings in pyproject.toml).
        "test": [
            "pytest>=8,<10", "pytest-xdist>=3.5,<4", "nbclient>=0.10,<1", "nbformat>=5.10,<6",
            "ipykernel>=6.29,<8", "yapf==0.43.0"
        ],
        # PyTorch (the CPU wheel) for the parity tests against transformers' PyTorch models
        # (tests/test_hf.py); pinned: a looser range pulls the newest, multi-GB CUDA build.
        "torch": ["torch==2.13.0"],
        # The peers of the side-by-side benchmark (benchmarks/peer_torch.py, with `torch`): TRL's
        # PPO trainer; tests/test_peer_torch.py runs it in CI.
        "bench": ["trl==0.29.1", "accelerate>=1.4,<2", "datasets>=3,<6"],
        # Workdirs and exports on Google Cloud Storage (gs://): etils.epath reads and writes
        # objects through gcsfs, Orbax checks the bucket through google-cloud-storage.
        "gcs": ["gcsfs>=2024.2", "google-cloud-storage>=2.14,<4"],
    },
)
