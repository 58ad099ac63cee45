"""Bookinfo's four services as one small asyncio program: ``python app.py SERVICE``.

    productpage  GET /productpage[?u=USER]   details + reviews, as JSON
    details      GET /details/<id>
    reviews      GET /reviews/<id>           v1: no stars; v2: black stars; v3: red stars (asks ratings)
    ratings      GET /ratings/<id>
    every one    GET /health, GET /stats     ({"served": n, "mirrored": m})

It runs under ``meshlet run``, which tells it where to listen (``PORT``, on
127.0.0.1), its version (``MESHLET_VERSION``), and where each service is:
``<NAME>_SERVICE_HOST`` / ``<NAME>_SERVICE_PORT`` are the sidecar's outbound
listeners, so every call between services goes through the sidecars. The
``end-user`` and ``x-request-id`` headers are passed along, as in Istio's
bookinfo, so routing by user works on every hop. Calls have timeouts
(productpage -> reviews 3 s, reviews -> ratings 10 s), so a delayed ratings
service shows up as an error on the product page, as Istio's fault-injection
task shows.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from urllib.parse import parse_qs, urlsplit

MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024
IDLE_TIMEOUT = 60.0
PASSED_HEADERS = ("end-user", "x-request-id", "user-agent")
PRODUCT = "The Comedy of Errors"
REVIEWS = [
    ("Reviewer1", "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"),
    ("Reviewer2", "Absolutely fun and entertaining. The play lacks thematic depth when compared to "
                  "other plays by Shakespeare."),
]
RATINGS = {"Reviewer1": 5, "Reviewer2": 4}
STAR_COLORS = {"v2": "black", "v3": "red"}


class Request:
    def __init__(self, method: str, target: str, headers: dict[str, str]) -> None:
        self.method = method
        parts = urlsplit(target)
        self.path = parts.path
        self.query = parse_qs(parts.query)
        self.headers = headers


class Response:
    def __init__(self, status: int, body: object) -> None:
        self.status = status
        self.body = json.dumps(body, indent=1).encode() + b"\n"


# -- calling other services through the sidecar ------------------------------------------------ #


async def call(service: str, path: str, headers: dict[str, str], timeout: float) -> tuple[int, object]:
    """GET ``path`` of ``service`` via the sidecar's outbound listener; (status, JSON body)."""
    prefix = service.upper().replace("-", "_")
    host = os.environ.get(f"{prefix}_SERVICE_HOST")
    port = os.environ.get(f"{prefix}_SERVICE_PORT")
    if not host or not port:
        raise LookupError(f"{service} is not a service this workload knows (no {prefix}_SERVICE_HOST)")
    return await asyncio.wait_for(_get(host, int(port), service, path, headers), timeout)


