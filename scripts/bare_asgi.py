"""The baseline of scripts/bench_serve.py: a bare ASGI app on the same server stack as
`trainer serve` (uvicorn, with uvloop and httptools where installed) that reads the same
JSON body, parses it and answers a small JSON reply, with no model. What the HTTP stack
itself allows on this machine.

    python scripts/bare_asgi.py PORT
"""

from __future__ import annotations

import json
import sys


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    doc = json.loads(body) if body else {}
    reply = json.dumps({"instances": len(doc.get("instances", []))}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(reply)).encode())]})
    await send({"type": "http.response.body", "body": reply})


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
                access_log=False, lifespan="off")
