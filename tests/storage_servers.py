"""Object storage on loopback for tests: moto's S3 server and nginx serving a folder over HTTP.

Both are real servers speaking their protocols (s3fs and aiohttp talk to them as to AWS or any
web server); each test gets its own, started and stopped by a fixture (see conftest.py).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BUCKET = "umt-test"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Server:
    endpoint: str
    client: object  # boto3 S3 client

    def upload_folder(self, folder: Path, prefix: str) -> str:
        """Every file of `folder` under `prefix/`; returns the folder's s3:// URL."""
        for path in sorted(folder.iterdir()):
            if path.is_file():
                self.client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")
        return f"s3://{BUCKET}/{prefix}"

    def objects(self, prefix: str) -> dict[str, bytes]:
        """{key: bytes} of every object under `prefix`."""
        out = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        for page in pages:
            for item in page.get("Contents", []):
                body = self.client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
                out[item["Key"]] = body
        return out


_ranged = threading.local()
_ONE_RANGE = re.compile(r"bytes=(\d+-\d*|-\d+)")


class _RangeOfObject:
    """An object's bytes as moto's range handling uses them (its length, then one slice), read
    from the object's buffer only where the slice lies."""

    def __init__(self, key):
        self.key = key

    def __len__(self) -> int:
        return self.key.contentsize

    def __getitem__(self, part: slice) -> bytes:
        start, stop, _ = part.indices(len(self))
        with self.key.lock:
            self.key._value_buffer.seek(start)
            return self.key._value_buffer.read(max(0, stop - start))

    def __bytes__(self) -> bytes:
        return self[:]


def serve_ranges_in_place() -> None:
    """Make moto serve a range request at the cost of the range, as S3 does.

    moto 5 reads a whole object for every GET, then slices out a range (`FakeKey.value`, then
    `S3Response._handle_range_header`): 100 KB of a 40 MB object cost 32 ms of the server's CPU
    here against 4.4 ms of a 1 MB one (measured), so a reader of ranges of large shards measured
    moto's copy, not its own work. Here a GET with one range reads only that range from the
    object's buffer. The bytes returned are the same (tests check them); other requests are moto's
    own. Installed once per process."""
    from moto.s3.models import FakeKey
    from moto.s3.responses import S3Response

    if getattr(S3Response, "_umt_ranges_in_place", False):
        return
    whole = FakeKey.value

    def value(key):
        return _RangeOfObject(key) if getattr(_ranged, "on", False) else whole.fget(key)

    get_object = S3Response.get_object

    def ranged_get_object(response):
        one_range = _ONE_RANGE.fullmatch(response.headers.get("range") or "") is not None
        _ranged.on = one_range and "partNumber" not in response.querystring
        try:
            status, headers, body = get_object(response)
        finally:
            _ranged.on = False
        if isinstance(body, _RangeOfObject) and status != 200:  # not sliced as a range below
            body = bytes(body)
        return status, headers, body

    handle_range = S3Response._handle_range_header

    def sliced(response, request, headers, content):
        # moto answers some ranges with the whole object (`bytes=10-5`; a suffix of an empty
        # one): its bytes then, never the lazy object.
        status, headers, content = handle_range(response, request, headers, content)
        return status, headers, bytes(content) if isinstance(content, _RangeOfObject) else content

    FakeKey.value = property(value, whole.fset)
    S3Response.get_object = ranged_get_object
    S3Response._handle_range_header = sliced
    S3Response._umt_ranges_in_place = True


@contextmanager
def moto_s3():
    """A moto S3 endpoint on 127.0.0.1 with bucket `umt-test`; AWS_* variables point at it (for
    this process and the subprocesses it starts) while it runs."""
    import boto3
    from moto.server import ThreadedMotoServer

    # One line per request from its HTTP server once logging is configured: keep it quiet.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    serve_ranges_in_place()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        # moto keeps its buckets in this process between servers: start from none.
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"))
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        yield S3Server(endpoint, client)
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class HttpServer:
    base: str  # http://127.0.0.1:PORT
    root: Path  # the folder served at /
    access_log: Path

    def requests(self, path: str, method: str = "GET") -> list[int]:
        """Status codes of the requests for `path` logged so far (nginx writes each at once)."""
        codes = []
        for line in self.access_log.read_text().splitlines():
            parts = line.split('"')
            if len(parts) > 2 and parts[1].split()[:2] == [method, path]:
                codes.append(int(parts[2].split()[0]))
        return codes


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that no system trusts, and its key (openssl)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nginx_binary() -> str:
    """The nginx to start: $UMT_NGINX when set, else the one on PATH, else Debian's."""
    return os.environ.get("UMT_NGINX") or shutil.which("nginx") or "/usr/sbin/nginx"


def server_missing(kind: str) -> str:
    """Why the loopback server for `kind` (s3: moto, http: nginx) cannot start here; "" if it can.

    Tests skip with this reason; benchmarks leave that storage out and print it."""
    if kind == "s3":
        absent = [m for m in ("boto3", "moto") if importlib.util.find_spec(m) is None]
        return f"{' and '.join(absent)} not installed (pip install -e '.[test]')" if absent else ""
    if kind == "http" and not os.path.exists(nginx_binary()):
        return f"nginx is not installed at {nginx_binary()} (apt-get install nginx; .ci/run does)"
    return ""


@contextmanager
def nginx(
    root: Path,
    work: Path,
    fail_with_500: tuple[str, ...] = (),
    answers: dict[str, int] | None = None,
    tls: tuple[Path, Path] | None = None,
):
    """nginx serving `root` at http://127.0.0.1:PORT/ (Range requests included); each path of
    `fail_with_500` always answers 500, each of `answers` its status; with `tls` (certificate,
    key), at https://. Needs Debian's nginx and root (as CI runs)."""
    missing = server_missing("http")
    if missing:
        import pytest

        pytest.skip(missing)
    binary = nginx_binary()
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    statuses = {**dict.fromkeys(fail_with_500, 500), **(answers or {})}
    failing = "".join(f"    location = {p} {{ return {c}; }}\n" for p, c in statuses.items())
    temp_paths = "".join(
        f"  {name}_temp_path {work / name};\n"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    config = work / "nginx.conf"
    config.write_text(
        f"""daemon off;
{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1;
pid {work / "nginx.pid"};
error_log {work / "error.log"};
events {{ worker_connections 256; }}
http {{
  access_log {work / "access.log"};
{temp_paths}  server {{
    listen 127.0.0.1:{port}{" ssl" if tls else ""};
    root {root};
{f"    ssl_certificate {tls[0]};{chr(10)}    ssl_certificate_key {tls[1]};" if tls else ""}
{failing}  }}
}}
"""
    )
    process = subprocess.Popen(
        [binary, "-c", str(config), "-p", str(work)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:  # wait until it accepts connections (it started, or it failed)
            if process.poll() is not None:
                raise RuntimeError(f"nginx did not start: {process.stderr.read().decode()[-500:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("nginx did not accept connections within 30 s") from None
                time.sleep(0.05)
        scheme = "https" if tls else "http"
        yield HttpServer(f"{scheme}://127.0.0.1:{port}", root, work / "access.log")
    finally:
        process.terminate()
        process.wait(timeout=30)
