"""fastvae.serve_web and the browser demo (examples/web): the server sends the page, onnxruntime-web's files and the
model with their MIME types and nothing else, and refuses a missing model or runtime in one line; in headless
Chromium the page decodes as OnnxVAE does, redraws on a slider move, times its decodes, and logs no errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import numpy as np
import pytest

from fastvae import serve_web
from fastvae.checkpoint import save_checkpoint
from fastvae.config import ModelConfig, TrainConfig
from fastvae.errors import FastVAEError
from fastvae.export.exporter import export_onnx
from fastvae.model import VAE
from fastvae.plan import cpu_plan
from fastvae.run_folder import new_record
from fastvae.runtime import OnnxVAE

CONFIG = ModelConfig(z_dim=5)
ATOL = 1e-4  # onnxruntime-web's WASM kernels vs onnxruntime's native ones, both fp32
DRIVER = serve_web.WEB / "test" / "browser.mjs"  # puppeteer-core script: drives the page, writes result.json


@pytest.fixture(scope="module")
def decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A decoder export of an untrained model (verification is test_export's job, so it is skipped here)."""
    folder = tmp_path_factory.mktemp("web")
    (folder / "run").mkdir()
    model = VAE(CONFIG).eval()
    save_checkpoint(folder / "run", model, CONFIG, new_record(CONFIG, TrainConfig(), cpu_plan(), epochs_done=1), {})
    export_onnx(folder / "decoder.onnx", folder / "run", "decoder", verify=False, log=lambda _: None)
    return folder / "decoder.onnx"


