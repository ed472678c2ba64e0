"""OHIF's prebuilt viewer served locally, with Orthanc's DICOMweb behind the same origin.

Not a test module: used by ``tests/integration/test_ohif.py``. The viewer is the ``dist/``
folder of the npm package ``@ohif/app`` (:data:`OHIF_VERSION`), which ``.ci/run`` unpacks into
``.cache/ohif/<version>/package/``. :class:`OhifServer` is a small threaded HTTP server that
serves those files (any unknown path answers ``index.html``, as the single-page app expects),
answers ``/app-config.js`` with a configuration whose one data source is this origin's
``/dicom-web``, and forwards ``/dicom-web/...`` to Orthanc's DICOMweb plugin. Viewer and
DICOMweb share one origin, so the browser needs no CORS, and the cross-origin isolation
headers (COOP/COEP) that let OHIF use ``SharedArrayBuffer`` are set on every answer.
"""

from __future__ import annotations

import json
import mimetypes
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

#: The pinned OHIF viewer release (npm ``@ohif/app``); .ci/run installs this one.
OHIF_VERSION = "3.13.2"
#: Where .ci/run unpacks the package (``npm pack`` + ``tar``), relative to the repository.
OHIF_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "ohif"


def ohif_dist(version: str = OHIF_VERSION) -> Path:
    """The ``dist/`` folder of the installed ``@ohif/app`` package (may not exist)."""
    return OHIF_CACHE / version / "package" / "dist"


def app_config(dicomweb_root: str) -> str:
    """OHIF's ``app-config.js`` with one DICOMweb data source at ``dicomweb_root``.

    Orthanc's settings from OHIF's own configuration for it (``platform/app/public/config/
    local_orthanc.js``): no ``includefield`` in QIDO, WADO-RS rendering, bulk data URIs.
    """
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "orthanc",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "orthanc",
                "configuration": {
                    "friendlyName": "l3spot test Orthanc",
                    "name": "orthanc",
                    "wadoUriRoot": dicomweb_root,
                    "qidoRoot": dicomweb_root,
                    "wadoRoot": dicomweb_root,
                    "qidoSupportsIncludeField": False,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": False,
                    "supportsWildcard": True,
                    "omitQuotationForMultipartRequest": True,
                    "bulkDataURI": {"enabled": True},
                },
            }
        ],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


class OhifServer:
    """Serve OHIF's ``dist`` on 127.0.0.1 and proxy ``/dicom-web`` to ``dicomweb_upstream``.

    Parameters
    ----------
    dist : the ``dist/`` folder of ``@ohif/app``.
    dicomweb_upstream : Orthanc's DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web``.

    Use as a context manager; :attr:`url` is the viewer's origin (``http://127.0.0.1:<port>``).
    """

    def __init__(self, dist: Path, dicomweb_upstream: str) -> None:
        self.dist = dist.resolve()
        self.upstream = dicomweb_upstream.rstrip("/")
        self.requests: list[tuple[str, int]] = []  # (path, status) of every answer
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> OhifServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass  # quiet; :attr:`OhifServer.requests` keeps what a test needs

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cross-Origin-Opener-Policy", "same-origin")
                self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
                self.send_header("Cross-Origin-Resource-Policy", "same-origin")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                server.requests.append((self.path, status))

            def _proxy(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length) if length else None
                url = server.upstream + self.path[len("/dicom-web") :]
                fwd = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() in ("accept", "content-type", "range")
                }
                req = urllib.request.Request(url, data=data, headers=fwd, method=self.command)
                try:
                    with urllib.request.urlopen(req, timeout=60) as r:
                        status, body, rh = r.status, r.read(), r.headers
                except urllib.error.HTTPError as exc:
                    status, body, rh = exc.code, exc.read(), exc.headers
                keep = {"Content-Type": rh.get("Content-Type", "application/octet-stream")}
                self._send(status, body, keep)

            def _static(self) -> None:
                path = self.path.split("?", 1)[0].split("#", 1)[0]
                if path == "/app-config.js":
                    body = app_config("/dicom-web").encode()
                    self._send(200, body, {"Content-Type": "application/javascript"})
                    return
                target = (server.dist / path.lstrip("/")).resolve()
                if not target.is_relative_to(server.dist) or not target.is_file():
                    target = server.dist / "index.html"  # the single-page app's routes
                ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
                if target.suffix == ".wasm":
                    ctype = "application/wasm"
                self._send(200, target.read_bytes(), {"Content-Type": ctype})

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.startswith("/dicom-web/") or self.path == "/dicom-web":
                    self._proxy()
                else:
                    self._static()

            do_HEAD = do_GET  # noqa: N815

            def do_POST(self) -> None:  # noqa: N802
                if self.path.startswith("/dicom-web/"):
                    self._proxy()
                else:
                    self._send(405, b"", {})

        return Handler
