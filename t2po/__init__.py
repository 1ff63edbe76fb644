"""t2po: multi-turn reinforcement learning for LLM agents (T2PO and its baselines)."""

__version__ = "0.1.0"
