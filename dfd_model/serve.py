"""`dfd-model serve`: the drawing app, a local web server around one SketchToFace model.

API (JSON over HTTP; images travel as base64 PNG data URLs):

    GET  /                 the drawing page
    GET  /api/info         {"resolution", "genders", "components", "has_banks"}
    POST /api/generate     {"sketch": "data:image/png;base64,...",     (required; any format, <= 16 MP)
                            "refine": 0.7 | {"nose": 0.3, ...},         (default 1)
                            "gender": "female" | null,                  (default: every bank)
                            "shadow": true}                             (default false)
                        -> {"face": "data:image/png;base64,...", "shadow": "data:..." | null,
                            "seconds": 0.41}

Errors are JSON {"error": "one line"} with 400 (malformed request or image, or an image that
is not a sketch: a photo, or mostly dark), 403 (see below), 404, 405, 411, 413 (body over the
limit), 415 (a POST body not declared application/json), 503 (too many requests waiting; try
again), the standard library's own refusals (an unknown method, headers too long), or, for a
bug, 500. Sketches over MAX_SKETCH_PIXELS are refused from their header. The server binds
127.0.0.1 unless told otherwise, never reads a file a client names, and runs one inference
at a time (the model uses every core), with a short queue in front.

Web pages from elsewhere must not drive the model through the user's browser: a POST must
declare its JSON (which a cross-site page cannot do without the browser asking first, and
the server grants nothing), a POST whose Origin is another site's is refused, and a request
addressed to a name that is not an IP address, localhost or this machine's name gets 403 (a
site that points its own name at the server, DNS rebinding, sends its name).
"""
from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import json
import re
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Iterator

import cv2
import numpy as np
import torch

from dfd_data.components import COMPONENTS
from dfd_data.errors import UserError
from dfd_data.image_io import ImageError, decode_image, encode_png

from .generate import letterbox, photo_reason
from .networks import denormalize_image
from .projection import check_refine
from .shadows import ShadowRenderer
from .sketch_to_face import SketchToFace

MAX_BODY_BYTES = 8 * 1024 * 1024
# A sketch is resized to the model's resolution anyway; larger images (an 8 MiB PNG can
# declare 178 MP) would only cost memory, once per request thread.
MAX_SKETCH_PIXELS = 4096 * 4096
# Requests allowed to wait for the model at once; more get 503 at once instead of piling up.
MAX_WAITING = 8
BUSY = "busy: too many requests are waiting; try again"
WAIT_SECONDS = 60.0


ALLOWED_METHODS = "GET, HEAD, POST, OPTIONS"
# What each path answers (anything else is 404), and the Allow header that says so.
PAGES = {"/": "GET", "/index.html": "GET", "/api/info": "GET", "/api/generate": "POST"}
PAGE_ALLOW = {"GET": "GET, HEAD, OPTIONS", "POST": "POST, OPTIONS"}


def _host_name(host: str) -> str:
    """A Host header without its port: "127.0.0.1:8000" -> "127.0.0.1", "[::1]:80" -> "::1"."""
    host = host.strip().lower()
    return host[1:host.index("]")] if host.startswith("[") and "]" in host else host.partition(":")[0]


def _names_this_machine(name: str) -> bool:
    """Whether a Host name can only mean this machine: an IP address, localhost or its own
    host name. A web page that points a name of its own at the server (DNS rebinding) sends
    that name."""
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return name == "localhost" or name in _machine_names()


@functools.lru_cache(maxsize=1)
def _machine_names() -> tuple[str, ...]:
    """This machine's host name and fully qualified name, looked up once (the second may ask DNS)."""
    return socket.gethostname().lower(), socket.getfqdn().lower()


class RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str, allow: str = ALLOWED_METHODS):
        super().__init__(message)
        self.status, self.allow = status, allow


