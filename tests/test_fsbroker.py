"""The filesystem broker writes each message atomically: a consumer never takes a message the
producer is still writing (kombu's own transport let a worker read an empty file and stop)."""

from __future__ import annotations

from pathlib import Path

from kombu import Connection

from config.paths import broker_folders, filesystem_transport_options


def test_a_message_is_invisible_until_complete_then_delivered_whole(tmp_path):
    for folder in broker_folders(tmp_path).values():
        folder.mkdir(parents=True, exist_ok=True)
    options = filesystem_transport_options(tmp_path)
    with Connection(
        "filesystem://", transport="config.fsbroker:Transport", transport_options=options
    ) as connection:
        channel = connection.default_channel
        assert type(channel).__module__ == "config.fsbroker"
        folder = Path(options["data_folder_out"])
        # A message being written (the partial name) is not taken by a consumer.
        (folder / ".1_x.q.msg.partial").write_bytes(b"")
        channel._put("q", {"body": "x" * 100_000})
        assert channel._size("q") == 1
        assert channel._get("q") == {"body": "x" * 100_000}
        assert channel._size("q") == 0
        assert [p.name for p in folder.iterdir()] == [".1_x.q.msg.partial"]
