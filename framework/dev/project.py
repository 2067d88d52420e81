"""Which services `mesh up` starts: the project's `[tool.mesh]` table or `mesh.toml`.

    # pyproject.toml                          # or mesh.toml, same keys at the top level
    [tool.mesh]
    services = ["shop.orders:service", "shop.payments:service"]
    nats_config = "nats.conf"                 # optional; relative to this file

The project is the nearest directory, from the working directory upwards, that holds a
`mesh.toml` or a `pyproject.toml` (`mesh.toml` wins when both are there). `mesh up`
works in that directory: service modules are imported from it and the mesh's state
lives in its `.mesh/`. Without either file the working directory is the project, with
no configuration.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import msgspec

__all__ = ["MeshConfig", "Project", "ProjectConfigError", "find_project", "how_to_configure"]

MESH_TOML = "mesh.toml"
PYPROJECT = "pyproject.toml"


class ProjectConfigError(ValueError):
    """The project's mesh configuration cannot be read or is not what `mesh up` takes."""


class MeshConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The `[tool.mesh]` table (or `mesh.toml`), checked: unknown keys are refused.

    `services`: `module:attr` of each service `mesh up` starts, one process each;
    `nats_config`: a nats-server configuration file, relative to the file it is named in
    (default: none; JetStream then stores under `.mesh/jetstream`).
    """

    services: list[str] = []
    nats_config: str | None = None


@dataclass(frozen=True)
class Project:
    """Where `mesh up` runs (`root`), the file its configuration came from, and that."""

    root: Path
    source: Path | None
    config: MeshConfig

    @property
    def nats_config(self) -> Path | None:
        """The configured nats-server config file, resolved against the project root."""
        if self.config.nats_config is None:
            return None
        return self.root / self.config.nats_config


def _read(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ProjectConfigError(f"cannot read {path}: {error}") from None


def _table(path: Path) -> dict[str, object] | None:
    """The mesh settings in `path`: all of mesh.toml, or pyproject's [tool.mesh] (or None)."""
    data = _read(path)
    if path.name == MESH_TOML:
        return data
    tool = data.get("tool")
    table = tool.get("mesh") if isinstance(tool, dict) else None
    if table is not None and not isinstance(table, dict):
        raise ProjectConfigError(f"{path}: [tool.mesh] must be a table")
    return table


def find_project(start: Path | None = None) -> Project:
    """The project around `start` (default: the working directory) and its configuration."""
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        for name in (MESH_TOML, PYPROJECT):
            path = directory / name
            if path.is_file():
                table = _table(path)
                if table is None:
                    return Project(directory, None, MeshConfig())
                try:
                    config = msgspec.convert(table, MeshConfig)
                except msgspec.ValidationError as error:
                    where = "" if name == MESH_TOML else " [tool.mesh]"
                    raise ProjectConfigError(f"{path}{where}: {error}") from None
                return Project(directory, path, config)
    return Project(here, None, MeshConfig())


def how_to_configure(project: Project) -> str:
    """What to write, and where, when there are no services to start."""
    return (
        f"no services to start in {project.root}: list them in its pyproject.toml\n\n"
        "    [tool.mesh]\n"
        '    services = ["mypackage.orders:service", "mypackage.payments:service"]\n'
        '    nats_config = "nats.conf"   # optional\n\n'
        "(or the same keys in a mesh.toml), or pass --service MODULE:ATTR (repeatable)"
    )
