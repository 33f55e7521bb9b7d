"""Issue 11, scenarios 7 and 8: who may keep a link, and whose retry hint a miner obeys.

7. A miner de-registered while its handshake is under way must not keep a link:
   registration is checked again as the link is listed, and every
   ``refresh_metagraph`` closes the links of hotkeys that left (1008 "hotkey
   deregistered"). The race is driven by an instrument that runs the refresh
   right after the validator's n-th task step (an await point of its handshake),
   n = 0..19, so the refresh lands before the auth check, in the window between
   the auth check and the listing, and on the listed link.

8. A retry hint ("flood cooldown: retry in N s") parks a miner beyond its normal
   backoff only when the refusal is signed by the validator it dialled and answers
   its own auth frame; an unsigned, wrongly signed or replayed hint is ignored.

In-memory streams under trio's autojump clock (tests/test_runtime.py): every
wait is mock time, bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
import trio
import trio.testing
import trio_websocket
from trio_websocket import ConnectionClosed

from bettensor_ws import (
    HandshakeRefused,
    MinerWebSocketManager,
    PredictionMessage,
    ValidatorWebSocketManager,
    build_auth,
    encode,
    sign,
)
from bettensor_ws.link.miner import MAX_RETRY_HINT
from bettensor_ws.protocol.auth import check_answer, refusal_frame
from bettensor_ws.protocol.identity import encode_address, public_key
from bettensor_ws.protocol.refusals import Refusal, RefusalKind
from bettensor_ws.protocol.replay import ReplayGuard
from bettensor_ws.protocol.signing import verify_dict
from tests.helpers import bare_refusal, prediction_data
from tests.test_flood_cooldown import COOLDOWN, HOLD, flood_until_closed, flooding_validator
from tests.test_runtime import authenticate, expect_close, raw_client, wait_for

Keypair = Any  # bittensor_wallet.Keypair (fixtures alice, bob, charlie)

URL = "ws://validator/ws"
DEREGISTERED = (1008, "hotkey deregistered")
NOT_REGISTERED = (1008, "hotkey not registered")


def format0(keypair: Keypair) -> str:
    """Another spelling (ss58 format 0) of the same key."""
    key = public_key(keypair.ss58_address)
    assert key is not None
    return encode_address(key, 0)


def signed_prediction(keypair: Keypair, prediction_id: str = "p1") -> str:
    return encode(sign(PredictionMessage(sender="", data=prediction_data(prediction_id)), keypair))


class Handled:
    """A prediction handler recording, for each call, whether the refresh had already run."""

    def __init__(self, refreshed: Callable[[], bool]) -> None:
        self._refreshed = refreshed
        self.calls: list[bool] = []

    async def __call__(self, websocket: Any, message: Any) -> None:
        self.calls.append(self._refreshed())
        await websocket.send_json({"type": "confirmation", "status": "success",
                                   "prediction_id": message.prediction.prediction_id, "message": "ok"})


# ---- scenario 7: a de-registered miner keeps its link ----------------------------------------


HANDLER = "ValidatorWebSocketManager.handle_stream"


def _validator_side(task: trio.lowlevel.Task) -> bool:
    """Whether ``task`` is a validator's connection handler, or runs under one."""
    current: trio.lowlevel.Task | None = task
    while current is not None:
        if current.name.endswith(HANDLER):
            return True
        nursery = current.parent_nursery
        current = nursery.parent_task if nursery is not None else None
    return False


class RefreshAtStep(trio.abc.Instrument):
    """Runs ``refresh`` once, right after the validator side's ``at``-th task step since ``arm()``.

    Between two steps of a task is an await point of it: the refresh runs there
    exactly as a ``refresh_metagraph`` called by another task at that moment
    would. ``at == 0`` refreshes at ``arm()``.
    """

    def __init__(self, at: int, refresh: Callable[[], list[str]]) -> None:
        self.at = at
        self._refresh = refresh
        self._armed = False
        self.steps = 0
        self.dropped: list[str] | None = None
        self.errors: list[BaseException] = []

    @property
    def fired(self) -> bool:
        return self.dropped is not None or bool(self.errors)

    def arm(self) -> None:
        self._armed = True
        if self.at == 0:
            self._fire()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if not self._armed or self.fired or not _validator_side(task):
            return
        self.steps += 1
        if self.steps >= self.at:
            self._fire()

    def _fire(self) -> None:
        try:
            self.dropped = self._refresh()
        except BaseException as exc:  # an instrument that raises is dropped silently: keep it
            self.errors.append(exc)


