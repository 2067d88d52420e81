"""Development tools: real nats-server processes and clusters (`devserver`), the
project's mesh configuration (`project`) and the local mesh (`supervisor`, `mesh up`)."""
