"""The JSON problem body (``title``, ``status``, ``detail``) of the sandbox's HTTP errors."""

from __future__ import annotations

import json
from http import HTTPStatus


def problem(status: int, detail: str) -> bytes:
    return json.dumps({"title": reason_phrase(status), "status": status, "detail": detail}).encode()


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
