"""`fastvae serve-web`: the browser demo (examples/web, onnxruntime-web on WASM) and one decoder export as
/model.onnx, from the standard library's http.server on loopback. Only the page and the runtime files it imports
are served."""

from __future__ import annotations

import errno
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from fastvae.errors import FastVAEError

WEB = Path(__file__).resolve().parents[1] / "examples" / "web"
DIST = ("node_modules", "onnxruntime-web", "dist")  # the runtime the page imports, under WEB
PAGE_SUFFIXES = {".html", ".js", ".css"}  # the page's own files: top level of WEB only (not package.json, test/)
NPM_INSTALL = "npm ci --prefix examples/web"
# Browsers refuse a .wasm served as anything but application/wasm to WebAssembly.instantiateStreaming, and an
# ES module whose type is not a JavaScript one; Python's mimetypes knows .mjs only from 3.12 on.
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".mjs": "text/javascript",
         ".css": "text/css", ".wasm": "application/wasm", ".onnx": "application/octet-stream"}


def check(model: Path, web: Path = WEB) -> None:
    """Raise FastVAEError, one line, unless `model` is a fastvae decoder export and web's node_modules holds
    onnxruntime-web."""
    if not model.is_file():
        raise FastVAEError(f"no ONNX model at {model}: write one with `fastvae export DECODER.onnx --checkpoint RUN`")
    if not (web / "index.html").is_file():
        raise FastVAEError(f"{web} is missing: serve-web runs from a source checkout of fastvae")
    if not web.joinpath(*DIST, "ort.wasm.min.mjs").is_file():
        raise FastVAEError(f"{web / 'node_modules'} does not hold onnxruntime-web: run `{NPM_INSTALL}` in the "
                           "repository root")
    from fastvae.runtime import OnnxVAE  # onnxruntime loads only for this command

    try:
        part = OnnxVAE(model, device="cpu", split_batches=False).part
    except ValueError as e:
        raise FastVAEError(str(e)) from e
    if part != "decoder":
        raise FastVAEError(f"{model} holds the {part!r} part; serve a decoder (`fastvae export --part decoder`) "
                           "and drop this file on the page to reconstruct your own images")


class _Server(ThreadingHTTPServer):
    # Some Python releases set SO_REUSEPORT on HTTPServer (gh-120485), which lets a second server share a port in
    # use: this one refuses instead.
    allow_reuse_port = False


class _Server6(_Server):
    address_family = socket.AF_INET6


def _handler(model: Path, web: Path) -> type[SimpleHTTPRequestHandler]:
    dist = web.joinpath(*DIST)

    class Handler(SimpleHTTPRequestHandler):
        extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **TYPES}

        def translate_path(self, path: str) -> str:
            """The file behind a URL path, or a path that does not exist (a 404): `model` as /model.onnx, the
            page's top-level files and onnxruntime-web's dist/ files, nothing else (no folders, no ..)."""
            parts = unquote(urlsplit(path).path).split("/")[1:]
            if parts in ([""], ["index.html"]):
                return str(web / "index.html")
            if parts == ["model.onnx"]:
                return str(model)
            name = parts[-1]
            folder = dist if tuple(parts[:-1]) == DIST else web if len(parts) == 1 else None
            safe = name not in ("", ".", "..") and "\\" not in name and "\0" not in name
            if folder is not None and safe and (folder is dist or Path(name).suffix in PAGE_SUFFIXES):
                if (folder / name).is_file():
                    return str(folder / name)
            return str(web / ".not-served")

        def end_headers(self) -> None:
            # Cross-origin isolation gives the page SharedArrayBuffer, which onnxruntime-web's WASM threads
            # need; no-cache so that a model exported again is fetched again.
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.send_header("Cache-Control", "no-cache")
            super().end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet: a page load is a dozen requests

    return Handler


def make_server(model: Path, port: int = 8000, host: str = "127.0.0.1", web: Path = WEB) -> ThreadingHTTPServer:
    """A server for the page and `model`, bound but not yet serving (port 0: a free port, read it from
    server.server_address). Raises FastVAEError for a missing model or node_modules, or a port in use."""
    if not 0 <= port <= 65535:
        raise FastVAEError(f"--port must be 0 to 65535, got {port}")
    model = Path(model).resolve()
    check(model, web)
    server_type = _Server6 if ":" in host else _Server  # ":": an IPv6 address such as ::1
    try:
        return server_type((host, port), _handler(model, web))
    except OSError as e:  # in use or a privileged port; else the host is not an address of this machine
        hint = "choose another --port" if e.errno in (errno.EADDRINUSE, errno.EACCES) else "check --host"
        raise FastVAEError(f"cannot listen on {host}:{port}: {e.strerror}; {hint}") from e


def start(model: Path, port: int = 0, host: str = "127.0.0.1", web: Path = WEB) -> ThreadingHTTPServer:
    """make_server(), serving in a daemon thread: for tests. Stop it with server.shutdown(); server.server_close()."""
    server = make_server(model, port, host, web)
    threading.Thread(target=server.serve_forever, name="fastvae-serve-web", daemon=True).start()
    return server


def serve(model: Path, port: int = 8000, host: str = "127.0.0.1") -> None:
    """Serve the page and `model` until Ctrl-C, which returns normally. Raises FastVAEError (see make_server)."""
    with make_server(model, port, host) as server:
        address, bound = server.server_address[:2]
        shown = f"[{address}]" if ":" in str(address) else address
        print(f"serving {model} at http://{shown}:{bound}/ (Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped", flush=True)
