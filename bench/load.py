"""A small HTTP/1.1 load generator: C keep-alive connections on asyncio streams (uvloop when
installed), each sending pre-built requests back to back, bounded by a duration and a count.

It is much lighter than an HTTP client library per request, which matters on a 2-core
machine where the generator and the server share the CPU.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    sent: int = 0
    ok: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    acked: list[int] = field(default_factory=list)  # indexes of the requests answered 2xx
    dropped: int = 0  # connections the server closed (it was killed)

    def summary(self) -> dict[str, float]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else 0.0

        return {
            "requests": self.sent,
            "rps": round(self.ok / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(pct(0.50), 2),
            "p99_ms": round(pct(0.99), 2),
            "errors": self.errors,
        }


def build(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _connection(
    host: str, port: int, requests: list[bytes], cursor: list[int], deadline: float, out: LoadResult
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline and cursor[0] < len(requests):
            index = cursor[0]
            request = requests[index]
            cursor[0] += 1
            started = time.perf_counter()
            writer.write(request)
            out.sent += 1
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                if length:
                    await reader.readexactly(length)
            except (asyncio.IncompleteReadError, ConnectionError):
                out.dropped += 1  # the server went away mid-answer: not acknowledged
                return
            out.latencies.append(time.perf_counter() - started)
            out.statuses[status] = out.statuses.get(status, 0) + 1
            if 200 <= status < 300:
                out.ok += 1
                out.acked.append(index)
            else:
                out.errors += 1
    finally:
        writer.close()


async def _run(
    host: str, port: int, requests: list[bytes], connections: int, seconds: float
) -> LoadResult:
    out = LoadResult()
    cursor = [0]
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(
        *(_connection(host, port, requests, cursor, deadline, out) for _ in range(connections))
    )
    out.seconds = time.perf_counter() - started
    return out


def run(
    host: str, port: int, requests: list[bytes], connections: int, seconds: float
) -> LoadResult:
    try:
        import uvloop

        return uvloop.run(_run(host, port, requests, connections, seconds))
    except ImportError:
        return asyncio.run(_run(host, port, requests, connections, seconds))


def drive(
    host: str, port: int, requests: list[bytes], connections: int, seconds: float
) -> dict[str, object]:
    """Send prebuilt `requests` (at most `seconds`) and summarise the answers, with which
    requests were acknowledged (for a server that is killed mid-run)."""
    result = run(host, port, requests, connections, seconds)
    return {
        **result.summary(),
        "statuses": result.statuses,
        "acked": result.acked,
        "dropped": result.dropped,
    }
