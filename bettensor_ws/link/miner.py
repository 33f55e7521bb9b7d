"""The miner side: one supervised, self-healing link to each validator."""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import orjson
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from ..protocol.auth import build_auth, check_answer
from ..protocol.backoff import Backoff
from ..protocol.errors import HandshakeRefused
from ..protocol.identity import canonical_hotkey
from ..protocol.link import MINER_HOTKEY, ConnectionSettings, PeerLimits, Role
from ..protocol.messages import WebSocketMessage
from ..protocol.refusals import GOING_AWAY, REPLACED, CloseCode, RefusalKind, bounded
from ..protocol.signing import Signer
from .connection import LinkClosed, LinkConnection
from .manager import Manager, settings_from
from .transport import close_quietly, first_leaf, hold_transport, plain_errors

__all__ = ["MINER_SETTINGS", "HandshakeRefused", "MinerWebSocketManager", "StreamOpener"]

log = logging.getLogger("bettensor_ws.miner")

StreamOpener = Callable[[str], Awaitable[trio.abc.Stream]]

FEATURES: tuple[str, ...] = ()

MINER_SETTINGS = ConnectionSettings(rate_limit=None, max_message_size=16 << 20)
"""A miner's defaults: it trusts (and does not pace) the validators it chose to dial."""

MAX_RETRY_HINT = 3600.0
"""Longest wait a validator's hint can impose, so a bogus hint cannot park a link for good."""

MISTAKES = frozenset({RefusalKind.IMPOSTOR, RefusalKind.BAD_WELCOME})
"""Refusals that mean the configuration is wrong (another key or another program at
that URL): retrying sooner cannot help, so the link retries at the longest interval."""


def _validator_key(hotkey: str) -> str:
    """A listed validator's hotkey in its canonical spelling; refused at once if it is none."""
    canonical = canonical_hotkey(hotkey)
    if canonical is None:
        raise ValueError(f"validator hotkey {bounded(hotkey, 64)!r} is not an ss58 address")
    return canonical


