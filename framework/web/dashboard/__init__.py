"""`mesh dashboard`: services, streams, dead letters, jobs and traces, live in a browser."""

from .app import create_app

__all__ = ["create_app"]
