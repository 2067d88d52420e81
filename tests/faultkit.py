"""Nemeses for the fault tests: pauses, partitions, full disks and slow links.

Jepsen's NATS analysis used process pauses (SIGSTOP), network partitions, disk faults
and slow links; these are the same faults on one machine, aimed only at loopback and at
processes the tests started themselves:

- `paused(pid)`: SIGSTOP, then SIGCONT when the block exits (however it exits).
- `DelayProxy`: a TCP proxy in the test's event loop that delays every chunk by a fixed
  latency each way, so a client's link to the server is slow without being throttled.
- `PartitionableCluster` and `partition()`: a 3-node cluster whose one node runs with a
  group id of its own, so iptables' `owner` match can cut that node's route traffic
  (and only that) while its clients stay connected to it.
- `tmpfs()`: a small tmpfs mounted for a server's store, to fill up and free.

Each nemesis says plainly why it cannot run (`why_not_*`), so a test skips with that
reason instead of failing for a missing tool or privilege.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec

from framework import BatchPublisher, Context, PublishError, Service, ServiceError
from framework.dev.devserver import LOOPBACK, NatsServer, _free_ports, wait_jetstream_ready
from framework.testing import eventually as wait_until

HERE = Path(__file__).parent
ROOT = HERE.parent
FIGURES = HERE / "fault_figures.json"
PARTITION_GID = 47017  # the group the partitioned node runs as (any unused gid)


# -- figures ---------------------------------------------------------------------------


def run_figures(expected: set[str], runs: Counter[str]) -> dict[str, int]:
    """What every fault row reports of its handler runs: handled, lost, run twice."""
    return {
        "handled": len(set(runs) & expected),
        "lost": len(expected - set(runs)),
        "handler_runs_twice": sum(n - 1 for n in runs.values()),
    }


def record_figures(name: str, **figures: Any) -> None:
    """Print one line for the test log and merge the figures into fault_figures.json."""
    print(f"figures: {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    try:
        data = json.loads(FIGURES.read_text())
    except (OSError, ValueError):
        data = {}
    data[name] = figures
    FIGURES.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# -- shared by the fault tests ---------------------------------------------------------


CONSUMER = HERE / "side_effect_consumer.py"
EVENT = "order.created.v1"
STREAM = "EVENTS_ORDER"
LEDGER_DURABLE = "ledger_on_order_created"


class OrderCreated(msgspec.Struct):
    order_id: str
    amount_cents: int


class Echo(msgspec.Struct):
    n: int


async def stats_of(client: Any, name: str) -> Any:
    """$SRV.STATS of the one running instance of `name` (polled: a busy machine answers late)."""
    found: list[Any] = []

    async def answered() -> bool:
        found[:] = await client.stats(name, timeout=0.5)
        return len(found) == 1

    await wait_until(answered, 15, f"{name} to answer $SRV.STATS")
    return found[0]


def lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


class ConsumerProcess:
    """tests/side_effect_consumer.py in a subprocess, so it can be SIGKILLed."""

    def __init__(self, url: str, ledger: Path, *options: str) -> None:
        self.url = url
        self.ledger = ledger
        self.options = list(options)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = ledger.parent / f"{ledger.name}-consumer.log"

    @property
    def attempts(self) -> Path:
        return self.ledger / "attempts.log"

    @property
    def effects(self) -> Path:
        return self.ledger / "effects.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.ledger.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "LOG_LEVEL": "warning"}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(CONSUMER),
                    *("--url", self.url, "--ledger", str(self.ledger)),
                    *self.options,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
            )

    def assert_alive(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, (
            f"consumer exited with {self.proc and self.proc.returncode}:\n"
            + self.log.read_text()[-3000:]
        )

    def kill(self) -> None:
        """SIGKILL: no shutdown, no acks, no idempotency markers for what is in flight."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        terminate(self.proc)