@contextlib.contextmanager
def instrumented(instrument: trio.abc.Instrument) -> Iterator[None]:
    trio.lowlevel.add_instrument(instrument)
    try:
        yield
    finally:
        with contextlib.suppress(KeyError):  # removed already if it raised
            trio.lowlevel.remove_instrument(instrument)


async def _race_round(alice: Keypair, bob: Keypair, at: int) -> str:
    """One round: bob authenticates while the metagraph is refreshed to [] after ``at`` steps.

    Returns where the refresh landed: "refused" (before the auth check),
    "unlisted" (after it, before the link was listed) or "listed".
    """
    validator = ValidatorWebSocketManager(alice, [bob.ss58_address])
    trigger = RefreshAtStep(at, lambda: validator.refresh_metagraph([]))
    handled = Handled(lambda: trigger.fired)
    validator.register_handler("prediction", handled)
    answer: dict[str, Any] | None = None
    sent_after_refresh: bool | None = None  # None: no prediction sent
    with instrumented(trigger), trio.fail_after(120):
        async with raw_client(validator) as ws:
            trigger.arm()
            await ws.send_message(orjson.dumps(build_auth(bob, audience=alice.ss58_address)).decode())
            with contextlib.suppress(ConnectionClosed):
                answer = orjson.loads(await ws.get_message())
                if answer.get("type") == "welcome":
                    sent_after_refresh = trigger.fired
                    await ws.send_message(signed_prediction(bob))
            close = await expect_close(ws)
            await wait_for(lambda: trigger.fired)
    where = f"round at={at}: answer={answer} close={close} dropped={trigger.dropped} handled={handled.calls}"
    assert not trigger.errors, where
    assert validator.connected_hotkeys == [], where
    if sent_after_refresh:
        assert handled.calls == [], f"{where}: a prediction sent after the refresh was handled"
    # A prediction sent before the refresh may have been handled before it ([False]) or
    # dropped with the link ([]); never handled after it ([True]: a frame already read
    # when the link was ended, see test_a_frame_already_read_is_not_handled_after_the_refresh).
    assert handled.calls in ([], [False]), where
    if answer is not None and answer.get("type") != "welcome":
        assert bare_refusal(answer, alice.ss58_address) == {"status": "error", "message": "hotkey not registered"}
        assert close == NOT_REGISTERED, where
        assert trigger.dropped == [], where
        return "refused"
    assert close == DEREGISTERED, where
    assert trigger.dropped in ([], [bob.ss58_address]), where
    if trigger.dropped == []:
        assert validator.stats()["rejections"].get("deregistered") == 1, where
        return "unlisted"
    return "listed"


async def test_refresh_during_the_handshake_is_never_missed(
    alice: Keypair, bob: Keypair, autojump_clock: Any
) -> None:
    """Scenario 7: refresh_metagraph([]) at successive await points of bob's handshake, 20 rounds.

    Every round bob ends refused ("hotkey not registered") or closed 1008 "hotkey
    deregistered", nobody is listed, no prediction bob sent after the refresh is
    handled; and the rounds did hit the window between the auth check and the
    listing (where the old code left the link up).
    """
    landed = [await _race_round(alice, bob, at) for at in range(20)]
    assert landed[0] == "refused"
    assert "unlisted" in landed, landed
    assert "listed" in landed, landed


READER = "LinkConnection._reader"


