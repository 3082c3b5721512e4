"""Prefect tasks: each wraps one stage from loraops.stages and adds retries, names and UI artifacts.

The flows send the ``loraops`` logger's lines to each run's logs (tasks.run_context.loraops_logs_in_run).
"""
