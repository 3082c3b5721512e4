"""``python -m loraops``: what dvc.yaml calls, so a checkout runs its own code (see loraops reproduce)."""

from loraops.cli.app import app

app(prog_name="loraops")