class RefreshWhenReaderWakes(trio.abc.Instrument):
    """Runs ``refresh`` once, right after a frame is handed to a link's reader and
    before that reader runs: a refresh_metagraph task scheduled in between."""

    def __init__(self, refresh: Callable[[], list[str]]) -> None:
        self._refresh = refresh
        self.armed = False
        self._woken = False
        self.dropped: list[str] | None = None

    @property
    def fired(self) -> bool:
        return self.dropped is not None

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        if self.armed and task.name.endswith(READER):
            self._woken = True

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._woken and not self.fired:
            self.dropped = self._refresh()


async def test_a_frame_already_read_is_not_handled_after_the_refresh(
    alice: Keypair, bob: Keypair, autojump_clock: Any
) -> None:
    """Scenario 7, "no prediction handled after the refresh": bob's prediction reaches the
    link's reader, refresh_metagraph([]) runs before the reader does; the link closes
    1008 "hotkey deregistered" and the handler must not run after the refresh.

    Fails today: the handler runs (until its first await) after the refresh returned.
    """
    validator = ValidatorWebSocketManager(alice, [bob.ss58_address])
    trigger = RefreshWhenReaderWakes(lambda: validator.refresh_metagraph([]))
    handled = Handled(lambda: trigger.fired)
    validator.register_handler("prediction", handled)
    with instrumented(trigger), trio.fail_after(60):
        async with raw_client(validator) as ws:
            await authenticate(ws, bob)
            await trio.sleep(1.0)  # the link idles: its reader waits for a frame
            trigger.armed = True
            await ws.send_message(signed_prediction(bob))
            assert await expect_close(ws) == DEREGISTERED
    assert trigger.dropped == [bob.ss58_address]
    assert validator.connected_hotkeys == []
    assert handled.calls == [], "bob's prediction was handled after refresh_metagraph dropped him"


class RefreshWhileSavingGuard(ValidatorWebSocketManager):
    """Runs ``refresh_metagraph(new)`` inside ``save_guard``: after the auth check, before the Welcome."""

    new_metagraph: Any = ()
    dropped: list[str] | None = None

    async def save_guard(self) -> None:
        self.dropped = self.refresh_metagraph(self.new_metagraph)
        await super().save_guard()


async def test_refresh_between_auth_check_and_listing_closes_the_link(
    alice: Keypair, bob: Keypair, autojump_clock: Any
) -> None:
    """Scenario 7: a refresh in the window between check_auth and the listing (deterministic).

    The miner gets no Welcome, only 1008 "hotkey deregistered"; nothing is listed.
    """
    validator = RefreshWhileSavingGuard(alice, [bob.ss58_address])
    handled = Handled(lambda: True)
    validator.register_handler("prediction", handled)
    with trio.fail_after(60):
        async with raw_client(validator) as ws:
            await ws.send_message(orjson.dumps(build_auth(bob, audience=alice.ss58_address)).decode())
            assert await expect_close(ws) == DEREGISTERED
    assert validator.dropped == []  # nothing listed yet when the refresh ran
    assert validator.connected_hotkeys == []
    assert handled.calls == []
    assert validator.stats()["rejections"] == {"deregistered": 1}
    assert validator.stats()["connections_total"] == 0


async def test_refresh_closes_listed_links_of_hotkeys_that_left(
    alice: Keypair, bob: Keypair, charlie: Keypair, autojump_clock: Any
) -> None:
    """Scenario 7, plain case: a listed link is closed 1008 "hotkey deregistered";
    refresh_metagraph returns the dropped hotkeys; those still registered stay."""
    validator = ValidatorWebSocketManager(alice, [bob.ss58_address, charlie.ss58_address])
    refreshed = False
    handled = Handled(lambda: refreshed)
    validator.register_handler("prediction", handled)
    with trio.fail_after(60):
        async with raw_client(validator) as ws_bob, raw_client(validator) as ws_charlie:
            await authenticate(ws_bob, bob)
            await authenticate(ws_charlie, charlie)
            assert sorted(validator.connected_hotkeys) == sorted([bob.ss58_address, charlie.ss58_address])
            refreshed = True
            assert validator.refresh_metagraph([charlie.ss58_address]) == [bob.ss58_address]
            with contextlib.suppress(ConnectionClosed):
                await ws_bob.send_message(signed_prediction(bob, "late"))
            assert await expect_close(ws_bob) == DEREGISTERED
            await wait_for(lambda: validator.connected_hotkeys == [charlie.ss58_address])
            assert validator.refresh_metagraph([charlie.ss58_address]) == []  # nothing more to drop
            await ws_charlie.send_message(signed_prediction(charlie, "still-served"))
            assert orjson.loads(await ws_charlie.get_message())["type"] == "confirmation"
    assert handled.calls == [True]  # charlie's, after the refresh; none of bob's
    assert validator.connected_hotkeys == []


