"""t2po: multi-turn reinforcement learning for LLM agents (T2PO and its baselines)."""

import os

# Every model is local (the embedded one, a directory, a run folder): nothing is downloaded at run
# time, for every entry point (the CLI, torchrun workers, Ray actors, library use). Set before any
# Hugging Face module is imported, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# OpenMP threads that give their core back when the machine is busy, sized to the cores this process
# may use; before torch is imported, which reads them once (t2po/openmp.py).
from t2po import openmp as _openmp  # noqa: E402

OPENMP_SETTINGS = _openmp.configure()

__version__ = "0.1.0"
