"""The operator's view of a run, live or finished: ``zowarmup status`` and ``--metrics-port``.

How a live run's agent states get out of the orchestrator: after every round it replaces
``fleet.json`` in the run directory (written to a temporary file, then renamed, so a reader
never sees half of it) with what its coordinator knows of each agent. That is the same
state the rounds are drawn from, so the view cannot disagree with what the run does; it
needs no broker credentials and no connection, works for a finished or stopped run, and
costs one small write per round. Between rounds it can be a round old; ``--broker URL``
adds what the broker knows right now: each agent's retained status, which its last will
turns to offline the moment its connection dies.

Everything else comes from files the run writes anyway: ``state.json`` (phase, planned
rounds, the orchestrator's pid) and ``metrics.jsonl`` (rounds done, accuracy, round times,
from which the ETA follows).
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import time
from pathlib import Path

from protocols.coordinator import Coordinator

from .state import CONFIG, FLEET, RunDir

STATES = ("online", "catching up", "offline")


def fleet_view(coordinator: Coordinator, skipped: dict[str, str], rounds: int | None = None
               ) -> dict:
    """What the coordinator knows of every agent (and of agents left out of the last draw
    that it never heard from), as ``fleet.json`` holds it."""
    c, agents = coordinator, {}
    for agent_id in sorted(set(c.agents) | set(skipped)):
        state, why = c.state_of(agent_id)
        record = c.agents.get(agent_id)
        agents[agent_id] = {
            "state": state, "why": why,
            "last_seen": record.last_seen if record else None,
            "version": record.version if record else None,
            "behind": c.behind(agent_id),
            "answered": record.results if record else 0,
            "missed": record.missed_total if record else 0,
            "missed_in_a_row": record.missed if record else 0,
            "refused": dict(record.refused) if record else {},
        }
    return {"version": c.version, "rounds": rounds, "updated": time.time(), "pid": os.getpid(),
            "host": socket.gethostname(), "agents": agents}


def write_fleet(rd: RunDir, view: dict) -> None:
    """Replace ``fleet.json`` at once: a reader sees the old view or the new one."""
    tmp = rd.path / (FLEET + ".tmp")
    tmp.write_text(json.dumps(view, indent=1) + "\n")
    os.replace(tmp, rd.path / FLEET)


def read_status(run_dir: Path) -> dict:
    """The run as its directory tells it; raises ``FileNotFoundError`` for a directory
    that holds no run."""
    rd = RunDir(run_dir)
    if not rd.path.is_dir() or not (rd.path / CONFIG).exists():
        raise FileNotFoundError(f"{run_dir} holds no run (no {CONFIG})")
    state = rd.state()
    rows = rd.metrics()
    fleet = _read_json(rd.path / FLEET)
    done = rows[-1]["round"] + 1 if rows else 0
    planned = fleet.get("rounds") or state.get("rounds")
    accs = [r["test_acc"] for r in rows if r.get("test_acc") is not None]
    finished = state.get("phase") == "done"
    return {
        "dir": str(rd.path), "run": _run_name(rd.path), "phase": state.get("phase", "new"),
        "round": done, "rounds": planned, "test_acc": accs[-1] if accs else None,
        "eta_s": 0.0 if finished else _eta(rows, planned),
        "orchestrator": _orchestrator(state, fleet, finished),
        "fleet_updated": fleet.get("updated"), "agents": fleet.get("agents", {}),
    }


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _run_name(path: Path) -> str:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return str(tomllib.loads((path / CONFIG).read_text())["run"]["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return path.name


def _eta(rows: list[dict], planned: int | None) -> float | None:
    """Seconds left at the pace of the last rounds of this session (a resume restarts the
    clock, so only rows whose wall time grows count)."""
    if not planned or not rows:
        return None
    steps = [b["wall_s"] - a["wall_s"] for a, b in zip(rows[-11:], rows[-10:])
             if isinstance(a.get("wall_s"), (int, float)) and isinstance(b.get("wall_s"),
                                                                         (int, float))]
    steps = [s for s in steps if s > 0]
    if not steps:
        return None
    return max(0, planned - (rows[-1]["round"] + 1)) * statistics.median(steps)


def _orchestrator(state: dict, fleet: dict, finished: bool) -> dict:
    """Whether the run's process is still there: checked when it ran on this machine."""
    pid, host = fleet.get("pid") or state.get("pid"), fleet.get("host") or state.get("host")
    if finished:
        return {"state": "finished", "pid": pid}
    if not pid or host != socket.gethostname():
        return {"state": "unknown", "pid": pid, "host": host}
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return {"state": "stopped", "pid": pid}
    except (PermissionError, ValueError, OverflowError):
        pass
    return {"state": "running", "pid": pid}


