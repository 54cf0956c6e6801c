"""Hooks that cannot outlive their scope: the shared plumbing of every intervention.

``scoped_hooks()`` is a context manager that hands out a ``HookScope``; every handle registered through it
is removed in ``finally``, so an exception inside the block (or inside a hook) leaves no hook behind.
Scopes nest: an inner scope removes only its own handles. PyTorch hooks are global state on the module
(the footgun TransformerLens documents in ``HookedRootModule``), hence the scope. ``hook_count`` counts
what is attached, for leak checks.

Where the hooks go (decoder layers, attention blocks, norms, heads) is ``memreason.model.layers``' job.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


class HookScope:
    """Registers hooks and remembers every handle so that ``remove()`` detaches exactly these hooks.

    Obtain one from ``scoped_hooks()`` rather than building it directly; the context manager guarantees
    ``remove()`` runs.
    """

    def __init__(self) -> None:
        self._handles: list = []

    def add_forward_hook(self, module, hook: Callable, *, with_kwargs: bool = False):
        """``module.register_forward_hook(hook, with_kwargs=...)``, remembered for removal."""
        handle = module.register_forward_hook(hook, with_kwargs=with_kwargs)
        self._handles.append(handle)
        return handle

    def add_forward_pre_hook(self, module, hook: Callable, *, with_kwargs: bool = False):
        """``module.register_forward_pre_hook(hook, with_kwargs=...)``, remembered for removal."""
        handle = module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
        self._handles.append(handle)
        return handle

    def __len__(self) -> int:
        return len(self._handles)

    def remove(self) -> None:
        """Detach every hook this scope registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()


@contextlib.contextmanager
def scoped_hooks() -> Iterator[HookScope]:
    """A ``HookScope`` whose hooks are removed when the block exits, normally or by an exception.

    Example::

        with scoped_hooks() as scope:
            scope.add_forward_hook(layout(model).attention(3), my_hook)
            model(**batch)
        # no hook left on the model here
    """
    scope = HookScope()
    try:
        yield scope
    finally:
        scope.remove()


def hook_count(model) -> int:
    """Number of forward and forward-pre hooks attached anywhere in ``model`` (for leak checks)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
