"""Experiments: each a settings dataclass + run(); mechanisms live in interventions/."""
