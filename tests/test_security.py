"""Security: credentials from the environment, TLS, secrets kept out of logs, permissions.

Every connection option (user/password, token, nkey seed or seed file, creds file,
TLS with a CA made here) is read from the environment by `ConnectSettings.from_env`,
exercised against a real nats-server configured for it, and the secret is looked for
in everything the process printed (JSON logs at debug level, nats-py's logs included)
and in `repr(settings)`. `nats-secure.conf` is started as committed (store dir moved)
and shown to refuse what a service does not own.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from framework import (
    Client,
    Context,
    NoResponders,
    PublishError,
    Reject,
    Service,
    ServiceError,
    connect,
    list_dead_letters,
)
from framework.dev.devserver import NatsServer
from framework.streams import ensure_streams
from framework.testing import eventually as wait_until
from framework.transport.settings import ConnectSettings

ROOT = Path(__file__).parent.parent
SECURE_CONF = ROOT / "nats-secure.conf"


def secret(prefix: str) -> str:
    """Distinctive enough that finding it anywhere in output is no coincidence."""
    return f"{prefix}{secrets.token_hex(12)}"


def server_with(tmp_path: Path, config: str, *, jetstream: bool = False) -> NatsServer:
    conf = tmp_path / "server.conf"
    conf.write_text(config)
    return NatsServer(
        config_file=conf,
        jetstream=jetstream,
        store_dir=tmp_path / "js" if jetstream else None,
        log_file=tmp_path / "server.log",
    )


# -- settings, in process ------------------------------------------------------------------


def test_settings_read_every_option_from_the_environment() -> None:
    env = {
        "NATS_URL": "nats://a:4222, nats://b:4222",
        "NATS_USER": "svc",
        "NATS_PASSWORD": "pw-secret",
        "NATS_TOKEN": "tok-secret",
        "NATS_NKEY_SEED": "SUseed-secret",
        "NATS_NKEY_SEED_FILE": "/run/secrets/seed",
        "NATS_CREDS": "/run/secrets/svc.creds",
    }
    settings = ConnectSettings.from_env(env=env)
    assert settings.servers == ["nats://a:4222", "nats://b:4222"]
    options = settings.nats_options()
    assert options["user"] == "svc" and options["password"] == "pw-secret"
    assert options["token"] == "tok-secret"
    assert options["nkeys_seed_str"] == "SUseed-secret"
    assert options["nkeys_seed"] == "/run/secrets/seed"
    assert options["user_credentials"] == "/run/secrets/svc.creds"
    text = repr(settings) + str(settings)
    for value in ("pw-secret", "tok-secret", "SUseed-secret"):
        assert value not in text


def test_settings_without_credentials_send_none() -> None:
    options = ConnectSettings.from_env(env={"NATS_URL": "nats://127.0.0.1:4222"}).nats_options()
    assert options == {"servers": ["nats://127.0.0.1:4222"]}


def test_credentials_inside_the_url_are_not_in_repr() -> None:
    settings = ConnectSettings.from_env(
        env={"NATS_URL": "nats://svc:url-secret@127.0.0.1:4222,nats://tok-in-url@127.0.0.1:4223"}
    )
    text = repr(settings)
    assert "url-secret" not in text
    assert "tok-in-url" not in text


# -- each credential kind, in a subprocess whose whole output is searched ---------------------

PROBE = r"""
import os, sys, anyio
from framework import Service, connect, configure_logging
from framework.transport.settings import ConnectSettings

configure_logging(json=True, level="debug")
vault = Service("vault")

@vault.rpc()
async def hello() -> str:
    return "hi"

async def main() -> None:
    settings = ConnectSettings.from_env()
    print("settings:", repr(settings), str(settings), flush=True)
    async with vault.serve():          # URL and credentials from the environment
        async with connect() as client:
            print("reply:", await client.call("vault.hello", returns=str, timeout=2), flush=True)
    for name, value in [kv.split("=", 1) for kv in sys.argv[1:]]:  # now wrong ones
        os.environ[name] = value
    try:
        async with connect(connect_timeout=1, allow_reconnect=False) as client:
            print("refused: no", flush=True)
    except Exception as exc:
        print("refused:", type(exc).__name__, exc, flush=True)

