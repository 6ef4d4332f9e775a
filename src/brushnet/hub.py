"""Whether the Hugging Face Hub can be reached at all, asked before a hub id is loaded.

Without a network, huggingface_hub retries every request for about half a minute (printing a
warning line per try) before it falls back to its cache or gives up. A single probe of the hub's
host (name lookup and TCP connect, a few seconds at most) tells that case apart; hub ids are then
loaded with `local_files_only=True`, so a cached model loads at once and an uncached one fails at
once with a one-line error.

Standard library only at import time: the segmentation code and the command line use it too.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

# `org/name`; a path that exists is always local.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The HTTP client connects through these when set (any case); a proxy may reach the hub when the
# hub's own host does not resolve here, so the probe would say nothing.
PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")
PROBE_TIMEOUT_S = 2.5
# Long enough that one command probes once, short enough that a server notices the network return.
PROBE_TTL_S = 60.0

_probed: dict[tuple[str, int], tuple[float, bool]] = {}


def looks_like_hub_id(source) -> bool:
    """True for an `org/name` string (or path-like) that is not an existing file or folder."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    return bool(HUB_ID.match(str(source))) and not Path(source).exists()


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: huggingface_hub makes no request at all."""
    from huggingface_hub import constants

    env = any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
              for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or env


def proxy_configured(proxies=None) -> bool:
    return bool(proxies) or any(os.environ.get(name) or os.environ.get(name.lower()) for name in PROXY_VARIABLES)


def endpoint_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub endpoint's host and port (huggingface_hub's ENDPOINT,
    which HF_ENDPOINT sets) opens within `timeout` seconds, name lookup included. The answer is
    kept for PROBE_TTL_S per endpoint."""
    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    try:
        host, port = url.hostname, url.port or (80 if url.scheme == "http" else 443)
    except ValueError:  # a port that is not a number: huggingface_hub will say so itself
        return True
    if not host:
        return True
    now = time.monotonic()
    seen = _probed.get((host, port))
    if seen is not None and now - seen[0] < PROBE_TTL_S:
        return seen[1]
    reachable = _connects(host, port, timeout)
    _probed[(host, port)] = (now, reachable)
    return reachable


def _connects(host: str, port: int, timeout: float) -> bool:
    # The name lookup has no timeout of its own (a resolver that does not answer holds it for tens
    # of seconds): the attempt runs in a daemon thread, given up on after `timeout`.
    outcome: list[bool] = []

    def attempt():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=attempt, name="brushnet-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(outcome and outcome[0])


def hub_unreachable(proxies=None) -> bool:
    """True when a request to the hub is sure to fail for want of a connection. False when it may
    work (a proxy is configured: it is not probed) or will not be made (HF_HUB_OFFLINE)."""
    if hub_offline() or proxy_configured(proxies):
        return False
    return not endpoint_reachable()


def local_only_if_unreachable(hub_kwargs: Mapping) -> dict:
    """`hub_kwargs` (from_pretrained / hf_hub_download options), with `local_files_only=True` when
    the hub cannot be reached: the cache answers at once instead of after half a minute of retries."""
    kwargs = dict(hub_kwargs)
    if not kwargs.get("local_files_only") and hub_unreachable(kwargs.get("proxies")):
        kwargs["local_files_only"] = True
    return kwargs
