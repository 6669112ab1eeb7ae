"""The run's figures for Prometheus: ``zowarmup run/serve/resume --metrics-port PORT``.

Each scrape reads the run directory as ``zowarmup status`` does (``run/status.py``), so the
two never disagree, and nothing in the round loop waits on a scraper. The text format is
``prometheus_client``'s own; series:

    zowarmup_rounds_done, zowarmup_rounds_planned, zowarmup_test_accuracy,
    zowarmup_eta_seconds, zowarmup_phase{phase}, zowarmup_orchestrator_up,
    zowarmup_agents{state}, zowarmup_agent_state{agent,state},
    zowarmup_agent_last_seen_timestamp_seconds{agent}, zowarmup_agent_commits_behind{agent},
    zowarmup_agent_rounds_answered_total{agent}, zowarmup_agent_rounds_missed_total{agent},
    zowarmup_agent_refusals_total{agent,reason}
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from protocols.errors import ZoError

from .status import STATES, read_status

log = logging.getLogger("zowarmup.run")


class RunCollector:
    """Every figure of ``zowarmup status``, read from the run directory at each scrape."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def collect(self) -> Iterator[Metric]:
        try:
            s = read_status(self.run_dir)
        except (OSError, ZoError) as exc:  # not written yet, or damaged: nothing to say
            log.debug("metrics: %s", exc)
            return
        yield _gauge("zowarmup_rounds_done", "Rounds done, warm-up included", s["round"])
        if s["rounds"]:
            yield _gauge("zowarmup_rounds_planned", "Rounds the run will do", s["rounds"])
        if s["test_acc"] is not None:
            yield _gauge("zowarmup_test_accuracy", "Latest test accuracy", s["test_acc"])
        if s["eta_s"] is not None:
            yield _gauge("zowarmup_eta_seconds", "Estimated time to the end", s["eta_s"])
        yield _gauge("zowarmup_phase", "The run's phase", 1, {"phase": s["phase"]})
        yield _gauge("zowarmup_orchestrator_up", "1 while the run's process is there",
                     int(s["orchestrator"]["state"] == "running"))
        yield from _agent_metrics(s["agents"])


def _agent_metrics(agents: dict) -> Iterator[Metric]:
    counts = GaugeMetricFamily("zowarmup_agents", "Agents by state", labels=["state"])
    for state in STATES:
        counts.add_metric([state], sum(a["state"] == state for a in agents.values()))
    yield counts
    state = GaugeMetricFamily("zowarmup_agent_state", "1 for each agent's state",
                              labels=["agent", "state"])
    seen = GaugeMetricFamily("zowarmup_agent_last_seen_timestamp_seconds",
                             "When the agent was last heard from", labels=["agent"])
    behind = GaugeMetricFamily("zowarmup_agent_commits_behind",
                               "Commits since the state the agent last reported",
                               labels=["agent"])
    answered = CounterMetricFamily("zowarmup_agent_rounds_answered", "Rounds answered",
                                   labels=["agent"])
    missed = CounterMetricFamily("zowarmup_agent_rounds_missed",
                                 "Rounds chosen for and not answered", labels=["agent"])
    refused = CounterMetricFamily("zowarmup_agent_refusals",
                                  "The agent's messages refused, by reason",
                                  labels=["agent", "reason"])
    for agent, a in sorted(agents.items()):
        state.add_metric([agent, a["state"]], 1)
        if a["last_seen"]:
            seen.add_metric([agent], a["last_seen"])
        if a["behind"] is not None:
            behind.add_metric([agent], a["behind"])
        answered.add_metric([agent], a["answered"])
        missed.add_metric([agent], a["missed"])
        for reason, count in sorted(a["refused"].items()):
            refused.add_metric([agent, reason], count)
    yield from (state, seen, behind, answered, missed, refused)


def _gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None
           ) -> GaugeMetricFamily:
    if not labels:
        return GaugeMetricFamily(name, doc, value=value)
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


class MetricsServer:
    """An HTTP endpoint (``/metrics``) serving :class:`RunCollector` until :meth:`stop`."""

    def __init__(self, run_dir: Path, port: int, host: str = "127.0.0.1") -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(RunCollector(run_dir))
        self._server, self._thread = start_http_server(port, host, registry)
        self.port = self._server.server_port
        self.url = f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