async def test_refresh_takes_a_metagraph_object_and_any_spelling(
    alice: Keypair, bob: Keypair, charlie: Keypair, autojump_clock: Any
) -> None:
    """Scenario 7 with a metagraph object (SimpleNamespace(hotkeys=[...])): a hotkey
    listed in another ss58 spelling stays; once absent, its link is closed."""
    validator = ValidatorWebSocketManager(alice, SimpleNamespace(hotkeys=[bob.ss58_address]))
    with trio.fail_after(60):
        async with raw_client(validator) as ws:
            await authenticate(ws, bob)
            assert validator.refresh_metagraph(SimpleNamespace(hotkeys=[format0(bob), charlie.ss58_address])) == []
            assert validator.connected_hotkeys == [bob.ss58_address]
            assert validator.refresh_metagraph(SimpleNamespace(hotkeys=[charlie.ss58_address])) == [bob.ss58_address]
            assert await expect_close(ws) == DEREGISTERED
        assert validator.connected_hotkeys == []
        # and bob cannot come back
        async with raw_client(validator) as ws:
            await ws.send_message(orjson.dumps(build_auth(bob)).decode())
            answer = await ws.get_message()
            assert bare_refusal(answer, alice.ss58_address) == {"status": "error", "message": "hotkey not registered"}
            assert await expect_close(ws) == NOT_REGISTERED


# ---- scenario 8: an unsigned hint parks a miner ----------------------------------------------


Server = Callable[[trio.abc.Stream], Awaitable[None]]


class Address:
    """One validator address: dial n is answered by ``servers[n]`` (the last one from then on)."""

    def __init__(self, servers: list[Server]) -> None:
        self._servers = servers
        self.nursery: trio.Nursery | None = None  # where the servers run; set once it is open
        self.dials: list[float] = []

    async def open(self, url: str) -> trio.abc.Stream:
        assert url == URL
        server = self._servers[min(len(self.dials), len(self._servers) - 1)]
        self.dials.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        client, stream = trio.testing.memory_stream_pair()
        assert self.nursery is not None
        self.nursery.start_soon(server, stream)
        return client


def refusing_server(answer: Callable[[dict[str, Any]], str], seen: list[dict[str, Any]]) -> Server:
    """Whoever answers at the address: reads the auth frame, sends ``answer(auth)``, closes 1008."""

    async def serve(stream: trio.abc.Stream) -> None:
        async with trio.open_nursery() as nursery:
            request = await trio_websocket.wrap_server_stream(nursery, stream)
            ws = await request.accept()
            auth = orjson.loads(await ws.get_message())
            seen.append(auth)
            text = answer(auth)
            await ws.send_message(text)
            await ws.aclose(1008, orjson.loads(text)["message"])
            nursery.cancel_scope.cancel()

    return serve


async def first_refused_then_real(
    alice: Keypair, bob: Keypair, answer: Callable[[dict[str, Any]], str]
) -> tuple[list[float], float, str, list[dict[str, Any]]]:
    """Bob's miner dials alice's address: the first dial meets a server that refuses with
    ``answer(auth)``, every later one the real validator alice.

    Returns the dial times, when the miner was connected, its error after the
    refusal, and the auth frames the refusing server read.
    """
    validator = ValidatorWebSocketManager(alice, [bob.ss58_address])
    seen: list[dict[str, Any]] = []
    address = Address([refusing_server(answer, seen), validator.handle_stream])
    miner = MinerWebSocketManager(bob, [(alice.ss58_address, URL)], stream_opener=address.open,
                                  reconnect_base_interval=1.0, max_reconnect_interval=8.0)
    with trio.fail_after(2 * MAX_RETRY_HINT):  # mock time: room to see a one-hour park, if taken
        async with trio.open_nursery() as nursery:
            address.nursery = nursery
            await nursery.start(miner.run)
            await wait_for(lambda: alice.ss58_address in miner.last_error)
            error = miner.last_error[alice.ss58_address]
            await miner.wait_connected(alice.ss58_address)
            connected_at = trio.current_time()
            assert validator.connected_hotkeys == [bob.ss58_address]
            nursery.cancel_scope.cancel()
    return address.dials, connected_at, error, seen


