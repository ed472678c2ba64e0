"""A tiny DICOMweb origin server for unit tests: answers what a test tells it, records requests.

Not a DICOMweb implementation: each request gets ``status`` with ``body`` (a DICOM JSON data
set, PS3.18 Annex F) after ``delay_s``; the requests (method, path, headers, body) are kept
so a test can check what l3spot sent.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydicom.dataset import Dataset


@dataclass
class Request:
    """One request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def parts(self) -> list[bytes]:
        """The payloads of a ``multipart/related`` body (one per DICOM instance)."""
        head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
        msg = message_from_bytes(head + self.body)
        return [p.get_payload(decode=True) for p in msg.get_payload()]  # type: ignore[union-attr,misc]


def failed_sop_body(
    failed: list[tuple[str, str, int]], stored: list[tuple[str, str]] = ()
) -> dict[str, Any]:
    """A STOW-RS response data set (PS3.18 10.5.3.1) as DICOM JSON: ``failed`` items are
    (SOP class, SOP instance, Failure Reason), ``stored`` ones (SOP class, SOP instance)."""
    ds = Dataset()
    if failed:
        items = []
        for cls, uid, reason in failed:
            item = Dataset()
            item.ReferencedSOPClassUID = cls
            item.ReferencedSOPInstanceUID = uid
            item.FailureReason = reason
            items.append(item)
        ds.FailedSOPSequence = items
    if stored:
        items = []
        for cls, uid in stored:
            item = Dataset()
            item.ReferencedSOPClassUID = cls
            item.ReferencedSOPInstanceUID = uid
            items.append(item)
        ds.ReferencedSOPSequence = items
    return ds.to_json_dict()


class DicomwebStub:
    """An HTTP server on 127.0.0.1 answering every request as configured.

    Attributes
    ----------
    status : HTTP status of the answers.
    body : DICOM JSON (a dict) sent as ``application/dicom+json``, or None for no body.
    delay_s : seconds to wait before answering (a server that hangs).
    answer : optional function ``Request -> (status, body)`` overriding the two above.
    requests : what was received.
    """

    def __init__(self, status: int = 200, body: dict[str, Any] | None = None) -> None:
        self.status = status
        self.body = body
        self.delay_s = 0.0
        self.answer: Callable[[Request], tuple[int, dict[str, Any] | None]] | None = None
        self.requests: list[Request] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                req = Request(self.command, self.path, dict(self.headers), self.rfile.read(length))
                stub.requests.append(req)
                time.sleep(stub.delay_s)
                status, body = (
                    stub.answer(req) if stub.answer is not None else (stub.status, stub.body)
                )
                data = b"" if body is None else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    if body is not None:
                        self.send_header("Content-Type", "application/dicom+json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (a timeout test)
                    pass

            do_GET = do_POST = _serve  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        """A DICOMweb base URL on this server."""
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
