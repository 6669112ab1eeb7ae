"""Step 1 of ZOWarmUp: first-order federated training over the high-resource clients.

The orchestrator trains the model from scratch with FedAvg or FedAdam, running each
participating client's local SGD in turn on the workstation. The same loop, run for the
whole round budget, is the High-Res-Only baseline.

Every random choice (which clients take part, how each shard is shuffled, any dropout) is
derived from ``(seed, round, client)``, never from a generator carried between rounds. So a
checkpoint needs only the weights, the FedAdam moments and the round counter, and a run
resumed from it ends with the same bits as one that never stopped (on CPU; CUDA kernels may
reorder floating-point sums unless the caller asks torch for deterministic algorithms).
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from protocols.errors import ZoError

from .settings import STRATEGIES, TrainerSettings

DEFAULT_SERVER_LR = {"fedavg": 1.0, "fedadam": 0.01}
CHECKPOINT_FORMAT = 1

# Stream tags keep the sampling stream apart from the per-client streams of the same round.
_SAMPLE_TAG = 0
_CLIENT_TAG = 1


class WarmupError(ZoError, ValueError):
    """A warm-up setting, data set or checkpoint that cannot be used; nothing was changed."""


# --- configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class WarmupConfig(TrainerSettings):
    """The trainer's settings and the device it trains on, all checked on construction."""

    device: str = "auto"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise WarmupError(f"strategy must be one of {', '.join(STRATEGIES)}, "
                              f"got {self.strategy!r}")
        if self.server_lr is None:
            object.__setattr__(self, "server_lr", DEFAULT_SERVER_LR[self.strategy])
        _check_positive("client_lr", self.client_lr)
        _check_positive("server_lr", self.server_lr)
        _check_positive("tau", self.tau)
        _check_unit_interval("client_momentum", self.client_momentum)
        _check_unit_interval("beta1", self.beta1)
        _check_unit_interval("beta2", self.beta2)
        if not _finite(self.weight_decay) or self.weight_decay < 0:
            raise WarmupError(f"weight_decay must be a finite number >= 0, "
                              f"got {self.weight_decay!r}")
        _check_count("local_epochs", self.local_epochs)
        _check_count("batch_size", self.batch_size)
        if self.clients_per_round is not None:
            _check_count("clients_per_round", self.clients_per_round)
        resolve_device(self.device)


