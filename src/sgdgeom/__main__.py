"""``python -m sgdgeom`` runs the command-line tool."""

from sgdgeom.cli import main

main()
