"""`trainer serve`, one module per concern: `supervisor` (the command: the listening
socket, the forked API servers, their replacement, reloads and shutdown), `app` (each API
server's ASGI app and its model), `batching` (concurrent requests into one onnxruntime
call), `payloads` (a request's body to the checked array, predictions to reply rows), `oip`
(the Open Inference Protocol's routes and tensors), `asgi` (body reads, replies, errors),
`metrics` (Prometheus text and the drift counts merged across processes) and `options`
(the settings, checked when made). No torch anywhere here."""
