"""Schemathesis against our own OpenAPI document, on the running service: no server errors, and every
answer conforms to the document (status codes, content types, bodies)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.helpers.stack import LocalStack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    # Authentication on, as shipped: every operation is called with a credential it accepts (schemathesis
    # also calls without one, and the document says what that answers). Many fuzzed requests are refused:
    # the failed-authentication limit is off here.
    env = {"METERSTREAM_LOCAL_AUTH__ENABLED": "true", "METERSTREAM_LOCAL_AUTH__FAILED_AUTH_PER_MINUTE": "0"}
    stack = LocalStack(tmp_path_factory.mktemp("openapi") / "data", env=env).start()
    yield stack
    stack.stop()


def credentials(stack: LocalStack) -> tuple[str, str]:
    """The admin key ``meterstream up`` made, and a portal token for the portal's own operations."""
    import httpx

    admin = (stack.data_dir / "admin.key").read_text().strip()
    r = httpx.post(
        f"{stack.url}/api/v1/portal/tokens", json={"subject": "fuzz"}, headers={"Authorization": f"Bearer {admin}"}
    )
    assert r.status_code == 200, r.text
    return admin, r.json()["token"]


def operations(stack: LocalStack, admin: str) -> list[APIOperation]:
    loaded = schemathesis.openapi.from_url(
        f"{stack.url}/api/v1/openapi.yaml", headers={"Authorization": f"Bearer {admin}"}
    )
    return [result.ok() for result in loaded.get_all_operations()]


def fuzz(operation: APIOperation, headers: dict[str, str], excluded: list[Any]) -> None:
    @given(operation.as_strategy())
    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=not os.environ.get("FUZZ_RANDOM"),
    )
    def conforms(case: Case) -> None:
        case.call_and_validate(headers=headers, excluded_checks=excluded)

    conforms()


def test_api_conforms_to_its_document(stack: LocalStack) -> None:
    # Driven through Hypothesis directly: schemathesis' pytest plugin does not support pytest 9 yet.
    checked = []
    # A schema-valid request can still be refused by rules a JSON schema cannot state (`from` before
    # `to`, an unknown time zone, an llm.usage event without usage, a time far in the future), so
    # "valid data must be accepted" is not checked. Every other check applies: no server error,
    # documented status codes, content types and bodies, and invalid data rejected.
    excluded = [positive_data_acceptance]
    admin, portal = credentials(stack)
    for operation in operations(stack, admin):
        token = portal if operation.path.startswith("/api/v1/portal/meters/") else admin
        fuzz(operation, {"Authorization": f"Bearer {token}"}, excluded)
        checked.append(operation.label)
    assert len(checked) >= 45, checked


def test_the_document_is_served_and_packaged(stack: LocalStack) -> None:
    import httpx

    admin = (stack.data_dir / "admin.key").read_text().strip()
    assert httpx.get(f"{stack.url}/api/v1/openapi.yaml").status_code == 401
    served = httpx.get(f"{stack.url}/api/v1/openapi.yaml", headers={"Authorization": f"Bearer {admin}"}).text
    assert served == (Path(__file__).parents[2] / "meterstream" / "openapi.yaml").read_text()
