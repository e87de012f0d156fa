"""The browser page (deploy/web/) in Debian's headless Chromium, driven by Playwright, on a
real `vae-generate web` server on 127.0.0.1; and the server's own rules.

VAE_WEB_TEST_MODEL=ARTIFACT_DIR runs the page tests on that artifact instead of the test
session's; VAE_WEB_SCREENSHOT=PATH saves the page's screenshot there (the README's image
is made that way, with the default model).
"""

import http.client
import os
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest

from deploy import Generator
from deploy.artifact import ArtifactError
from deploy.web_server import make_server, start_in_thread

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FRAME_MS = 16.0


@pytest.fixture(scope="module")
def model_dir(request):
    if os.environ.get("VAE_WEB_TEST_MODEL"):
        return Path(os.environ["VAE_WEB_TEST_MODEL"])
    return request.getfixturevalue("artifact").out


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def serve(directory: Path, threads: bool = True):
    server = make_server(directory, port=0, threads=threads)
    start_in_thread(server)
    return server


class Page:
    """One tab on the page, recording every console error and uncaught exception."""

    def __init__(self, browser, url: str):
        self.errors: list[str] = []
        self.page = browser.new_page(viewport={"width": 1000, "height": 900})
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.goto(url)

    def wait_ready(self) -> None:
        self.page.wait_for_function(
            "document.body.dataset.ready === 'true' || !document.getElementById('error').hidden", timeout=90_000
        )

    def image(self) -> np.ndarray:
        """The decoded image's 28x28 grey levels, as the canvas holds them."""
        data = self.page.evaluate(
            "() => Array.from(document.getElementById('image').getContext('2d').getImageData(0, 0, 28, 28).data)"
        )
        rgba = np.array(data, np.int16).reshape(28, 28, 4)
        assert (rgba[..., 3] == 255).all() and (rgba[..., 0] == rgba[..., 1]).all()
        return rgba[..., 0]


@pytest.fixture(scope="module")
def page(browser, model_dir):
    server = serve(model_dir)
    tab = Page(browser, server.url)
    tab.wait_ready()
    yield tab
    tab.page.close()
    server.shutdown()
    server.server_close()


def test_the_page_loads_the_model_and_renders_an_image_without_console_errors(page, model_dir):
    assert page.page.locator("#error").is_hidden(), page.page.locator("#error").text_content()
    assert page.errors == []
    assert page.page.evaluate("window.vae.backend") == "wasm"
    assert page.page.evaluate("self.crossOriginIsolated") is True
    assert page.page.evaluate("window.vae.threads") == min(4, os.cpu_count())
    image = page.image()
    assert image.std() > 5, "a blank image"
    facts = page.page.locator("#facts").text_content()
    assert f"latent dimensions{Generator(model_dir, providers='cpu').latent_dim}" in facts
    strip = page.page.evaluate("""() => [...document.querySelectorAll('#strip canvas')].map(
        c => c.getContext('2d').getImageData(0, 0, 28, 28).data.reduce((a, b) => a + b, 0))""")
    assert len(strip) == 8 and len(set(strip)) > 1, "the interpolation strip is not drawn"
    if os.environ.get("VAE_WEB_SCREENSHOT"):
        page.page.mouse.move(*pad_point(page, 0.7, 0.35))
        page.page.wait_for_timeout(300)
        page.page.screenshot(path=os.environ["VAE_WEB_SCREENSHOT"], full_page=True)


def pad_point(page: Page, fx: float, fy: float) -> tuple[float, float]:
    box = page.page.locator("#pad").bounding_box()
    return box["x"] + fx * box["width"], box["y"] + fy * box["height"]


def test_moving_over_the_pad_redraws_the_image(page):
    seen = []
    for fx, fy in [(0.1, 0.1), (0.9, 0.9), (0.9, 0.1)]:
        count = page.page.evaluate("window.vae.timings().length")
        page.page.mouse.move(*pad_point(page, fx, fy))
        page.page.wait_for_function(f"window.vae.timings().length > {count}")
        page.page.wait_for_timeout(100)  # the newest pointer position's decode, if one was queued
        seen.append(page.image())
    assert not np.array_equal(seen[0], seen[1]) and not np.array_equal(seen[1], seen[2])
    coords = page.page.locator("#coords").text_content()
    assert coords.startswith("u = ") and "-" not in coords.split(",")[0]  # right half: u > 0
    assert page.errors == []


