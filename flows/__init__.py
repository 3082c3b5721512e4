"""Prefect flows of loraops."""

import logging
import os

# The temporary API server (no PREFECT_API_URL) needs more than the default 20 s on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

# One line per HTTP call to the Prefect API drowns the training log.
logging.getLogger("httpx").setLevel(logging.WARNING)
