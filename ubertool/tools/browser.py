"""A browser for the guest: Playwright driving Debian's Chromium, one context per run.

Policy `[tools.browser]` names the origins pages may load from. Three layers hold every
request, redirect hop and WebSocket to them; the guest is told (on stderr) what was refused,
and the audit trail records it:

- request routing: a request to another origin is aborted; a credentialed request is sent by
  the host one hop at a time (`route.fetch(max_redirects=0)`), each redirect's target checked
  before it is asked for;
- WebSocket routing (`route_web_socket`): a page's socket to another origin is closed;
- a refusing proxy: Chromium reaches only the allowed origins' host:port directly, everything
  else (a Worker's WebSocket, the next hop of a redirect answered to the browser) goes to a
  host-side proxy that refuses it.

A credential is attached by the host, to one request at a time, only when the request's URL is
on the credential's origin and so is what started it: the host's own `goto`, or a frame whose
every ancestor is on that origin. The page's scripts never see it. Screenshots of a page on a
credentialed origin are refused unless the policy allows them (`credentialed_screenshots`).
Screenshots go into the run's workspace. Playwright runs on one event loop thread of the
broker's own, started at first use and closed with the run.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import anyio
import anyio.abc
import anyio.to_thread
from anyio.from_thread import BlockingPortal
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ubertool.tools import ToolFailure
from ubertool.tools.broker import Broker
from ubertool.tools.credentials import CredentialBroker, CredentialError
from ubertool.tools.files import write_no_follow
from ubertool.tools.recorder import Recorder
from ubertool.tools.redact import Redactor

# Headless Chromium on a machine with no outside network: no background traffic, no updates.
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-pings", "--disable-domain-reliability", "--disable-client-side-phishing-detection",
                 "--disable-default-apps", "--disable-breakpad", "--no-service-autorun",
                 "--disable-features=AutofillServerCommunication,OptimizationHints,MediaRouter,Translate,"
                 "CertificateTransparencyComponentUpdater,AccountConsistency,SigninInterceptBubble")


_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_HOPS = 10
_BROWSER_SERVICES = (".google.com", ".googleapis.com", ".gvt1.com", ".gstatic.com")
_MAX_REPORTED = 50  # refusals told to the guest per answer (the audit has them all)
_SOCKET_SCHEMES = {"ws": "http", "wss": "https"}  # a WebSocket's origin is its HTTP twin's


def origin_of(url: str) -> str:
    """`scheme://host:port` of `url`, the port made explicit (an IPv6 host in brackets)."""
    parts = urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443, "ws": 80, "wss": 443}.get(parts.scheme)
    except ValueError:  # a port that is not a number: no origin anyone allowed
        port = None
    host = parts.hostname or ""
    return f"{parts.scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def shown(url: str) -> str:
    """`url` as reports show it: no user info, no query, no fragment."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme and netloc else url.split("?")[0][:200]


class BrowserSpec(BaseModel):
    """Policy `[tools.browser]`."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    origins: tuple[str, ...] = Field(min_length=1, strict=False)
    credentials: dict[str, str] = Field(default_factory=dict)  # origin -> credential name
    executable: str = "/usr/bin/chromium"
    width: int = Field(1280, ge=200, le=4096)
    height: int = Field(800, ge=200, le=4096)
    timeout_s: float = Field(10.0, gt=0, le=600)
    evaluate: bool = False  # may the guest run its own JavaScript in pages?
    max_text_bytes: int = Field(1_048_576, ge=1024, le=64 * 2**20)
    # May the guest screenshot a page on a credentialed origin? Pixels can show what the
    # credential opened (or the credential itself), and no redaction reads pixels.
    credentialed_screenshots: bool = False

    @field_validator("origins")
    @classmethod
    def _origins(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for value in values:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
                raise ValueError(f"{value!r} is not an origin such as 'https://example.com'")
        return tuple(origin_of(v) for v in values)

    @model_validator(mode="after")
    def _credentials_on_origins(self) -> BrowserSpec:
        # Keys are compared with request origins: make them the same form (explicit port).
        credentials = {origin_of(origin): name for origin, name in self.credentials.items()}
        for origin in credentials:
            if origin not in self.origins:
                raise ValueError(f"credentials: {origin} is not one of tools.browser.origins")
        object.__setattr__(self, "credentials", credentials)
        return self

    def warnings(self) -> tuple[str, ...]:
        """What an operator should know about this section (for `ubertool policy check`)."""
        if self.credentialed_screenshots and self.credentials:
            return ("tools.browser.credentialed_screenshots = true: screenshots of pages on "
                    f"{', '.join(sorted(self.credentials))} may show what the credential opens, "
                    "or the secret itself, and redaction cannot remove text from pixels",)
        return ()

    def allows(self, url: str) -> bool:
        """Is `url` (http, https, ws or wss) on one of the policy's origins?"""
        parts = urlsplit(url)
        scheme = _SOCKET_SCHEMES.get(parts.scheme, parts.scheme)
        if scheme not in ("http", "https"):
            return False
        return origin_of(parts._replace(scheme=scheme).geturl()) in self.origins


