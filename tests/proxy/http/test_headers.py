"""The request header policy's helpers."""

from __future__ import annotations

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
