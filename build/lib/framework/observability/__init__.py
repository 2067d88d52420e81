"""Observability: tracing, metrics, logging and trace rendering (OpenTelemetry API only)."""
