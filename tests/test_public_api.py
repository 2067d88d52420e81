"""The public API is `framework.__all__`, and every name and parameter in it is documented."""

from __future__ import annotations

import ast
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import framework
from framework import BatchPublisher, Client, Context, Service, connect

ROOT = Path(__file__).resolve().parent.parent


def _public_members(cls: type) -> list[tuple[str, Any]]:
    found = []
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        target = member.fget if isinstance(member, property) else member
        if callable(target) or isinstance(member, property):
            found.append((name, target))
    return found


def test_every_public_name_and_method_has_a_docstring() -> None:
    missing = []
    for name in framework.__all__:
        obj = getattr(framework, name)
        if typing.get_origin(obj) is not None:
            continue  # a type alias (`JobState = Literal[...]`) cannot carry a docstring
        if not (obj.__doc__ or "").strip():
            missing.append(name)
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            missing += [
                f"{name}.{attr}"
                for attr, target in _public_members(obj)
                if not (getattr(target, "__doc__", None) or "").strip()
            ]
    assert missing == []


DOCUMENTED: list[tuple[str, Callable[..., Any], str | None]] = [
    ("connect", connect, None),
    ("Client.open", Client.open, None),
    ("Client.call", Client.call, None),
    ("Client.publish", Client.publish, None),
    ("Client.batch", Client.batch, None),
    ("Context.call", Context.call, None),
    ("Context.publish", Context.publish, None),
    ("Service", Service.__init__, Service.__doc__),
    ("Service.rpc", Service.rpc, None),
    ("Service.serve", Service.serve, None),
    ("Service.run", Service.run, None),
    ("BatchPublisher.publish", BatchPublisher.publish, Client.publish.__doc__),
]


@pytest.mark.parametrize(("what", "fn", "doc"), DOCUMENTED, ids=[d[0] for d in DOCUMENTED])
def test_every_parameter_is_documented(what: str, fn: Callable[..., Any], doc: str | None) -> None:
    text = doc if doc is not None else inspect.getdoc(fn) or ""
    params = [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.name not in ("self", "cls", "client") and p.kind is not p.VAR_POSITIONAL
    ]
    undocumented = [p for p in params if p not in text]
    assert undocumented == [], f"{what}: {undocumented} not described in its docstring"


def _framework_imports(path: Path) -> list[str]:
    return [
        node.module
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("framework")
    ]


# Dev harnesses, not user code: the demo reads the mesh's trace file, the benchmarks
# start their own servers and time the tracing calls themselves.
INTERNAL_OK = {
    "services/demo.py": {
        "framework.observability.trace_file",
        "framework.observability.console_traces",
    },
    "bench/common.py": {"framework.dev.devserver"},
    "bench/durability.py": {"framework.dev.devserver"},  # single servers and clusters
    "bench/fast_batch_ids.py": {"framework.dev.devserver"},  # raw nats-py on a cluster
    "bench/telemetry_overhead.py": {"framework.observability"},
}


def test_samples_examples_and_benchmarks_import_the_public_api() -> None:
    offenders = []
    for folder in ("services", "examples", "bench"):
        for path in sorted((ROOT / folder).glob("*.py")):
            rel = str(path.relative_to(ROOT))
            # framework.web: the public API of the [web] extra (it needs Starlette)
            allowed = {"framework", "framework.testing", "framework.web"}
            allowed |= INTERNAL_OK.get(rel, set())
            offenders += [f"{rel}: {m}" for m in _framework_imports(path) if m not in allowed]
    assert offenders == []
