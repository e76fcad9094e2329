"""kombu's filesystem transport with atomic message files.

kombu writes a message straight into its final name and takes a lock, but the consumer moves
files away without looking at the lock: a worker can take a message the web process has only
begun to write and fail on an empty payload ("Expecting value: line 1 column 1"), which stops
the worker. Here each message is written under a name the consumer does not pick up and renamed
into place once complete (a rename is atomic within a directory).
"""

from __future__ import annotations

import os
import uuid
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


class Transport(filesystem.Transport):
    Channel = Channel
