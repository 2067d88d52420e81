"""The `mesh` command: `main` parses arguments, one module per command family."""
