"""The baseline of scripts/bench_serve.py: a bare ASGI app on the same server stack as
`trainer serve` (uvicorn, with uvloop and httptools where installed) that reads the same
JSON body, parses it with the server's JSON library (orjson, or the standard library's json
without it) and answers a small JSON reply, with no model. What the HTTP stack
itself allows on this machine.

    python scripts/bare_asgi.py PORT
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from export.serve_payloads import dumps, loads  # noqa: E402 (the server's JSON library)


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    doc = loads(body) if body else {}
    reply = dumps({"instances": len(doc.get("instances", []))})
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(reply)).encode())]})
    await send({"type": "http.response.body", "body": reply})


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
                access_log=False, lifespan="off")
