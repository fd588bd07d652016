"""Early stopping, with the lecture's rule and the common one.

- "lecture": stop after `patience` consecutive epochs whose validation loss
  rose over the previous epoch's (the course's loop).
- "best": stop after `patience` epochs that did not improve the best
  validation loss by more than `min_delta` (Keras/Lightning's rule).
Either way the best epoch is tracked, so its weights can be restored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

RULES = ("lecture", "best")


@dataclass
class EarlyStopping:
    rule: str = "best"
    patience: int = 5
    min_delta: float = 0.0
    best_loss: float = math.inf
    best_epoch: int = -1
    previous_loss: float = math.inf
    bad_epochs: int = 0
    stopped_epoch: int = -1
    reason: str = ""

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown early-stopping rule {self.rule!r}; choose from {RULES}")
        if self.patience < 1:
            raise ValueError("patience must be at least 1")

    def step(self, epoch: int, valid_loss: float) -> bool:
        """Record one epoch's validation loss; True when training should stop now."""
        improved = valid_loss < self.best_loss - self.min_delta
        if valid_loss < self.best_loss:
            self.best_loss, self.best_epoch = valid_loss, epoch
        if self.rule == "lecture":
            self.bad_epochs = self.bad_epochs + 1 if valid_loss > self.previous_loss else 0
            why = f"validation loss rose {self.bad_epochs} epochs in a row"
        else:
            self.bad_epochs = 0 if improved else self.bad_epochs + 1
            why = (
                f"no improvement of the best validation loss by more than {self.min_delta:g} "
                f"for {self.bad_epochs} epochs"
            )
        self.previous_loss = valid_loss
        if self.bad_epochs >= self.patience:
            self.stopped_epoch, self.reason = (
                epoch,
                f"early stop at epoch {epoch}: {why} (patience {self.patience}, rule {self.rule!r})",
            )
            return True
        return False

    def is_best(self, epoch: int) -> bool:
        return epoch == self.best_epoch

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