def _decode_data_url(value) -> bytes:
    if not isinstance(value, str) or not value:
        raise RequestError(HTTPStatus.BAD_REQUEST, "'sketch' must be a base64 image or a data: URL")
    _, comma, data = value.partition(",")
    if value.startswith("data:") and not comma:
        raise RequestError(HTTPStatus.BAD_REQUEST, "'sketch' is a data: URL without data (no comma)")
    payload = data if value.startswith("data:") else value
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(HTTPStatus.BAD_REQUEST, "'sketch' is not valid base64") from None


def _png_data_url(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(encode_png(image)).decode("ascii")


class FaceService:
    """Parses requests and runs the model; one inference at a time, MAX_WAITING in line."""

    def __init__(self, model: SketchToFace):
        self.model = model
        self.shadows = ShadowRenderer(model)
        self.lock = threading.Lock()
        self._line = threading.Lock()
        self.free_places = MAX_WAITING + 1  # for the request the model runs and those in line

    def info(self) -> dict:
        return {"resolution": self.model.config.resolution, "genders": list(self.model.genders),
                "components": list(COMPONENTS), "has_banks": self.model.banks is not None}

    def _parse(self, request) -> tuple[np.ndarray, float | dict, str | None, bool]:
        if not isinstance(request, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        unknown = sorted(set(request) - {"sketch", "refine", "gender", "shadow"})
        if unknown:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown field {unknown[0]!r}")
        try:
            image = decode_image(_decode_data_url(request.get("sketch")), "sketch", max_pixels=MAX_SKETCH_PIXELS)
        except ImageError as error:
            raise RequestError(HTTPStatus.BAD_REQUEST, str(error)) from None
        reason = photo_reason(image)
        if reason:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"sketch: {reason}; draw dark lines on white paper")
        sketch = letterbox(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), self.model.config.resolution)
        refine = request.get("refine", 1.0)
        try:
            if isinstance(refine, dict):
                unknown = [k for k in refine if k not in COMPONENTS]
                if unknown:
                    raise ValueError(f"refine names unknown component {unknown[0]!r}")
                refine = {name: check_refine(refine.get(name, 1.0), f"refine.{name}") for name in COMPONENTS}
            else:
                refine = check_refine(refine)
        except ValueError as error:
            raise RequestError(HTTPStatus.BAD_REQUEST, str(error)) from None
        gender = request.get("gender")
        if gender is not None and gender not in self.model.genders:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"gender {gender!r} is not one of the model's "
                                                       f"({', '.join(self.model.genders) or 'none'})")
        shadow = request.get("shadow", False)
        if not isinstance(shadow, bool):
            raise RequestError(HTTPStatus.BAD_REQUEST, "'shadow' must be true or false")
        return sketch, refine, gender, shadow

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """A place among the requests that may wait for the model (the one it runs and
        MAX_WAITING more), or 503 at once. The handler takes it once the body is read and
        before parsing it: at most MAX_WAITING + 1 parsed bodies, decoded sketches and faces
        are in memory. (Taken before the body is read, it had cost the 503 to clients still
        uploading, whose connection then closed under them, and let slow uploads hold every
        place.)"""
        with self._line:
            if self.free_places == 0:
                raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, BUSY)
            self.free_places -= 1
        try:
            yield
        finally:
            with self._line:
                self.free_places += 1

    def full(self) -> bool:
        """Whether every place in line is taken now (a request arriving now would get 503). A
        read: taking a place to look had refused requests that arrived meanwhile."""
        return self.free_places == 0

    def generate(self, request) -> dict:
        """The face (and the shadow, if asked for) of a parsed JSON request. A server calls it
        within admitted()."""
        sketch, refine, gender, want_shadow = self._parse(request)
        if not self.lock.acquire(timeout=WAIT_SECONDS):
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "busy: the model did not free up in time")
        try:
            started = time.perf_counter()
            shadow = None
            with torch.inference_mode():
                if want_shadow and self.model.banks is not None:  # one encoding for the face and its shadow
                    latents, matches = self.model.encode_and_match(torch.from_numpy(sketch), refine, gender)
                    shadow = _png_data_url(self.shadows.image_of(matches, gender)[0].numpy())
                else:
                    latents = self.model.encode(torch.from_numpy(sketch), refine, gender)
                face = denormalize_image(self.model.synthesize(latents))[0].permute(1, 2, 0).cpu().numpy()
            seconds = time.perf_counter() - started
        finally:
            self.lock.release()
        return {"face": _png_data_url(face), "shadow": shadow, "seconds": round(seconds, 3)}


