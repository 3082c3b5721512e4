"""Prefect tasks: each wraps one stage from loraops.stages and adds retries, names and UI artifacts."""

import os

# Let Prefect capture the stdlib loggers of the plain stage code (must be set before prefect is imported).
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "loraops")
