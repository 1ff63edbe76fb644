"""One iteration's training samples as the update reads them, built once after scoring (old log-probs,
reference log-probs, critic values) and advantages: per-sample tensors padded to the longest response,
on the policy's device. A micro-batch takes its rows (`TrainingBatch.rows`), cut to its own length, as
the loss component's `LossBatch` fields (t2po/algos/losses.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def _pad(rows: list[torch.Tensor] | list[list[float]], width: int, fill: float = 0.0) -> torch.Tensor:
    out = torch.full((len(rows), width), fill, dtype=torch.float32)
    for b, row in enumerate(rows):
        out[b, : len(row)] = row if torch.is_tensor(row) else torch.tensor(row, dtype=torch.float32)
    return out


@dataclass
class TrainingBatch:
    old_logp: torch.Tensor  # [N, T] log-probs of the sampling policy (or their recomputation), 0 past each response
    keep: torch.Tensor | None  # [N, T] 0 on tokens the thinking intervention forced (algo.mask_forced_tokens), else 1
    advantages: torch.Tensor  # [N]
    ref_logp: torch.Tensor | None = None  # [N, T] the reference policy's log-probs (KL loss on)
    old_values: torch.Tensor | None = None  # [N] critic values when the batch was scored
    returns: torch.Tensor | None = None  # [N] the critic's regression targets

    @classmethod
    def build(cls, forced: list[list[bool]], old: list[torch.Tensor], adv: np.ndarray, ref: list[torch.Tensor] | None,
              values: np.ndarray | None, returns: np.ndarray | None, mask_forced: bool,
              device: torch.device) -> "TrainingBatch":
        width = max((len(f) for f in forced), default=0)
        keep = None
        if mask_forced and any(any(f) for f in forced):
            keep = _pad([[1.0 - float(x) for x in f] for f in forced], width, fill=1.0).to(device)
        return cls(_pad(old, width).to(device), keep, torch.tensor(adv, dtype=torch.float32, device=device),
                   _pad(ref, width).to(device) if ref is not None else None,
                   torch.tensor(values, dtype=torch.float32, device=device) if values is not None else None,
                   torch.tensor(returns, dtype=torch.float32, device=device) if returns is not None else None)

    def rows(self, indices: list[int], response_mask: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """The rows `indices` cut to the micro-batch's response length, as `LossBatch` keyword arguments
        (the loss mask: the micro-batch's response mask without the forced tokens)."""
        index = torch.tensor(indices, device=self.advantages.device)
        width = response_mask.shape[1]
        take = lambda t: None if t is None else t[index, :width] if t.ndim == 2 else t[index]  # noqa: E731
        mask = response_mask if self.keep is None else response_mask * take(self.keep)
        return {"old_logp": take(self.old_logp), "advantages": take(self.advantages), "mask": mask,
                "ref_logp": take(self.ref_logp), "old_values": take(self.old_values), "returns": take(self.returns)}
