"""The planner's one error type."""

from __future__ import annotations


class PlanError(ValueError):
    """A request the planner cannot answer: the message says why and what would fit."""
