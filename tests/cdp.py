"""A headless Chromium driven through the Chrome DevTools Protocol, with a small WebSocket client by hand.

Strategy: ``Browser`` starts ``chromium --headless --remote-debugging-port=0`` with a throwaway profile,
reads the ``DevTools listening on ws://...`` line it prints, and speaks CDP over one WebSocket (RFC 6455,
client frames masked, text messages, ping answered) in flat-session mode. ``new_page()`` opens a tab in
its own browser context, so each test starts with no cookies. A ``Page`` navigates and waits for the load
event, tells the HTTP status of the main document, evaluates JavaScript, types, clicks with the mouse
and waits for the navigation that follows, and takes PNG screenshots. Every wait has a deadline; ``close()`` ends the
browser and its process group.
"""

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.parse

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WebSocket:
    """The client side of RFC 6455 for text messages."""

    def __init__(self, url, timeout=15):
        parts = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16))
        self.sock.sendall(b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (
                              parts.path.encode(), parts.hostname.encode(), parts.port, key))
        self.file = self.sock.makefile("rb")
        status = self.file.readline()
        headers = {}
        for line in iter(self.file.readline, b"\r\n"):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
        if b" 101 " not in status or headers.get("sec-websocket-accept") != accept:
            raise ConnectionError("WebSocket handshake refused: %r" % status)

    def send(self, text, opcode=1):
        data = text.encode("utf-8") if isinstance(text, str) else text
        mask = os.urandom(4)
        n = len(data)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def recv(self, timeout):
        """The next whole text message (continuation frames joined), answering pings on the way."""
        self.sock.settimeout(timeout)
        message = b""
        while True:
            b1, b2 = self._exact(2)
            opcode, n = b1 & 0x0F, b2 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._exact(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._exact(8))[0]
            mask = self._exact(4) if b2 & 0x80 else None
            data = self._exact(n)
            if mask:
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
            if opcode == 8:
                raise ConnectionError("the browser closed the WebSocket")
            if opcode == 9:
                self.send(data, opcode=10)
                continue
            if opcode in (0, 1, 2):
                message += data
                if b1 & 0x80:
                    return message.decode("utf-8")

    def _exact(self, n):
        data = self.file.read(n)
        if len(data) != n:
            raise ConnectionError("WebSocket closed mid-frame")
        return data

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def chromium_binary():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError("no chromium on PATH: tests/run installs Debian's chromium package")


class Browser:
    """One headless Chromium; ``call(method, params, session)`` is one CDP command."""

    def __init__(self, timeout=60):
        self.profile = tempfile.mkdtemp(prefix="hookd-chromium-")
        args = [chromium_binary(), "--headless", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--mute-audio", "--hide-scrollbars",
                "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                "--user-data-dir=" + self.profile, "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium's sandbox refuses to run as root
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        found, self._stderr = [], []
        threading.Thread(target=self._pump, args=(found,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError("chromium did not start:\n" + "".join(self._stderr)[-3000:])
            time.sleep(0.05)
        self.ws = WebSocket(found[0])
        self._ids = 0
        self.events = []

    def _pump(self, found):
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace")
            self._stderr.append(line)
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                found.append(m.group(1))

    def call(self, method, params=None, session=None, timeout=30):
        self._ids += 1
        msg = {"id": self._ids, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while True:
            reply = self._next(deadline, method)
            if reply.get("id") == self._ids:
                if "error" in reply:
                    raise AssertionError("CDP %s failed: %s" % (method, reply["error"]))
                return reply.get("result", {})

    def _next(self, deadline, waiting_for):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("timed out waiting for %s" % waiting_for)
        try:
            msg = json.loads(self.ws.recv(left))
        except socket.timeout:
            raise AssertionError("timed out waiting for %s" % waiting_for)
        if "method" in msg:
            self.events.append(msg)
        return msg

    def wait_event(self, predicate, timeout=30, what="an event"):
        """The first recorded event matching ``predicate`` (removed from the record), waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if predicate(ev):
                    return self.events.pop(i)
            self._next(deadline, what)

    def new_page(self, width=1280, height=900):
        context = self.call("Target.createBrowserContext")["browserContextId"]
        target = self.call("Target.createTarget", {"url": "about:blank", "browserContextId": context})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for method in ("Page.enable", "Network.enable"):
            page.call(method)
        page.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                         "deviceScaleFactor": 1, "mobile": False})
        return page

    def close(self):
        if getattr(self, "ws", None) is not None:
            try:
                self.call("Browser.close", timeout=5)
            except (AssertionError, OSError):
                pass
            self.ws.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """One tab. ``status`` is the HTTP status of the last main document loaded."""

    def __init__(self, browser, session):
        self.browser, self.session = browser, session
        self.status = None

    def call(self, method, params=None, timeout=30):
        return self.browser.call(method, params, self.session, timeout)

    def _mine(self, method):
        return lambda ev: ev.get("sessionId") == self.session and ev["method"] == method

    def _forget(self):
        self.browser.events = [ev for ev in self.browser.events if ev.get("sessionId") != self.session]

    def _loaded(self, timeout):
        """Wait for the load event of the navigation under way; note its main document's status."""
        ev = self.browser.wait_event(self._mine("Page.loadEventFired"), timeout, "the page to load")
        docs = [e for e in self.browser.events if self._mine("Network.responseReceived")(e)
                and e["params"].get("type") == "Document"]
        if docs:
            self.status = docs[-1]["params"]["response"]["status"]
        self._forget()
        return ev

    def goto(self, url, timeout=30):
        self._forget()
        self.call("Page.navigate", {"url": url})
        self._loaded(timeout)
        return self.status

    def eval(self, expression, timeout=30):
        """The value of a JavaScript expression (promises awaited)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, timeout)
        if "exceptionDetails" in result:
            raise AssertionError("JavaScript failed: %s" % result["exceptionDetails"])
        return result["result"].get("value")

    def type(self, selector, text):
        """Focus the element and type ``text`` into it, as the keyboard would."""
        self.eval("document.querySelector(%s).focus()" % json.dumps(selector))
        self.call("Input.insertText", {"text": text})

    def click(self, selector, timeout=30):
        """A real mouse click (press and release) in the middle of the element, then wait for the page
        it leads to."""
        box = self.eval("(() => { const r = document.querySelector(%s).getBoundingClientRect();"
                        " return [r.x + r.width / 2, r.y + r.height / 2]; })()" % json.dumps(selector))
        self._forget()
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left",
                                                   "clickCount": 1})
        self._loaded(timeout)
        return self.status

    def screenshot(self, path, full_page=False):
        params = {"format": "png"}
        if full_page:
            size = self.call("Page.getLayoutMetrics")["cssContentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
            params["captureBeyondViewport"] = True
        data = base64.b64decode(self.call("Page.captureScreenshot", params)["data"])
        with open(path, "wb") as f:
            f.write(data)
        return path
