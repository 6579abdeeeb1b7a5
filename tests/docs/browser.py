"""A small driver for the installed Chromium, over the DevTools protocol on a pipe.

Chromium started with ``--remote-debugging-pipe`` reads JSON commands, each ended by a NUL
byte, on file descriptor 3 and writes replies and events on descriptor 4. That is all this
needs: open a page, wait for a condition, evaluate JavaScript, take a screenshot. No
driver binary and no download: only the browser Debian installs.

The driver also keeps what went wrong on the pages it opens: every load that failed (a
missing file, or a fetch from the network, which is blocked) and every uncaught script
error or rejected promise; ``problems()`` hands them over. Host names resolve to nothing, so a
fetch from the network fails (and is kept) instead of reaching out.
"""

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time


def find_chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


class BrowserError(RuntimeError):
    pass


class Browser:
    def __init__(self, executable=None, width=1280, height=900):
        executable = executable or find_chromium()
        if executable is None:
            raise BrowserError("Browser: no chromium executable on PATH")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def plumb():  # in the child: the pipe ends become descriptors 3 and 4
            read = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            write = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(read, 3)
            os.dup2(write, 4)

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--remote-debugging-pipe", f"--window-size={width},{height}",
                 "--host-resolver-rules=MAP * ~NOTFOUND", "about:blank"]  # fmt: skip
        self.process = subprocess.Popen(
            [executable, *flags],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=plumb,
            pass_fds=(3, 4),
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self._requests = {}  # request id -> url, to name a failed load
        self._problems = []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable", session=True)
        for domain in ("Runtime", "Network", "Log"):
            self.send(f"{domain}.enable", session=True)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            session=True,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    # ------------------------------------------------------------------ protocol

    def send(self, method, session=False, timeout=60, **params):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if "method" in reply:
                self._event(reply)
            elif reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _event(self, message):
        """Keep a failed load or an uncaught error; forget every other event."""
        method, params = message["method"], message.get("params", {})
        if method == "Network.requestWillBeSent":
            self._requests[params["requestId"]] = params["request"]["url"]
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            url = self._requests.get(params["requestId"], "?")
            reason = params.get("blockedReason") or params.get("errorText", "")
            self._problems.append(f"failed load: {url} ({reason})")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            self._problems.append(f"{entry['source']} error: {entry.get('url', '')} {entry['text']}".strip())
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self._problems.append(f"uncaught: {text.splitlines()[0] if text else details} ({details.get('url', '')})")

    def problems(self, settle=0.5):
        """Failed loads and uncaught errors since the last call, after ``settle`` seconds without any message."""
        while True:
            if b"\0" not in self._buffer:
                ready, _, _ = select.select([self._from_browser], [], [], settle)
                if not ready:
                    break
            message = self._read(time.monotonic() + 10)
            if "method" in message:
                self._event(message)
        found, self._problems = self._problems, []
        return list(dict.fromkeys(found))  # a failure repeated on one page is named once

    def _read(self, deadline):
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise BrowserError("Browser: no reply before the deadline")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise BrowserError("Browser: chromium closed the pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    # ------------------------------------------------------------------ pages

    def evaluate(self, expression, timeout=60):
        """The value of a JavaScript expression (a promise is awaited)."""
        result = self.send(
            "Runtime.evaluate",
            session=True,
            timeout=timeout,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"evaluate: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url, ready="true", timeout=60):
        """Load ``url`` and wait until the JavaScript condition ``ready`` holds (polled every 50 ms)."""
        self.send("Page.navigate", session=True, url=url)
        wait = (
            "new Promise((resolve, reject) => { const start = Date.now(); (function poll() {"
            f" try {{ if (document.readyState === 'complete' && ({ready})) return resolve(true); }} catch (e) {{}}"
            f" if (Date.now() - start > {timeout * 1000}) return resolve(false); setTimeout(poll, 50); }})(); }})"
        )
        # the navigation may replace the document while the first poll runs: poll again until it holds
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.evaluate(wait, timeout=timeout + 5) and self.evaluate("location.href") == url:
                    return True
            except BrowserError:
                pass
            time.sleep(0.05)
        raise BrowserError(f"open: {url} not ready within {timeout} s ({ready})")

    def screenshot(self, path):
        data = self.send("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
        except (BrowserError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
