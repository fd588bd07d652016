"""The bitmoji gRPC model server: `bitmoji-serve` (see `bitmoji.server.cli`).

Modules, one job each: `config` (every knob, flags and environment),
`inputs` (request items -> tensors, validated), `model` (the served model and
its forward pass), `batcher` (dynamic batching on the model thread), `service`
(the gRPC servicer), `saliency` (gradient heat maps), `metrics` (Prometheus),
`security` (TLS credentials, bearer-token interceptor), `reload` (model hot
reload), `main` (life cycle: start, warm up, serve, drain), `workers`
(`--workers N`: N processes on one port), `cli` (the command).
"""