anyio.run(main)
"""


def run_probe(env: dict[str, str], wrong: dict[str, str], secrets_: list[str]) -> str:
    """Run PROBE with `env`, then with `wrong` values; no secret may be in its output."""
    full = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("NATS_") and k not in ("LOG_LEVEL", "LOG_FORMAT")
    }
    full.update(env)
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *(f"{k}={v}" for k, v in wrong.items())],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "reply: hi" in output, output[-4000:]
    assert "refused: no" not in output, output[-4000:]
    assert '"level": "debug"' in output or '"level":"debug"' in output  # debug was on
    for value in secrets_:
        assert value not in output, f"secret {value[:6]}... found in the output"
    return output


def test_user_and_password_from_env_and_never_logged(tmp_path: Path) -> None:
    password, wrong = secret("pw-"), secret("wrong-pw-")
    config = f'authorization {{ user: vault, password: "{password}" }}\n'
    with server_with(tmp_path, config) as server:
        output = run_probe(
            {"NATS_URL": server.url, "NATS_USER": "vault", "NATS_PASSWORD": password},
            {"NATS_PASSWORD": wrong},
            [password, wrong],
        )
    assert "refused: AuthorizationError" in output or "Authorization" in output


def test_token_from_env_and_never_logged(tmp_path: Path) -> None:
    token, wrong = secret("tok-"), secret("wrong-tok-")
    with server_with(tmp_path, f'authorization {{ token: "{token}" }}\n') as server:
        output = run_probe(
            {"NATS_URL": server.url, "NATS_TOKEN": token}, {"NATS_TOKEN": wrong}, [token, wrong]
        )
    assert "Authorization" in output


def new_user_nkey() -> tuple[str, str]:
    """(seed, public key) of a fresh user nkey."""
    nkeys = pytest.importorskip("nkeys", reason="nkeys is needed for nkey authentication")
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed.decode(), nkeys.from_seed(seed).public_key.decode()


@pytest.mark.parametrize("via", ["NATS_NKEY_SEED", "NATS_NKEY_SEED_FILE"])
def test_nkey_seed_from_env_and_never_logged(tmp_path: Path, via: str) -> None:
    seed, public = new_user_nkey()
    other_seed, _ = new_user_nkey()
    config = f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n'
    if via == "NATS_NKEY_SEED_FILE":
        seed_file, other_file = tmp_path / "vault.nk", tmp_path / "other.nk"
        seed_file.write_text(seed + "\n")
        other_file.write_text(other_seed + "\n")
        env, wrong = {via: str(seed_file)}, {via: str(other_file)}
    else:
        env, wrong = {via: seed}, {via: other_seed}
    with server_with(tmp_path, config) as server:
        output = run_probe({"NATS_URL": server.url, **env}, wrong, [seed, other_seed])
    assert "Authorization" in output


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_pki(tmp_path: Path) -> Path:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate."""
    pki = tmp_path / "pki"
    pki.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=mesh test CA", cwd=pki)  # fmt: skip
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        (pki / f"{name}.ext").write_text(ext)
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN=mesh {name}", cwd=pki)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
                "-extfile", f"{name}.ext", cwd=pki)  # fmt: skip
    return pki


def key_body(path: Path) -> str:
    """The base64 body of a PEM private key: the part that must never be printed."""
    return "".join(line for line in path.read_text().splitlines() if not line.startswith("-----"))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI needed to make a CA")
