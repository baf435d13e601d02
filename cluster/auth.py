"""Token authentication with a running Ray cluster, for every `kd` command that talks to one.

Ray 2.60's `ray start --head` turns token authentication on, and a client then needs the cluster's
token and token mode (RAY_AUTH_MODE=token), for the GCS (`ray.init`) and the dashboard (job
submission) alike. Ray's own clients enable token mode by themselves only when they find a local
cluster with `ray.init("auto")` and no RAY_ADDRESS; `ray job submit` and `serve deploy` never do.
`kd` uses Ray's own rule (`maybe_enable_token_auth_if_token_available`) for every cluster address it
is given: RAY_AUTH_MODE set explicitly wins; unset, token mode is on when Ray's token loader finds a
token where Ray looks for one — RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else
~/.ray/auth_token. A cluster that refuses the connection for want of a (valid) token becomes one
`kd: error:` line (`ClusterAuthError`) naming those places, instead of Ray's tracebacks.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

MODE_VAR, TOKEN_VAR, TOKEN_PATH_VAR = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = "~/.ray/auth_token"
HOW_TO = (f"give this client the cluster's token (`ray get-auth-token` on the head prints it) in "
          f"{DEFAULT_TOKEN_FILE}, a file named by {TOKEN_PATH_VAR}, or {TOKEN_VAR}, and set {MODE_VAR}=token "
          f"(Ray's own `serve deploy` and `ray job submit` need it too)")
# the logger of Ray's token setup, whose warning on enabling token mode speaks of starting a cluster
_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"


class ClusterAuthError(Exception):
    """The cluster wants a token this client does not have (or not the right one)."""


@contextmanager
def cluster_auth(address: str) -> Iterator[None]:
    """Around connecting to the cluster at `address`: token mode first by Ray's rule
    (`use_cluster_token`), then any authentication failure of the connection as ClusterAuthError."""
    try:
        use_cluster_token()
        yield
    except Exception as exc:  # noqa: BLE001 - only authentication failures are translated
        if authentication_failure(exc):
            raise ClusterAuthError(f"cannot authenticate to the Ray cluster at {address}: {client_state()}; "
                                   f"{HOW_TO}") from None
        if _silent_client_refusal(address, exc):
            raise ClusterAuthError(f"no answer from the Ray client server at {address}: unreachable, or it "
                                   f"wants a token ({client_state()}); {HOW_TO}") from None
        raise


def use_cluster_token() -> bool:
    """Token mode for this process (and what it starts) when RAY_AUTH_MODE is unset and Ray finds a
    token; RAY_AUTH_MODE set wins. Ray's own rule for a local `ray.init("auto")` and `ray start`,
    without its warning, which speaks of starting a cluster. True when token mode is on."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    logger = logging.getLogger(_SETUP_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        logger.setLevel(level)


def authentication_failure(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, is Ray's AuthenticationError (a 401/403 of
    the dashboard, the GCS's InvalidAuthToken, a token file Ray cannot read). `ray.init` keeps the
    GCS's refusal only as the text of the last connection error's traceback in a RuntimeError
    (ray._private.node), so that text counts too."""
    from ray.exceptions import AuthenticationError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, AuthenticationError) or (
                isinstance(exc, RuntimeError) and f"{AuthenticationError.__module__}.AuthenticationError" in str(exc)):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _silent_client_refusal(address: str, exc: BaseException) -> bool:
    """A Ray client (ray://) without a token to send: its server refuses each ping and the client
    reports only a connection timeout, the one sign of a missing token there."""
    return (address.startswith("ray://") and isinstance(exc, ConnectionError)
            and "timeout" in str(exc) and not token_mode_on())


def token_mode_on() -> bool:
    """Whether this process is in Ray's token mode (as Ray decides it: RAY_AUTH_MODE)."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    return is_token_auth_enabled()


def client_state() -> str:
    """Why this client could not authenticate, in words that name the setting to change."""
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    mode = os.environ.get(MODE_VAR, "")
    if mode.lower() == "disabled":
        return f"{MODE_VAR}=disabled turns token authentication off here"
    try:
        found = AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)
    except AuthenticationError as exc:  # e.g. RAY_AUTH_TOKEN_PATH names a missing or empty file
        return str(exc.message).split(". Note:")[0].rstrip(".")
    if not found:
        return (f"no token here ({TOKEN_VAR} unset, {TOKEN_PATH_VAR} unset, no {DEFAULT_TOKEN_FILE})"
                + (f" although {MODE_VAR}={mode}" if mode else ""))
    return f"it refused the token from {token_source()}"


def token_source() -> str:
    """Where Ray takes the token from, in its order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, the default file."""
    if os.environ.get(TOKEN_VAR):
        return TOKEN_VAR
    if os.environ.get(TOKEN_PATH_VAR):
        return f"{TOKEN_PATH_VAR}={os.environ[TOKEN_PATH_VAR]}"
    return DEFAULT_TOKEN_FILE
