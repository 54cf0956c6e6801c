"""memreason: make an LLM's knowledge recall and its reasoning separate, visible and repairable.

    import memreason
    mr = memreason.load("runs/demo")          # a trained run, or None for the embedded SmolLM2
    trace = mr.answer("Could a penguin walk from Antarctica to the Sahara?")
    for step in trace.steps:
        print(step.kind, step.text)
"""

__version__ = "0.1.0"

__all__ = ["Reasoner", "Step", "Trace", "__version__", "load"]


def __getattr__(name):
    # Lazy: `import memreason` and `memreason --help` must not import torch.
    if name in ("load", "Reasoner"):
        from memreason import api

        return getattr(api, name)
    if name in ("Step", "Trace"):
        from memreason import traces

        return getattr(traces, name)
    raise AttributeError(f"module 'memreason' has no attribute {name!r}")
