"""A browser for the guest: Playwright driving Debian's Chromium, one context per run.

Policy `[tools.browser]` names the origins pages may load from; every other navigation and
sub-request is blocked by the host (request routing) and the guest is told which. A
credential may be attached to one origin's requests, by the host, as a header: the page's
scripts never see it. Screenshots go into the run's workspace. Playwright runs on one event
loop thread of the broker's own, started at first use and closed with the run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio.to_thread
from anyio.from_thread import BlockingPortal
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ubertool.tools import ToolFailure
from ubertool.tools.broker import Broker
from ubertool.tools.credentials import CredentialBroker, CredentialError
from ubertool.tools.files import write_no_follow
from ubertool.tools.recorder import Recorder
from ubertool.tools.redact import Redactor

# Headless Chromium on a machine with no outside network: no background traffic, no updates.
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return f"{parts.scheme}://{parts.hostname}:{port}"


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

    @field_validator("origins")
    @classmethod
    def _origins(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for value in values:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
                raise ValueError(f"{value!r} is not an origin such as 'https://example.com'")
        return tuple(origin_of(v) for v in values)


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
            raise ToolFailure(self._redactor.text(f"{type(exc).__name__}: {message}")[:1000]) from None
        with self._lock:
            blocked, self._blocked = self._blocked, []
        if blocked:
            answer["blocked"] = blocked
        return answer

    def _start(self) -> BlockingPortal:
        if self._spec is None:
            raise ToolFailure("no browser in the policy; an operator adds [tools.browser] with its origins")
        with self._lock:
            portal = self._event_loop()
            if self._page is None:
                from playwright.async_api import async_playwright

                playwright = self._stack.enter_context(portal.wrap_async_context_manager(async_playwright()))
                self._page = portal.call(self._launch, portal, playwright)
            return portal

    async def _launch(self, portal: BlockingPortal, playwright: Any) -> Any:
        assert self._spec is not None
        spec = self._spec
        try:
            browser = await playwright.chromium.launch(executable_path=spec.executable,
                                                       args=list(CHROMIUM_ARGS))
        except Exception as exc:
            raise ToolFailure(f"the browser could not start ({spec.executable}): "
                              f"{str(exc).splitlines()[0]}") from None
        self._stack.callback(portal.call, browser.close)
        context = await browser.new_context(viewport={"width": spec.width, "height": spec.height},
                                            service_workers="block")
        context.set_default_timeout(spec.timeout_s * 1000)
        await context.route("**/*", self._route)
        self._on_event("browser_started", origins=list(spec.origins))
        return await context.new_page()

    async def _route(self, route: Any, request: Any) -> None:
        assert self._spec is not None
        url = request.url
        if url.startswith(("data:", "about:", "blob:")):
            await route.continue_()
            return
        origin = origin_of(url)
        if origin not in self._spec.origins:
            with self._lock:
                self._blocked.append(url)
            self._on_event("browser_blocked", url=url.split("?")[0])
            await route.abort("blockedbyclient")
            return
        credential = self._spec.credentials.get(origin)
        if credential is None or self._credentials is None:
            await route.continue_()
            return
        try:
            name, value = await anyio.to_thread.run_sync(
                lambda: self._credentials.header(credential, method=request.method))  # type: ignore[union-attr]
        except CredentialError:
            await route.abort("accessdenied")
            return
        await route.continue_(headers={**request.headers, name.lower(): value})

    async def _goto(self, url: str) -> dict[str, Any]:
        assert self._spec is not None
        if origin_of(url) not in self._spec.origins:
            raise ToolFailure(f"navigation to {origin_of(url)} is blocked: not in tools.browser.origins "
                              f"({', '.join(self._spec.origins)})")
        response = await self._page.goto(url)
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
        return {"text": self._redactor.text(text[: self._spec.max_text_bytes])}

    async def _evaluate(self, expression: str) -> dict[str, Any]:
        assert self._spec is not None
        if not self._spec.evaluate:
            raise ToolFailure("running JavaScript is not allowed (policy tools.browser.evaluate = false)")
        return {"value": await self._page.evaluate(expression)}

    async def _screenshot(self, name: str) -> dict[str, Any]:
        if not name or "/" in name or name.startswith(".") or not name.endswith(".png"):
            raise ToolFailure(f"screenshot name {name!r}: a plain file name ending in .png")
        png = await self._page.screenshot()
        try:
            write_no_follow(self._workspace, name, png)
        except OSError as exc:
            raise ToolFailure(f"screenshot {name!r} could not be written: {exc.strerror or exc}") from None
        return {"path": f"{self._workspace_guest}/{name}"}

    async def _state(self) -> dict[str, Any]:
        return {"url": self._page.url, "title": await self._page.title()}
