"""A real S3 server on loopback for the object-store tests: moto in server mode (HTTP, its own thread), not
an in-process mock. Every request the code under test makes goes over a socket to it, signed like AWS's.

``s3_server`` starts it once per session on a free 127.0.0.1 port; ``s3_env`` points the environment at
it (the same variables the promote.secret Secret gives KFP tasks) and creates a fresh bucket per test.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

ACCESS_KEY = "recsys-test-key"
SECRET_KEY = "recsys-test-secret"


@dataclass(frozen=True)
class S3Endpoint:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class S3Bucket:
    endpoint: S3Endpoint
    name: str

    def uri(self, path: str = "") -> str:
        return f"s3://{self.name}/{path}" if path else f"s3://{self.name}"

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint.url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Endpoint]:
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3Endpoint("127.0.0.1", port)
    finally:
        server.stop()


@pytest.fixture()
def s3_env(s3_server, monkeypatch) -> S3Bucket:
    """The environment a promote/gate/deploy task gets from the Secret, and a new empty bucket."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "S3_ENDPOINT", "S3_USE_HTTPS", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = S3Bucket(s3_server, f"recsys-{uuid.uuid4().hex[:12]}")
    bucket.client().create_bucket(Bucket=bucket.name)
    return bucket
