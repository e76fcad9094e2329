"""kombu's filesystem transport with atomic message files.

kombu writes a message straight into its final name and takes a lock, but the consumer moves
files away without looking at the lock: a worker can take a message the web process has only
begun to write and fail on an empty payload ("Expecting value: line 1 column 1"), which stops
the worker. Here each message is written under a name the consumer does not pick up and renamed
into place once complete (a rename is atomic within a directory).

The exchange tables (which queues a broadcast reaches: every worker binds its own at startup)
have the same flaw: kombu creates a table's file empty and writes it only after taking that
file's lock, so a second worker starting at the same moment can lock the empty file first and
stop on it. Here every change and read of a table holds one lock file in the control folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from collections.abc import Iterator
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        # The consumer only takes names whose part after the first dot is "<queue>.msg".
        partial = os.path.join(self.data_folder_out, f".{name}.partial")
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {name!r} to directory") from exc

    @contextlib.contextmanager
    def _tables_locked(self, mode: int) -> Iterator[None]:
        self.control_folder.mkdir(exist_ok=True)
        with open(self.control_folder / ".tables.lock", "a") as handle:
            fcntl.flock(handle.fileno(), mode)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def get_table(self, exchange: str) -> list:
        with self._tables_locked(fcntl.LOCK_SH):
            return super().get_table(exchange)

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        with self._tables_locked(fcntl.LOCK_EX):
            super()._queue_bind(exchange, routing_key, pattern, queue)

    def _delete(self, queue: str, exchange: str, routing_key: str, pattern: str, *args, **kwargs):
        with self._tables_locked(fcntl.LOCK_EX):
            super()._delete(queue, exchange, routing_key, pattern, *args, **kwargs)


class Transport(filesystem.Transport):
    Channel = Channel
