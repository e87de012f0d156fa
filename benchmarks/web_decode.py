"""Single-image decoding in the browser page (onnxruntime-web, headless Chromium) against
Python's onnxruntime (deploy.Generator) on the same artifact, in the same run.

    .venv/bin/python benchmarks/web_decode.py --artifact RUN/artifact [--rounds 3] [--calls 200]

Each round times `--calls` single-image decodes in the page with multi-threaded WebAssembly
(cross-origin isolated), in the page on one thread, and in Python; it prints each median
and the page's ratio to Python. Target: the page's median under 16 ms (one frame at 60 Hz).
"""

import argparse
import shutil
import statistics
import time

import numpy as np

from deploy import Generator
from deploy.web_server import make_server, start_in_thread

FRAME_MS = 16.0


def page_medians(browser, artifact: str, threads: bool, rounds: int, calls: int) -> list[float]:
    server = make_server(artifact, port=0, threads=threads)
    start_in_thread(server)
    try:
        page = browser.new_page()
        page.goto(server.url)
        page.wait_for_function("document.body.dataset.ready === 'true'", timeout=120_000)
        if not threads:
            assert page.evaluate("window.vae.threads") == 1
        page.evaluate("window.vae.benchmark(20)")  # warm-up
        medians = [page.evaluate(f"window.vae.benchmark({calls})") for _ in range(rounds)]
        page.close()
        return medians
    finally:
        server.shutdown()
        server.server_close()


def python_medians(artifact: str, rounds: int, calls: int) -> list[float]:
    generator = Generator(artifact, providers="cpu")
    rng = np.random.default_rng(0)
    for _ in range(20):
        generator.decode(rng.standard_normal((1, generator.latent_dim)).astype(np.float32))
    medians = []
    for _ in range(rounds):
        times = []
        for _ in range(calls):
            z = rng.standard_normal((1, generator.latent_dim)).astype(np.float32)
            started = time.perf_counter()
            generator.decode(z)
            times.append((time.perf_counter() - started) * 1000)
        medians.append(statistics.median(times))
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        results = {
            "page, WebAssembly, threads": page_medians(browser, args.artifact, True, args.rounds, args.calls),
            "page, WebAssembly, 1 thread": page_medians(browser, args.artifact, False, args.rounds, args.calls),
        }
        browser.close()
    results["Python onnxruntime (baseline)"] = python_medians(args.artifact, args.rounds, args.calls)
    baseline = statistics.median(results["Python onnxruntime (baseline)"])
    print(f"single-image decode, median ms per call ({args.rounds} rounds x {args.calls} calls)")
    for name, medians in results.items():
        middle = statistics.median(medians)
        verdict = (
            ""
            if name.startswith("Python")
            else f"  {'under' if middle < FRAME_MS else 'OVER'} one frame ({FRAME_MS} ms)"
        )
        print(f"  {name:32s} {' '.join(f'{m:6.2f}' for m in medians)}   {middle / baseline:5.1f}x Python{verdict}")


if __name__ == "__main__":
    main()
