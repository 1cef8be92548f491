"""The baselines of scripts/bench_serve.py: a bare ASGI app on the same server stack as
`trainer serve` (uvicorn, with uvloop and httptools where installed) that reads the same
JSON body, parses it with the server's JSON library (orjson, or the standard library's json
without it) and answers a small JSON reply, with no model: what the HTTP stack itself allows
on this machine.

With MODEL, the same app also does what any server of that model must: the body read into
the checked input array, one onnxruntime call (one thread), the reply's columns as JSON,
with the server's own functions (export/serve/payloads.py, export/runtime.Predictor) and
nothing else (no batching, metrics, drift counts or admission): the floor of a Python
server of this model on this stack.

    python scripts/bare_asgi.py PORT [MODEL]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from export.serve.payloads import dumps, encode_rows, loads, parse_request  # noqa: E402


def reply_for(model: str | None):
    """body -> reply bytes: the JSON's instance count, or the model's predictions."""
    if model is None:
        return lambda body: dumps({"instances": len((loads(body) if body else {}).get(
            "instances", []))})
    from export.runtime import Predictor
    from export.serve.options import Limits

    predictor, limits = Predictor(model, "cpu", 1, spin=False), Limits()

    def predict(body: bytes) -> bytes:
        x = parse_request(body, "application/json", predictor.card, limits)
        pred = predictor.predict(x, batch_size=max(len(x), 1))
        return dumps({"model_sha256": predictor.sha256, "predictions": encode_rows(
            pred, predictor.class_names, 1)})
    return predict


def app_for(reply):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        out = reply(body) if scope["method"] == "POST" else b"{}"  # GET: started
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})
    return app


if __name__ == "__main__":
    import uvicorn

    from export.errors import InputError

    try:
        reply = reply_for(sys.argv[2] if len(sys.argv) > 2 else None)
    except InputError as exc:  # a model that is not one: one line, as the commands say it
        print(f"bare_asgi: {exc}", file=sys.stderr)
        sys.exit(2)
    uvicorn.run(app_for(reply), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
                access_log=False, lifespan="off")
