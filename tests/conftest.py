"""Shared test helpers; fixtures for servers and services come from framework.testing."""
