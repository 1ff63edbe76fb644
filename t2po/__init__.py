"""t2po: multi-turn reinforcement learning for LLM agents (T2PO and its baselines)."""

import os

# Every model is local (the embedded one, a directory, a run folder): nothing is downloaded at run
# time, for every entry point (the CLI, torchrun workers, Ray actors, library use). Set before any
# Hugging Face module is imported, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"
