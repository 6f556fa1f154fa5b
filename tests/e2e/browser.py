"""Headless Chromium for the browser tests, driven over the DevTools protocol.

The protocol runs over ``--remote-debugging-pipe``: Chromium reads commands from its file
descriptor 3 and writes answers and events to 4, as JSON messages ending in a NUL byte. That
needs nothing beyond the standard library (no websocket client, no debugging port).

    with Browser.launch() as browser:
        page = browser.new_page(1400, 900)
        page.goto("http://127.0.0.1:8081/")
        page.wait_for("document.body.innerText.includes('Running Jobs')")
        page.screenshot(path)
        text = page.text()
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT_DIR = PROJECT_ROOT / "artifacts" / "screenshots"

CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
#: How Chromium gets onto a machine: CI (.ci/run) installs it as a system package; tests never do.
INSTALL_HINT = "apt-get install chromium (as root; .ci/run does this in CI)"

# Only loopback networking: nothing may phone home (component updates, sync, QUIC probes...).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
         "--disable-default-apps", "--disable-extensions", "--mute-audio",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--no-proxy-server")


def find_chromium() -> str | None:
    for name in CANDIDATES:
        found = name if os.path.isabs(name) and os.access(name, os.X_OK) else shutil.which(name)
        if found:
            return found
    return None


def require_chromium() -> str:
    """The Chromium executable, or skip the test saying how to get one."""
    found = find_chromium()
    if not found:
        pytest.skip(f"Chromium is not installed (looked for {', '.join(CANDIDATES)}); "
                    f"install it with `{INSTALL_HINT}`")
    return found


class BrowserError(RuntimeError):
    pass


class Browser:
    """A headless Chromium process and its DevTools connection."""

    def __init__(self, executable: str, process: subprocess.Popen, to_browser: int,
                 from_browser: int, profile: str):
        self.executable, self.process, self.profile = executable, process, profile
        self._out = os.fdopen(to_browser, "wb", buffering=0)
        self._in = os.fdopen(from_browser, "rb", buffering=0)
        self._ids = iter(range(1, 1 << 62))
        self._lock = threading.Lock()
        self._answers: dict[int, dict] = {}
        self._events: list[dict] = []
        self._arrived = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="chromium-devtools", daemon=True)
        self._reader.start()

    @classmethod
    def launch(cls, executable: str | None = None) -> "Browser":
        executable = executable or require_chromium()
        profile = tempfile.mkdtemp(prefix="chromium-profile-")
        cmd_read, cmd_write = os.pipe()     # we write commands, Chromium reads them on fd 3
        out_read, out_write = os.pipe()     # Chromium writes on fd 4, we read
        # bash moves the child's ends to 3 and 4 and then becomes Chromium (no preexec_fn);
        # they are first copied above 9 so that they cannot collide with 3 and 4
        child_in, child_out = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (cmd_read, out_write))
        os.close(cmd_read)
        os.close(out_write)
        wrapper = f'exec "$@" 3<&{child_in} 4>&{child_out} {child_in}<&- {child_out}>&-'
        try:
            process = subprocess.Popen(
                ["bash", "-c", wrapper, "chromium", executable, *FLAGS, f"--user-data-dir={profile}",
                 "--remote-debugging-pipe", "about:blank"],
                pass_fds=(child_in, child_out), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        finally:
            os.close(child_in)
            os.close(child_out)
        browser = cls(executable, process, cmd_write, out_read, profile)
        try:
            browser.version = browser.send("Browser.getVersion", timeout_s=30)["product"]
        except Exception:
            browser.close()
            raise
        return browser

    # -- the protocol ---------------------------------------------------------------------

    def _read(self) -> None:
        buffer = b""
        try:
            while True:
                chunk = self._in.read(1 << 16)
                if not chunk:
                    break
                buffer += chunk
                *messages, buffer = buffer.split(b"\0")
                with self._arrived:
                    for raw in messages:
                        message = json.loads(raw)
                        if "id" in message:
                            self._answers[message["id"]] = message
                        else:
                            self._events.append(message)
                    self._arrived.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._arrived:
                self._closed = True
                self._arrived.notify_all()

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout_s: float = 30) -> dict:
        with self._lock:
            ident = next(self._ids)
            message = {"id": ident, "method": method, "params": params or {}}
            if session:
                message["sessionId"] = session
            try:
                self._out.write(json.dumps(message).encode() + b"\0")
            except OSError as e:
                raise BrowserError(f"Chromium is gone ({e}) while sending {method}") from e
        deadline = time.monotonic() + timeout_s
        with self._arrived:
            while ident not in self._answers:
                remaining = deadline - time.monotonic()
                if self._closed:
                    raise BrowserError(f"Chromium exited ({self.process.poll()}) during {method}")
                if remaining <= 0:
                    raise BrowserError(f"no answer to {method} within {timeout_s} s")
                self._arrived.wait(remaining)
            answer = self._answers.pop(ident)
        if "error" in answer:
            raise BrowserError(f"{method} failed: {answer['error']}")
        return answer.get("result", {})

    def events(self, method: str, session: str | None = None) -> list[dict]:
        with self._arrived:
            return [e for e in self._events if e.get("method") == method
                    and (session is None or e.get("sessionId") == session)]

    # -- pages ----------------------------------------------------------------------------

    def new_page(self, width: int = 1400, height: int = 900) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, target, session)
        page.call("Page.enable")
        page.call("Runtime.enable")
        page.call("Log.enable")  # browser-side messages: blocked scripts, failed requests
        page.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                         "deviceScaleFactor": 1, "mobile": False})
        return page

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.send("Browser.close", timeout_s=5)
            except BrowserError:
                pass
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(10)
        for stream in (self._out, self._in):
            try:
                stream.close()
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    """One tab: navigate, evaluate JavaScript, wait for a condition, click, type, screenshot."""

    def __init__(self, browser: Browser, target: str, session: str):
        self.browser, self.target, self.session = browser, target, session

    def call(self, method: str, params: dict | None = None, timeout_s: float = 30) -> dict:
        return self.browser.send(method, params, session=self.session, timeout_s=timeout_s)

    def goto(self, url: str, timeout_s: float = 30) -> None:
        """Navigate and wait for the load event (a JS app renders after it: use wait_for)."""
        loads_before = len(self.browser.events("Page.loadEventFired", self.session))
        answer = self.call("Page.navigate", {"url": url}, timeout_s)
        if answer.get("errorText"):
            raise BrowserError(f"cannot load {url}: {answer['errorText']}")
        if answer.get("loaderId"):   # a new document (a change of #fragment only has none)
            self._poll(lambda: len(self.browser.events("Page.loadEventFired", self.session)) > loads_before,
                       timeout_s, f"the load event of {url}")

    def evaluate(self, expression: str, timeout_s: float = 30):
        """The value of a JavaScript expression (awaited if it is a promise)."""
        answer = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, timeout_s)
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            raise BrowserError(f"{expression[:80]!r} threw: "
                               f"{details.get('exception', {}).get('description') or details.get('text')}")
        return answer["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 30, what: str | None = None):
        """Poll a JavaScript expression until it is truthy; return its value."""
        return self._poll(lambda: self.evaluate(expression), timeout_s, what or expression)

    def _poll(self, probe, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}; page text: "
                                   f"{self.text()[:1500]!r}")
            time.sleep(0.2)

    def errors(self) -> list[str]:
        """What went wrong in the page so far: uncaught script exceptions and the browser's
        error messages (a script refused by the Content-Security-Policy, a failed request)."""
        found = []
        for event in self.browser.events("Runtime.exceptionThrown", self.session):
            details = event["params"]["exceptionDetails"]
            found.append(details.get("exception", {}).get("description") or details.get("text", ""))
        for event in self.browser.events("Log.entryAdded", self.session):
            entry = event["params"]["entry"]
            if entry.get("level") == "error":
                found.append(f"{entry.get('source')}: {entry.get('text')}")
        return found

    def text(self) -> str:
        """The rendered text (what a user sees), ``innerText`` of the body."""
        try:
            return self.evaluate("document.body ? document.body.innerText : ''") or ""
        except BrowserError:
            return ""

    def dom(self) -> str:
        """The rendered DOM as HTML (after scripts ran)."""
        return self.evaluate("document.documentElement.outerHTML")

    def center_of(self, selector: str, text: str | None = None) -> tuple[float, float] | None:
        """The centre of the first visible element matching ``selector`` (and containing
        ``text``), scrolled into view if it is not; None if there is none."""
        script = f"""(() => {{
            const text = {json.dumps(text)};
            for (const el of document.querySelectorAll({json.dumps(selector)})) {{
                if (text !== null && !el.innerText.includes(text)) continue;
                el.scrollIntoView({{block: "nearest", inline: "nearest"}});
                const r = el.getBoundingClientRect();
                if (r.width > 0 && r.height > 0) return [r.left + r.width / 2, r.top + r.height / 2];
            }}
            return null;
        }})()"""
        found = self.evaluate(script)
        return tuple(found) if found else None

    def click(self, selector: str, text: str | None = None, timeout_s: float = 20) -> None:
        """Click like a user (mouse events at the element's centre), waiting for it to appear."""
        what = f"{selector}" + (f" containing {text!r}" if text else "")
        x, y = self._poll(lambda: self.center_of(selector, text), timeout_s, what)
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left",
                                                   "clickCount": 0 if kind == "mouseMoved" else 1})

    def type_text(self, text: str) -> None:
        """Type into the focused element."""
        self.call("Input.insertText", {"text": text})

    def screenshot(self, path: Path | str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))
        return path


def screenshot_path(name: str) -> Path:
    """Where a page's screenshot goes: artifacts/screenshots/<name>.png (git-ignored)."""
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    return SCREENSHOT_DIR / f"{name}.png"
