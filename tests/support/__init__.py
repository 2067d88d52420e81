"""Helpers shared by the test modules (fixtures live in tests/conftest.py).

- `support.cli`: `mesh` run in this process, as the installed script or as a
  subprocess whose output is collected; child processes read from /proc.
- `support.shop`: test doubles and waits for the sample shop (services/).
- `support.events`: the event structs several test modules publish.
- `support.otel`: finished spans recorded in memory.

The web tests' HTTP server and SSE reader are in tests/web_support.py.
"""
