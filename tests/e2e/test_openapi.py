"""Schemathesis against our own OpenAPI document, on the running service: no server errors, and every
answer conforms to the document (status codes, content types, bodies)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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
    stack = LocalStack(tmp_path_factory.mktemp("openapi") / "data").start()
    yield stack
    stack.stop()


def operations(stack: LocalStack) -> list[APIOperation]:
    loaded = schemathesis.openapi.from_url(f"{stack.url}/api/v1/openapi.yaml")
    return [result.ok() for result in loaded.get_all_operations()]


def test_api_conforms_to_its_document(stack: LocalStack) -> None:
    # Driven through Hypothesis directly: schemathesis' pytest plugin does not support pytest 9 yet.
    checked = []
    # A schema-valid request can still be refused by rules a JSON schema cannot state (`from` before
    # `to`, an unknown time zone, an llm.usage event without usage, a time far in the future), so
    # "valid data must be accepted" is not checked. Every other check applies: no server error,
    # documented status codes, content types and bodies, and invalid data rejected.
    excluded = [positive_data_acceptance]
    for operation in operations(stack):

        @given(operation.as_strategy())
        @settings(
            max_examples=40,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=not os.environ.get("FUZZ_RANDOM"),
        )
        def conforms(case: Case) -> None:
            case.call_and_validate(excluded_checks=excluded)

        conforms()
        checked.append(operation.label)
    assert len(checked) >= 39, checked


def test_the_document_is_served_and_packaged(stack: LocalStack) -> None:
    import httpx

    served = httpx.get(f"{stack.url}/api/v1/openapi.yaml").text
    assert served == (Path(__file__).parents[2] / "meterstream" / "openapi.yaml").read_text()
