"""Planning reranker training from a time budget instead of epochs.

An epoch over every (query, judged document) tuple scales with the judgments: 809 SciFact
queries give 919 tuples, 2,590 NFCorpus queries give 210,000. A budget does not: the trainer
measures what one step and one dev evaluation cost on this machine, then
:func:`plan_training` turns the budget into a step count, and the learning-rate schedule,
the warm-up phase, the dev evaluations and the checkpoints are all planned from that count.
The plan is saved with the checkpoints so a resumed run keeps the same schedule.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)?\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in ``"20m"``, ``"90s"``, ``"1.5h"`` or a plain number of seconds."""
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"training budget {text!r}: expected a duration such as 20m, 90s or 1.5h")
    seconds = float(match.group(1)) * _UNIT_SECONDS[(match.group(2) or "s").lower()]
    if seconds <= 0:
        raise ValueError(f"training budget {text!r} must be positive")
    return seconds


@dataclass(frozen=True)
class TrainingPlan:
    """Steps, schedule, evaluations and checkpoints of one training run (saved as plan.json)."""

    total_steps: int
    distillation_steps: int
    warmup_steps: int
    evaluation_steps: tuple[int, ...]
    checkpoint_every: int
    budget_seconds: float
    seconds_per_step: float
    seconds_per_evaluation: float

    @property
    def label_steps(self) -> int:
        return self.total_steps - self.distillation_steps

    def to_dict(self) -> dict:
        values = asdict(self)
        values["evaluation_steps"] = list(self.evaluation_steps)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> TrainingPlan:
        return cls(**{**values, "evaluation_steps": tuple(values["evaluation_steps"])})


def plan_training(
    budget_seconds: float,
    seconds_per_step: float,
    seconds_per_evaluation: float,
    evaluations: int,
    distillation_fraction: float,
    warmup_fraction: float,
    checkpoints: int,
    fixed_steps: int = 0,
    minimum_steps: int = 10,
) -> TrainingPlan:
    """Spend ``budget_seconds`` on steps and dev evaluations.

    ``evaluations`` dev evaluations are spread evenly over the label-learning steps, the first at
    the end of the warm-up (distillation) phase, the model the label phase starts from. The rest of
    the budget is steps: ``distillation_fraction`` of them distil the first stage, the remainder
    learn from judgments. ``fixed_steps`` > 0 replaces the budget's step count (tests, smoke runs).
    """
    if seconds_per_step <= 0:
        raise ValueError(f"seconds per step must be positive, got {seconds_per_step}")
    evaluations = max(1, evaluations)
    if fixed_steps > 0:
        total = fixed_steps
    else:
        for_steps = budget_seconds - evaluations * seconds_per_evaluation
        total = int(for_steps // seconds_per_step)
        if total < minimum_steps:
            raise ValueError(
                f"a training budget of {budget_seconds:.0f} s leaves {max(0, total)} steps at {seconds_per_step:.2f} s/step after "
                f"{evaluations} dev evaluations of {seconds_per_evaluation:.0f} s: raise --training.budget"
            )
    distillation = int(round(total * distillation_fraction))
    label = max(1, total - distillation)
    distillation = total - label
    interval = label / max(1, evaluations - 1) if evaluations > 1 else label
    points = sorted({distillation + int(round(i * interval)) for i in range(evaluations)} | {total})
    points = [step for step in points if step > 0]
    return TrainingPlan(
        total_steps=total,
        distillation_steps=distillation,
        warmup_steps=int(math.ceil(total * warmup_fraction)),
        evaluation_steps=tuple(points),
        checkpoint_every=max(1, total // max(1, checkpoints)),
        budget_seconds=float(budget_seconds),
        seconds_per_step=float(seconds_per_step),
        seconds_per_evaluation=float(seconds_per_evaluation),
    )
