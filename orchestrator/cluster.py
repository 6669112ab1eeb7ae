"""Grids beyond one machine: each run of ``zowarmup experiment`` as a task on a Ray cluster.

``--ray`` alone starts a Ray instance on this machine for the grid and stops it after (every
process it started stops with it); ``--ray ADDRESS`` joins a running cluster
(``ray start --head`` on one node, ``ray start --address ...`` on the others) and leaves it
running. A task holds one CPU, and one GPU where the cluster has GPUs, so a run's warm-up
and its torch engine (``zo.engine = "torch"``) each get a device of their own.

Tasks receive their run's resolved config and directory and write the run directory
themselves, so on a cluster of several machines ``experiment.out`` (and ``data.path``) must
be on a file system every node mounts at the same path; a run finished somewhere this
machine cannot see is reported as such. Ray is an extra of its own (``pip install
'zowarmup[ray]'``), never part of the orchestrator's install.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from protocols.errors import ZoError

log = logging.getLogger("zowarmup.experiment")

LOCAL = "local"  # --ray without an address: a Ray instance started here for the grid


class ClusterError(ZoError):
    """Ray missing, a cluster that cannot be reached, or a run that failed there."""


class RayCluster:
    """A connected Ray: runs calls as tasks, one CPU (and one GPU where there are GPUs) each."""

    def __init__(self, ray_module, gpus: float) -> None:
        self.ray = ray_module
        self.gpus_per_task = 1 if gpus >= 1 else 0

    def run(self, fn: Callable[..., None], calls: Sequence[tuple]) -> None:
        """``fn(*args)`` for every ``args`` in ``calls``, as many at once as the cluster
        holds; the first failure stops the grid with its own message."""
        if not calls:
            return
        remote = self.ray.remote(num_cpus=1, num_gpus=self.gpus_per_task, max_retries=0)(fn)
        pending = [remote.remote(*args) for args in calls]
        try:
            while pending:
                done, pending = self.ray.wait(pending, num_returns=1)
                self.ray.get(done[0])
        except self.ray.exceptions.RayTaskError as exc:
            for ref in pending:
                self.ray.cancel(ref, force=True)
            cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else exc
            if isinstance(cause, ZoError):
                raise cause from None
            raise ClusterError(f"a run failed on the Ray cluster: {cause}") from None


@contextmanager
def ray_cluster(address: str, num_cpus: int | None = None) -> Iterator[RayCluster]:
    """Ray for the duration of a grid: a local instance (``address == LOCAL``, with
    ``num_cpus`` CPUs, default all) started and stopped here, or a running cluster."""
    try:
        import ray
    except ImportError:
        raise ClusterError("--ray needs Ray, an extra of its own: pip install "
                           "'zowarmup[ray]' (on every node of the cluster)") from None
    options = dict(include_dashboard=False, log_to_driver=True)
    try:
        if address == LOCAL:  # a new instance, even where RAY_ADDRESS names a cluster
            ray.init(address="local", num_cpus=num_cpus, **options)
        else:
            ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        ray.shutdown()
        where = "a local Ray" if address == LOCAL else f"the Ray cluster at {address}"
        raise ClusterError(f"cannot start {where}: {exc}") from None
    try:
        resources = ray.cluster_resources()
        log.info("Ray: %d CPU(s), %d GPU(s)", resources.get("CPU", 0), resources.get("GPU", 0))
        yield RayCluster(ray, resources.get("GPU", 0))
    finally:
        ray.shutdown()  # a local instance: every process it started stops
