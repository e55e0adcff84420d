"""The dashboard in a real browser: Voilà renders a notebook showing ``mlnb.dashboard()`` over the tiny model,
headless Chromium (driven through chromedriver's W3C WebDriver HTTP API) clicks Generate and waits for the image.

Run by ``.ci/browser-test VENV``, which installs Chromium, chromedriver and Voilà (in a venv of its own; the kernel
is this interpreter, through a temporary kernelspec). Skipped unless ``MLNB_BROWSER_TEST=1``.

Environment:
    MLNB_VOILA: the ``voila`` executable (default: ``voila`` on PATH).
    MLNB_CHROMIUM, MLNB_CHROMEDRIVER: the browser and driver (default ``/usr/bin/chromium``, ``chromedriver``).
    MLNB_SCREENSHOT: where to save the screenshot (default ``docs/img/dashboard.png`` in the repository).

Everything listens on 127.0.0.1 only, every wait is bounded, and the servers are killed at the end.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage", "--hide-scrollbars",
    "--force-device-scale-factor=1", "--window-size=1000,1700",
    # Nothing but the local server: the widget manager's CDN stylesheet fails fast instead of leaving the machine.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]
PAGE_TIMEOUT = 150  # s: kernel start, torch import and the notebook's cells
GENERATE_TIMEOUT = 90  # s: the click to the image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: dict | None = None, timeout: float = 30) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:  # WebDriver errors come back as JSON bodies
        raise AssertionError(f"{method} {url}: {exc.code} {exc.read()[:500]!r}") from None


def _wait(probe, what: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    """Call ``probe()`` until it stops raising ``OSError``; fail if ``proc`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited with {proc.returncode}:\n{_tail(log)}")
        try:
            probe()
            return
        except OSError:  # urllib's URLError is an OSError too
            time.sleep(0.2)
    raise AssertionError(f"{what} in {timeout} s:\n{_tail(log)}")


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    _wait(lambda: urllib.request.urlopen(url, timeout=2).close(), f"{url} did not answer", timeout, proc, log)


def _wait_port(port: int, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    # A TCP connect, not a GET: Voilà starts a kernel and runs the notebook for every page request.
    connect = lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close()  # noqa: E731
    _wait(connect, f"port {port} did not open", timeout, proc, log)


def _tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (Voilà and its kernel), SIGKILL what is left after 10 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def _start(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


class WebDriver:
    """The few W3C WebDriver commands this test needs, over HTTP to a local chromedriver."""

    ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C web element identifier

    def __init__(self, port: int, chromium: str, user_data_dir: Path) -> None:
        self.base = f"http://127.0.0.1:{port}"
        caps = {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium, "args": CHROMIUM_FLAGS + [f"--user-data-dir={user_data_dir}"],
        }}
        reply = _http("POST", f"{self.base}/session", {"capabilities": {"alwaysMatch": caps}}, timeout=60)
        self.url = f"{self.base}/session/{reply['value']['sessionId']}"
        self.command("POST", "/timeouts", {"pageLoad": PAGE_TIMEOUT * 1000, "script": 10_000})

    def command(self, method: str, path: str, body: dict | None = None, timeout: float = 30):
        return _http(method, self.url + path, body, timeout=timeout)["value"]

    def get(self, url: str) -> None:
        self.command("POST", "/url", {"url": url}, timeout=PAGE_TIMEOUT + 10)

    def run(self, script: str, *args):
        return self.command("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find(self, css: str) -> str | None:
        found = self.command("POST", "/elements", {"using": "css selector", "value": css})
        return found[0][self.ELEMENT] if found else None

    def wait_for(self, what: str, check, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def click(self, element: str) -> None:
        self.command("POST", f"/element/{element}/click", {})

    def screenshot(self, element: str | None = None) -> bytes:
        path = f"/element/{element}/screenshot" if element else "/screenshot"
        return base64.b64decode(self.command("GET", path))

    def quit(self) -> None:
        try:
            _http("DELETE", self.url, timeout=15)
        except Exception:
            pass


def _notebook(model: str, kernel: str) -> dict:
    cells = [
        # The per-cell monitor fills the history plot when the IPython extension is available.
        "import mlnb\nfrom mlnb.session import defaults\ntry:\n    get_ipython().extension_manager.load_extension('mlnb')\n"
        "except Exception as exc:\n    print('per-cell monitor off:', exc)",
        f"defaults.model = {model!r}\npipe = mlnb.load_pipeline(defaults.model)",
        "board = mlnb.dashboard()\npanel = board.generate_panel\npanel.prompt.value = 'a watercolor fox in a snowy forest'\n"
        "panel.steps.value = 2\npanel.seed.value = '7'\npanel.width.value = panel.height.value = '128'\nboard",
    ]
    return {
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": kernel, "display_name": "mlnb test", "language": "python"}},
        "cells": [
            {"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None, "outputs": [], "source": src}
            for i, src in enumerate(cells)
        ],
    }


PAGE_STATE = """
const img = document.querySelector('img.mlnb-result-image');
const report = document.querySelector('.mlnb-report');
const status = document.querySelector('.mlnb-generate-status');
return {
  image: img && img.complete && img.naturalWidth > 0 && getComputedStyle(img).display !== 'none'
         ? [img.naturalWidth, img.naturalHeight] : null,
  report: report ? report.innerText : '',
  status: status ? status.innerText : '',
  button_disabled: !!(document.querySelector('.mlnb-generate-button') || {}).disabled,
};
"""


def _finished(state: dict) -> bool:
    # The worker sets the image, the report, the status, then re-enables the button: wait for the last of them.
    return bool(state["image"]) and "128×128" in state["report"] and "done" in state["status"] and not state["button_disabled"]


def test_dashboard_generates_in_a_real_browser(tiny_sd, tmp_path):
    voila = os.environ.get("MLNB_VOILA") or shutil.which("voila")
    chromium = os.environ.get("MLNB_CHROMIUM", "/usr/bin/chromium")
    chromedriver = os.environ.get("MLNB_CHROMEDRIVER") or shutil.which("chromedriver")
    missing = [name for name, path in (("voila", voila), ("chromium", chromium), ("chromedriver", chromedriver))
               if not path or not os.path.exists(path)]
    assert not missing, f"not installed: {', '.join(missing)} (.ci/browser-test installs them)"

    # A kernelspec for this interpreter, so Voilà (in its own venv) runs the kernel where mlnb is installed.
    kernel = "mlnb-browser-test"
    spec_dir = tmp_path / "jupyter" / "kernels" / kernel
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mlnb test", "language": "python",
    }))
    # The kernel starts in the notebook's folder: a short relative model path reads well in the screenshot.
    shutil.copytree(tiny_sd, tmp_path / "tiny-sd")
    notebook = tmp_path / "dashboard.ipynb"
    notebook.write_text(json.dumps(_notebook("tiny-sd", kernel)))
    env = dict(os.environ, JUPYTER_PATH=str(tmp_path / "jupyter"), MLNB_DEVICE="cpu",
               MLNB_CACHE=str(tmp_path / "cache"), MPLBACKEND="Agg")

    voila_port, driver_port = _free_port(), _free_port()
    voila_log, driver_log = tmp_path / "voila.log", tmp_path / "chromedriver.log"
    procs = []
    driver = None
    try:
        procs.append(_start([
            voila, str(notebook), "--no-browser", f"--port={voila_port}", "--Voila.ip=127.0.0.1",
            "--Voila.port_retries=0", "--show_tracebacks=True", f"--VoilaExecutor.timeout={PAGE_TIMEOUT}",
        ], voila_log, env))
        procs.append(_start([chromedriver, f"--port={driver_port}", "--allowed-ips=127.0.0.1"], driver_log))
        _wait_http(f"http://127.0.0.1:{driver_port}/status", 30, procs[1], driver_log)
        _wait_port(voila_port, 60, procs[0], voila_log)

        driver = WebDriver(driver_port, chromium, tmp_path / "chromium-profile")
        started = time.monotonic()
        driver.get(f"http://127.0.0.1:{voila_port}/")
        try:
            button = driver.wait_for("the Generate button", lambda: driver.find(".mlnb-generate-button"), PAGE_TIMEOUT)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\npage: {driver.run('return document.body.innerText')[:2000]}\n{_tail(voila_log)}")
        assert driver.find(".mlnb-dashboard") is not None
        driver.click(button)
        try:
            state = driver.wait_for(
                "the generated image",
                lambda: _finished(s := driver.run(PAGE_STATE)) and s,
                GENERATE_TIMEOUT,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; page state {driver.run(PAGE_STATE)}\n{_tail(voila_log)}")
        assert state["image"] == [128, 128]
        assert "2 steps" in state["report"] and "level none" in state["report"]
        assert "done, seed 7" in state["status"]
        text = driver.run("return document.querySelector('.mlnb-dashboard').innerText")
        assert "host RAM used" in text and "Cell history" in text
        print(f"page ready and image shown {time.monotonic() - started:.1f} s after navigation")

        board = driver.find(".mlnb-dashboard")
        png = driver.screenshot(board)
        assert png.startswith(b"\x89PNG")
        target = Path(os.environ.get("MLNB_SCREENSHOT", REPO / "docs" / "img" / "dashboard.png"))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png)
    finally:
        if driver is not None:
            driver.quit()
        for proc in reversed(procs):
            _stop(proc)
