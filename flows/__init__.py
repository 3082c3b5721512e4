"""Prefect flows of loraops."""

import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "loraops")