def test_the_page_pixels_match_python_within_one_level(page, model_dir):
    generator = Generator(model_dir, providers="cpu")
    latents = np.random.default_rng(7).standard_normal((5, generator.latent_dim)).astype(np.float32)
    expected = 255 - np.round(generator.decode(latents)[..., 0] * 255).astype(np.int16)
    for z, want in zip(latents, expected, strict=True):
        page.page.evaluate("z => window.vae.show(z)", z.tolist())
        got = page.image()
        assert np.abs(got - want).max() <= 1, np.abs(got - want).max()


def test_an_image_chosen_as_a_is_encoded_as_python_encodes_it(page, model_dir, tmp_path):
    from PIL import Image

    generator = Generator(model_dir, providers="cpu")
    image = generator.sample(1, seed=3)[0, ..., 0]  # light ink on black, as Fashion-MNIST
    levels = np.round(image * 255).astype(np.uint8)
    Image.fromarray(levels, mode="L").save(tmp_path / "a.png")
    before = page.page.evaluate("window.vae.ends()")
    page.page.locator("#image-a").set_input_files(str(tmp_path / "a.png"))
    page.page.wait_for_function("old => window.vae.ends()[0].some((x, i) => x !== old[i])", arg=before[0])
    a, b = page.page.evaluate("window.vae.ends()")
    z_mean, _ = generator.encode(levels[None, ..., None].astype(np.float32) / 255)
    np.testing.assert_allclose(a, z_mean[0], atol=1e-4)
    assert b == before[1] and page.errors == []


def test_decoding_one_image_in_the_page_takes_under_a_frame(page):
    medians = [page.page.evaluate("window.vae.benchmark(40)") for _ in range(3)]
    print(f"page decode, one image: medians {medians} ms")
    assert statistics.median(medians) < FRAME_MS, medians


def test_without_isolation_headers_the_page_runs_on_one_thread(browser, model_dir):
    server = serve(model_dir, threads=False)
    try:
        tab = Page(browser, server.url)
        tab.wait_ready()
        assert tab.page.evaluate("[self.crossOriginIsolated, window.vae.threads]") == [False, 1]
        assert tab.image().std() > 5 and tab.errors == []
        tab.page.close()
    finally:
        server.shutdown()
        server.server_close()


def test_webgpu_is_used_only_with_a_gpu_adapter_and_the_page_says_which(browser, page, model_dir):
    """Headless Chromium here has no GPU adapter: the page runs on WebAssembly and says
    why, rather than claim WebGPU while onnxruntime quietly falls back."""
    tab = Page(browser, page.page.url + "?backend=webgpu")  # the module's server
    try:
        tab.wait_ready()
        adapter = tab.page.evaluate("async () => !!(navigator.gpu && await navigator.gpu.requestAdapter())")
        status = tab.page.locator("#status").text_content()
        if adapter:
            assert tab.page.evaluate("window.vae.backend") == "webgpu" and status.startswith("WebGPU, ")
        else:
            assert tab.page.evaluate("window.vae.backend") == "wasm"
            assert status.startswith("WebGPU asked for, but this browser has no GPU adapter: WebAssembly"), status
        assert tab.image().std() > 5 and tab.errors == []
    finally:
        tab.page.close()


def test_a_model_changed_after_the_server_started_is_refused_by_the_page(browser, model_dir, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(model_dir, copy)
    server = serve(copy)
    try:
        data = bytearray((copy / "decoder.onnx").read_bytes())
        data[-1] ^= 0xFF
        (copy / "decoder.onnx").write_bytes(bytes(data))
        tab = Page(browser, server.url)
        tab.wait_ready()
        message = tab.page.locator("#error").text_content()
        assert "decoder.onnx does not match SHA256SUMS" in message
        assert tab.page.evaluate("document.body.dataset.ready") is None
        tab.page.close()
    finally:
        server.shutdown()
        server.server_close()


def test_the_server_refuses_a_tampered_artifact_and_serves_only_its_files(model_dir, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(model_dir, copy)
    (copy / "encoder.onnx").write_bytes(b"not a model")
    with pytest.raises(ArtifactError, match="encoder.onnx"):
        make_server(copy, port=0)
    server = serve(model_dir)
    try:
        host, port = server.server_address[:2]

        def get(path):
            connection = http.client.HTTPConnection(host, port, timeout=10)
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()

        status, headers, body = get("/model/decoder.onnx")
        assert status == 200 and body == (model_dir / "decoder.onnx").read_bytes()
        assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
        assert get("/ort/ort-wasm-simd-threaded.wasm")[1]["Content-Type"] == "application/wasm"
        for path in [
            "/package.json",
            "/model/../../web_server.py",
            "/node_modules/onnxruntime-web/package.json",
            "/build.mjs",
            "/model/notes.txt",
        ]:
            assert get(path)[0] == 404, path
    finally:
        server.shutdown()
        server.server_close()
