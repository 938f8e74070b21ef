"""The OpenAPI 3.0 document of /api/ (served at /api/openapi.json; tests/test_api.py runs
schemathesis against it, so it must say exactly what the handlers in api.py answer)."""

from __future__ import annotations

from typing import Any

from bridge import __version__
from bridge.store.history import CURSOR, EVENT_CURSOR, MAX_LIMIT

# What each parameter may be, checked by api.py with the same patterns. Short enough that a URL
# carrying every parameter at its longest stays within the server's 8 KiB request line.
SOURCE = r"^[a-z0-9_-]{1,64}$"  # as sources: names are
TYPE = r"^[a-z0-9_.-]{1,64}\*?$"  # task.succeeded, or task.* for a family
EVENT_ID = r"^[A-Za-z0-9_.:-]{1,128}$"
TEXT = r"^[^\u0000]{1,128}$"  # a task id, a target name: anything but NUL
MAX_TYPES = 5

_TIME = {"type": "string", "format": "date-time"}


def _str(pattern: str) -> dict[str, Any]:
    return {"type": "string", "pattern": pattern}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": {
        "description": "a parameter or cursor is not valid (text/plain: the HTTP server refused "
        "the request line itself, e.g. over 8 KiB)",
        "content": {
            "application/json": {"schema": _ref("Error")},
            "text/plain": {"schema": {"type": "string"}},
        },
    },
    "401": _json(_ref("Error"), "not logged in and no valid bearer token"),
    "503": {"description": "the bridge is between two configurations (a reload)"},
}

_LIMIT = {
    "name": "limit",
    "in": "query",
    "description": "page size",
    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 50},
}
_CURSOR = {
    "name": "cursor",
    "in": "query",
    "description": "`next` of the previous page",
    "schema": _str(CURSOR),
}
_EVENT_CURSOR = {**_CURSOR, "schema": _str(EVENT_CURSOR)}


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "description": description, "schema": schema}


def _path(name: str, description: str, pattern: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": _str(pattern),
    }


_DELIVERY = {
    "type": "object",
    "required": [
        "id",
        "event_id",
        "target",
        "rule",
        "state",
        "attempts",
        "created_at",
        "updated_at",
        "next_at",
        "last_error",
    ],
    "properties": {
        "id": {"type": "string", "description": "{event id}:{target}"},
        "event_id": {"type": "string"},
        "target": {"type": "string"},
        "rule": {"type": "string"},
        "state": {"type": "string", "enum": ["pending", "inflight", "sent", "dead"]},
        "attempts": {"type": "integer", "minimum": 0},
        "created_at": _TIME,
        "updated_at": {**_TIME, "description": "for a dead letter: when it died"},
        "next_at": {**_TIME, "nullable": True, "description": "when it is tried next (waiting)"},
        "last_error": {"type": "string", "nullable": True},
    },
}

_CLOUDEVENT = {
    "type": "object",
    "description": "The event as CloudEvents 1.0 JSON, exactly as a webhook target receives it",
    "required": ["specversion", "id", "type", "source", "subject", "time", "data"],
    "properties": {
        "specversion": {"type": "string", "enum": ["1.0"]},
        "id": {"type": "string"},
        "type": {"type": "string", "example": "task.succeeded"},
        "source": {"type": "string", "example": "bridge/mj"},
        "subject": {"type": "string", "description": "the task id (the source name for source.*)"},
        "time": _TIME,
        "datacontenttype": {"type": "string"},
        "data": {"type": "object", "description": "task: the task as the upstream sent it"},
    },
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "mj-bridge",
        "version": __version__,
        "description": "What the bridge saw and did: events, tasks, deliveries, dead letters. "
        "Read-only. Behind server.auth: a logged-in session or `Authorization: Bearer TOKEN`.",
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}},
            },
            "CloudEvent": _CLOUDEVENT,
            "Delivery": _DELIVERY,
            "DeadLetter": {
                "allOf": [
                    _ref("Delivery"),
                    {
                        "type": "object",
                        "required": ["event"],
                        "properties": {"event": _ref("CloudEvent")},
                    },
                ]
            },
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/api/events": {
            "get": {
                "operationId": "listEvents",
                "summary": "Events, newest first",
                "parameters": [
                    {
                        **_query(
                            "type",
                            "event type; `task.*` for a family; repeatable",
                            {"type": "array", "items": _str(TYPE), "maxItems": MAX_TYPES},
                        ),
                        "style": "form",
                        "explode": True,
                    },
                    _query("source", "only this source's events", _str(SOURCE)),
                    _query("task", "only this task's events (the CloudEvent subject)", _str(TEXT)),
                    _query(
                        "q",
                        "only events whose JSON holds this text, any case (prompt, id, reason)",
                        _str(TEXT),
                    ),
                    _query("since", "events at or after this time", _TIME),
                    _query("until", "events before this time", _TIME),
                    _EVENT_CURSOR,
                    _LIMIT,
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["events", "next"],
                            "properties": {
                                "events": {"type": "array", "items": _ref("CloudEvent")},
                                "next": {
                                    "type": "string",
                                    "nullable": True,
                                    "description": "cursor of the next page; null at the end",
                                },
                            },
                        },
                        "a page of events",
                    ),
                    **_ERRORS,
                },
            }
        },
        "/api/events/{id}": {
            "get": {
                "operationId": "getEvent",
                "summary": "One event and its deliveries",
                "parameters": [_path("id", "the event id", EVENT_ID)],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["event", "deliveries"],
                            "properties": {
                                "event": _ref("CloudEvent"),
                                "deliveries": {"type": "array", "items": _ref("Delivery")},
                            },
                        },
                        "the event",
                    ),
                    "404": _json(_ref("Error"), "no such event"),
                    **_ERRORS,
                },
            }
        },
        "/api/tasks/{source}/{id}": {
            "get": {
                "operationId": "getTask",
                "summary": "One task: its state, its events (oldest first) and their deliveries",
                "parameters": [
                    _path("source", "the source's name", SOURCE),
                    _path("id", "the task id", TEXT),
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["source", "id", "state", "events", "deliveries"],
                            "properties": {
                                "source": {"type": "string"},
                                "id": {"type": "string"},
                                "state": {
                                    "type": "object",
                                    "nullable": True,
                                    "required": [
                                        "status",
                                        "progress",
                                        "finished",
                                        "stalled",
                                        "changed_at",
                                    ],
                                    "properties": {
                                        "status": {"type": "string"},
                                        "progress": {"type": "integer", "minimum": -1},
                                        "finished": {"type": "boolean"},
                                        "stalled": {"type": "boolean"},
                                        "changed_at": _TIME,
                                    },
                                },
                                "events": {"type": "array", "items": _ref("CloudEvent")},
                                "deliveries": {"type": "array", "items": _ref("Delivery")},
                            },
                        },
                        "the task",
                    ),
                    "404": _json(_ref("Error"), "the bridge knows no such task"),
                    **_ERRORS,
                },
            }
        },
        "/api/dead-letters": {
            "get": {
                "operationId": "listDeadLetters",
                "summary": "Dead letters, newest first (by when they died)",
                "parameters": [_query("target", "only this target's", _str(TEXT)), _CURSOR, _LIMIT],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["dead_letters", "next"],
                            "properties": {
                                "dead_letters": {"type": "array", "items": _ref("DeadLetter")},
                                "next": {"type": "string", "nullable": True},
                            },
                        },
                        "a page of dead letters",
                    ),
                    **_ERRORS,
                },
            }
        },
        "/api/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.0",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "401": _ERRORS["401"],
                },
            }
        },
    },
}
