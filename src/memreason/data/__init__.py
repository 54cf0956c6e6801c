"""Data sources that become Traces: file loaders, bundled data, the synthetic world (``data.world``) and the
annotation agent (``data.annotate``)."""

from memreason.data.loaders import (BUNDLED, LoadReport, load_dataset, load_traces, require_steps, source_task,
                                    training_traces, write_jsonl)

__all__ = ["BUNDLED", "LoadReport", "load_dataset", "load_traces", "require_steps", "source_task",
           "training_traces", "write_jsonl"]
