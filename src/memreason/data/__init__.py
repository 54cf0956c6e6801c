"""Data sources that become Traces: file loaders, bundled data (and later the synthetic world and the
annotation agent)."""

from memreason.data.loaders import BUNDLED, LoadReport, load_traces, require_steps, write_jsonl

__all__ = ["BUNDLED", "LoadReport", "load_traces", "require_steps", "write_jsonl"]
