"""The per-token uncertainty signal M_t (docs/method.md §1) and the turn score Mbar (docs/method.md §3).

M_t mixes the confidence of the top token with the normalised entropy of one decoding step:

    logp   = log_softmax(z_t)                       # z_t: raw logits, before temperature
    conf_t = max_v logp(v)                          # or max_v p(v) with confidence="prob"
    H_t    = -sum_v p(v) logp(v)                    # nats
    M_t    = alpha * conf_t + (1 - alpha) * (1 - clip(H_t / log|V|, 0, 1))

Larger M_t means more certain. |V| is the width of the logits (the model's output vocabulary, which
may be padded beyond the tokenizer's). Everything is computed in float32 whatever the input dtype,
so bf16 logits give the same signal as their float32 upcast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

CONFIDENCE_FORMS = ("logprob", "prob")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) over the last dimension, as float32 (H_t of docs/method.md §1)."""
    return _entropy(torch.log_softmax(logits.float(), dim=-1))


def uncertainty_from_logprobs(logprobs: torch.Tensor, alpha: float = 0.6, confidence: str = "logprob",
                              probs: torch.Tensor | None = None) -> torch.Tensor:
    """M_t (docs/method.md §1) from float32 log-probabilities of shape [..., V] (already log_softmax-ed).

    Engines that need the log-probabilities anyway call this to avoid a second log_softmax. `probs`
    (= logprobs.exp(), which a sampler at temperature 1 computes anyway) saves the pass that
    exponentiates; the entropy is then one dot product, so `logprobs` must be finite (no masked entries)."""
    if confidence not in CONFIDENCE_FORMS:
        raise ValueError(f"confidence must be one of {CONFIDENCE_FORMS}, got {confidence!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    vocab_size = logprobs.shape[-1]
    if vocab_size < 2:
        raise ValueError(f"M_t needs at least 2 vocabulary entries (log|V| > 0), got logits of width {vocab_size}")
    top = logprobs.amax(dim=-1)  # amax: max(dim=-1) also finds the indices, ~8x slower on a [32, 49152] batch
    conf = top if confidence == "logprob" else top.exp()
    entropy = _entropy(logprobs) if probs is None else -torch.linalg.vecdot(probs, logprobs)
    normalised_entropy = (entropy / math.log(vocab_size)).clamp(0.0, 1.0)
    return alpha * conf + (1.0 - alpha) * (1.0 - normalised_entropy)


def uncertainty_signal(logits: torch.Tensor, alpha: float = 0.6, confidence: str = "logprob") -> torch.Tensor:
    """M_t (docs/method.md §1) for raw logits of shape [..., V] (before temperature); float32, shape [...].

    `confidence="logprob"` (default) uses max log p; `"prob"` uses max p (other versions of the
    authors' code). A uniform distribution gives alpha * (-log V); a one-hot one gives 1 - alpha."""
    return uncertainty_from_logprobs(torch.log_softmax(logits.float(), dim=-1), alpha, confidence)


def turn_score(uncertainty: Sequence[float] | torch.Tensor, skip: int = 32) -> float:
    """Mbar(k) (docs/method.md §3): the mean of M_t over a response's tokens after its first `skip` tokens.

    The reference skips the first 32 tokens. A response with `skip` tokens or fewer has no tokens
    after the window, so its score is the mean over all of its tokens instead (a short turn still gets
    a score, which TDS needs). An empty response scores NaN."""
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    values = torch.as_tensor(uncertainty, dtype=torch.float64).flatten()
    if values.numel() == 0:
        return math.nan
    window = values[skip:] if values.numel() > skip else values
    return float(window.mean())


def _entropy(logprobs: torch.Tensor) -> torch.Tensor:
    # Masked entries (logp = -inf) have p = 0 and contribute 0; clamping avoids 0 * -inf = nan.
    return -(logprobs.exp() * logprobs.clamp_min(torch.finfo(logprobs.dtype).min)).sum(dim=-1)
