"""The figures of a run that its metrics rows alone decide: one computation for the summary
a finished run writes and for the report of a run still going."""

from __future__ import annotations

PHASES_WITH_BYTES = ("warmup", "zo", "fo")


def phase_figures(rows: list[dict]) -> dict:
    """Accuracies, the pivot, round counts and bytes per client and round, from the rows.

    The pivot is the end of the warm-up: ``pivot_round`` is the first ZO round (or
    first-order ceiling round) and ``pivot_acc`` the last warm-up evaluation before it;
    both are None while (or when) no such round has been logged. Bytes are per
    participating client and round, averaged over the phase.
    """
    evaluated = [r for r in rows if r.get("test_acc") is not None]
    zo_rounds = [r["round"] for r in rows if r["phase"] == "zo"]
    after = [r["round"] for r in rows if r["phase"] in ("zo", "fo")]  # what follows a pivot
    pivot_round = min(after) if after else None
    warm_evals = [r for r in evaluated if r["phase"] == "warmup"
                  and (pivot_round is None or r["round"] < pivot_round)]

    def per_client(phase: str, key: str) -> float:
        values = [r.get(key, 0) / r["participants"] for r in rows
                  if r["phase"] == phase and r.get("participants")]
        return sum(values) / len(values) if values else 0.0

    return {
        "final_acc": evaluated[-1]["test_acc"] if evaluated else None,
        "final_val_acc": evaluated[-1].get("val_acc") if evaluated else None,
        "best_acc": max((r["test_acc"] for r in evaluated), default=None),
        "pivot_acc": warm_evals[-1]["test_acc"] if warm_evals and after else None,
        "pivot_round": pivot_round,
        "warmup_rounds": len({r["round"] for r in rows if r["phase"] == "warmup"}),
        "zo_rounds": len(set(zo_rounds)),
        "bytes_per_client_round": {
            phase: {"uplink": per_client(phase, "uplink_bytes"),
                    "downlink": per_client(phase, "downlink_bytes")}
            for phase in PHASES_WITH_BYTES},
        "wall_s": rows[-1].get("wall_s") if rows else None,
    }
