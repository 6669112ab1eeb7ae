"""The model and the first-order trainer a run's config asks for: the warm-up phase builds
them, and so does the hi+lo ablation's first-order part, identically."""

from __future__ import annotations

import numpy as np
import torch

from ..config import Config
from ..train.fedavg import Warmup, WarmupConfig
from ..train.zoo import build_model
from .state import Plan


def build(config: Config, plan: Plan) -> torch.nn.Module:
    """The zoo model at its initial weights (seeded by the run's seed)."""
    c, _, size = plan.dataset.input_shape
    return build_model(config.model.name, plan.dataset.num_classes, c, size,
                       config.model.width, seed=config.run.seed)


def warmup_config(config: Config) -> WarmupConfig:
    return WarmupConfig(**config.warmup.trainer_settings(), device=config.run.device)


def trainer(config: Config, plan: Plan, settings: WarmupConfig | None = None) -> Warmup:
    """FedAvg/FedAdam over the plan's high-resource clients, from the initial model."""
    ds = plan.dataset
    clients = [(ds.x_train[idx], ds.y_train[idx]) for idx in plan.parts]
    return Warmup(build(config, plan), clients, np.flatnonzero(plan.high).tolist(),
                  settings or warmup_config(config), seed=config.run.seed)