def terminate(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, and SIGKILL if it is still there 10 s later."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


async def publish_batch(client: Any, ids: range, *, prefix: str = "") -> int:
    """Publish order.created events e-<i> (order o-<i>) without waiting for each ack."""
    async with BatchPublisher(client, max_outstanding=512) as publisher:
        for i in ids:
            await publisher.publish(
                EVENT, OrderCreated(f"{prefix}o-{i}", i), event_id=f"{prefix}e-{i}"
            )
    return len(publisher.acks)


async def consumer_info(client: Any, durable: str = LEDGER_DURABLE) -> Any:
    return await client.js.consumer_info(STREAM, durable, timeout=2.0)


class Traffic:
    """Publishes events (retrying each with its event id until acknowledged) and calls RPC."""

    def __init__(self, client: Any, total: int) -> None:
        self.client = client
        self.total = total
        self.acked: list[str] = []
        self.ack_times: list[float] = []
        self.publish_failures: Counter[str] = Counter()
        self.duplicate_acks = 0
        self.rpc_ok: list[float] = []
        self.rpc_failures: Counter[str] = Counter()
        self.done = anyio.Event()

    async def publish_loop(self) -> None:
        for i in range(self.total):
            event_id = f"e-{i}"
            while True:
                try:
                    ack = await self.client.publish(
                        EVENT, OrderCreated(f"o-{i}", i), event_id=event_id, timeout=2.0
                    )
                except PublishError as exc:
                    self.publish_failures[str(exc)[:60]] += 1
                    await anyio.sleep(0.05)
                    continue
                self.duplicate_acks += ack.duplicate
                self.acked.append(event_id)
                self.ack_times.append(time.monotonic())
                break
            if i % 4 == 0:
                await anyio.sleep(0.001)  # keep a steady stream rather than one burst
        self.done.set()

    async def rpc_loop(self) -> None:
        n = 0
        while not self.done.is_set():
            n += 1
            try:
                reply = await self.client.call("orders.echo", Echo(n), returns=Echo, timeout=1.0)
                assert reply.n == n
                self.rpc_ok.append(time.monotonic())
            except (ServiceError, OSError) as exc:
                self.rpc_failures[type(exc).__name__] += 1
            except Exception as exc:  # nats-py errors while disconnected
                self.rpc_failures[type(exc).__name__] += 1
            await anyio.sleep(0.01)

    def first_after(self, times: list[float], moment: float) -> float | None:
        later = [t for t in times if t > moment]
        return round(later[0] - moment, 2) if later else None

    @staticmethod
    def longest_gap(times: list[float], since: float) -> float:
        """The longest stretch without a success from `since` on: the outage as seen."""
        later = [since, *(t for t in times if t > since)]
        return round(max(b - a for a, b in itertools.pairwise(later)), 2) if len(later) > 1 else 0.0


async def instance_ids(
    client: Any, names: tuple[str, ...] = ("orders", "ledger")
) -> dict[str, str]:
    """Name -> instance id of every running service, once all of `names` answer a ping."""
    ids: dict[str, str] = {}

    async def all_answer() -> bool:
        ids.clear()
        ids.update({s.name: s.id for s in await client.ping(timeout=0.5)})
        return set(names) <= set(ids)

    await wait_until(all_answer, 15, f"{names} to answer a ping")
    return dict(ids)


def mesh_services(handled: list[str]) -> tuple[Service, Service]:
    orders = Service("orders", publishes=[EVENT])

    @orders.rpc()
    async def echo(req: Echo) -> Echo:
        return req

    ledger = Service("ledger")

    @ledger.subscribe(EVENT, ack_wait=2.0, backoff=[0.2], max_concurrency=16)
    async def on_order_created(event: OrderCreated, ctx: Context) -> None:
        handled.append(ctx.event_id or "")

    return orders, ledger


KV_STREAM = "KV_processed_ledger_on_order_created"


async def move_leader(client: Any, api: str, preferred: str) -> None:
    """Ask the current leader to step down in favour of `preferred` (best effort)."""
    request = json.dumps({"placement": {"preferred": preferred}}).encode()
    for _ in range(5):
        reply = await client.nc.request(f"$JS.API.{api}", request, timeout=5.0)
        if b'"success":true' not in reply.data.replace(b" ", b""):
            return  # an older server without preferred placement: keep the leader it has
        await anyio.sleep(0.5)
        name = api.rsplit(".", 1)[-1] if api.startswith("STREAM") else None
        info = await client.js.stream_info(name) if name else await consumer_info(client)
        if info.cluster.leader == preferred:
            return


async def wait_for_r3_placement(client: Any, timeout: float = 20.0) -> None:
    """A meta leader answers before every peer has joined; R3 needs all three.

    (The nats_cluster fixture waits only for the meta leader.)
    """
    from nats.js.errors import BadRequestError

    with anyio.fail_after(timeout):
        while True:
            try:
                await client.js.add_stream(name="R3_PROBE", subjects=["r3probe"], num_replicas=3)
            except BadRequestError:  # no suitable peers for placement (yet)
                await anyio.sleep(0.1)
                continue
            await client.js.delete_stream("R3_PROBE")
            return


# -- pauses ----------------------------------------------------------------------------


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    """SIGSTOP `pid` for the block; SIGCONT on the way out, whatever happens inside."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


# -- slow links ------------------------------------------------------------------------


class DelayProxy:
    """`127.0.0.1:<port>` forwards to `target_port`, each chunk `delay` seconds late, each way.

    Latency without a bandwidth limit: a chunk is read as soon as it arrives, stamped,
    and written when its time comes, so back-to-back chunks keep their spacing. The
    queue per direction is bounded (a full one stops reading: TCP back-pressure).
    """

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port = target_port
        self.delay = delay
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"nats://{LOOPBACK}:{self.port}"

    async def __aenter__(self) -> DelayProxy:
        self._server = await asyncio.start_server(self._accept, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.target_port)
        except OSError:
            writer.close()
            return
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(1024)

        async def send() -> None:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    break
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                dst.write(chunk)
                await dst.drain()

        sender = loop.create_task(send())
        try:
            while chunk := await src.read(65536):
                await queue.put((loop.time() + self.delay, chunk))
            await queue.put((0.0, b""))
            await sender
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            sender.cancel()
            dst.close()


# -- partitions ------------------------------------------------------------------------


def why_not_iptables() -> str | None:
    """None if iptables can add rules here; else why not, said plainly."""
    if os.geteuid() != 0:
        return "the partition test needs root (iptables rules on loopback)"
    if shutil.which("iptables") is None:
        return "iptables is not installed (Debian: apt-get install -y iptables; .ci/run does it)"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is missing: the partitioned node runs with its own gid"
    probe = subprocess.run(["iptables", "-S", "OUTPUT"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"iptables does not work here: {probe.stderr.strip()}"
    return None


class _GidServer(NatsServer):
    """A nats-server run with group id `gid`, so iptables can match its packets."""

    def __init__(self, *args: Any, gid: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gid = gid

    def args(self) -> list[str]:
        return ["setpriv", f"--regid={self.gid}", "--clear-groups", "--", *super().args()]


class PartitionableCluster:
    """Three nodes n1..n3 on loopback; n1 runs with `PARTITION_GID`, so it can be cut off.

    Built like `framework.dev.devserver.NatsCluster`; `cluster_ports` are what a
    partition drops. `route_ping` (seconds) sets the routes' ping interval, as the
    committed `nats-cluster/` configs do: a silently dropped route is then found dead
    and redialled within seconds, instead of waiting for TCP's retransmission backoff
    after the heal.
    """

    def __init__(self, base_dir: Path, size: int = 3, route_ping: float | None = None) -> None:
        ports = _free_ports(2 * size)
        self.client_ports, self.cluster_ports = ports[:size], ports[size:]
        self.nodes: list[NatsServer] = []
        config = None
        if route_ping is not None:
            base_dir.mkdir(parents=True, exist_ok=True)
            config = base_dir / "routes.conf"
            config.write_text(f'cluster {{ ping_interval: "{route_ping:g}s", ping_max: 3 }}\n')
        for i in range(size):
            routes = [f"nats://{LOOPBACK}:{p}" for j, p in enumerate(self.cluster_ports) if j != i]
            kwargs: dict[str, Any] = {
                "store_dir": base_dir / f"n{i + 1}",
                "server_name": f"n{i + 1}",
                "cluster_name": "mesh",
                "cluster_port": self.cluster_ports[i],
                "routes": routes,
                "config_file": config,
            }
            if i == 0:
                self.nodes.append(_GidServer(self.client_ports[i], gid=PARTITION_GID, **kwargs))
            else:
                self.nodes.append(NatsServer(self.client_ports[i], **kwargs))

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    async def start(self) -> None:
        for node in self.nodes:
            await anyio.to_thread.run_sync(node.start)
        await wait_jetstream_ready(self.urls, 30, replicas=len(self.nodes))

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


def _iptables(*args: str) -> None:
    subprocess.run(["iptables", "-w", *args], check=True, capture_output=True)


@contextlib.contextmanager
def partition(cluster: PartitionableCluster) -> Iterator[None]:
    """Cut n1's routes to n2 and n3 (both directions) for the block; clients are untouched.

    Routes are TCP connections between cluster ports: those accepted by n1 (dropped on
    the way in to n1's cluster port and on the way out of it) and those n1 opened (n1's
    packets, matched by its gid, to the others' cluster ports). The rules live in a chain
    of their own, removed on the way out however the block ends.
    """
    chain = f"MESHPART{os.getpid()}"
    mine = str(cluster.cluster_ports[0])
    others = ",".join(str(p) for p in cluster.cluster_ports[1:])
    hooks = {"INPUT": ("-i", chain + "I"), "OUTPUT": ("-o", chain + "O")}
    try:
        for _, name in hooks.values():
            _iptables("-N", name)
        # the owner match is allowed only on the way out, hence two chains
        _iptables("-A", chain + "I", "-p", "tcp", "--dport", mine, "-j", "DROP")
        _iptables("-A", chain + "O", "-p", "tcp", "--sport", mine, "-j", "DROP")
        _iptables(
            "-A", chain + "O", "-p", "tcp", "-m", "owner", "--gid-owner", str(PARTITION_GID),
            "-m", "multiport", "--dports", others, "-j", "DROP",
        )  # fmt: skip
        for hook, (flag, name) in hooks.items():
            _iptables("-I", hook, flag, "lo", "-j", name)
        yield
    finally:
        for hook, (flag, name) in hooks.items():
            for step in (("-D", hook, flag, "lo", "-j", name), ("-F", name), ("-X", name)):
                with contextlib.suppress(subprocess.CalledProcessError):
                    _iptables(*step)


# -- full disks ------------------------------------------------------------------------


def why_not_tmpfs() -> str | None:
    """None if a tmpfs can be mounted here; else why not."""
    if os.geteuid() != 0:
        return "the full-disk test needs root to mount a small tmpfs for the server's store"
    with tempfile.TemporaryDirectory() as probe:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", probe],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            return f"cannot mount a tmpfs here: {result.stderr.strip()}"
        subprocess.run(["umount", probe], check=False)
    return None


@contextlib.contextmanager
def tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of `size_mb` MB mounted at `path` for the block."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path, leave_bytes: int = 0) -> Path:
    """A file that takes the free space of `path`'s file system, but `leave_bytes`."""
    filler = path / "filler"
    free = shutil.disk_usage(path).free - leave_bytes
    with filler.open("wb") as fh:
        chunk = b"\0" * (1 << 20)
        while free > 0:
            try:
                fh.write(chunk[: min(len(chunk), free)])
                fh.flush()
            except OSError:
                break
            free -= len(chunk)
    return filler


@contextlib.asynccontextmanager
async def running(*cms: Any) -> AsyncIterator[list[Any]]:
    """Enter several async context managers, exit them in reverse (a short AsyncExitStack)."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(cm) for cm in cms]