def test_mutual_tls_from_env_with_a_ca_made_here(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    config = (
        "tls {\n"
        f'  cert_file: "{pki / "server.pem"}"\n'
        f'  key_file: "{pki / "server.key"}"\n'
        f'  ca_file: "{pki / "ca.pem"}"\n'
        "  verify: true\n"
        "  timeout: 2\n"
        "}\n"
    )
    env = {
        "NATS_TLS_CA": str(pki / "ca.pem"),
        "NATS_TLS_CERT": str(pki / "client.pem"),
        "NATS_TLS_KEY": str(pki / "client.key"),
    }
    with server_with(tmp_path, config) as server:
        # The second connection presents the server's own cert as a client cert: the
        # server requires clientAuth, so it is refused after the handshake.
        output = run_probe(
            {"NATS_URL": server.url, **env},
            {"NATS_TLS_CERT": str(pki / "server.pem"), "NATS_TLS_KEY": str(pki / "server.key")},
            [key_body(pki / "client.key"), key_body(pki / "server.key")],
        )
    assert "refused:" in output


async def test_tls_without_the_ca_is_refused_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI needed")
    from framework import connect

    pki = make_pki(tmp_path)
    config = f'tls {{ cert_file: "{pki / "server.pem"}", key_file: "{pki / "server.key"}" }}\n'
    with server_with(tmp_path, config) as server:
        for name in ("NATS_TLS_CA", "NATS_TLS_CERT", "NATS_TLS_KEY"):
            monkeypatch.delenv(name, raising=False)
        # No CA of ours: the system store does not know the test CA, verification fails.
        monkeypatch.setenv("NATS_TLS_CERT", str(pki / "client.pem"))
        monkeypatch.setenv("NATS_TLS_KEY", str(pki / "client.key"))
        started = time.monotonic()
        with pytest.raises(Exception, match=r"(?i)certificate verify failed"):
            async with connect(server.url, connect_timeout=1, allow_reconnect=False):
                pass
        assert time.monotonic() - started < 5  # an error, not a hang
        # With the CA it works.
        monkeypatch.setenv("NATS_TLS_CA", str(pki / "ca.pem"))
        async with connect(server.url) as client:
            assert client.nc.is_connected


async def test_wrong_credentials_fail_fast_instead_of_retrying_forever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from framework import connect

    with server_with(tmp_path, 'authorization { user: vault, password: "right" }\n') as server:
        monkeypatch.setenv("NATS_USER", "vault")
        monkeypatch.setenv("NATS_PASSWORD", "wrong")
        with anyio.move_on_after(2) as scope, pytest.raises(Exception, match=r"(?i)authoriz"):
            async with connect(server.url):
                pass
        assert not scope.cancelled_caught, "connect() still retrying after 2 s"


# -- creds file (operator mode: JWTs signed here with nkeys) ------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _jwt(claims: dict[str, Any], signer: Any) -> str:
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = signer.sign(f"{header}.{body}".encode())
    return f"{header}.{body}.{_b64(signature)}"


def _keypair(prefix: int) -> Any:
    nkeys = pytest.importorskip("nkeys", reason="nkeys is needed to sign JWTs")
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def make_operator_setup(tmp_path: Path) -> tuple[str, Path, str]:
    """(server config, creds file, user seed) for a one-account operator-mode server."""
    import hashlib

    nkeys = pytest.importorskip("nkeys")
    operator = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
    account = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    user = _keypair(nkeys.PREFIX_BYTE_USER)
    now = int(time.time())

    def claims(sub: str, iss: str, name: str, nats: dict[str, Any]) -> dict[str, Any]:
        payload = {"iat": now, "iss": iss, "name": name, "sub": sub, "nats": nats}
        jti = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).digest()
        payload["jti"] = base64.b32encode(jti).decode().rstrip("=")
        return payload

    op_pub = operator.public_key.decode()
    acc_pub = account.public_key.decode()
    operator_jwt = _jwt(
        claims(op_pub, op_pub, "mesh", {"type": "operator", "version": 2}), operator
    )
    unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                 "wildcards": True, "conn": -1, "leaf": -1}  # fmt: skip
    account_jwt = _jwt(
        claims(acc_pub, op_pub, "MESH", {"type": "account", "version": 2, "limits": unlimited}),
        operator,
    )
    user_claims = {"type": "user", "version": 2, "subs": -1, "data": -1, "payload": -1}
    user_jwt = _jwt(claims(user.public_key.decode(), acc_pub, "vault", user_claims), account)
    seed = user.seed.decode()
    tmp_path.mkdir(parents=True, exist_ok=True)
    creds = tmp_path / "vault.creds"
    creds.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed}\n"
        "------END USER NKEY SEED------\n"
    )
    config = (
        f"operator: {operator_jwt}\n"
        "resolver: MEMORY\n"
        f"resolver_preload: {{\n  {acc_pub}: {account_jwt}\n}}\n"
    )
    return config, creds, seed


def test_creds_file_from_env_and_never_logged(tmp_path: Path) -> None:
    config, creds, seed = make_operator_setup(tmp_path)
    other_config, other_creds, other_seed = make_operator_setup(tmp_path / "other")
    del other_config
    with server_with(tmp_path, config) as server:
        output = run_probe(
            {"NATS_URL": server.url, "NATS_CREDS": str(creds)},
            {"NATS_CREDS": str(other_creds)},  # signed by an operator the server does not trust
            [seed, other_seed],
        )
    assert "Authorization" in output