def add_broker_view(status: dict, statuses: dict[str, str]) -> None:
    """Fold in each agent's retained status on the broker (``online`` / ``offline``)."""
    agents = status["agents"]
    for agent_id, said in sorted(statuses.items()):
        entry = agents.setdefault(agent_id, {"state": said, "why": "", "last_seen": None,
                                             "version": None, "behind": None, "answered": 0,
                                             "missed": 0, "missed_in_a_row": 0,
                                             "refused": {}})
        entry["broker"] = said
        if said == "offline" and entry["state"] != "offline":
            entry["state"], entry["why"] = "offline", "its status on the broker says offline"
        elif said == "online" and entry["state"] == "offline" and not entry["missed_in_a_row"]:
            entry["state"], entry["why"] = "online", "connected, per its status on the broker"


def broker_statuses(url: str, run_id: str, identity: tuple = (None, None, None),
                    wait_s: float = 2.0) -> dict[str, str]:
    """Every agent's retained status under the run's topics, read from the broker."""
    from edge_agent.mqtt import MqttTransport, Tls
    from protocols import topics
    from protocols.codec import decode
    from protocols.errors import ProtocolError
    from protocols.messages import Status

    username, password, tls = identity
    transport = MqttTransport(url, client_id=f"zowarmup-{run_id}-status-{os.getpid()}",
                              username=username, password=password,
                              tls=Tls(*tls) if tls else None)
    transport.subscribe(topics.agent_filter(run_id, "status"))
    found: dict[str, str] = {}
    try:
        transport.connect(10)
        end, quiet = time.monotonic() + wait_s, 0.5  # retained ones come at once
        while (message := transport.get(timeout=min(quiet, max(0.0, end - time.monotonic()))
                                        )) is not None:
            try:
                said = decode(message.payload)
            except ProtocolError:
                continue
            if isinstance(said, Status):
                found[said.agent_id] = said.state
    finally:
        transport.close()
    return found


def table(status: dict, now: float | None = None) -> list[str]:
    """The view as text lines, for a terminal."""
    now = time.time() if now is None else now
    s, o = status, status["orchestrator"]
    acc = "-" if s["test_acc"] is None else f"{s['test_acc']:.4f}"
    rounds = f"{s['round']} of {s['rounds']}" if s["rounds"] else str(s["round"])
    process = o["state"] + (f" (pid {o['pid']})" if o.get("pid") else "")
    lines = [f"run {s['run']} ({s['dir']}): phase {s['phase']}, round {rounds}, test acc "
             f"{acc}, ETA {_duration(s['eta_s'])}; orchestrator {process}"]
    if o["state"] == "stopped":
        lines.append(f"  the run stopped before it finished: continue it with "
                     f"`zowarmup resume {s['dir']}`")
    agents = s["agents"]
    if not agents:
        lines.append("no agent known yet (the fleet is listed once the rounds begin; "
                     "--broker URL shows who is connected now)")
        return lines
    counts = {state: sum(a["state"] == state for a in agents.values()) for state in STATES}
    age = "" if s["fleet_updated"] is None else \
        f" as of {_duration(max(0.0, now - s['fleet_updated']))} ago"
    lines.append(f"{len(agents)} agent(s){age}: " + ", ".join(f"{n} {state}"
                                                             for state, n in counts.items()))
    header = ("agent", "state", "last seen", "behind", "answered", "missed", "refused", "why")
    rows = [header] + [(
        agent, a["state"],
        "-" if a["last_seen"] is None else f"{_duration(max(0.0, now - a['last_seen']))} ago",
        "-" if a["behind"] is None else str(a["behind"]), str(a["answered"]), str(a["missed"]),
        ",".join(f"{k}={v}" for k, v in sorted(a["refused"].items())) or "-", a["why"] or "")
        for agent, a in sorted(agents.items())]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1]
              for r in rows]
    return [line.rstrip() for line in lines]


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
