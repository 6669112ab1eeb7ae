"""The warm-up trainer's settings, declared once: the ``[warmup]`` table of a run's config
and the trainer's own settings are both this dataclass (plus the rounds, or the device).

Kept free of torch so that reading a config file does not load it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

STRATEGIES = ("fedavg", "fedadam")


@dataclass(frozen=True)
class TrainerSettings:
    """How the high-resource clients train (client SGD) and how the server aggregates.

    Defaults follow the paper: three local epochs at batch size 64, SGD on the clients,
    FedAvg with server learning rate 1 (plain weighted averaging). ``server_lr=None``
    picks the strategy's default (1.0 for FedAvg, 0.01 for FedAdam). ``beta1``, ``beta2``
    and ``tau`` are FedAdam's moment decays and adaptivity (Reddi et al., 2021).
    """

    strategy: str = "fedavg"
    client_lr: float = 0.01
    client_momentum: float = 0.0
    weight_decay: float = 0.0
    local_epochs: int = 3
    batch_size: int = 64
    server_lr: float | None = None  # None = the strategy's default
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    clients_per_round: int | None = None  # None = every high-resource client

    def trainer_settings(self) -> dict:
        """Just these fields, for building the trainer's settings from a subclass."""
        return {f.name: getattr(self, f.name) for f in fields(TrainerSettings)}
