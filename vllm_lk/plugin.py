"""vLLM general plugin: the entry point vLLM calls in every process it starts.

vLLM calls :func:`register` in the front-end process, the engine-core process and every worker
(``vllm.plugins.load_general_plugins``), possibly more than once per process, so registration is
idempotent and cheap: it imports nothing heavy and does its work once per process.

``VLLM_LK_DISABLE=1`` switches the plugin off (vLLM then behaves exactly as without vllm-lk).
"""

from __future__ import annotations

import logging
import os

from vllm_lk import __version__

# A child of vLLM's "vllm" logger: our lines go through whatever handler, format and level vLLM
# configures in each of its processes, whenever it configures them.
logger = logging.getLogger("vllm.plugins.vllm_lk")

DISABLE_ENV = "VLLM_LK_DISABLE"

# The plugin's registration state: the one piece of process-global state the package keeps.
_registered: bool | None = None  # None: register() not yet called in this process


def disabled_by_env() -> bool:
    """True when ``VLLM_LK_DISABLE`` is set to anything but '', '0' or 'false'."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def is_active() -> bool:
    """Whether :func:`register` has run in this process and activated the plugin."""
    return bool(_registered)


def _ensure_vllm_logging() -> None:
    # In the front-end process vLLM loads plugins before it configures logging, which would drop
    # our line; apply vLLM's default logging config now (vLLM re-applies its own config later,
    # a no-op when it is the default).
    if logging.getLogger("vllm").handlers:
        return
    try:
        from vllm.config.logging import LoggingConfig
        from vllm.logger import configure_logging_if_needed
    except ImportError:  # register() called outside vLLM, e.g. by a test
        return
    configure_logging_if_needed(LoggingConfig())


def register() -> None:
    """Activate vllm_lk in this process (called by vLLM; safe to call any number of times)."""
    global _registered
    if _registered is not None:
        return
    _ensure_vllm_logging()
    if disabled_by_env():
        _registered = False
        logger.info("vllm_lk %s disabled by %s=1 (pid %d)", __version__, DISABLE_ENV, os.getpid())
        return
    from vllm_lk import patch

    _registered = True
    patched = patch.apply()
    logger.info(
        "vllm_lk %s active (pid %d): %s", __version__, os.getpid(),
        "exact temperature-aware verification" if patched else "verification NOT patched (see warning)",
    )
