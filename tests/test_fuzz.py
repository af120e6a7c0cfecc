"""Fuzzing the web process against its own OpenAPI spec (schemathesis + Hypothesis).

The app runs in-process (ASGI) over the test Redis with no worker: jobs wait and time out
quickly (interactive 0.5 s, batch 0.2 s), so every answer is the web process's own. For every
operation: no 5xx other than the declared 503/504, every status code is declared in the spec, and
every body matches the declared schema. Bounded: HYBRIDGL_FUZZ_EXAMPLES examples per operation
(default 30), so CI runs it in well under a minute.
"""

from __future__ import annotations

import os

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

from backend.app import create_app
from backend.config import ServeSettings
from backend.queue import QUEUES

REDIS_URL = os.environ.get("HYBRIDGL_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
EXAMPLES = int(os.environ.get("HYBRIDGL_FUZZ_EXAMPLES", "30"))

app = create_app(ServeSettings(redis_url=REDIS_URL, interactive_timeout=0.5, batch_budget=0.2, job_retries=0,
                               result_ttl=60, warm_on_open=False))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module", autouse=True)
def _no_jobs_left_behind(redis_url):
    """Jobs the fuzzer enqueued must not reach the workers of later test modules."""
    yield
    from rq import Queue

    conn = redis.Redis.from_url(REDIS_URL)
    for name in QUEUES:
        Queue(name, connection=conn).empty()


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
def test_api_conforms_to_its_spec(case):
    response = case.call_and_validate(
        checks=[not_a_server_error, status_code_conformance, response_schema_conformance])
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body.get("error"), str) and body["error"], response.text


def test_spec_declares_the_error_answers():
    spec = app.openapi()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            declared = set(operation["responses"])
            assert {"401", "422", "503"} <= declared, (method, path, declared)
    assert "404" in spec["paths"]["/jobs/{job_id}"]["get"]["responses"]
