"""How every HTTP target judges an answer (bridge.targets.http.classify): the one table."""

from __future__ import annotations

import pytest

from bridge.targets.http import classify


@pytest.mark.parametrize(
    ("status", "retryable"),
    [
        (200, None),
        (204, None),
        (301, False),
        (400, False),
        (401, False),
        (404, False),
        (408, True),
        (410, False),
        (413, False),
        (425, True),
        (429, True),
        (500, True),
        (502, True),
        (503, True),
        (504, True),
    ],
    ids=str,
)
def test_classify(status: int, retryable: bool | None) -> None:
    error = classify(status, {"Retry-After": "7"})
    if retryable is None:
        assert error is None
        return
    assert error is not None
    assert error.retryable is retryable
    assert f"HTTP {status}" in str(error)
    assert error.retry_after == (7.0 if retryable else None)


def test_a_redirect_names_where_it_points() -> None:
    error = classify(308, {"Location": "https://elsewhere.example/hook"})
    assert error is not None
    assert "https://elsewhere.example/hook" in str(error)
