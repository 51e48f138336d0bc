"""HTTP routes of the server, one module per API area."""