HINT = "flood cooldown: retry in 3600 s"


def _unsigned(alice: Keypair, charlie: Keypair, auth: dict[str, Any]) -> str:
    return orjson.dumps({"status": "error", "message": HINT}).decode()


def _signed_by_another_key(alice: Keypair, charlie: Keypair, auth: dict[str, Any]) -> str:
    return refusal_frame(Refusal.cooldown(3600), charlie, auth)


def _forged_sender(alice: Keypair, charlie: Keypair, auth: dict[str, Any]) -> str:
    frame = orjson.loads(refusal_frame(Refusal.cooldown(3600), charlie, auth))
    frame["sender"] = alice.ss58_address  # claims alice, signed by charlie
    return orjson.dumps(frame).decode()


def _another_handshake(alice: Keypair, charlie: Keypair, auth: dict[str, Any]) -> str:
    earlier = build_auth(alice, audience=alice.ss58_address)  # any other auth frame: another nonce
    return refusal_frame(Refusal.cooldown(3600), alice, earlier)


def _no_handshake(alice: Keypair, charlie: Keypair, auth: dict[str, Any]) -> str:
    return refusal_frame(Refusal.cooldown(3600), alice, "not json")  # no auth_nonce at all


@pytest.mark.parametrize(
    "make",
    [_unsigned, _signed_by_another_key, _forged_sender, _another_handshake, _no_handshake],
    ids=["8a-unsigned", "8b-signed-by-charlie", "8b-forged-sender", "8c-other-auth-nonce", "8c-no-auth-nonce"],
)
async def test_a_hint_not_signed_for_our_handshake_does_not_park_the_miner(
    alice: Keypair, bob: Keypair, charlie: Keypair, autojump_clock: Any,
    make: Callable[[Keypair, Keypair, dict[str, Any]], str],
) -> None:
    """Scenario 8 (a)-(c): a 3600 s hint that is unsigned, signed by another key (charlie,
    not alice), or alice's but for another handshake, is ignored: the real validator,
    back at the address, is reached within the normal backoff (1 s, max 8 s)."""
    dials, connected_at, error, seen = await first_refused_then_real(
        alice, bob, lambda auth: make(alice, charlie, auth)
    )
    assert error == f"validator refused auth: {HINT} (unsigned: retry hint ignored)"
    assert len(seen) == 1 and seen[0]["audience"] == alice.ss58_address
    assert len(dials) == 2
    assert connected_at - dials[0] < 10.0, f"parked {connected_at - dials[0]:.0f} s"


async def test_a_hint_signed_by_the_expected_validator_for_our_handshake_is_honoured(
    alice: Keypair, bob: Keypair, autojump_clock: Any
) -> None:
    """Scenario 8 (d): alice's signed refusal "retry in 30 s" answering the miner's own auth
    frame delays the next dial by the hint, beyond the 1 s backoff."""
    dials, connected_at, error, seen = await first_refused_then_real(
        alice, bob, lambda auth: refusal_frame(Refusal.cooldown(30), alice, auth)
    )
    assert error == "validator refused auth: flood cooldown: retry in 30 s"
    assert len(seen) == 1 and len(dials) == 2
    assert 30.0 <= dials[1] - dials[0] < 32.0
    assert connected_at - dials[1] < 1.0


