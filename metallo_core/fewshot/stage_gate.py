"""Whether a training stage earned its place: its output scored against its baseline on the same held-apart
selection tasks, kept only when the paired gain's 95% interval lies above a minimum gain.

Pure maths on per-task accuracies (no Ray, no MLflow); `train/gate.py` probes the backbones and acts on the
verdict (registry alias, MLflow run)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from metallo_core.fewshot.metrics import mean_and_ci95, paired_gain

POINTS = 100.0  # accuracies are fractions; verdicts speak in percentage points


@dataclass(frozen=True)
class Interval:
    """A mean and the half width of its 95% interval, as fractions (0.012 is 1.2 points)."""

    mean: float
    ci95: float

    @property
    def low(self) -> float:
        return self.mean - self.ci95

    def in_points(self, signed: bool = False) -> str:
        mean = f"{self.mean * POINTS:+.1f}" if signed else f"{self.mean * POINTS:.1f}"
        return f"{mean} ± {self.ci95 * POINTS:.1f}"


@dataclass(frozen=True)
class StageVerdict:
    """What a stage's gate decided. `before`, `after` and `gain` are None when there was no baseline to
    compare with (then `kept` is True and `reason` says so); `tasks` is then 0."""

    stage: str  # "pretrain", "metatrain"
    trained_on: str  # in words: the data the stage trained on
    baseline: str  # in words: what the output was compared with
    before: Interval | None  # the baseline's selection accuracy
    after: Interval | None  # the stage output's selection accuracy
    gain: Interval | None  # paired per task: after - before
    tasks: int
    kept: bool
    reason: str

    @property
    def compared(self) -> bool:
        return self.gain is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """One line for the console: the stage, the scores and the decision."""
        if not self.compared:
            return f"{self.stage} gate: {self.reason}"
        assert self.before is not None and self.after is not None
        decision = "kept" if self.kept else "not kept"
        return (f"{self.stage} gate: selection accuracy {self.before.in_points()} -> {self.after.in_points()} % "
                f"on {self.tasks} tasks against {self.baseline}: {decision}; {self.reason}")


def judge(stage: str, trained_on: str, baseline: str, before_accuracies: Sequence[float],
          after_accuracies: Sequence[float], min_gain: float = 0.0) -> StageVerdict:
    """The verdict on a stage from per-task selection accuracies of its baseline (`before_accuracies`) and its
    output (`after_accuracies`) on the same tasks, in the same order: kept iff the lower end of the paired
    gain's 95% interval is above `min_gain` (a fraction: 0.01 is one point)."""
    if len(before_accuracies) != len(after_accuracies):
        raise ValueError(f"the baseline was scored on {len(before_accuracies)} tasks and the stage output on "
                         f"{len(after_accuracies)}; a paired gain needs the same tasks for both")
    if len(before_accuracies) < 2:
        raise ValueError("a 95% interval needs at least 2 selection tasks")
    before = Interval(*mean_and_ci95(before_accuracies))
    after = Interval(*mean_and_ci95(after_accuracies))
    gain = Interval(*paired_gain(before_accuracies, after_accuracies))
    kept = gain.low > min_gain
    return StageVerdict(stage=stage, trained_on=trained_on, baseline=baseline, before=before, after=after,
                        gain=gain, tasks=len(before_accuracies), kept=kept,
                        reason=_reason(gain, min_gain, kept))


def unopposed(stage: str, trained_on: str, why: str) -> StageVerdict:
    """The verdict when there is nothing to compare with (e.g. a scratch start and no model at the alias yet):
    the output is kept, and `why` says why no comparison was made."""
    return StageVerdict(stage=stage, trained_on=trained_on, baseline="none", before=None, after=None, gain=None,
                        tasks=0, kept=True, reason=f"no baseline to compare with ({why}): kept")


def _reason(gain: Interval, min_gain: float, kept: bool) -> str:
    bar = "0" if min_gain == 0 else f"the minimum gain {min_gain * POINTS:+.1f}"
    stated = f"gain {gain.in_points(signed=True)} points"
    if kept:
        return f"{stated}: the interval lies above {bar}, the stage output replaces the baseline"
    if gain.low <= min_gain < gain.mean + gain.ci95:
        return f"{stated}: the interval includes {bar}, the baseline stays"
    return f"{stated}: the interval lies below {bar}, the baseline stays"


def stage_table(verdicts: Sequence[StageVerdict]) -> str:
    """A markdown table of the verdicts, one row per stage."""
    rows = ["| stage | trained on | selection accuracy before -> after | paired gain | kept? | why |",
            "|---|---|---|---|---|---|"]
    for verdict in verdicts:
        if verdict.compared:
            assert verdict.before is not None and verdict.after is not None and verdict.gain is not None
            scores = f"{verdict.before.in_points()} -> {verdict.after.in_points()} % ({verdict.tasks} tasks)"
            gain = f"{verdict.gain.in_points(signed=True)} points"
        else:
            scores, gain = "n/a", "n/a"
        cells = [verdict.stage, verdict.trained_on, scores, gain, "yes" if verdict.kept else "no", verdict.reason]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)
