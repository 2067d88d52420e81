"""compose.yaml names only things that exist: commands, modules, files, services."""

from __future__ import annotations

import yaml
from support.cli import ROOT, sample_services

from framework.runner import load_service


def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_every_service_command_loads_a_framework_service():
    services = compose()["services"]
    app_services = {name: spec for name, spec in services.items() if name != "nats"}
    mesh_up = sample_services()
    assert set(app_services) == {load_service(spec).name for spec in mesh_up}  # as `just up`
    for name, spec in app_services.items():
        command = spec["command"]
        assert command[:2] == ["mesh", "run"], command
        for target in command[2:]:
            assert load_service(target).name == name
        assert spec["environment"]["NATS_URL"] == "nats://nats:4222"
        assert spec["depends_on"]["nats"]["condition"] == "service_healthy"
        health = spec["healthcheck"]["test"]
        assert health[:3] == ["CMD", "mesh", "info"] and health[3] == name


def test_files_the_compose_file_names_exist():
    spec = compose()
    nats = spec["services"]["nats"]
    mounts = [volume.split(":")[0] for volume in nats["volumes"]]
    for mount in mounts:
        if mount.startswith("./"):
            assert (ROOT / mount).is_file(), mount
    assert nats["image"].startswith("nats:")
    # the shop needs message schedules (ADR-51) and atomic batches (ADR-50): 2.12+
    major, minor = (int(part) for part in nats["image"][5:].split("-")[0].split(".")[:2])
    assert (major, minor) >= (2, 12), nats["image"]
    assert "-c" in nats["command"] and "/etc/nats/nats.conf" in nats["command"]
    assert (ROOT / "Dockerfile").is_file()
    dockerfile = (ROOT / "Dockerfile").read_text()
    for copied in ("pyproject.toml", "framework", "services"):
        assert copied in dockerfile and (ROOT / copied).exists()
    for name in ("orders", "payments", "notifications", "inventory", "receipts", "gateway"):
        assert spec["services"][name]["build"] == "."