async def test_a_signed_hint_is_capped_at_an_hour(alice: Keypair, bob: Keypair, autojump_clock: Any) -> None:
    """Scenario 8 (d): even a signed hint parks the miner for at most MAX_RETRY_HINT (3600 s)."""
    dials, _, error, _ = await first_refused_then_real(
        alice, bob, lambda auth: refusal_frame(Refusal.cooldown(100_000), alice, auth)
    )
    assert error == "validator refused auth: flood cooldown: retry in 100000 s"
    assert MAX_RETRY_HINT <= dials[1] - dials[0] < MAX_RETRY_HINT + 2.0


async def test_our_validators_flood_cooldown_is_honoured(
    alice: Keypair, bob: Keypair, autojump_clock: Any
) -> None:
    """Scenario 8 (d) end to end: bob closed for flooding by the real validator; its miner,
    refused with the validator's signed "retry in N s", waits N s before dialling again."""
    validator = flooding_validator(alice)
    with trio.fail_after(600):
        closed_at = await flood_until_closed(validator, bob)
        address = Address([validator.handle_stream])
        miner = MinerWebSocketManager(bob, [(alice.ss58_address, URL)], stream_opener=address.open,
                                      reconnect_base_interval=1.0, max_reconnect_interval=2.0)
        async with trio.open_nursery() as nursery:
            address.nursery = nursery
            await nursery.start(miner.run)
            await wait_for(lambda: alice.ss58_address in miner.last_error)
            error = miner.last_error[alice.ss58_address]
            await miner.wait_connected(alice.ss58_address)
            nursery.cancel_scope.cancel()
    # refused after the hold with the time left, which the miner then waited out
    hinted = COOLDOWN - HOLD
    assert error == f"validator refused auth: flood cooldown: retry in {hinted:.0f} s"
    assert len(address.dials) == 2  # one refused dial, then the one after the hint: no retries between
    assert address.dials[1] - address.dials[0] >= HOLD + hinted
    assert address.dials[1] >= closed_at + COOLDOWN


# ---- scenario 8: the refusal frames and check_answer -----------------------------------------


def _refused(raw: str | bytes, expected: str, nonce: str | None, own: str) -> HandshakeRefused:
    with pytest.raises(HandshakeRefused) as caught:
        check_answer(raw, expected, guard=ReplayGuard(), max_size=1 << 20, own_hotkey=own, auth_nonce=nonce)
    return caught.value


def test_check_answer_keeps_a_hint_only_when_signed_for_this_handshake(
    alice: Keypair, bob: Keypair, charlie: Keypair
) -> None:
    """Scenario 8 unit: check_answer drops the retry hint of an unsigned, wrongly signed,
    tampered or other-handshake refusal; a properly signed one keeps it."""
    auth = build_auth(bob, audience=alice.ss58_address)
    nonce = auth["nonce"]
    hint = Refusal.cooldown(30)

    def answer(raw: str | bytes, expected: str = alice.ss58_address) -> HandshakeRefused:
        return _refused(raw, expected, nonce, bob.ss58_address)

    unsigned = answer(refusal_frame(hint))
    assert unsigned.refusal.kind is RefusalKind.FLOOD_COOLDOWN
    assert unsigned.retry_after is None
    assert str(unsigned) == "validator refused auth: flood cooldown: retry in 30 s (unsigned: retry hint ignored)"

    good = answer(refusal_frame(hint, alice, auth))
    assert good.refusal.kind is RefusalKind.FLOOD_COOLDOWN
    assert good.retry_after == 30.0
    assert str(good) == "validator refused auth: flood cooldown: retry in 30 s"
    # the expected validator named in another spelling of its key
    assert answer(refusal_frame(hint, alice, auth), expected=format0(alice)).retry_after == 30.0

    tampered = orjson.loads(refusal_frame(hint, alice, auth))
    tampered["message"] = HINT
    forged = orjson.loads(refusal_frame(hint, charlie, auth))
    forged["sender"] = alice.ss58_address
    ignored: dict[str, str | bytes] = {
        "signed by charlie": refusal_frame(hint, charlie, auth),
        "forged sender": orjson.dumps(forged),
        "tampered message": orjson.dumps(tampered),
        "other auth nonce": refusal_frame(hint, alice, build_auth(bob, audience=alice.ss58_address)),
        "no auth nonce": refusal_frame(hint, alice, "not json"),
    }
    for case, raw in ignored.items():
        refused = answer(raw)
        assert refused.refusal.kind is RefusalKind.FLOOD_COOLDOWN, case
        assert refused.retry_after is None, case
        assert str(refused).endswith("(unsigned: retry hint ignored)"), case

    # a refusal without a hint is reported as it is, signed or not
    plain = answer(refusal_frame(Refusal(RefusalKind.NOT_REGISTERED), charlie, auth))
    assert (plain.refusal.kind, plain.retry_after) == (RefusalKind.NOT_REGISTERED, None)
    assert str(plain) == "validator refused auth: hotkey not registered"


