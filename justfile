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

# order through the running mesh's HTTP gateway: final states, one order's SSE stream, its trace
demo *args:
    python -m services.demo {{args}}

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