class MinerWebSocketManager(Manager):
    """Holds a connection to every listed validator, reconnecting with backoff.

    ``validators`` pairs each validator's ss58 hotkey with its URL
    (``ws://host:port/ws``); the Welcome must be signed by that hotkey, so a
    miner never talks to an impostor. Start it with ``await nursery.start(miner.run)``;
    :meth:`set_validators` changes the list while it runs (a metagraph refresh).
    """

    ROLE = Role.MINER

    def __init__(
        self,
        keypair: Signer,
        validators: Iterable[tuple[str, str]] = (),
        *,
        settings: ConnectionSettings | None = None,
        reconnect_base_interval: float = 1.0,
        max_reconnect_interval: float = 60.0,
        stable_after: float = 30.0,
        connect_timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        features: Iterable[str] = FEATURES,
        stream_opener: StreamOpener | None = None,
        **overrides: Any,
    ) -> None:
        """``settings`` (default :data:`MINER_SETTINGS`) may be adjusted by
        keyword: ``MinerWebSocketManager(key, validators, heartbeat_interval=30)``."""
        super().__init__(
            keypair, settings=settings_from(MINER_SETTINGS, settings, overrides), features=features
        )
        self.validators: dict[str, str] = {_validator_key(h): url for h, url in validators}
        self.reconnect_base_interval = reconnect_base_interval
        self.max_reconnect_interval = max_reconnect_interval
        self.stable_after = stable_after
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl_context
        self._open_stream = stream_opener or self._open_tcp
        self._changed = trio.Event()
        self.last_error: dict[str, str] = {}
        # while run() is running: its nursery, and each validator's supervisor scope
        self._nursery: trio.Nursery | None = None
        self._supervisors: dict[str, trio.CancelScope] = {}
        # per validator, the last failure said at WARNING: a repeat is said at DEBUG
        self._said: dict[str, str] = {}

    @property
    def max_message_size(self) -> int:
        return self.settings.max_message_size

    # ---- configuration ---------------------------------------------------------------------

    def set_validators(self, validators: Iterable[tuple[str, str]]) -> tuple[list[str], list[str]]:
        """Follow a new list of ``(hotkey, url)``: dial the new ones, drop the departed.

        A validator whose URL changed is dropped and dialled again at its new URL.
        Returns ``(added, removed)`` hotkeys. Dropping a validator closes its link
        (1001 going away) and stops its reconnects; nothing else about it is touched.
        """
        wanted = {_validator_key(h): url for h, url in validators}
        removed = [h for h, url in self.validators.items() if wanted.get(h) != url]
        added = [h for h, url in wanted.items() if self.validators.get(h) != url]
        self.validators = wanted
        for hotkey in removed:
            scope = self._supervisors.pop(hotkey, None)
            if scope is not None:
                scope.cancel()
            self.last_error.pop(hotkey, None)
        if self._nursery is not None:
            for hotkey in added:
                self._start_supervisor(self._nursery, hotkey, wanted[hotkey])
        return added, removed

    # ---- state -----------------------------------------------------------------------------

    @property
    def connected_validators(self) -> list[str]:
        return list(self._connections)

    async def wait_connected(self, validator_hotkey: str | None = None) -> None:
        """Wait until connected to that validator, or to any when None."""
        while not (
            self._connections if validator_hotkey is None else validator_hotkey in self._connections
        ):
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # ---- sending ---------------------------------------------------------------------------

    async def send(
        self, message: WebSocketMessage | dict[str, Any], validator_hotkey: str | None = None
    ) -> list[str]:
        """Sign once and queue for every connected validator (or only ``validator_hotkey``);
        returns who got it. :meth:`send_to` is the one-peer form, as on the validator."""
        frame = self._signed_frame(message)
        targets = (
            list(self._connections.items())
            if validator_hotkey is None
            else [(validator_hotkey, c) for c in [self._connections.get(validator_hotkey)] if c]
        )
        delivered = []
        for hotkey, conn in targets:
            try:
                await conn.send_frame(frame)
            except LinkClosed:
                continue
            delivered.append(hotkey)
        await trio.lowlevel.checkpoint()
        return delivered

    # ---- running ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Supervise one link per validator until cancelled."""
        with plain_errors():
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    for hotkey, url in self.validators.items():
                        self._start_supervisor(nursery, hotkey, url)
                    task_status.started()
                    await trio.sleep_forever()
                finally:
                    self._nursery = None
                    self._supervisors.clear()

    def _start_supervisor(self, nursery: trio.Nursery, validator_hotkey: str, url: str) -> None:
        # the scope exists before the task starts: set_validators may cancel it at once
        scope = trio.CancelScope()
        self._supervisors[validator_hotkey] = scope
        nursery.start_soon(self._supervise_in, scope, validator_hotkey, url, name=f"supervise {validator_hotkey[:8]}")

    async def _supervise_in(self, scope: trio.CancelScope, validator_hotkey: str, url: str) -> None:
        with scope:
            await self._supervise(validator_hotkey, url)

    async def _supervise(self, validator_hotkey: str, url: str) -> None:
        backoff = Backoff(self.reconnect_base_interval, self.max_reconnect_interval)
        while True:
            started = trio.current_time()
            asked = 0.0  # a wait the validator asked for: retrying sooner is refused anyway
            mistake = False  # a wrong URL, key or certificate: retry at the longest interval
            try:
                await self._connect_once(validator_hotkey, url)
            except* HandshakeRefused as group:
                refused = first_leaf(group)
                assert isinstance(refused, HandshakeRefused)
                kind = refused.refusal.kind
                said = str(refused)
                if refused.signed_by is not None:
                    said = (f"{said}: it is signed by {refused.signed_by}, not {validator_hotkey}: "
                            f"the validator at {url} has another hotkey (check the hotkey after @)")
                elif kind is RefusalKind.WRONG_AUDIENCE:
                    said = (f"{said}: the validator at {url} is not {validator_hotkey} "
                            f"(check the hotkey after @)")
                mistake = kind in MISTAKES
                self._failed(validator_hotkey, str(refused), kind, said=said, once=not kind.transient)
                if refused.retry_after:
                    asked = min(refused.retry_after, MAX_RETRY_HINT)
            except* ssl.SSLCertVerificationError as group:
                cause = first_leaf(group)
                assert isinstance(cause, ssl.SSLCertVerificationError)
                mistake = True
                self._failed(
                    validator_hotkey,
                    f"certificate verification failed for {url}: {cause.verify_message or cause.reason} "
                    f"(give the CA that signed the validator's certificate with --ssl-ca)",
                    RefusalKind.CONNECT_FAILED,
                )
            except* ConnectionRejected as group:
                rejected = first_leaf(group)
                assert isinstance(rejected, ConnectionRejected)
                status = rejected.status_code
                mistake = status == 404
                reason = (
                    f"{url} answered 404 Not Found: the URL path is wrong (the endpoint is /ws)"
                    if mistake else f"{url} refused the WebSocket upgrade with HTTP status {status}"
                )
                self._failed(validator_hotkey, reason, RefusalKind.CONNECT_FAILED, once=mistake)
            except* (OSError, ConnectionClosed, HandshakeError, trio.TooSlowError,
                     trio.BrokenResourceError, trio.ClosedResourceError) as group:
                cause = first_leaf(group)
                self._failed(validator_hotkey, f"{type(cause).__name__}: {cause}", RefusalKind.CONNECT_FAILED)
            except* Exception:
                log.exception("link to validator %s failed", validator_hotkey)
                self.last_error[validator_hotkey] = "internal error"
            if trio.current_time() - started >= self.stable_after:
                backoff.reset()
            delay = max(backoff.next_delay(), asked)
            if mistake:
                delay = max(delay, self.max_reconnect_interval)
            log.info("reconnecting to %s in %.1fs", validator_hotkey, delay)
            await trio.sleep(delay)
            self._stats.reconnects += 1

    def _failed(
        self, validator_hotkey: str, reason: str, kind: RefusalKind, *, said: str | None = None,
        once: bool = False,
    ) -> None:
        """Record why a link failed; log it at WARNING (with ``said``, the operator's
        wording, if given). With ``once``, a failure that repeats the last one said is
        logged at DEBUG: a permanent mistake is stated once, not every retry."""
        reason = bounded(reason)
        self.last_error[validator_hotkey] = reason
        self._stats.reject(kind)
        text = bounded(said, 400) if said is not None else reason
        if once and self._said.get(validator_hotkey) == text:
            log.debug("link to validator %s: %s", validator_hotkey, text)
            return
        self._said[validator_hotkey] = text
        if once:
            text += f" (retrying every {self.max_reconnect_interval:g} s at most; said once)"
        log.warning("link to validator %s: %s", validator_hotkey, text,
                    extra={"validator": validator_hotkey, "refusal": kind.key})

    async def _open_tcp(self, url: str) -> trio.abc.Stream:
        parts = urlsplit(url)
        secure = parts.scheme == "wss"
        host = parts.hostname or "127.0.0.1"
        port = parts.port or (443 if secure else 80)
        if secure:
            context = self.ssl_context or ssl.create_default_context()
            stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=context)
            # Handshake now: trio-websocket waits for its upgrade forever (here: until
            # connect_timeout) when TLS fails inside its reader, and hides the reason.
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                await trio.aclose_forcefully(stream)
                if isinstance(exc.__cause__, ssl.SSLError):
                    raise exc.__cause__ from None
                raise
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            return stream
        return await trio.open_tcp_stream(host, port)

    def _opener(self, url: str) -> Callable[[trio.Nursery], Awaitable[WebSocketConnection]]:
        parts = urlsplit(url)
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

        async def open_ws(nursery: trio.Nursery) -> WebSocketConnection:
            with trio.fail_after(self.connect_timeout):
                stream = await self._open_stream(url)
                try:
                    return await wrap_client_stream(
                        nursery,
                        stream,  # type: ignore[arg-type]  # any trio Stream works
                        parts.hostname or "localhost",
                        resource,
                        message_queue_size=4,
                        max_message_size=self.max_message_size,
                    )
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise

        return open_ws

    async def _connect_once(self, validator_hotkey: str, url: str) -> None:
        async with trio.open_nursery() as nursery:
            ws, hold = await nursery.start(hold_transport, self._opener(url))
            conn: LinkConnection | None = None
            # how to close if there is no link yet: shut down while handshaking is
            # going away; a refused validator is told why
            fallback: tuple[int, str] = (CloseCode.POLICY, "")
            try:
                try:
                    conn = await self._handshake(ws, validator_hotkey)
                except trio.Cancelled:
                    fallback = (GOING_AWAY.code, GOING_AWAY.reason)
                    raise
                except HandshakeRefused as exc:
                    fallback = (CloseCode.POLICY, str(exc))
                    raise
                await self._run_connection(conn)
            finally:
                code, reason = (conn.close_code, conn.close_reason) if conn else fallback
                await close_quietly(ws, code, reason, self.settings.close_timeout)
                hold.cancel()

    async def _handshake(self, ws: WebSocketConnection, validator_hotkey: str) -> LinkConnection:
        """Authenticate to that validator alone (the auth frame names it), then insist
        on a Welcome it signed, made for this handshake."""
        auth = build_auth(self.keypair, features=self.features, audience=validator_hotkey)
        await ws.send_message(orjson.dumps(auth).decode())
        with trio.fail_after(self.connect_timeout):
            raw = await ws.get_message()
        welcome = check_answer(
            raw,
            validator_hotkey,
            guard=self.guard,
            max_size=self.max_message_size,
            now=time.time(),
            mono=trio.current_time(),
            own_hotkey=self.hotkey,
            auth_nonce=auth["nonce"],
        )
        bound = MINER_HOTKEY in welcome.data
        limits = PeerLimits.announced(welcome.data)
        # a Welcome that names no miner is a reference validator's: it refuses any
        # answer to its heartbeats, so it gets none
        return self._connection(
            ws, validator_hotkey, welcome.features, bound=bound, peer_limits=limits, answer_heartbeats=bound
        )

    async def _run_connection(self, conn: LinkConnection) -> None:
        self._connections[conn.hotkey] = conn
        self._stats.connections_total += 1
        self.last_error.pop(conn.hotkey, None)
        self._said.pop(conn.hotkey, None)
        self._notify()
        log.info("connected to validator %s", conn.hotkey, extra={"validator": conn.hotkey})
        try:
            await self._serve_connection(conn)
        finally:
            if self._connections.get(conn.hotkey) is conn:
                del self._connections[conn.hotkey]
                self._notify()
            if conn.protocol.closing == REPLACED:
                # the validator keeps one link per hotkey: a newer one took ours
                log.warning(
                    "validator %s closed this link as replaced: another process with this "
                    "miner's hotkey (%s) connected to it; two miners with one hotkey take the "
                    "link from each other for ever", conn.hotkey, self.hotkey,
                    extra={"validator": conn.hotkey, "close_code": conn.close_code},
                )
            elif conn.close_code != CloseCode.NORMAL:
                log.info("link to %s ended (%d %s)", conn.hotkey, conn.close_code, conn.close_reason,
                         extra={"validator": conn.hotkey, "close_code": conn.close_code})