@pytest.fixture
def web(tmp_path: Path) -> Path:
    """A stand-in for examples/web with its node_modules installed: the page, the runtime and files not to serve."""
    files = ["index.html", "main.js", "style.css", "package.json", "test/browser.mjs", "node_modules/other/x.js",
             *(f"node_modules/onnxruntime-web/dist/{name}" for name in
               ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.wasm", "ort.wasm.min.mjs.map"))]
    for name in files:
        (tmp_path / "web" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "web" / name).write_text(f"contents of {name}")
    return tmp_path / "web"


def _get(url: str) -> tuple[int, Message, bytes]:
    """Status, headers (case-insensitive) and body of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, b""


def test_serves_the_page_runtime_and_model_with_their_types(decoder: Path, web: Path) -> None:
    server = serve_web.start(decoder, web=web)
    host, port = server.server_address[:2]
    try:
        assert host == "127.0.0.1"
        base = f"http://127.0.0.1:{port}"
        dist = "/node_modules/onnxruntime-web/dist"
        for path, kind, source in [("/", "text/html; charset=utf-8", web / "index.html"),
                                   ("/main.js", "text/javascript", web / "main.js"),
                                   ("/style.css", "text/css", web / "style.css"),
                                   (f"{dist}/ort.wasm.min.mjs", "text/javascript", None),
                                   (f"{dist}/ort-wasm-simd-threaded.wasm", "application/wasm", None),
                                   ("/model.onnx?v=2", "application/octet-stream", decoder)]:
            status, headers, body = _get(base + path)
            assert (status, headers["Content-Type"]) == (200, kind), path
            assert body == (source or web / path.lstrip("/")).read_bytes(), path
            # onnxruntime-web's threads need SharedArrayBuffer, which needs the page cross-origin isolated.
            assert headers["Cross-Origin-Embedder-Policy"] == "require-corp", path
            assert headers["Cross-Origin-Opener-Policy"] == "same-origin", path
        for path in ["/package.json", "/test/browser.mjs", "/node_modules/other/x.js", f"{dist}/", f"{dist}",
                     "/node_modules/onnxruntime-web/package.json", "/../fastvae/cli.py", "/%2e%2e/pyproject.toml",
                     f"{dist}/..%2f..%2f..%2fpackage.json", "/model.onnx/x", "/nothing.js"]:
            assert _get(base + path)[0] == 404, path
    finally:
        server.shutdown()
        server.server_close()


def test_refuses_a_missing_model_or_runtime_in_one_line(decoder: Path, web: Path, tmp_path: Path) -> None:
    with pytest.raises(FastVAEError, match=r"^no ONNX model at .*missing\.onnx: write one with `fastvae export"):
        serve_web.make_server(tmp_path / "missing.onnx", port=0, web=web)
    (tmp_path / "junk.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(FastVAEError, match="is not a loadable ONNX model") as error:
        serve_web.make_server(tmp_path / "junk.onnx", port=0, web=web)
    assert "\n" not in str(error.value)
    shutil.rmtree(web / "node_modules")
    with pytest.raises(FastVAEError, match=r"does not hold onnxruntime-web: run `npm ci --prefix examples/web`"):
        serve_web.make_server(decoder, port=0, web=web)


def test_refuses_a_port_in_use(decoder: Path, web: Path) -> None:
    first = serve_web.make_server(decoder, port=0, web=web)
    try:
        with pytest.raises(FastVAEError, match=r"cannot listen on 127\.0\.0\.1:\d+: .*choose another --port"):
            serve_web.make_server(decoder, port=first.server_address[1], web=web)
    finally:
        first.server_close()


def _browser_missing() -> str | None:
    """Why the page cannot be tested here, or None."""
    if shutil.which("chromium") is None:
        return "Chromium is not installed (apt-get install -y chromium)"
    if shutil.which("node") is None:
        return "Node.js is not installed"
    if not (serve_web.WEB / "node_modules" / "puppeteer-core").is_dir() or not serve_web.WEB.joinpath(
            *serve_web.DIST).is_dir():
        return f"examples/web/node_modules is not installed ({serve_web.NPM_INSTALL})"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))
def test_page_decodes_like_onnxruntime_in_chromium(decoder: Path, tmp_path: Path) -> None:
    z = np.random.default_rng(0).standard_normal((3, CONFIG.z_dim), dtype=np.float32)
    # float32 -> JSON -> JavaScript's Float32Array is exact: every float32 is a double, and JSON keeps doubles.
    (tmp_path / "input.json").write_text(json.dumps({"z": z.ravel().tolist(), "n": len(z)}))
    server = serve_web.start(decoder)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    start = time.perf_counter()
    try:
        run = subprocess.run(["node", str(DRIVER), url, str(tmp_path / "input.json"), str(tmp_path)],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "CHROMIUM": shutil.which("chromium")})
    finally:
        server.shutdown()
        server.server_close()
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert "failure" not in result, f"{result['failure']} (the page's status line: {result.get('status')!r})"
    assert result["errors"] == []
    assert result["origins"] == [url.rstrip("/")]  # loopback only: no CDN, no Google services
    info = result["info"]
    assert (info["zDim"], info["imageShape"]) == (CONFIG.z_dim, [1, 28, 28])  # from the file's metadata_props

    images = np.array(result["decoded"], dtype=np.float32).reshape(len(z), 1, 28, 28)
    np.testing.assert_allclose(images, OnnxVAE(decoder, device="cpu").decode(z), rtol=0, atol=ATOL)

    assert result["slider"]["from"] != result["slider"]["to"]
    assert result["sliderChangedImage"], "moving z[0] did not change the latent's image"
    ms = result["ms"]
    assert set(ms) == {"1", "64"} and all(v > 0 for v in ms.values()), ms
    print(f"\nChromium, onnxruntime-web WASM, {info['threads']} thread(s): decode {ms['1']:.2f} ms at batch 1, "
          f"{ms['64']:.2f} ms at batch 64 (median of 20); page ready after {result['readyMs'] / 1000:.1f} s, "
          f"browser run {time.perf_counter() - start:.1f} s; screenshot {tmp_path / 'page.png'}")
    if result["warnings"]:
        print("console warnings:", *result["warnings"], sep="\n  ")
