"""The teacher pool on Ray Serve: the batched core (`engine`), the replica (`deployment`), sample-counted
fair batching (`batching`), exactly-once computation across runs (`coalesce`) and the request router
that sends identical requests to one replica (`routing`).

`teacher_service.app` deploys a pool (and its gRPC ingress); import submodules directly.
"""
