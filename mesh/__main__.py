"""`python -m mesh` is the `mesh` command (the local mesh starts role processes this way)."""

from mesh.cli.main import main

main()
