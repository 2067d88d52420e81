"""`mesh asyncapi`: the document is valid AsyncAPI 3.0 (the official JSON schema) and says
what the services do: RPC endpoints with request and reply, events published and handled,
with schemas whose `$ref`s resolve inside the document.

tests/data/asyncapi-3.0.0.schema.json is `schemas/3.0.0-without-$id.json` of the npm
package @asyncapi/specs 6.11.1 (Apache-2.0; LICENSE and NOTICE beside it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from framework import Context, Service
from framework.cli.main import main
from framework.web.asyncapi import asyncapi_document, describe_services
from services import notifications, orders, payments

SCHEMA = json.loads((Path(__file__).parent / "data" / "asyncapi-3.0.0.schema.json").read_text())
SHOP = [orders.service, payments.service, notifications.service]


def validate(document: dict[str, Any]) -> None:
    jsonschema.Draft7Validator(SCHEMA).validate(document)


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def all_refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in all_refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in all_refs(v)]
    return []


def test_the_shop_described_from_code_is_valid_asyncapi_3() -> None:
    document = asyncapi_document(describe_services(SHOP), server="127.0.0.1:4222")
    validate(document)
    assert document["asyncapi"] == "3.0.0"
    for ref in all_refs(document):
        resolve(document, ref)  # raises KeyError for a dangling $ref


def test_rpc_endpoints_have_request_and_reply_schemas() -> None:
    document = asyncapi_document(describe_services(SHOP))
    create = document["operations"]["orders_create"]
    assert create["action"] == "receive"
    assert resolve(document, create["channel"]["$ref"])["address"] == "orders.create"
    request = resolve(document, resolve(document, create["messages"][0]["$ref"])["$ref"])
    assert request["payload"]["$ref"] == "#/components/schemas/CreateOrder"
    assert set(document["components"]["schemas"]["CreateOrder"]["required"]) == {
        "customer_id",
        "items",
    }
    reply = resolve(document, resolve(document, create["reply"]["messages"][0]["$ref"])["$ref"])
    assert reply["payload"]["$ref"] == "#/components/schemas/Order"


def test_events_published_and_subscribed_share_one_channel() -> None:
    document = asyncapi_document(describe_services(SHOP))
    operations = document["operations"]
    sent = operations["orders_publishes_order_created_v1"]
    received = operations["payments_on_order_created"]
    assert (sent["action"], received["action"]) == ("send", "receive")
    assert sent["channel"] == received["channel"] == {"$ref": "#/channels/events_order_created_v1"}
    channel = resolve(document, sent["channel"]["$ref"])
    assert channel["address"] == "events.order.created.v1"
    message = resolve(document, channel["messages"]["event"]["$ref"])
    assert message["payload"]["$ref"] == "#/components/schemas/OrderCreated"


def test_job_endpoints_are_described_as_job_kinds() -> None:
    from framework.rpc.discovery import EndpointInfo, InfoResponse

    info = InfoResponse(
        name="reports",
        id="x",
        version="1.0.0",
        endpoints=[
            EndpointInfo(
                name="render",
                subject="jobs.reports.render",
                queue_group="reports",
                metadata={
                    "kind": "job",
                    "request_schema": json.dumps(
                        {"type": "object", "properties": {"pages": {"type": "integer"}}}
                    ),
                    "response_schema": json.dumps({"type": "string"}),
                },
            )
        ],
    )
    document = asyncapi_document([info])
    validate(document)
    job = document["operations"]["reports_job_render"]
    assert job["x-job-kind"] == "reports.render"
    assert job["x-result-schema"] == {"type": "string"}


def test_the_validator_rejects_a_broken_document() -> None:
    document = asyncapi_document(describe_services(SHOP))
    document["operations"]["orders_create"]["action"] = "publish"  # AsyncAPI 2 wording
    with pytest.raises(jsonschema.ValidationError):
        validate(document)


def test_cli_describes_modules_without_a_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "shop.json"
    code = main(
        ["asyncapi", "services.orders:service", "services.payments:service", "-o", str(out)]
    )
    assert code == 0
    document = json.loads(out.read_text())
    validate(document)
    assert "orders_create" in document["operations"]
    assert "wrote" in capsys.readouterr().err


async def test_cli_writes_the_document_of_running_services(
    serve: Any, nats_url: str, tmp_path: Path
) -> None:
    import anyio

    for service in SHOP:
        await serve(service)
    out = tmp_path / "running.json"
    code = await anyio.to_thread.run_sync(
        main, ["asyncapi", "--url", nats_url, "--timeout", "0.5", "-o", str(out)]
    )
    assert code == 0
    document = json.loads(out.read_text())
    validate(document)
    assert document["servers"]["nats"]["host"] == nats_url.removeprefix("nats://")
    assert {"orders_create", "payments_refund", "notifications_on_order_confirmed"} <= set(
        document["operations"]
    )


async def test_cli_with_no_services_running_exits_3(nats_url: str) -> None:
    import anyio

    code = await anyio.to_thread.run_sync(main, ["asyncapi", "--url", nats_url, "--timeout", "0.2"])
    assert code == 3


def test_cli_with_a_bad_spec_is_a_usage_error() -> None:
    assert main(["asyncapi", "services.nope:service"]) == 2


class RenderJob(msgspec.Struct):
    pages: int


def test_a_services_job_kinds_are_in_the_document() -> None:
    pytest.importorskip("framework.jobs", reason="background jobs are not present")
    reports = Service("reports", version="1.0.0")

    @reports.job("render")
    async def render(req: RenderJob, job: Context) -> str:  # a job handler may take Context
        return "done"

    document = asyncapi_document(describe_services([reports]))
    validate(document)
    job = document["operations"]["reports_job_render"]
    assert job["x-job-kind"] == "reports.render"
    message = resolve(document, job["messages"][0]["$ref"])
    assert resolve(document, message["$ref"])["payload"]["$ref"] == "#/components/schemas/RenderJob"
    assert job["x-result-schema"] == {"type": "string"}
