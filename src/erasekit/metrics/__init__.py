"""Metrics: concept reproduction rate with Wilson intervals, and the cost of a step (time, memory, images)."""

from erasekit.metrics.cost import Cost, measure_cost
from erasekit.metrics.crr import concept_reproduction_rate, crr_summary, wilson_interval

__all__ = ["concept_reproduction_rate", "crr_summary", "wilson_interval", "Cost", "measure_cost"]
