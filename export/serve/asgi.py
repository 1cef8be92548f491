"""The ASGI plumbing of `trainer serve`'s gate: a bounded body read, a reply, a JSON
error, and the scope and receive of a request the gate makes itself. No framework."""

from __future__ import annotations

from export.serve.payloads import RequestError, dumps


async def read_body(receive, headers: dict, limit: int) -> bytes:
    declared = headers.get(b"content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise RequestError(413, f"body: {int(declared):,} bytes; at most {limit:,} "
                                        "(--max-body-mb)")
        except ValueError:
            raise RequestError(400, "Content-Length: not a number") from None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RequestError(400, "body: the client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body: more than {limit:,} bytes (--max-body-mb)")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def replaced_body(scope: dict, body: bytes) -> dict:
    headers = [(k, v) for k, v in scope["headers"]
               if k not in (b"content-length", b"content-type")]
    headers += [(b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode())]
    return {**scope, "headers": headers, "state": {}}


def body_receiver(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def respond(send, status: int, body: bytes, content_type: str = "application/json",
                   extra: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()),
                            (b"content-length", str(len(body)).encode()), *(extra or [])]})
    await send({"type": "http.response.body", "body": body})


async def error(send, status: int, message: str, extra: list | None = None) -> None:
    await respond(send, status, dumps({"error": message}), extra=extra)
