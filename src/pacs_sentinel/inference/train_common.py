"""What the demo trainers share: early stopping on a validation figure and the model folder.

Used by the organ-seg (:mod:`~pacs_sentinel.inference.training`), cxr-cls
(:mod:`~pacs_sentinel.inference.train_cxr`) and QC estimator
(:mod:`~pacs_sentinel.qc.train_estimator`) trainers.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from pacs_sentinel import atomic
from pacs_sentinel.inference.sources import CARD_FILE, WEIGHTS_FILE

#: A validation figure must beat the best by more than this to count as better.
MIN_IMPROVEMENT = 1e-4


class EarlyStopping:
    """Keeps the weights of the best epoch and says when ``patience`` epochs brought nothing better.

    Attributes:
        best: The best validation figure so far (``initial`` before the first epoch).
        best_epoch: Its epoch (0 before the first improvement).
    """

    def __init__(self, network: torch.nn.Module, *, patience: int, initial: float, higher_is_better: bool = True) -> None:
        self.network = network
        self.patience = patience
        self.higher_is_better = higher_is_better
        self.best = initial
        self.best_epoch = 0
        self._best_state = copy.deepcopy(network.state_dict())
        self._stale = 0

    def step(self, epoch: int, value: float) -> bool:
        """Record an epoch's validation figure; True when training should stop."""
        better = (value > self.best + MIN_IMPROVEMENT if self.higher_is_better
                  else value < self.best - MIN_IMPROVEMENT)
        if better:
            self.best, self.best_epoch, self._stale = value, epoch, 0
            self._best_state = copy.deepcopy(self.network.state_dict())
            return False
        self._stale += 1
        return self._stale >= self.patience

    def restore_best(self) -> None:
        """Load the best epoch's weights back into the network and put it in eval mode."""
        self.network.load_state_dict(self._best_state)
        self.network.eval()


def write_model_folder(out_dir: Path, state_dict: dict[str, Any], card: dict[str, Any], card_markdown: str) -> None:
    """Write ``model.pt``, ``card.json`` and ``MODEL_CARD.md``, each atomically (temp file + rename)."""
    out_dir = Path(out_dir)
    atomic.replace_durably(lambda tmp: torch.save(state_dict, tmp), out_dir / WEIGHTS_FILE)
    write_card(out_dir, card, card_markdown)


def write_card(out_dir: Path, card: dict[str, Any], card_markdown: str) -> None:
    """Write ``card.json`` and ``MODEL_CARD.md`` of a model folder, each atomically."""
    for name, text in ((CARD_FILE, json.dumps(card, indent=2) + "\n"), ("MODEL_CARD.md", card_markdown)):
        atomic.write_text(Path(out_dir) / name, text)
