"""Ray Data options for one block of driver code, restored when it ends (:func:`scoped`).

Ray Data reads its options from one DataContext per process. An option set and left there by one function (no
progress bars, for the prepare stage) silently changes every later Ray Data call of the same driver. Scoped, each
caller says what it needs. A dataset copies the current context when it is created and executes with that copy,
so the datasets built inside the block keep the options after it ends (load_splits returns such datasets).
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def scoped(*, enable_progress_bars: bool | None = None, preserve_order: bool | None = None):
    """Set the given DataContext options for the block and restore their previous values after it (None: leave
    that option as it is). Yields the current ``ray.data.DataContext``.

    ``enable_progress_bars``: Ray Data's console progress bars (off: one bar per operator floods job logs).
    ``preserve_order``: ``execution_options.preserve_order`` (on: the same row order in every run with the same
    seed).
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    wanted = [(ctx, "enable_progress_bars", enable_progress_bars),
              (ctx.execution_options, "preserve_order", preserve_order)]
    changes = [(owner, name, value) for owner, name, value in wanted if value is not None]
    before = [(owner, name, getattr(owner, name)) for owner, name, _ in changes]
    for owner, name, value in changes:
        setattr(owner, name, value)
    try:
        yield ctx
    finally:
        for owner, name, value in before:
            setattr(owner, name, value)
