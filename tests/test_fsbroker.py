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


def test_exchange_tables_are_never_read_half_written(tmp_path):
    """Workers starting together bind their queues to the same broadcast exchanges. kombu
    creates an exchange's table file empty and writes it after taking the file's lock, so
    another worker could lock the empty file first and fail on it ("Expecting value") at
    startup; here every table change and read is serialised."""
    import threading

    for folder in broker_folders(tmp_path).values():
        folder.mkdir(parents=True, exist_ok=True)
    options = filesystem_transport_options(tmp_path)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(n: int) -> None:
        with Connection(
            "filesystem://", transport="config.fsbroker:Transport", transport_options=options
        ) as connection:
            channel = connection.default_channel
            start.wait()
            for round_ in range(40):
                try:
                    channel._queue_bind(f"x{round_}", "", "", f"q{n}")
                    channel.get_table(f"x{round_}")
                except BaseException as err:  # collected for the assertion below
                    errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with Connection(
        "filesystem://", transport="config.fsbroker:Transport", transport_options=options
    ) as connection:
        for round_ in range(40):
            queues = {q.queue for q in connection.default_channel.get_table(f"x{round_}")}
            assert queues == {f"q{n}" for n in range(8)}
