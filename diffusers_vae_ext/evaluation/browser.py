"""Headless Chromium over the DevTools protocol on a pipe: screenshots of the report, and clicks for its test.

Standard library only: Chromium's `--remote-debugging-pipe` reads NUL-terminated JSON commands on file
descriptor 3 and writes replies and events on 4, so no websocket client, driver download or Playwright install
is needed. The browser runs with networking features off and a throw-away profile.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
HEADLESS_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--allow-file-access-from-files",
)


def find_browser() -> str | None:
    """Path of a Chromium-family browser: $CHROMIUM_PATH, else the first of BROWSER_NAMES on PATH."""
    explicit = os.environ.get("CHROMIUM_PATH")
    if explicit and Path(explicit).is_file():
        return explicit
    for name in BROWSER_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


class BrowserError(RuntimeError):
    """The browser could not be started or answered with an error."""


class HeadlessBrowser:
    """One headless Chromium with one page; use as a context manager.

    Args:
        executable: the browser binary (default `find_browser()`).
        width, height: the page's viewport in CSS pixels.
        timeout: seconds to wait for any single reply.
    """

    def __init__(self, executable: str | None = None, width: int = 1280, height: int = 900, timeout: float = 60.0):
        self.executable = executable or find_browser()
        if self.executable is None:
            raise BrowserError(f"No Chromium-family browser found (looked for {', '.join(BROWSER_NAMES)}).")
        self.width, self.height, self.timeout = width, height, timeout
        self._next_id = 0
        self._buffer = b""
        self.session: str | None = None

    # ------------------------------------------------------------------------------------------------ process
    def __enter__(self) -> HeadlessBrowser:
        self._profile = tempfile.mkdtemp(prefix="vae-report-browser-")
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()
        flags = [*HEADLESS_FLAGS, f"--user-data-dir={self._profile}", "--remote-debugging-pipe", "about:blank"]
        # The pipe ends must be fds 3 and 4 in the browser; a shell's redirections put them there (bash: POSIX sh
        # only takes single-digit fd numbers).
        shell = shutil.which("bash") or "/bin/sh"
        command = f'exec "$0" "$@" 3<&{to_browser_read} 4>&{from_browser_write}'
        self._process = subprocess.Popen(
            [shell, "-c", command, self.executable, *flags],
            pass_fds=(to_browser_read, from_browser_write),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        try:
            target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            self.call("Page.enable")
            self.call(
                "Emulation.setDeviceMetricsOverride",
                {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
            )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._process.poll() is None:
                self.session = None
                self._send("Browser.close", {})
                self._process.wait(timeout=10)
        except Exception:
            pass
        finally:
            if self._process.poll() is None:
                self._process.kill()
                self._process.wait()
            for fd in (self._to_browser, self._from_browser):
                try:
                    os.close(fd)
                except OSError:
                    pass
            if self._process.stderr is not None:
                self._process.stderr.close()
            shutil.rmtree(self._profile, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------ protocol
    def _send(self, method: str, params: dict[str, Any]) -> int:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        return self._next_id

    def _read_message(self, deadline: float) -> dict[str, Any]:
        import select

        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrowserError("The browser did not answer in time.")
            ready, _, _ = select.select([self._from_browser], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                stderr = self._process.stderr.read().decode(errors="replace")[-2000:] if self._process.stderr else ""
                raise BrowserError(f"The browser exited (code {self._process.poll()}): {stderr}")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a DevTools command and return its result (events arriving meanwhile are dropped)."""
        message_id = self._send(method, params or {})
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._read_message(deadline)
            if message.get("id") == message_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})

    # ------------------------------------------------------------------------------------------------ page
    def open(self, path: str | os.PathLike) -> None:
        """Load a local HTML file and wait until it and its images have loaded."""
        url = Path(path).resolve().as_uri()
        self.call("Page.navigate", {"url": url})
        deadline = time.monotonic() + self.timeout
        while self.evaluate("document.readyState") != "complete" or not self.evaluate(
            "Array.from(document.images).every(function (i) { return i.complete; })"
        ):
            if time.monotonic() > deadline:
                raise BrowserError(f"{url} did not finish loading.")
            time.sleep(0.05)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable values only)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click (press and release) at the centre of the first element matching `selector`."""
        box = self.evaluate(
            f"(function () {{ var e = document.querySelector({json.dumps(selector)}); e.scrollIntoView(); "
            "var r = e.getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left", "clickCount": 1}
            )

    def screenshot(self, full_page: bool = True) -> bytes:
        """PNG bytes of the viewport, or of the whole page with `full_page`."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params["clip"] = {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1}
            params["captureBeyondViewport"] = True
        return base64.b64decode(self.call("Page.captureScreenshot", params)["data"])


def screenshot_html(
    html_path: str | os.PathLike, png_path: str | os.PathLike, width: int = 1280, full_page: bool = True
) -> Path:
    """Render a local HTML file in headless Chromium and save a PNG of it (e.g. a report for a model card)."""
    with HeadlessBrowser(width=width) as browser:
        browser.open(html_path)
        data = browser.screenshot(full_page=full_page)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.write_bytes(data)
    return png_path
