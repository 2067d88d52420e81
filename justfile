# Recipes for the local mesh. Everything runs from the project's virtual environment.
set shell := ["bash", "-cu"]

# start NATS (nats.conf) and the sample services ([tool.mesh] in pyproject.toml); Ctrl-C stops everything
up:
    mesh up

# start the mesh in the background (stop it with `just down`)
up-detached:
    mesh up --detach

# stop a mesh started in the background
down:
    mesh down

# place a few orders against a running mesh and show their final states and a trace
demo:
    python -m services.demo

# the whole test suite against real nats-server processes
test *args:
    pytest -q {{args}}

# style and types
lint:
    ruff check .
    ruff format --check .
    mypy

# benchmarks against raw nats-py on the same server
bench *args:
    python -m bench {{args}}
