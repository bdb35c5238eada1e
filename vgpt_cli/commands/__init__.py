"""One module per CLI command: each parses options, calls the core and prints. No logic here."""
