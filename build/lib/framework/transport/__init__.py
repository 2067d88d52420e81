"""Transport: the connection-level machinery every handler kind shares (mux, headers, codec, workers)."""
