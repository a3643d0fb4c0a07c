"""schemathesis over /openapi.json against the live gateway: no 5xx, responses match the schema.

Bounded: a few generated requests per operation (hypothesis, derandomized), under a minute.
(Driven through schemathesis' Python API: its pytest plugin does not load under pytest 9.)
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

# Operations whose inputs have rules beyond a schema: any bytes are schema-valid for an upload
# (refusing what is not audio, 415, is the contract); a page token is opaque (one not returned
# by ListJobs is INVALID_ARGUMENT, per AIP-158); job options are checked against the chosen
# model (its sources, its longest segment). Only "schema-valid data must be accepted" is
# skipped for them; no 5xx and schema-conforming responses are still checked everywhere.
CONTENT_CHECKED = {("POST", "/v1/jobs:upload"), ("POST", "/process"), ("GET", "/v1/jobs"), ("POST", "/v1/jobs")}


def fuzz(operation, excluded: list):
    """A hypothesis test of one operation: generated requests, validated responses."""

    @given(case=operation.as_strategy())
    @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    def run(case):
        case.call_and_validate(timeout=60, excluded_checks=excluded)

    return run


def test_every_operation_conforms(gateway_url):
    schema = schemathesis.openapi.from_url(f"{gateway_url}/openapi.json")
    failures: dict[str, str] = {}
    checked = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        semantic = (operation.method.upper(), operation.path) in CONTENT_CHECKED
        try:
            fuzz(operation, [positive_data_acceptance] if semantic else [])()
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure, then report
            failures[operation.label] = str(exc)[:2000]
        checked += 1
    assert checked >= 15
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
