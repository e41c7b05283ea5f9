"""Where training runs: float policy and distribution strategy, falling back cleanly to CPU.

On GPUs the default is mixed precision (float16 compute, float32 weights) and, with more than
one GPU, ``MirroredStrategy``. Several hosts use ``MultiWorkerMirroredStrategy``: start the
same ``ainode train fit`` on every host with ``TF_CONFIG`` naming the cluster and this host's
index, e.g. ``{"cluster": {"worker": ["hostA:12345", "hostB:12345"]}, "task": {"type":
"worker", "index": 0}}``, and ``--strategy multiworker``; every host reads the same run folder
(a shared file system).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIXED_PRECISION = ("auto", "on", "off")
STRATEGIES = ("auto", "default", "mirrored", "multiworker")


@dataclass
class Devices:
    """The resolved set-up and why (``notes`` say what was asked for and not possible)."""

    gpus: int
    policy: str
    strategy: object
    strategy_name: str
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        """A JSON-able summary for the run's records."""
        return {
            "gpus": self.gpus,
            "policy": self.policy,
            "strategy": self.strategy_name,
            "replicas": getattr(self.strategy, "num_replicas_in_sync", 1),
        }


def visible_gpus() -> list:
    """The GPUs TensorFlow can use."""
    import tensorflow as tf

    return tf.config.list_physical_devices("GPU")


def resolve_devices(mixed_precision: str = "auto", strategy: str = "auto") -> Devices:
    """Choose the float policy and the distribution strategy for the visible hardware."""
    import tensorflow as tf

    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(
            f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}"
        )
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    gpus = len(visible_gpus())
    notes = []
    policy = "float32"
    if mixed_precision == "on" and not gpus:
        notes.append("mixed precision asked for but no GPU is visible: training in float32")
    elif mixed_precision == "on" or (mixed_precision == "auto" and gpus):
        policy = "mixed_float16"
    name = strategy
    if strategy == "auto":
        name = "mirrored" if gpus > 1 else "default"
    if name == "mirrored":
        chosen = tf.distribute.MirroredStrategy()
        if gpus < 2:
            notes.append(f"MirroredStrategy over {max(gpus, 1)} device(s): no speed-up")
    elif name == "multiworker":
        chosen = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        chosen = tf.distribute.get_strategy()
    return Devices(gpus=gpus, policy=policy, strategy=chosen, strategy_name=name, notes=notes)
