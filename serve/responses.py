"""What the experts middleware changes in vLLM's answers: the experts (or adapter) a request
ran with, added to the JSON body, every server-sent event and a header; and /v1/models cut down
to the names the caller may use (an adapter's files stay private).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]

HEADER = b"x-composer-experts"


class ReportingSend:
    """Adds the header, and `experts` to the JSON body or to every server-sent event."""

    def __init__(self, send: Send, allowed: list[str]) -> None:
        self.send = send
        self.allowed = allowed
        self.mode = "pass"
        self.buffer = b""
        self.start: Message | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
            headers.append((HEADER, ",".join(self.allowed).encode()))
            ctype = dict((k.lower(), v) for k, v in headers).get(b"content-type", b"")
            if message["status"] == 200 and ctype.startswith(b"application/json"):
                self.mode = "json"
            elif message["status"] == 200 and ctype.startswith(b"text/event-stream"):
                self.mode = "sse"
            if self.mode == "json":  # length changes: hold the start until the body is known
                self.start = {**message, "headers": headers}
                return
            await self.send({**message, "headers": headers})
            return
        if message["type"] != "http.response.body" or self.mode == "pass":
            await self.send(message)
            return
        self.buffer += message.get("body", b"")
        more = message.get("more_body", False)
        if self.mode == "json":
            if more:
                return
            body = self._inject_json(self.buffer)
            assert self.start is not None
            headers = [(k, v) for k, v in self.start["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await self.send({**self.start, "headers": headers})
            await self.send({"type": "http.response.body", "body": body})
            return
        events, sep, rest = self.buffer.rpartition(b"\n\n")
        self.buffer = rest
        out = (
            b"".join(self._inject_event(e) + b"\n\n" for e in events.split(b"\n\n")) if sep else b""
        )
        if not more and self.buffer:
            out += self.buffer
            self.buffer = b""
        await self.send({"type": "http.response.body", "body": out, "more_body": more})

    def _inject_json(self, body: bytes) -> bytes:
        try:
            obj = json.loads(body)
        except ValueError:
            return body
        if isinstance(obj, dict):
            obj["experts"] = self.allowed
            return json.dumps(obj).encode()
        return body

    def _inject_event(self, event: bytes) -> bytes:
        if not event.startswith(b"data: ") or event == b"data: [DONE]":
            return event
        try:
            obj = json.loads(event[6:])
        except ValueError:
            return event
        if isinstance(obj, dict):
            obj["experts"] = self.allowed
        return b"data: " + json.dumps(obj).encode()


class ModelsFilter:
    """Buffers a 200 JSON /v1/models answer and keeps the cards whose `id` the caller may use;
    each kept card's `root` (for an adapter, the checkout folder vLLM loaded it from) becomes
    its id (`parent`, the base's served name, stays). Anything else passes unchanged."""

    def __init__(self, send: Send, visible: Collection[str]) -> None:
        self.send = send
        self.visible = set(visible)
        self.start: Message | None = None
        self.buffer = b""

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            if message["status"] == 200:
                self.start = message
                return
            await self.send(message)
            return
        if self.start is None or message["type"] != "http.response.body":
            await self.send(message)
            return
        self.buffer += message.get("body", b"")
        if message.get("more_body", False):
            return
        body = self._filter(self.buffer)
        headers = [
            (k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-length"
        ]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({**self.start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    def _filter(self, body: bytes) -> bytes:
        try:
            doc = json.loads(body)
        except ValueError:
            return body
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
            return body
        cards = [c for c in doc["data"] if isinstance(c, dict) and c.get("id") in self.visible]
        for card in cards:
            card["root"] = card["id"]
        doc["data"] = cards
        return json.dumps(doc).encode()