def _finite(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _check_positive(name: str, value: object) -> None:
    if not _finite(value) or value <= 0:
        raise WarmupError(f"{name} must be a finite number > 0, got {value!r}")


def _check_unit_interval(name: str, value: object) -> None:
    if not _finite(value) or not 0 <= value < 1:
        raise WarmupError(f"{name} must be in [0, 1), got {value!r}")


def _check_count(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise WarmupError(f"{name} must be an integer >= 1, got {value!r}")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when torch sees a GPU, else CPU; anything else is parsed as is."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise WarmupError(f"device {name!r} is not a torch device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WarmupError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


# --- data ----------------------------------------------------------------------------------


Dataset = tuple[np.ndarray, np.ndarray]


def _as_tensors(what: str, data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Check one data set and wrap it as CPU tensors (no copy when already float32)."""
    try:
        x, y = data
    except (TypeError, ValueError):
        raise WarmupError(f"{what}: data must be an (x, y) pair") from None
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 4:
        raise WarmupError(f"{what}: x must be N x C x H x W, got shape {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise WarmupError(f"{what}: y must be a vector of {len(x)} labels, "
                          f"got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise WarmupError(f"{what}: labels must be integers, got {y.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def _derived_seed(*key: int) -> int:
    """A 63-bit torch seed from a tuple of non-negative integers (order matters)."""
    state = np.random.SeedSequence(list(key)).generate_state(2, np.uint32)
    return (int(state[0]) << 32 | int(state[1])) & ((1 << 63) - 1)


# --- statistics ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundStats:
    """What one warm-up round did and cost; bytes are per participating client, each way."""

    round: int
    participants: tuple[int, ...]
    samples: int
    train_loss: float
    seconds: float
    uplink_bytes: int
    downlink_bytes: int

    def to_dict(self) -> dict:
        out = asdict(self)
        out["participants"] = list(self.participants)
        return out


def model_bytes(model: nn.Module) -> int:
    """The bytes a first-order client exchanges per direction: every parameter and buffer."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# --- evaluation ----------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 512,
             device: str | torch.device | None = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over ``(x, y)`` in eval mode.

    ``device=None`` evaluates where the model already is; the model's train/eval mode is
    restored afterwards so evaluating mid-training changes nothing.
    """
    xt, yt = _as_tensors("evaluation set", (x, y))
    if len(yt) == 0:
        raise WarmupError("cannot evaluate on an empty data set")
    _check_count("batch_size", batch_size)
    if device is None:
        target = next(iter(model.parameters())).device
    else:
        target = resolve_device(device) if isinstance(device, str) else device
    model = model.to(target)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=target)
    correct = torch.zeros((), dtype=torch.int64, device=target)
    try:
        for start in range(0, len(yt), batch_size):
            xb = xt[start:start + batch_size].to(target)
            yb = yt[start:start + batch_size].to(target)
            logits = model(xb)
            loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
            correct += (logits.argmax(dim=1) == yb).sum()
    finally:
        model.train(was_training)
    return float(loss_sum) / len(yt), int(correct) / len(yt)


# --- the warm-up loop ----------------------------------------------------------------------


class Warmup:
    """FedAvg / FedAdam over the high-resource clients, one client at a time on one device.

    ``model`` becomes the global model: it is moved to the configured device and updated in
    place each round (read it back through :attr:`model`). One extra copy is the local model
    every client trains on; it is reloaded from the global weights for each client rather
    than allocated anew.
    """

    def __init__(self, model: nn.Module, clients: Sequence[Dataset],
                 high_resource: Sequence[int], config: WarmupConfig | None = None,
                 seed: int = 0) -> None:
        self.config = config or WarmupConfig()
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise WarmupError(f"seed must be an integer >= 0, got {seed!r}")
        self.seed = seed
        self.clients = [_as_tensors(f"client {i}", data) for i, data in enumerate(clients)]
        self.high_resource = self._check_high_resource(high_resource)
        self.device = resolve_device(self.config.device)
        self.global_model = model.to(self.device).eval()
        self.local_model = copy.deepcopy(self.global_model)
        self.has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                 for m in self.global_model.modules())
        self.trainable = [name for name, p in self.global_model.named_parameters()
                          if p.requires_grad]
        self.moments = self._zero_moments()
        self.bytes_per_client = model_bytes(self.global_model)
        self.next_round = 0

    @property
    def model(self) -> nn.Module:
        return self.global_model

    def _check_high_resource(self, high_resource: Sequence[int]) -> tuple[int, ...]:
        """Distinct, in-range client indices with data; the only clients that ever train."""
        indices = tuple(int(i) for i in high_resource)
        if not indices:
            raise WarmupError("warm-up needs at least one high-resource client")
        if len(set(indices)) != len(indices):
            raise WarmupError(f"high-resource client indices repeat: {list(indices)}")
        for i in indices:
            if not 0 <= i < len(self.clients):
                raise WarmupError(f"high-resource client {i} is not one of the "
                                  f"{len(self.clients)} clients")
            if len(self.clients[i][1]) == 0:
                raise WarmupError(f"high-resource client {i} holds no samples")
        wanted = self.config.clients_per_round
        if wanted is not None and wanted > len(indices):
            raise WarmupError(f"clients_per_round={wanted} exceeds the {len(indices)} "
                              "high-resource clients")
        return indices

    def _zero_moments(self) -> dict[str, dict[str, torch.Tensor]]:
        """FedAdam's m = 0 and v = tau^2 (Reddi et al.'s initialisation); empty for FedAvg."""
        if self.config.strategy != "fedadam":
            return {}
        params = dict(self.global_model.named_parameters())
        tau2 = self.config.tau ** 2
        return {"m": {n: torch.zeros_like(params[n]) for n in self.trainable},
                "v": {n: torch.full_like(params[n], tau2) for n in self.trainable}}

    # --- one round --------------------------------------------------------------------

    def participants(self, round_index: int) -> tuple[int, ...]:
        """The clients of a round: all high-resource ones, or a seeded sample of them."""
        wanted = self.config.clients_per_round
        if wanted is None or wanted == len(self.high_resource):
            return self.high_resource
        rng = np.random.default_rng([self.seed, round_index, _SAMPLE_TAG])
        chosen = rng.choice(len(self.high_resource), size=wanted, replace=False)
        return tuple(self.high_resource[i] for i in sorted(chosen.tolist()))

    def run_round(self, round_index: int) -> RoundStats:
        """Train every participant from the global weights, then aggregate their deltas."""
        if round_index != self.next_round:
            raise WarmupError(f"round {round_index} asked for, but the next round is "
                              f"{self.next_round}")
        started = time.perf_counter()
        chosen = self.participants(round_index)
        total = sum(len(self.clients[c][1]) for c in chosen)
        global_state = self.global_model.state_dict()
        mean_delta = {k: torch.zeros_like(v, dtype=_acc_dtype(v))
                      for k, v in global_state.items()}
        loss_sum, seen = 0.0, 0
        for client in chosen:
            client_loss, client_seen = self._train_client(round_index, client)
            loss_sum, seen = loss_sum + client_loss, seen + client_seen
            weight = len(self.clients[client][1]) / total
            local_state = self.local_model.state_dict()
            for key, acc in mean_delta.items():
                acc.add_(local_state[key].to(acc.dtype) - global_state[key].to(acc.dtype),
                         alpha=weight)
        self._apply(mean_delta)
        self.next_round = round_index + 1
        return RoundStats(round=round_index, participants=chosen, samples=total,
                          train_loss=loss_sum / seen, seconds=time.perf_counter() - started,
                          uplink_bytes=self.bytes_per_client,
                          downlink_bytes=self.bytes_per_client)

    def run(self, rounds: int) -> list[RoundStats]:
        """``rounds`` more rounds from wherever the run stands (fresh or resumed)."""
        return [self.run_round(self.next_round) for _ in range(rounds)]

    def _train_client(self, round_index: int, client: int) -> tuple[float, int]:
        """Local SGD over one shard; returns the summed training loss and the samples seen."""
        cfg = self.config
        x, y = (t.to(self.device) for t in self.clients[client])
        local = self.local_model
        local.load_state_dict(self.global_model.state_dict())
        local.train()
        optimizer = torch.optim.SGD(local.parameters(), lr=cfg.client_lr,
                                    momentum=cfg.client_momentum,
                                    weight_decay=cfg.weight_decay)
        rng = np.random.default_rng([self.seed, round_index, _CLIENT_TAG, client])
        devices = [self.device] if self.device.type == "cuda" else []
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        seen = 0
        with torch.random.fork_rng(devices=devices):
            # Any randomness inside the model (dropout) comes from this client's own stream.
            torch.manual_seed(_derived_seed(self.seed, round_index, _CLIENT_TAG, client))
            for _ in range(cfg.local_epochs):
                order = torch.from_numpy(rng.permutation(len(y))).to(self.device)
                for batch in self._batches(order):
                    optimizer.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(local(x[batch]), y[batch])
                    loss.backward()
                    optimizer.step()
                    loss_sum += loss.detach().double() * len(batch)
                    seen += len(batch)
        local.eval()
        return float(loss_sum), seen

    def _batches(self, order: torch.Tensor) -> list[torch.Tensor]:
        """Minibatches of the shuffled order; a trailing single sample is dropped for
        BatchNorm models, whose training-mode statistics are undefined for one sample."""
        batches = list(torch.split(order, self.config.batch_size))
        if self.has_batchnorm and len(batches) > 1 and len(batches[-1]) == 1:
            batches.pop()
        return batches

    @torch.no_grad()
    def _apply(self, mean_delta: dict[str, torch.Tensor]) -> None:
        """Server step on trainable parameters; buffers take the weighted average."""
        state = self.global_model.state_dict()
        trainable = set(self.trainable)
        for key, delta in mean_delta.items():
            target = state[key]
            if key in trainable:
                self._server_step(key, target, delta)
            elif target.is_floating_point():
                target.add_(delta.to(target.dtype))
            else:  # counters such as num_batches_tracked
                target.add_(torch.round(delta).to(target.dtype))

    def _server_step(self, key: str, weight: torch.Tensor, delta: torch.Tensor) -> None:
        """FedAvg: w += lr * delta. FedAdam: Adam on the pseudo-gradient -delta, i.e.
        m = b1 m + (1-b1) delta, v = b2 v + (1-b2) delta^2, w += lr m / (sqrt(v) + tau)."""
        cfg = self.config
        delta = delta.to(weight.dtype)
        if cfg.strategy == "fedavg":
            weight.add_(delta, alpha=cfg.server_lr)
            return
        m, v = self.moments["m"][key], self.moments["v"][key]
        m.mul_(cfg.beta1).add_(delta, alpha=1 - cfg.beta1)
        v.mul_(cfg.beta2).addcmul_(delta, delta, value=1 - cfg.beta2)
        weight.addcdiv_(m, v.sqrt().add_(cfg.tau), value=cfg.server_lr)

    # --- state for resume ---------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a resumed run needs: weights, FedAdam moments, the round counter."""
        return {
            "format": CHECKPOINT_FORMAT,
            "strategy": self.config.strategy,
            "seed": self.seed,
            "next_round": self.next_round,
            "model": {k: v.detach().cpu().clone()
                      for k, v in self.global_model.state_dict().items()},
            "moments": {kind: {k: v.detach().cpu().clone() for k, v in tensors.items()}
                        for kind, tensors in self.moments.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; refuses one of another strategy, seed or model."""
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise WarmupError("not a warm-up checkpoint of format "
                              f"{CHECKPOINT_FORMAT}")
        for field, ours in (("strategy", self.config.strategy), ("seed", self.seed)):
            if state.get(field) != ours:
                raise WarmupError(f"checkpoint {field} is {state.get(field)!r}, this run's "
                                  f"is {ours!r}; resuming would not continue the same run")
        next_round = state.get("next_round")
        if not isinstance(next_round, int) or next_round < 0:
            raise WarmupError(f"checkpoint round counter is invalid: {next_round!r}")
        _check_shapes("weights", state.get("model"), self.global_model.state_dict())
        moments = state.get("moments")
        if not isinstance(moments, dict) or set(moments) != set(self.moments):
            raise WarmupError("checkpoint FedAdam moments do not match this run's strategy")
        for kind, tensors in self.moments.items():
            _check_shapes(f"FedAdam {kind}", moments[kind], tensors)
        self.global_model.load_state_dict(state["model"], strict=True)
        with torch.no_grad():
            for kind, tensors in self.moments.items():
                for key, tensor in tensors.items():
                    tensor.copy_(moments[kind][key])
        self.next_round = next_round

    def save_checkpoint(self, path: str | Path) -> None:
        """Write :meth:`state_dict` atomically: a crash leaves the old file or the new one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(self.state_dict(), handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as exc:  # a full disk, an I/O error: the old one stays
            Path(tmp).unlink(missing_ok=True)
            # torch.save reports a failed write as a RuntimeError raised while handling it
            exc = exc if isinstance(exc, OSError) else exc.__context__
            if not isinstance(exc, OSError):
                raise
            kept = "the previous checkpoint is intact" if path.exists() else "none was written"
            raise WarmupError(f"cannot write the warm-up checkpoint {path}: "
                              f"{exc.strerror or exc}; {kept} (free space, then resume)") from exc
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore from a file written by :meth:`save_checkpoint`."""
        try:
            state = torch.load(Path(path), map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
            raise WarmupError(f"cannot read warm-up checkpoint {path}: {str(exc)[:300]}") from None
        self.load_state_dict(state)


def _check_shapes(what: str, given: object, ours: dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint part before copying anything, so a misfit changes nothing."""
    if not isinstance(given, dict) or set(given) != set(ours):
        names = sorted(set(given) ^ set(ours)) if isinstance(given, dict) else []
        raise WarmupError(f"checkpoint {what} do not fit this model; differing names: "
                          f"{names[:10]}")
    for key, tensor in ours.items():
        other = given[key]
        if not isinstance(other, torch.Tensor) or other.shape != tensor.shape:
            shape = tuple(other.shape) if isinstance(other, torch.Tensor) else type(other)
            raise WarmupError(f"checkpoint {what} {key!r} has shape {shape}, this model's "
                              f"is {tuple(tensor.shape)}")


def _acc_dtype(tensor: torch.Tensor) -> torch.dtype:
    """Deltas of counters are averaged as float64 and rounded; float tensors keep theirs."""
    return tensor.dtype if tensor.is_floating_point() else torch.float64


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
