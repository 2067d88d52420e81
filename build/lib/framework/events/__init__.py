"""Events on JetStream: publishing, durable subscribers and their outcomes, idempotency, dead letters."""
