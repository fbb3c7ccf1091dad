"""Reading S3 objects at presigned URLs over plain HTTP (see `storage._reading`): the pieces
that differ from botocore's client and must behave as it does (SigV4 presigning, status
handling, CA bundle, proxies), a download in concurrent parts, and the rule that a presigned
URL, a credential while it lasts, reaches no log and no message."""

from __future__ import annotations

import functools
import logging
import os
import re
from typing import Any


def presign_with_sigv4(signature_version: str, **_) -> str | None:
    if signature_version.endswith("-query") and "v4" in signature_version:
        return None if signature_version.startswith("v4a") else signature_version
    return None


def session_options(kind: str) -> dict[str, Any]:
    """aiohttp session arguments of `storage`'s HTTP filesystems: "http", or "presigned" (as
    botocore: the proxy variables, the CA bundle, the stored bytes as they are, 2xx only)."""
    import urllib.request

    import aiohttp

    # aiohttp gives a whole request 5 minutes by default, which cuts a large shard's download on
    # a slow link and retries it from the start, forever. As botocore: 60 s to connect, and 60 s
    # without a byte is a stall; no limit on the whole.
    options: dict[str, Any] = {
        "timeout": aiohttp.ClientTimeout(total=None, sock_connect=60, sock_read=60)
    }
    if kind == "presigned":
        # aiohttp's trust_env looks the proxy variables up on every request (0.37 ms of CPU
        # each, measured: as much as the rest of a range request): only where one is set.
        options.update(
            trust_env=bool(urllib.request.getproxies()),
            auto_decompress=False,
            raise_for_status=raise_unless_2xx,
        )
    return options


async def session(**kwargs):
    """The HTTP session of presigned reads (made in fsspec's loop), trusting botocore's CA
    bundle where one is set (an internal CA of an on-premises store)."""
    import aiohttp

    ca_bundle = os.environ.get("AWS_CA_BUNDLE") or os.environ.get("REQUESTS_CA_BUNDLE")
    if ca_bundle:
        kwargs["connector"] = aiohttp.TCPConnector(ssl=ca_context(ca_bundle))
    return aiohttp.ClientSession(**kwargs)


def ca_context(ca_bundle: str):
    """An SSL context trusting `ca_bundle`, made once per process and bundle file (while the
    file is unchanged). Loading a system's bundle takes ~22 ms of CPU, and every loader worker
    made its own before its first request; forked from a process that has read S3, a worker
    now inherits it (as aiohttp's own default contexts, made when it is imported)."""
    try:
        stat = os.stat(ca_bundle)  # a file replaced keeps neither its inode nor its ctime
        stamp = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    except OSError:
        stamp = None  # loading it names the problem
    return _ca_context(ca_bundle, stamp)


@functools.lru_cache(maxsize=4)
def _ca_context(ca_bundle: str, stamp: tuple[int, ...] | None):
    import ssl

    return ssl.create_default_context(cafile=ca_bundle)


async def raise_unless_2xx(response) -> None:
    """aiohttp raises for >= 400 only: S3's PermanentRedirect (a 301 with no Location, another
    region's endpoint) would be read as the object's bytes."""
    import aiohttp

    if response.status >= 400:
        response.raise_for_status()
    elif not 200 <= response.status < 300:
        raise aiohttp.ClientResponseError(
            response.request_info, response.history, status=response.status,
            message=response.reason or "", headers=response.headers,
        )  # fmt: skip


def unusable_connection(exc: BaseException) -> bool:
    """A certificate or proxy the HTTP client could not use, where botocore may (its CA bundle,
    its proxy settings)."""
    import aiohttp

    return isinstance(
        exc,
        (aiohttp.ClientSSLError, aiohttp.ClientProxyConnectionError, aiohttp.ClientHttpProxyError),
    )


SIGNED_QUERY = re.compile(r"(https?://[^\s?'\"]+)\?[^\s'\"]*")


def without_signatures(text: str) -> str:
    """`text` with the query of every URL in it cut (a presigned URL is a credential while it
    lasts: it never reaches a log or a message)."""
    return SIGNED_QUERY.sub(r"\1?...", text)


class NoSignatures(logging.Filter):
    """fsspec's HTTP client logs each URL it reads at DEBUG: cut their queries."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "?" in message:
            record.msg, record.args = without_signatures(message), ()
        return True


logging.getLogger("fsspec.http").addFilter(NoSignatures())


def get_in_parts(
    fs, url: str, destination: str, size: int, progress: Any, part_bytes: int, concurrency: int
) -> None:
    """`url`'s `size` bytes into `destination` by range requests of `part_bytes`, `concurrency`
    at a time, each streamed to its place in the file; the object's size the server announces
    (Content-Range) is given to `progress` (an fsspec callback)."""
    import asyncio

    import fsspec.asyn

    fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    async def part(session, start: int, end: int) -> None:
        async with session.get(
            fs.encode_url(url), headers={"Range": f"bytes={start}-{end - 1}"}
        ) as response:
            total = response.headers.get("Content-Range", "").rpartition("/")[2]
            if response.status != 206 or not total.isdigit():
                raise EOFError(f"a range was answered with HTTP {response.status}, not a part")
            progress.set_size(int(total))
            if int(total) != size:
                raise EOFError(f"the server announced {total} bytes, the manifest says {size}")
            at = start
            async for chunk in response.content.iter_chunked(1 << 20):
                os.pwrite(fd, chunk[: end - at], at)
                at += len(chunk)
                progress.relative_update(len(chunk))
            if at != end:
                raise EOFError(f"{at - start} bytes of the part at {start}, {end - start} wanted")

    async def all_parts() -> None:
        session = await fs.set_session()
        starts = iter(range(0, size, part_bytes))  # shared: each worker takes the next part

        async def worker() -> None:
            for start in starts:
                await part(session, start, min(start + part_bytes, size))

        # `concurrency` tasks whatever the size (a manifest's size is not trusted to be sane).
        tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:  # the rest cancelled and awaited: none writes once fd is closed
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    try:
        fsspec.asyn.sync(fs.loop, all_parts)
    finally:
        os.close(fd)
