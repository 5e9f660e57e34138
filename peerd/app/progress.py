"""The progress bar of ``peer get`` on a terminal (rich, on stderr)."""

from __future__ import annotations

from types import TracebackType

import trio
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from peerd.node.driver import Content

__all__ = ["PolledProgress", "ProgressView"]


def _bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[peers]} peers"),
        console=Console(stderr=True),
        transient=False,
    )


class ProgressView:
    """A rich progress bar fed from a running :class:`Content`; inert when disabled."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Progress | None = _bar() if enabled else None

    def __enter__(self) -> ProgressView:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def track(self, nursery: trio.Nursery, content: Content) -> None:
        """Start updating the bar from ``content`` until it completes."""
        progress = self._progress
        if progress is None:
            return
        # The name comes from a remote manifest: shown as it is, never as markup.
        task = progress.add_task(escape(content.info.name), total=content.info.size, peers=0)

        async def update() -> None:
            while True:
                progress.update(task, completed=content.have_bytes, peers=len(content.sessions))
                if content.completed.is_set():
                    return
                with trio.move_on_after(0.25):
                    await content.completed.wait()

        nursery.start_soon(update)


class PolledProgress:
    """The same bar, fed by whoever polls (``peer get`` following a daemon's
    status); inert when disabled. Not async: the caller updates it.

    Made first and started apart (:meth:`start`), so that a Ctrl-C arriving
    while it starts still finds an object to :meth:`close`.
    """

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def start(self, name: str, size: int) -> None:
        if not self.enabled or self._progress is not None:
            return
        self._progress = _bar()
        # A remote manifest's name: shown as it is, never as markup.
        self._task = self._progress.add_task(escape(name), total=size, peers=0)
        self._progress.start()

    def update(self, have: int, peers: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=have, peers=peers)

    def close(self) -> None:
        """Stop the bar (its last state stays on screen); idempotent."""
        progress, self._progress = self._progress, None
        if progress is not None:
            progress.stop()
