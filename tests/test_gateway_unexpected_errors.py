"""An unexpected failure inside the gateway is a plain OpenAI-shaped 500, never a debug page."""

from __future__ import annotations

import logging

import pytest

from gateway import views


@pytest.fixture
def recorded(monkeypatch) -> list:
    records: list = []
    monkeypatch.setattr(views.writer, "submit", records.append)
    return records


def test_unexpected_exception_becomes_an_openai_500_without_its_message(
    client, monkeypatch, recorded, canary_key, caplog, settings
):
    settings.DEBUG = True  # even with a debug page available, the gateway never renders it

    async def explode(*args, **kwargs):
        raise RuntimeError(f"boom while holding {canary_key}")

    monkeypatch.setattr(views.router, "resolve", explode)
    caplog.set_level(logging.DEBUG)

    response = client.post(
        "/v1/chat/completions",
        data={"model": "kilo/preview-x", "messages": []},
        content_type="application/json",
    )

    assert response.status_code == 500
    assert response.json() == {
        "error": {
            "message": "The gateway failed to handle this request.",
            "type": "server_error",
            "code": "internal_error",
        }
    }
    assert canary_key not in response.content.decode()
    assert canary_key not in caplog.text
    assert "RuntimeError" in caplog.text
    (usage,) = recorded
    assert (usage.status_code, usage.error_kind) == (500, "internal_error")
