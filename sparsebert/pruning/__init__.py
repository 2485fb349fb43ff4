"""Pruning: importance criteria (and, later, masks and schedules)."""

from sparsebert.pruning.importance import MODES, Importance, importance

__all__ = ["MODES", "Importance", "importance"]
