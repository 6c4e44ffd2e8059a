"""``python -m gptq_tools`` runs the CLI."""

from .cli import run

run()
