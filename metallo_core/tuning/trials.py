"""A search's trials as plain rows: how each ended, which is the best, and the table of them (no Ray, no
MLflow: `runner` makes the rows from Tune's results, `search_runs` records them)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from metallo_core.errors import MetalloError
from metallo_core.tuning.space import decode_params, describe_params


@dataclass
class TrialRow:
    """One trial as the search saw it: its parameters, its objective, and how it ended."""

    trial_id: str
    params: dict[str, Any]
    objective: float | None  # None: the trial failed before reporting
    budget_used: float  # epochs or meta-val tasks done (the scheduler's time axis)
    completed: bool  # ran its whole budget (not stopped early by the scheduler, not failed)
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False  # the search stopped while this trial was pending or running

    @property
    def status(self) -> str:
        if self.error:
            return "failed"
        if self.completed:
            return "completed"
        return "interrupted" if self.interrupted else "stopped early"


def best_trial(rows: list[TrialRow]) -> TrialRow:
    """The trial with the highest objective among those that ran their whole budget; trials stopped early
    are judged on less (fewer epochs, fewer tasks) and only count when none finished."""
    scored = [row for row in rows if row.objective is not None and not row.error]
    if not scored:
        raise MetalloError("no trial of the search reported its objective; see the trial errors above")
    complete = [row for row in scored if row.completed] or scored
    return max(complete, key=lambda row: (row.objective, -len(row.trial_id), row.trial_id))


def trials_table(rows: list[TrialRow], metric: str, time_attr: str, best: TrialRow | None = None) -> str:
    """The trials as a markdown table, best first."""
    keys = sorted({key for row in rows for key in row.params})
    header = ["trial", metric, time_attr, "status", *keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ordered = sorted(rows, key=lambda row: (row.objective is None, -(row.objective or 0.0)))
    for row in ordered:
        mark = " (best)" if best is not None and row.trial_id == best.trial_id else ""
        values = [describe_params({key: row.params[key]}).split("=", 1)[1] if key in row.params else ""
                  for key in keys]
        objective = f"{100 * row.objective:.2f}%" if row.objective is not None else "-"
        lines.append(f"| {row.trial_id}{mark} | {objective} | {row.budget_used:g} | {row.status} | "
                     + " | ".join(values) + " |")
    return "\n".join(lines)


def best_setting_tags(params: Mapping[str, Any]) -> dict[str, str]:
    """The best trial's settings as parent-run tags, `metallo.tune.best.<setting>` (lists as JSON)."""
    return {f"metallo.tune.best.{key}": json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            for key, value in decode_params(params).items()}