class BrowserBroker(Broker):
    """The run's browser; use as a context manager (leaving it closes the browser)."""

    prefix = "browser"

    def __init__(self, spec: BrowserSpec | None, workspace: Path, workspace_guest: str, *,
                 credentials: CredentialBroker | None, recorder: Recorder, redactor: Redactor,
                 on_event: Callable[..., None] | None = None) -> None:
        super().__init__(recorder=recorder, redactor=redactor, on_event=on_event)
        self._spec = spec
        self._workspace = workspace
        self._workspace_guest = workspace_guest
        self._credentials = credentials
        self._page: Any = None
        self._blocked: list[str] = []
        self._blocked_lock = threading.Lock()  # not `_lock`: that one is held while the browser starts
        self._host_goto: str | None = None  # the origin the host's own goto is loading

    def tools(self) -> tuple[Callable[..., Any], ...]:
        return (self.browser_goto, self.browser_act, self.browser_text, self.browser_evaluate,
                self.browser_screenshot, self.browser_state)

    # -- the tools ---------------------------------------------------------------------------

    def browser_goto(self, url: str) -> dict[str, Any]:
        """Load a page (its origin must be allowed by the policy).

        Args:
            url: The page's URL.
        """
        return self._recorded("goto", {"url": url}, lambda: self._run(self._goto, url))

    def browser_act(self, action: str, selector: str, value: str = "",
                    timeout_s: float | None = None) -> dict[str, Any]:
        """Act on the element a CSS selector finds: click, fill (value), press (value: a key),
        or wait_for (until it is visible).

        Args:
            action: One of click, fill, press, wait_for.
            selector: A CSS (or Playwright) selector.
            value: The text to fill, or the key to press.
            timeout_s: How long to wait for the element (capped by the policy).
        """
        arguments = {"action": action, "selector": selector, "value": value, "timeout_s": timeout_s}
        return self._recorded("act", arguments,
                              lambda: self._run(self._act, action, selector, value, timeout_s))

    def browser_text(self, selector: str = "body") -> dict[str, Any]:
        """The visible text of the element a selector finds (the whole page by default).

        Args:
            selector: A CSS (or Playwright) selector.
        """
        return self._recorded("text", {"selector": selector}, lambda: self._run(self._text, selector))

    def browser_evaluate(self, expression: str) -> dict[str, Any]:
        """Evaluate a JavaScript expression in the page; JSON values only. Only when the policy's
        tools.browser.evaluate allows it.

        Args:
            expression: The JavaScript expression.
        """
        return self._recorded("evaluate", {"expression": expression},
                              lambda: self._run(self._evaluate, expression))

    def browser_screenshot(self, name: str = "screenshot.png") -> dict[str, Any]:
        """Save a PNG of the page into the workspace; returns its guest path.

        Args:
            name: The file name (letters, digits, '.', '_', '-').
        """
        return self._recorded("screenshot", {"name": name}, lambda: self._run(self._screenshot, name))

    def browser_state(self) -> dict[str, Any]:
        """The current page's URL and title."""
        return self._recorded("state", {}, lambda: self._run(self._state))

    # -- the host side -----------------------------------------------------------------------

    def _run(self, fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
        """Call the async `fn` on the browser's loop; report requests blocked meanwhile."""
        portal = self._start()
        try:
            answer = portal.call(fn, *args)
        except ToolFailure:
            raise
        except Exception as exc:  # Playwright's errors: timeouts, missing elements, ...
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            refused = self._take_blocked()
            if refused:  # e.g. a navigation whose redirect the policy refused
                message += f" (refused by tools.browser.origins: {'; '.join(refused)})"
            raise ToolFailure(self._redactor.text(f"{type(exc).__name__}: {message}")[:2000]) from None
        blocked = self._take_blocked()
        if blocked:
            answer["blocked"] = blocked
        return answer

    def _take_blocked(self) -> list[str]:
        with self._blocked_lock:
            blocked, self._blocked = self._blocked, []
        return blocked

    def _start(self) -> BlockingPortal:
        if self._spec is None:
            raise ToolFailure("no browser in the policy; an operator adds [tools.browser] with its origins")
        with self._lock:
            portal = self._event_loop()
            if self._page is None:
                from playwright.async_api import async_playwright

                playwright = self._stack.enter_context(portal.wrap_async_context_manager(async_playwright()))
                proxy = self._stack.enter_context(portal.wrap_async_context_manager(
                    refusing_proxy(self._refuse_outside)))
                self._page = portal.call(self._launch, portal, playwright, proxy)
            return portal

    async def _launch(self, portal: BlockingPortal, playwright: Any, proxy_port: int) -> Any:
        assert self._spec is not None
        spec = self._spec
        # Only the allowed origins' host:port are reached directly; everything else goes to the
        # refusing proxy. `<-loopback>` drops Chromium's implicit direct access to loopback.
        direct = ";".join(origin.split("://", 1)[1] for origin in spec.origins)
        network = (f"--proxy-server=http://127.0.0.1:{proxy_port}",
                   f"--proxy-bypass-list=<-loopback>;{direct}")
        try:
            browser = await playwright.chromium.launch(executable_path=spec.executable,
                                                       args=[*CHROMIUM_ARGS, *network])
        except Exception as exc:
            raise ToolFailure(f"the browser could not start ({spec.executable}): "
                              f"{str(exc).splitlines()[0]}") from None
        self._stack.callback(portal.call, browser.close)
        context = await browser.new_context(viewport={"width": spec.width, "height": spec.height},
                                            service_workers="block")
        context.set_default_timeout(spec.timeout_s * 1000)
        await context.route("**/*", self._route)
        await context.route_web_socket(lambda url: True, self._route_socket)
        self._on_event("browser_started", origins=list(spec.origins))
        return await context.new_page()

    def _refuse(self, url: str, how: str, *, tell: bool = True) -> None:
        """Report a refused request, hop or socket to the audit and (`tell`) to the guest, with
        the answer of its current or next call."""
        if tell:
            with self._blocked_lock:
                if len(self._blocked) < _MAX_REPORTED:
                    self._blocked.append(f"{shown(url)} ({how})" if how != "request" else shown(url))
        self._on_event("browser_blocked", url=shown(url), via=how)

    def _refuse_outside(self, target: str) -> None:
        # Chromium's own background requests (updates, clock, sign-in) land here too: refused
        # and audited like any other, but they are not the page's doing, so not told.
        host = urlsplit(target if "://" in target else f"//{target}").hostname or ""
        ours = host.endswith(_BROWSER_SERVICES)
        self._refuse(target, "outside request routing: a Worker's WebSocket or a redirect's next hop",
                     tell=not ours)

    async def _route(self, route: Any, request: Any) -> None:
        """Every HTTP request of every page and Worker: refused, continued, or sent by the host."""
        try:
            await self._route_request(route, request)
        except Exception:  # a request must end one way or another, never hang the page
            with contextlib.suppress(Exception):
                await route.abort("failed")

    async def _route_request(self, route: Any, request: Any) -> None:
        assert self._spec is not None
        url = request.url
        if url.startswith(("data:", "about:", "blob:")):
            await route.continue_()
            return
        if not self._spec.allows(url):
            self._refuse(url, "request")
            await route.abort("blockedbyclient")
            return
        credential = self._credential_for(request)
        if credential is None:
            # No header of ours rides along; if this is redirected, the next hop leaves the
            # routing and meets the refusing proxy unless it is on an allowed origin.
            await route.continue_()
            return
        try:
            await self._send_credentialed(route, request, credential)
        except CredentialError:
            await route.abort("accessdenied")

    def _credential_for(self, request: Any) -> str | None:
        """The credential to attach, if the request's URL is on a credentialed origin and what
        started it is on that origin too (the host's goto, or a frame and all its ancestors)."""
        assert self._spec is not None
        origin = origin_of(request.url)
        name = self._spec.credentials.get(origin)
        if name is None or self._credentials is None:
            return None
        try:
            frame = request.frame
        except Exception:  # a service worker's request has no frame: nobody vouches for it
            return None
        if request.is_navigation_request() and frame.parent_frame is None and self._host_goto == origin:
            self._host_goto = None  # the host's own navigation, once
            return name
        while frame is not None:
            if origin_of(frame.url) != origin:
                return None
            frame = frame.parent_frame
        return name

    async def _send_credentialed(self, route: Any, request: Any, credential: str) -> None:
        """Send `request` from the host, one hop at a time: the credential goes only to hops on
        its origin while the chain has not left it; each redirect's target is checked first."""
        assert self._spec is not None and self._credentials is not None
        credentials = self._credentials
        origin = origin_of(request.url)
        url, method, body, carry = request.url, request.method, request.post_data_buffer, True
        headers = dict(request.headers)
        for _ in range(_MAX_HOPS + 1):
            carry = carry and origin_of(url) == origin
            sent = dict(headers)
            if carry:
                name, value = await anyio.to_thread.run_sync(
                    functools.partial(credentials.header, credential, method=method))
                sent = {k: v for k, v in sent.items() if k.lower() != name.lower()} | {name: value}
            response = await route.fetch(url=url, method=method, headers=sent, post_data=body,
                                         max_redirects=0, timeout=self._spec.timeout_s * 1000)
            location = response.headers.get("location")
            if response.status not in _REDIRECTS or not location:
                await route.fulfill(response=response)
                return
            target = urljoin(url, location)
            if not self._spec.allows(target):
                self._refuse(target, f"redirect from {shown(url)}")
                await route.abort("blockedbyclient")
                return
            if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                method, body = "GET", b""
                headers = {k: v for k, v in headers.items()
                           if k.lower() not in ("content-type", "content-length")}
            url = target
        self._refuse(url, f"more than {_MAX_HOPS} redirects")
        await route.abort("blockedbyclient")

    async def _route_socket(self, socket: Any) -> None:
        """Every page's WebSocket: connected if its origin is allowed, else closed."""
        assert self._spec is not None
        if self._spec.allows(socket.url):
            socket.connect_to_server()
            return
        self._refuse(socket.url, "WebSocket")
        await socket.close(code=1008, reason="blocked by the policy")

    async def _goto(self, url: str) -> dict[str, Any]:
        assert self._spec is not None
        if not self._spec.allows(url):
            raise ToolFailure(f"navigation to {origin_of(url)} is blocked: not in tools.browser.origins "
                              f"({', '.join(self._spec.origins)})")
        self._host_goto = origin_of(url)
        try:
            response = await self._page.goto(url)
        except Exception:
            # A refused navigation commits Chromium's error page a moment later; wait for it,
            # or it would cut the next goto short.
            with contextlib.suppress(Exception):
                await self._page.wait_for_url("chrome-error://**", timeout=2000)
            raise
        finally:
            self._host_goto = None
        return {"url": self._page.url, "title": await self._page.title(),
                "status": response.status if response is not None else None}

    async def _act(self, action: str, selector: str, value: str, timeout_s: float | None) -> dict[str, Any]:
        assert self._spec is not None
        timeout = (self._spec.timeout_s if timeout_s is None else min(timeout_s, self._spec.timeout_s)) * 1000
        locator = self._page.locator(selector).first
        if action == "click":
            await locator.click(timeout=timeout)
        elif action == "fill":
            await locator.fill(value, timeout=timeout)
        elif action == "press":
            await locator.press(value, timeout=timeout)
        elif action == "wait_for":
            await locator.wait_for(timeout=timeout)
        else:
            raise ToolFailure(f"unknown action {action!r}: use click, fill, press or wait_for")
        return {"url": self._page.url}

    async def _text(self, selector: str) -> dict[str, Any]:
        assert self._spec is not None
        text = await self._page.locator(selector).first.inner_text()
        return {"text": text[: self._spec.max_text_bytes]}  # redacted with every answer (Recorder)

    async def _evaluate(self, expression: str) -> dict[str, Any]:
        assert self._spec is not None
        if not self._spec.evaluate:
            raise ToolFailure("running JavaScript is not allowed (policy tools.browser.evaluate = false)")
        return {"value": await self._page.evaluate(expression)}

    async def _screenshot(self, name: str) -> dict[str, Any]:
        assert self._spec is not None
        if not name or "/" in name or name.startswith(".") or not name.endswith(".png"):
            raise ToolFailure(f"screenshot name {name!r}: a plain file name ending in .png")
        shown_origins = {origin_of(frame.url) for frame in self._page.frames}
        credentialed = sorted(shown_origins & set(self._spec.credentials))
        if credentialed and not self._spec.credentialed_screenshots:
            raise ToolFailure(f"a screenshot of a page on {', '.join(credentialed)} is refused: that origin "
                              "has a credential (an operator allows it with "
                              "tools.browser.credentialed_screenshots = true)")
        png = await self._page.screenshot()
        try:
            write_no_follow(self._workspace, name, png)
        except OSError as exc:
            raise ToolFailure(f"screenshot {name!r} could not be written: {exc.strerror or exc}") from None
        return {"path": f"{self._workspace_guest}/{name}"}

    async def _state(self) -> dict[str, Any]:
        return {"url": self._page.url, "title": await self._page.title()}


@asynccontextmanager
async def refusing_proxy(on_refused: Callable[[str], None]) -> AsyncIterator[int]:
    """A proxy on loopback that forwards nothing: it reads each request's first line, reports
    its target (`host:port` of a CONNECT, or the URL) to `on_refused`, answers 403 and closes.
    Yields its port; stops on exit."""
    async def refuse(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            head = b""
            with anyio.move_on_after(5):
                try:
                    while b"\r\n" not in head and len(head) < 8192:
                        head += await stream.receive(4096)
                    parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
                    if len(parts) == 3:
                        on_refused(parts[1])
                    await stream.send(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n"
                                      b"Connection: close\r\n\r\n")
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    pass

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, refuse)
        try:
            yield port
        finally:
            group.cancel_scope.cancel()