# -- nats-secure.conf: one user per service, least privilege ---------------------------------


class Note(msgspec.Struct):
    order_id: str


@pytest.fixture
def secure_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """nats-secure.conf as committed, the store moved to tmp, passwords in the env."""
    passwords = {
        user: secret(f"{user}-")
        for user in ("orders", "payments", "inventory", "receipts", "notifications", "edge")
    }
    for user, password in passwords.items():
        monkeypatch.setenv(f"{user.upper()}_PASSWORD", password)
    text = SECURE_CONF.read_text()
    assert '".mesh/secure"' in text
    conf = tmp_path / "nats-secure.conf"
    conf.write_text(text.replace('".mesh/secure"', f'"{tmp_path / "secure"}"'))
    with NatsServer(config_file=conf, jetstream=False, log_file=tmp_path / "secure.log") as server:
        server.passwords = passwords  # type: ignore[attr-defined]
        yield server


@asynccontextmanager
async def as_user(server: Any, user: str) -> AsyncIterator[Client]:
    client = await Client.open(server.url, name=user, user=user, password=server.passwords[user])
    try:
        yield client
    finally:
        await client.close()


def test_secure_conf_is_valid_and_binds_loopback() -> None:
    from framework.dev.devserver import find_nats_server

    env = {
        **os.environ,
        **{
            f"{u}_PASSWORD": "x"
            for u in ("ORDERS", "PAYMENTS", "INVENTORY", "RECEIPTS", "NOTIFICATIONS", "EDGE")
        },
    }
    result = subprocess.run(
        [find_nats_server(), "-t", "-c", str(SECURE_CONF)],
        capture_output=True,
        text=True,
        env=env,
        timeout=10,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = SECURE_CONF.read_text()
    assert "listen: 127.0.0.1:" in text and "0.0.0.0" not in text
    assert "password: $" in text and 'password: "' not in text  # no password in the file


async def test_secure_conf_lets_the_sample_mesh_work(secure_server: Any, outbox: Any) -> None:
    """The real sample services, each as its own user, take an order to confirmed."""
    from support.shop import order_when

    from services import inventory, notifications, orders, payments, receipts
    from services.contracts import CreateOrder, Order, OrderItem

    sent = outbox.sent  # a list, not the outbox file
    async with AsyncExitStack() as stack:
        for module in (notifications, payments, inventory, receipts, orders):
            client = await stack.enter_async_context(as_user(secure_server, module.service.name))
            await stack.enter_async_context(module.service.serve(client))
        edge = await stack.enter_async_context(as_user(secure_server, "edge"))
        order = await edge.call(
            "orders.create",
            CreateOrder("c-1", [OrderItem("book-dune", 2, 500)]),
            returns=Order,
            timeout=5.0,
        )
        await wait_until(lambda: len(sent) >= 1, 10, "the confirmation notification")
        await wait_until(lambda: len(sent) == 2, 10, "the receipt (the receipts.render job)")
        assert sorted(note.kind for note in sent) == ["order_confirmed", "receipt"]

        await order_when(edge, order.id, lambda found: found.status == "confirmed", 5)

        async def all_answer() -> bool:
            names = {info.name for info in await edge.ping(timeout=0.3)}
            return names == {"orders", "payments", "inventory", "receipts", "notifications"}

        await wait_until(all_answer, 10, "every service to answer a ping as edge")
    log = (secure_server.log_file).read_text()
    assert "Violation" not in log, [line for line in log.splitlines() if "Violation" in line]


async def test_a_service_cannot_publish_an_event_type_it_does_not_own(secure_server: Any) -> None:
    """payments forging an order event, orders a payment capture: refused, nothing stored."""
    async with (
        as_user(secure_server, "orders") as orders,
        as_user(secure_server, "payments") as payments,
        as_user(secure_server, "notifications") as notifications,
    ):
        await ensure_streams(orders, [], ["order.created.v1"])
        await ensure_streams(payments, [], ["payment.captured.v1"])
        await orders.publish("order.created.v1", Note("o-1"))  # its own domain: stored
        await payments.publish("payment.captured.v1", Note("o-1"))
        forged = [
            (payments, "order.created.v1"),
            (orders, "payment.captured.v1"),
            (notifications, "payment.captured.v1"),
            (notifications, "order.created.v1"),
        ]
        for client, event_type in forged:
            with pytest.raises(PublishError):
                await client.publish(event_type, Note("forged"), timeout=0.5)
        for stream in ("EVENTS_ORDER", "EVENTS_PAYMENT"):
            info = await orders.js.stream_info(stream)
            assert info.state.messages == 1, f"{stream} stored a forged event"
    log = secure_server.log_file.read_text()
    assert log.count("Publish Violation") >= len(forged)


async def test_a_refused_publish_is_a_clear_and_fast_error(secure_server: Any) -> None:
    async with as_user(secure_server, "payments") as payments:
        await ensure_streams(payments, [], ["payment.captured.v1"])
        started = time.monotonic()
        with pytest.raises(PublishError, match=r"(?i)permission") as caught:
            await payments.publish("order.created.v1", Note("forged"), timeout=2.0)
        assert time.monotonic() - started < 1.0, caught.value
        assert "events.order.created.v1" in str(caught.value)


async def test_a_refused_call_is_a_clear_and_fast_error(secure_server: Any) -> None:
    async with as_user(secure_server, "notifications") as notifications:
        started = time.monotonic()
        with pytest.raises(ServiceError, match=r"(?i)permission") as caught:
            await notifications.call("payments.refund", {"order_id": "o-1"}, timeout=2.0)
        assert time.monotonic() - started < 1.0, caught.value


async def test_a_service_cannot_serve_another_services_subjects(secure_server: Any) -> None:
    """Credentials of payments serving an `orders` impostor: it never gets a request."""
    impostor = Service("orders")
    seen: list[Any] = []

    @impostor.rpc()
    async def create(req: dict[str, Any]) -> str:
        seen.append(req)
        return "stolen"

    async with (
        as_user(secure_server, "payments") as payments,
        as_user(secure_server, "edge") as edge,
        impostor.serve(payments),
    ):
        with pytest.raises((NoResponders, ServiceError)):
            await edge.call("orders.create", {"card": "4111"}, timeout=1.0)
    assert seen == []
    log = secure_server.log_file.read_text()
    assert 'Subscription Violation - User "payments", Subject "orders.create"' in log or (
        "Subscription Violation" in log
    )


async def test_dead_letters_stay_within_the_services_own_subjects(secure_server: Any) -> None:
    """A rejected event is dead-lettered under deadletter.<its service>: allowed."""
    payments = Service("payments")
    rejected: list[str] = []

    @payments.subscribe("order.created.v1", max_deliver=1)
    async def on_created(event: Note, ctx: Context) -> None:
        rejected.append(event.order_id)
        raise Reject("card on a deny list")

    async with (
        as_user(secure_server, "orders") as orders,
        as_user(secure_server, "payments") as client,
    ):
        await ensure_streams(orders, [], ["order.created.v1"])
        async with payments.serve(client):
            await orders.publish("order.created.v1", Note("o-9"))
            await wait_until(lambda: rejected == ["o-9"], 5, "the rejection")

            async def stored() -> bool:
                return bool(await list_dead_letters(orders, service="payments"))

            await wait_until(stored, 5, "the dead letter")
        (letter,) = await list_dead_letters(orders, service="payments")
    assert letter.reason == "rejected"
    assert letter.subject == "events.order.created.v1"


async def test_a_refused_request_to_a_subject_with_capitals_fails_at_once(tmp_path: Path) -> None:
    """nats-py lowercases the server's -ERR text: the refusal must still find the call
    (`$JS.API.*`, `$SRV.*` and users' own subjects have capitals) instead of letting it
    wait out its timeout."""
    conf = tmp_path / "deny.conf"
    conf.write_text(
        'authorization { users: [{user: "svc", password: "pw",'
        ' permissions: {publish: {deny: ["Billing.Charge"]}}}] }\n'
    )
    with NatsServer(config_file=conf, jetstream=False) as server:
        await anyio.to_thread.run_sync(server.start)
        async with connect(server.url.replace("nats://", "nats://svc:pw@")) as client:
            with anyio.fail_after(2), pytest.raises(ServiceError, match=r"(?i)permission"):
                await client.call("Billing.Charge", {"order_id": "o-1"}, timeout=10)
