"""Fetching image bytes: local files, and URLs with a deadline, a size cap and retries."""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from pathlib import Path

from data_pipeline.shard.options import SampleError, ShardOptions
from data_pipeline.shard.sources import is_url

RETRY_HTTP_CODES = (408, 425, 429, 500, 502, 503, 504)


def fetch_image(image: str | bytes, options: ShardOptions) -> bytes:
    """The encoded image of a row: its bytes, a local file, or a download."""
    if isinstance(image, bytes):
        return image
    if is_url(image):
        return download(image, options)
    try:
        return Path(image).read_bytes()
    except FileNotFoundError as exc:
        raise SampleError("missing_file", f"{image}: no such file") from exc
    except OSError as exc:
        raise SampleError("unreadable_file", f"{image}: {exc.strerror or exc}") from exc


def download(url: str, options: ShardOptions) -> bytes:
    """GET `url` with a timeout, a size limit and retries on transient failures."""
    error = SampleError("download_error", f"{url}: not attempted")
    for attempt in range(options.retries + 1):
        if attempt:
            time.sleep(min(0.25 * 2 ** (attempt - 1), 5.0))  # back off before a retry
        try:
            return download_once(url, options)
        except urllib.error.HTTPError as exc:
            error = SampleError(f"http_{exc.code}", f"{url}: HTTP {exc.code} {exc.reason}")
            if exc.code not in RETRY_HTTP_CODES:
                break
        except TimeoutError as exc:
            error = SampleError("timeout", f"{url}: no answer within {options.timeout_s} s ({exc})")
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                error = SampleError("timeout", f"{url}: no answer within {options.timeout_s} s")
            else:
                error = SampleError("download_error", f"{url}: {exc.reason}")
        except (HTTPException, OSError) as exc:
            error = SampleError("download_error", f"{url}: {type(exc).__name__}: {exc}")
    raise error


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only: urllib would also follow ftp://, and a redirect to
    file:// (which urllib refuses as an HTTP error) is reported for what it is."""

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers.get("Location") or headers.get("URI") or ""
        target = urllib.parse.urljoin(req.full_url, target)
        if urllib.parse.urlsplit(target).scheme not in ("http", "https"):
            fp.close()
            raise SampleError("bad_redirect", f"{req.full_url}: redirected to {target}")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


def download_once(url: str, options: ShardOptions) -> bytes:
    """One GET: at most max_download_bytes, within download_deadline_s in all (the per-read
    timeout alone lets a server that trickles a byte at a time hold a worker for ever)."""
    request = urllib.request.Request(url, headers={"User-Agent": "umt-shard/1"})
    limit, deadline = options.max_download_bytes, time.monotonic() + options.download_deadline_s
    with _OPENER.open(request, timeout=options.timeout_s) as response:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise SampleError("too_large", f"{url}: {declared} bytes > {limit} allowed")
        chunks, size = [], 0
        while chunk := response.read1(1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise SampleError("too_large", f"{url}: more than {limit} bytes")
            if time.monotonic() > deadline:
                raise SampleError(
                    "timeout",
                    f"{url}: not complete within --download-deadline {options.download_deadline_s:g} s"
                    f" ({size} bytes so far)",
                )
    return b"".join(chunks)


def fetch_in_order(
    images: list[str | bytes], options: ShardOptions
) -> Iterator[bytes | SampleError]:
    """Bytes (or the error) of each image, in order, loaded by a bounded pool of threads.

    At most `2 * download_threads` loads are in flight, so memory stays bounded however large the
    shard; leaving early cancels what has not started.
    """

    def load(image: str | bytes) -> bytes | SampleError:
        try:
            return fetch_image(image, options)
        except SampleError as exc:
            return exc

    window = 2 * options.download_threads
    pool = ThreadPoolExecutor(options.download_threads, thread_name_prefix="umt-fetch")
    try:
        pending: deque = deque()
        upcoming = iter(images)
        for image in upcoming:
            pending.append(pool.submit(load, image))
            if len(pending) >= window:
                break
        while pending:
            result = pending.popleft().result()
            following = next(upcoming, None)
            if following is not None:
                pending.append(pool.submit(load, following))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
