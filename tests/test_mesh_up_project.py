"""`mesh up` in a user's own project (not this repository): services from its configuration.

Each test writes a small project into a temp directory (a service module and a
`[tool.mesh]` table or a `mesh.toml`) and runs the installed `mesh` there, with a real
nats-server started by `mesh up` itself.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from support.cli import mesh_cli, mesh_up, project_env

from framework.dev.devserver import free_port
from framework.dev.project import ProjectConfigError, find_project
from framework.testing import eventually

GREETER = textwrap.dedent(
    """
    import os

    import msgspec
    from framework import Service

    class Hello(msgspec.Struct):
        name: str

    class Greeted(msgspec.Struct):
        name: str

    service = Service("greeter", version="1.0.0", publishes=["greeting.sent.v1"])

    @service.rpc()
    async def hello(req: Hello) -> dict[str, str]:
        return {"text": "hello " + req.name}

    @service.subscribe("greeting.sent.v1")
    async def on_greeting_sent(event: Greeted) -> None:
        with open(os.environ["GREETED_FILE"], "a") as out:
            out.write(event.name + "\\n")
    """
)

PYPROJECT = textwrap.dedent(
    """
    [project]
    name = "greeter-app"
    version = "0.1.0"

    [tool.mesh]
    services = ["greeter_app.service:service"]
    """
)


def make_project(root: Path, pyproject: str | None = PYPROJECT) -> Path:
    package = root / "greeter_app"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "service.py").write_text(GREETER)
    if pyproject is not None:
        (root / "pyproject.toml").write_text(pyproject)
    return root


def mesh_run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Any:
    return mesh_cli(*args, cwd=cwd, env=env or project_env())


async def test_mesh_up_starts_the_services_of_a_users_project(tmp_path: Path) -> None:
    project = make_project(tmp_path / "greeter-app")
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    greeted = tmp_path / "greeted.txt"
    env = project_env(GREETED_FILE=str(greeted))
    started_in = project / "greeter_app"  # a subdirectory: the project is found upwards
    mesh = mesh_up(started_in, port, env=env)
    try:
        await eventually(lambda: mesh.said("mesh: ready"), 60, "mesh up ready")
        assert mesh.said(f"(from {project / 'pyproject.toml'}) in {project}")
        called = mesh_run("--url", url, "call", "greeter.hello", '{"name": "ann"}', cwd=tmp_path)
        assert called.returncode == 0, called.stderr
        assert json.loads(called.stdout) == {"text": "hello ann"}
        published = mesh_run(
            "--url", url, "publish", "greeting.sent.v1", '{"name": "bo"}', cwd=tmp_path
        )
        assert published.returncode == 0, published.stderr
        await eventually(lambda: greeted.exists() and greeted.read_text() == "bo\n", 20, "event")
    finally:
        code = mesh.stop()
    output = "".join(mesh.lines)
    assert code == 0, output
    assert "mesh: stopped" in output and "Traceback" not in output
    assert (project / ".mesh" / "jetstream").is_dir()  # the mesh's state lives in the project


async def test_mesh_toml_and_service_flags(tmp_path: Path) -> None:
    """`mesh.toml` names the services as well; `--service` flags replace the configured list."""
    project = make_project(tmp_path, pyproject=None)
    (project / "mesh.toml").write_text('services = ["greeter_app.nothere:service"]\n')
    port = free_port()
    mesh = mesh_up(project, port, "--service", "greeter_app.service:service", env=project_env())
    try:
        await eventually(lambda: mesh.said("mesh: ready"), 60, "mesh up ready")
        assert mesh.said("greeter (from --service)")
        called = mesh_run(
            "--url",
            f"nats://127.0.0.1:{port}",
            "call",
            "greeter.hello",
            '{"name": "cy"}',
            cwd=project,
        )
        assert json.loads(called.stdout) == {"text": "hello cy"}
    finally:
        assert mesh.stop() == 0, "".join(mesh.lines)

    # without the flag, mesh.toml's (broken) list is used: refused before anything starts
    done = mesh_run("up", "--port", str(free_port()), cwd=project)
    assert done.returncode == 2
    assert "cannot load 'greeter_app.nothere:service'" in done.stderr


@pytest.mark.parametrize(
    "pyproject, fragment",
    [
        ('[project]\nname = "x"\n', "[tool.mesh]"),  # no table at all
        ("[tool.mesh]\nservices = []\n", "[tool.mesh]"),  # an empty list
        ('[tool.mesh]\nservice = ["a:b"]\n', "unknown field `service`"),  # a typo
        ("[tool.mesh]\nservices = 'a:b'\n", "Expected `array`"),
        ("[tool.mesh\n", "cannot read"),
    ],
)
def test_mesh_up_without_services_says_how_to_configure(
    tmp_path: Path, pyproject: str, fragment: str
) -> None:
    (tmp_path / "pyproject.toml").write_text(pyproject)
    done = mesh_run("up", "--port", str(free_port()), cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert fragment in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / ".mesh").exists()  # nothing was started


def test_how_to_configure_names_the_table_and_the_flag(tmp_path: Path) -> None:
    done = mesh_run("up", cwd=tmp_path)  # no pyproject, no mesh.toml
    assert done.returncode == 2
    assert "[tool.mesh]" in done.stderr and "services = [" in done.stderr
    assert "mesh.toml" in done.stderr and "--service MODULE:ATTR" in done.stderr


def test_find_project_prefers_mesh_toml_and_stops_at_the_nearest_project(tmp_path: Path) -> None:
    outer = tmp_path / "outer"
    inner = outer / "inner" / "src"
    inner.mkdir(parents=True)
    (outer / "pyproject.toml").write_text('[tool.mesh]\nservices = ["a.b:service"]\n')
    (outer / "mesh.toml").write_text('services = ["c.d:service"]\nnats_config = "n.conf"\n')
    found = find_project(inner)
    assert (found.root, found.source) == (outer, outer / "mesh.toml")
    assert found.config.services == ["c.d:service"]
    assert found.nats_config == outer / "n.conf"

    (outer / "inner" / "pyproject.toml").write_text('[project]\nname = "inner"\n')
    nearest = find_project(inner)
    assert (nearest.root, nearest.source, nearest.config.services) == (outer / "inner", None, [])

    (outer / "inner" / "pyproject.toml").write_text("[tool.mesh]\nnats_config = 1\n")
    with pytest.raises(ProjectConfigError, match="nats_config"):
        find_project(inner)
