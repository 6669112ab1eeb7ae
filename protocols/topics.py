"""The MQTT topic layout, and MQTT's topic-filter matching for the in-memory bus.

Every run lives under ``zowarmup/<run>/``::

    zowarmup/<run>/model                      orchestrator -> all   ModelAnnounce (retained)
    zowarmup/<run>/model/<file>/<chunk>       orchestrator -> all   raw file bytes (retained)
    zowarmup/<run>/commit                     orchestrator -> all   CommitMessage (retained)
    zowarmup/<run>/agent/<id>/hello           agent -> orchestrator Hello
    zowarmup/<run>/agent/<id>/result          agent -> orchestrator Result
    zowarmup/<run>/agent/<id>/sync            agent -> orchestrator SyncRequest
    zowarmup/<run>/agent/<id>/status          agent -> orchestrator Status (and last will)
    zowarmup/<run>/agent/<id>/inbox           orchestrator -> agent RoundStart, SyncReply, Error

A round start goes to each participant's inbox, never to everyone: the fleet's per-round
downlink is then one commit per agent plus a few hundred bytes per participant. An agent
publishes only below its own ``agent/<id>/`` (a broker ACL can enforce it), and
the id in the topic must equal the id in the message, so one agent cannot speak for
another. Everything the orchestrator publishes sits outside ``agent/``, except inboxes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .errors import ProtocolError
from .validate import check_identifier

ROOT = "zowarmup"
AGENT_KINDS = ("hello", "result", "sync", "status")


@lru_cache(maxsize=64)
def base(run: str) -> str:
    """``zowarmup/<run>``; cached, as every message's topic starts with it."""
    return f"{ROOT}/{check_identifier(run, 'run id')}"


def model(run: str) -> str:
    return f"{base(run)}/model"


def model_chunk(run: str, file: str, chunk: int) -> str:
    return f"{base(run)}/model/{check_identifier(file, 'file name')}/{chunk}"


def commit(run: str) -> str:
    return f"{base(run)}/commit"


def agent(run: str, agent_id: str, kind: str) -> str:
    if kind not in AGENT_KINDS + ("inbox",):
        raise ValueError(f"unknown agent topic kind {kind!r}")
    return f"{base(run)}/agent/{check_identifier(agent_id, 'agent id')}/{kind}"


def agent_filter(run: str, kind: str) -> str:
    """Every agent's messages of one kind, e.g. their statuses."""
    if kind not in AGENT_KINDS:
        raise ValueError(f"unknown agent topic kind {kind!r}")
    return f"{base(run)}/agent/+/{kind}"


def agent_filters(run: str) -> list[str]:
    """What the orchestrator subscribes to: everything agents send (not the inboxes)."""
    return [agent_filter(run, kind) for kind in AGENT_KINDS]


@dataclass(frozen=True)
class Send:
    """A publish for the transport to carry out; both state machines return these.

    ``qos`` is MQTT's: 1 (at least once) unless losing the message costs nothing but
    time. A round start goes at 0: it is not retained and is worthless after its deadline,
    so a lost one costs that agent's contribution to one round, while at 1 every
    participant's start would cost two more packets (a PUBACK on each leg).
    """

    topic: str
    payload: bytes
    retain: bool = False
    qos: int = 1


@dataclass(frozen=True)
class AgentTopic:
    agent_id: str
    kind: str


def parse_agent_topic(run: str, topic: str) -> AgentTopic:
    """Split ``zowarmup/<run>/agent/<id>/<kind>``; refuse anything else."""
    prefix = f"{base(run)}/agent/"
    parts = topic[len(prefix):].split("/") if topic.startswith(prefix) else []
    if len(parts) != 2 or parts[1] not in AGENT_KINDS:
        raise ProtocolError(f"topic {topic!r} is not an agent topic of run {run!r}", "bad_topic")
    return AgentTopic(check_identifier(parts[0], "agent id in topic"), parts[1])


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 section 4.7 matching of ``+`` (one level) and ``#`` (the rest)."""
    fparts, tparts = topic_filter.split("/"), topic.split("/")
    for i, f in enumerate(fparts):
        if f == "#":
            return not (i == 0 and topic.startswith("$"))
        if i >= len(tparts) or (f != "+" and f != tparts[i]):
            return False
        if f == "+" and i == 0 and topic.startswith("$"):
            return False
    return len(fparts) == len(tparts)