async def _get(host: str, port: int, authority: str, path: str,
               headers: dict[str, str]) -> tuple[int, object]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        lines = [f"GET {path} HTTP/1.1", f"host: {authority}", "connection: close"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        length = next((int(h.split(":", 1)[1]) for h in header_lines
                       if h.lower().startswith("content-length:")), None)
        body = await (reader.readexactly(length) if length is not None else reader.read(MAX_BODY))
    finally:
        writer.close()
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, body.decode(errors="replace")


def passed_headers(request: Request) -> dict[str, str]:
    return {name: request.headers[name] for name in PASSED_HEADERS if name in request.headers}


# -- the services --------------------------------------------------------------------------------- #


def book_id(path: str, prefix: str) -> int | None:
    rest = path.removeprefix(prefix)
    return int(rest) if rest.isdigit() else None


async def productpage(request: Request) -> Response:
    if request.path != "/productpage":
        return Response(404, {"error": f"no page {request.path}"})
    headers = passed_headers(request)
    user = (request.query.get("u") or [""])[0] or _cookie_user(request.headers.get("cookie", ""))
    if user:
        headers["end-user"] = user
    details, reviews = await asyncio.gather(_fetch("details", "/details/0", headers, 3.0),
                                            _fetch("reviews", "/reviews/0", headers, 3.0))
    version = reviews.get("version") if isinstance(reviews, dict) else None
    return Response(200, {"product": PRODUCT, "user": user or None, "details": details, "reviews": reviews,
                          "reviewsVersion": version})


def _cookie_user(cookie: str) -> str:
    for item in cookie.split(";"):
        name, _, value = item.strip().partition("=")
        if name == "user":
            return value
    return ""


async def _fetch(service: str, path: str, headers: dict[str, str], timeout: float) -> object:
    try:
        status, body = await call(service, path, headers, timeout)
    except TimeoutError:
        return {"error": f"{service} did not answer within {timeout:.0f} s"}
    except (OSError, LookupError, ValueError, asyncio.IncompleteReadError) as exc:
        return {"error": f"{service} is unavailable: {exc}"}
    if status != 200:
        return {"error": f"{service} answered {status}", "body": body}
    return body


async def details(request: Request) -> Response:
    book = book_id(request.path, "/details/")
    if book is None:
        return Response(404, {"error": "please provide a numeric product id"})
    return Response(200, {"id": book, "author": "William Shakespeare", "year": 1595, "type": "paperback",
                          "pages": 200, "publisher": "PublisherA", "language": "English",
                          "ISBN-10": "1234567890", "ISBN-13": "123-1234567890"})


async def reviews(request: Request) -> Response:
    book = book_id(request.path, "/reviews/")
    if book is None:
        return Response(404, {"error": "please provide a numeric product id"})
    version = os.environ.get("MESHLET_VERSION") or "v1"
    entries: list[dict[str, object]] = [{"reviewer": who, "text": text} for who, text in REVIEWS]
    color = STAR_COLORS.get(version)
    if color is not None:
        ratings = await _fetch("ratings", f"/ratings/{book}", passed_headers(request), 10.0)
        for entry in entries:
            stars = ratings.get("ratings", {}).get(entry["reviewer"]) if isinstance(ratings, dict) else None
            entry["rating"] = ({"stars": stars, "color": color} if stars is not None
                               else {"error": "Ratings service is currently unavailable"})
    return Response(200, {"id": book, "version": version, "podname": os.environ.get("MESHLET_WORKLOAD", ""),
                          "reviews": entries})


async def ratings(request: Request) -> Response:
    book = book_id(request.path, "/ratings/")
    if book is None:
        return Response(404, {"error": "please provide a numeric product id"})
    return Response(200, {"id": book, "ratings": RATINGS})


SERVICES = {"productpage": productpage, "details": details, "reviews": reviews, "ratings": ratings}


# -- a small HTTP/1.1 server ------------------------------------------------------------------------- #


class Server:
    def __init__(self, handler: object) -> None:
        self.handler = handler
        self.served = 0
        self.mirrored = 0

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await asyncio.wait_for(_read_request(reader), IDLE_TIMEOUT)
                if request is None:
                    break
                response = await self.respond(request)
                close = request.headers.get("connection", "").lower() == "close"
                writer.write(_head(response, close) + response.body)
                await writer.drain()
                if close:
                    break
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError):
            pass  # a client that went away or spoke badly: this connection ends, the server goes on
        finally:
            writer.close()

    async def respond(self, request: Request) -> Response:
        if request.path == "/health":
            return Response(200, {"status": "ok"})
        if request.path == "/stats":
            return Response(200, {"served": self.served, "mirrored": self.mirrored})
        self.served += 1
        # A mirrored copy's authority carries "-shadow" (Envoy's request mirroring).
        if request.headers.get("host", "").split(":")[0].endswith("-shadow"):
            self.mirrored += 1
        handler = self.handler
        assert callable(handler)
        response: Response = await handler(request)
        return response


def _head(response: Response, close: bool) -> bytes:
    reason = b"OK" if response.status == 200 else b"Error"
    extra = b"connection: close\r\n" if close else b""
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n"
            % (response.status, reason, len(response.body), extra))


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    if len(head) > MAX_HEAD:
        raise ValueError("request head too large")
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, target, _version = request_line.split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)
    if length > MAX_BODY:
        raise ValueError("request body too large")
    if length:
        await reader.readexactly(length)
    return Request(method, target, headers)


async def serve(service: str, port: int) -> None:
    server = Server(SERVICES[service])
    listener = await asyncio.start_server(server.connection, "127.0.0.1", port, limit=MAX_HEAD)
    print(f"{service} {os.environ.get('MESHLET_VERSION', '')} listening on 127.0.0.1:{port}", flush=True)
    async with listener:
        await listener.serve_forever()


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in SERVICES:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(SERVICES)}}}  (PORT from the environment)")
    port = int(os.environ.get("PORT", "9080"))
    try:
        import uvloop
        uvloop.run(serve(sys.argv[1], port))
    except ImportError:
        asyncio.run(serve(sys.argv[1], port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