def _page() -> bytes:
    return resources.files("dfd_model").joinpath("app/index.html").read_bytes()


def make_handler(service: FaceService):
    page = _page()

    class Handler(BaseHTTPRequestHandler):
        server_version = "dfd-model"
        protocol_version = "HTTP/1.1"
        # A client that goes quiet (an idle keep-alive connection, a body that never arrives)
        # frees its thread after this many seconds.
        timeout = 120

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            pass  # one line per request would drown the terminal while drawing

        def _send(self, status: HTTPStatus, body: bytes, content_type: str, allow: str = ALLOWED_METHODS) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            if status == HTTPStatus.METHOD_NOT_ALLOWED:
                self.send_header("Allow", allow)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":  # HEAD: GET's status and headers, without its body
                self.wfile.write(body)

        @property
        def _page(self) -> str:
            """The request's path without its query."""
            return self.path.split("?", 1)[0]

        def _json(self, status: HTTPStatus, document: dict) -> None:
            self._send(status, json.dumps(document).encode(), "application/json")

        def _refuse(self, error: RequestError) -> None:
            self._send(error.status, json.dumps({"error": str(error)}).encode(), "application/json", error.allow)

        def send_error(self, code, message=None, explain=None):
            """The standard library's own refusals (a malformed request line, headers too long,
            an unknown method) in JSON, like every other answer."""
            self.close_connection = True
            status = HTTPStatus(code)
            self._json(status, {"error": message or status.phrase})

        def _check_request(self, method: str) -> None:
            """RequestError for a request addressed to another host name, or for a method `path`
            does not answer: what every method checks before anything else."""
            host = self.headers.get("Host")
            if host is None and self.request_version != "HTTP/1.0":
                raise RequestError(HTTPStatus.BAD_REQUEST, "an HTTP/1.1 request needs a Host header")
            if host is not None and not _names_this_machine(_host_name(host)):
                raise RequestError(HTTPStatus.FORBIDDEN, "this server answers requests addressed to an IP address, "
                                                         f"localhost or {socket.gethostname()}, not to "
                                                         f"{_host_name(host)!r}")
            path = self._page
            wanted = PAGES.get(path)
            if wanted is None:
                raise RequestError(HTTPStatus.NOT_FOUND, f"no such page {path!r}")
            if method != wanted and not (method == "HEAD" and wanted == "GET"):
                raise RequestError(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} answers {wanted} only", PAGE_ALLOW[wanted])

        def _check_post(self) -> int:
            """The body's length, once the POST's headers are acceptable (RequestError if not)."""
            self._check_request("POST")
            length = self.headers.get("Content-Length")
            if length is None or not re.fullmatch(r"[0-9]+", length):
                raise RequestError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header giving the body's size is required")
            if int(length) > MAX_BODY_BYTES:
                raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                   f"the body is {int(length)} bytes; the limit is {MAX_BODY_BYTES}")
            media_type = self.headers.get("Content-Type", "").partition(";")[0].strip().lower()
            if media_type != "application/json":
                raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                                   f"the body must be sent as application/json, not {media_type or 'undeclared'}")
            origin, host = self.headers.get("Origin"), self.headers.get("Host")
            if origin is not None and origin.lower().partition("://")[2] != (host or "").strip().lower():
                raise RequestError(HTTPStatus.FORBIDDEN, f"requests from pages of {origin!r} are refused")
            return int(length)

        def handle_expect_100(self):
            """Invite the body (Expect: 100-continue) only if it will be read: a refusal is
            sent at once instead of after the upload (a full line too, though a place may
            free up by the time the body is in), and a method whose body is never read is
            answered without the invitation."""
            if self.command != "POST":
                return True
            try:
                self._check_post()
                if service.full():
                    raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, BUSY)
            except RequestError as error:
                self.close_connection = True
                self._refuse(error)
                return False
            return super().handle_expect_100()

        def do_GET(self):  # noqa: N802 - http.server's naming
            if self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers:
                self.close_connection = True  # a GET's body is never read
            try:
                self._check_request("GET")
            except RequestError as error:
                self._refuse(error)
                return
            if self._page == "/api/info":
                self._json(HTTPStatus.OK, service.info())
            else:
                self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")

        def do_POST(self):  # noqa: N802
            # Until the body is read, an answer must close the connection: the unread body
            # would otherwise be parsed as the client's next request.
            asked_to_close, self.close_connection = self.close_connection, True
            try:
                length = self._check_post()
                try:
                    body = self.rfile.read(length)
                except TimeoutError:
                    raise RequestError(HTTPStatus.REQUEST_TIMEOUT, f"the body did not arrive within {self.timeout} s") \
                        from None
                # (a client that hung up midway, or one that asked to close: Connection: close)
                self.close_connection = asked_to_close or len(body) < length
                with service.admitted():
                    try:
                        request = json.loads(body)
                    except (ValueError, RecursionError):  # (bad JSON or text; numbers over 4300 digits; deep nesting)
                        raise RequestError(HTTPStatus.BAD_REQUEST, "the body is not valid JSON") from None
                    del body  # (the parsed request holds it again)
                    answer = service.generate(request)
                self._json(HTTPStatus.OK, answer)
            except RequestError as error:
                self._refuse(error)
            except ConnectionError:  # the client hung up (a reload): nobody to answer, nothing to report
                raise
            except Exception as error:  # a bug: the client still gets an answer, the server keeps serving
                self.close_connection = True
                traceback.print_exc()  # and the bug is not lost: the request log is off, stderr is not
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(error).__name__}"})

        do_HEAD = do_GET  # noqa: N815

        def do_OPTIONS(self):  # noqa: N802
            self.close_connection = True  # its body, if any, is never read
            # (no Access-Control-Allow-* header: a page of another site may not send its JSON)
            self.send_response(HTTPStatus.NO_CONTENT)
            wanted = PAGES.get(self._page)
            self.send_header("Allow", PAGE_ALLOW[wanted] if wanted else ALLOWED_METHODS)
            self.send_header("Connection", "close")
            self.end_headers()

        def do_PUT(self):  # noqa: N802
            self.close_connection = True  # its body, if any, is never read
            try:
                self._check_request(self.command)
            except RequestError as error:
                self._refuse(error)

        do_DELETE = do_PATCH = do_PUT

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Bursts of connections (a page reloading, a script) queue in the kernel instead of being reset.
    request_queue_size = 256

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up is no error
            super().handle_error(request, client_address)


def _listening(host: str, port: int, handler) -> ThreadingHTTPServer:
    try:
        return _Server((host, port), handler)
    except OSError as error:  # the port taken, no such address, no permission
        raise UserError(f"cannot serve at {host}:{port}: {error.strerror or error}") from None


def check_address(host: str, port: int) -> None:
    """A one-line UserError if (host, port) cannot be listened on: the command checks it before
    the model loads, not after."""
    _listening(host, port, BaseHTTPRequestHandler).server_close()


def make_server(model: SketchToFace, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A ready-to-serve HTTP server (port 0 picks a free one: see server.server_address)."""
    return _listening(host, port, make_handler(FaceService(model)))


__all__ = ["FaceService", "MAX_BODY_BYTES", "MAX_SKETCH_PIXELS", "check_address", "make_server"]
