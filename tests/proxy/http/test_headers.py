"""The request header policy's helpers."""

from __future__ import annotations

import os
import uuid

from meshlet.proxy.http.headers import new_request_id


def test_request_ids_are_distinct_version_4_uuids_in_canonical_text() -> None:
    ids = [new_request_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == text


def test_a_forked_child_draws_fresh_request_ids() -> None:
    new_request_id()  # the buffer now holds ids the child must not repeat
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id, then leave at once
        os.write(write_end, new_request_id().encode())
        os._exit(0)
    os.close(write_end)
    try:
        child_id = os.read(read_end, 64).decode()
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert child_id and child_id != new_request_id()
