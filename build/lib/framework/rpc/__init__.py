"""Request-reply: endpoints and the NATS service API (ADR-32) discovery responder."""
