"""``python -m daami2i`` runs the command line."""

from .cli import main

main()
