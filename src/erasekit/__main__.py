"""``python -m erasekit`` (and ``accelerate launch -m erasekit``): the command line."""

from erasekit.cli import app

app()
