"""Training-loop options, importable without Keras (the CLI builds its parser from them)."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class FitOptions:
    """Model and training loop settings; the defaults are the seed paper's."""

    backbone: str = "EfficientNetB7"
    input_size: int = 512
    batch_size: int = 80
    epochs: int = 10  # passes over all training shards
    patience: int = 5  # shards without a better validation accuracy before stopping
    learning_rate: float = 1e-4
    decay_steps: int = 100_000
    decay_rate: float = 0.96
    weights: str | None = None
    freeze_base: bool = False
    # Starting from a trained model (a bundle or .keras as weights) keeps its classifier when
    # the classes match; fresh_head starts the classifier from random instead.
    fresh_head: bool = False
    # After the head-only stage on a frozen base: unfreeze the backbone's top blocks (batch
    # norm kept frozen) and train on at a lower rate, as the Keras transfer-learning guide does.
    fine_tune_blocks: int = 0
    fine_tune_epochs: int = 5  # passes over all shards in the fine-tuning stage
    fine_tune_lr: float = 1e-5
    online_augment: bool = False  # the seed augmented offline only (balancing copies)
    # With a frozen base, run the frozen layers once per image and train on their cached
    # output (training.feature_cache); off only to compare or to save disk.
    feature_cache: bool = True
    batchnorm_momentum: float | None = None  # None: 0.9 from scratch, Keras' own otherwise
    mixed_precision: str = "auto"  # auto | on | off
    strategy: str = "auto"  # auto | default | mirrored | multiworker
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs", "decay_steps", "fine_tune_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")
        if not 0 < self.learning_rate < 1 or not 0 < self.decay_rate <= 1:
            raise ValueError("learning_rate must be in (0, 1) and decay_rate in (0, 1]")
        if self.fine_tune_blocks < 0:
            raise ValueError(f"fine_tune_blocks must be >= 0, got {self.fine_tune_blocks}")
        if self.fine_tune_blocks and not self.freeze_base:
            raise ValueError(
                "fine_tune_blocks follows a head-only stage: it needs freeze_base (without it "
                "the whole backbone trains from the start)"
            )
        if not 0 < self.fine_tune_lr < 1:
            raise ValueError(f"fine_tune_lr must be in (0, 1), got {self.fine_tune_lr}")

    def resume_key(self) -> dict:
        """What must not change between a run and its resumption."""
        fixed = {f.name for f in dataclasses.fields(self)} - {
            "epochs",
            "patience",
            "fine_tune_epochs",
        }
        return {k: v for k, v in asdict(self).items() if k in fixed}