SIGNED_KEYS = {"status", "message", "sender", "timestamp", "auth_nonce", "signature"}


async def test_our_validator_signs_its_refusals_for_the_auth_frame(
    alice: Keypair, bob: Keypair, charlie: Keypair, autojump_clock: Any
) -> None:
    """Scenario 8: our validator's refusal frames verify with verify_dict(frame, "sender"),
    name alice, and carry the auth frame's nonce as auth_nonce (none when the auth frame
    was not JSON or had no usable nonce); a reference miner still reads status and message."""
    validator = ValidatorWebSocketManager(alice, [charlie.ss58_address])

    async def refusal_for(first: str) -> tuple[dict[str, Any], tuple[int, str | None]]:
        async with raw_client(validator) as ws:
            await ws.send_message(first)
            frame = orjson.loads(await ws.get_message())
            return frame, await expect_close(ws)

    with trio.fail_after(60):
        auth = build_auth(bob, audience=alice.ss58_address)
        frame, close = await refusal_for(orjson.dumps(auth).decode())
        assert set(frame) == SIGNED_KEYS
        assert verify_dict(frame, "sender") and frame["sender"] == alice.ss58_address
        assert frame["auth_nonce"] == auth["nonce"]
        assert {"status": frame["status"], "message": frame["message"]} == {
            "status": "error", "message": "hotkey not registered"}
        assert close == NOT_REGISTERED
        altered = {**frame, "auth_nonce": "another"}
        assert not verify_dict(altered, "sender")  # the signature covers the nonce

        frame, close = await refusal_for("hello, validator")
        assert set(frame) == SIGNED_KEYS - {"auth_nonce"}
        assert verify_dict(frame, "sender") and frame["sender"] == alice.ss58_address
        assert frame["message"].startswith("malformed auth frame")
        assert close[0] == 1008

        for unusable in ({"hotkey": bob.ss58_address}, {**build_auth(bob), "nonce": "n" * 200},
                         {**build_auth(bob), "nonce": 7}):
            frame, _ = await refusal_for(orjson.dumps(unusable).decode())
            assert "auth_nonce" not in frame, unusable
            assert verify_dict(frame, "sender"), unusable


async def test_our_validators_flood_refusal_keeps_its_hint_at_our_miner(
    alice: Keypair, bob: Keypair, autojump_clock: Any
) -> None:
    """Scenario 8: the real validator's flood-cooldown refusal, read by check_answer for the
    auth frame it answers, keeps its retry hint; for another auth nonce it does not."""
    validator = flooding_validator(alice)
    with trio.fail_after(600):
        await flood_until_closed(validator, bob)
        auth = build_auth(bob, audience=alice.ss58_address)
        async with raw_client(validator) as ws:
            await ws.send_message(orjson.dumps(auth).decode())
            raw = await ws.get_message()
    frame = orjson.loads(raw)
    assert frame["auth_nonce"] == auth["nonce"] and verify_dict(frame, "sender")
    hinted = COOLDOWN - HOLD
    honoured = _refused(raw, alice.ss58_address, auth["nonce"], bob.ss58_address)
    assert honoured.retry_after == hinted
    assert str(honoured) == f"validator refused auth: flood cooldown: retry in {hinted:.0f} s"
    other = _refused(raw, alice.ss58_address, "another-nonce", bob.ss58_address)
    assert other.retry_after is None
