"""The gRPC front door for callers outside Ray: the wire codec (`codec`), the ingress server in a Ray
actor (`ingress`), bearer tokens (`auth`), per-caller admission (`caller_limits`), a Python client
(`client`) and the committed stubs (`proto`).

Import submodules directly: a client needs only `client` and `codec`, not Ray.
"""
