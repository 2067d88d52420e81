"""Development tools: real nats-server processes and clusters, and the local mesh supervisor."""
