"""The flood cooldown: a hotkey closed for flooding is refused for a while, cheaply;
and auth deadlines spread out, so a crowd of silent peers is not refused in one burst.

Why it exists: a flooder closed by the strike rule (1008 "rate limit exceeded")
that reconnects at once would cost a full handshake (sr25519 verify, signed
welcome) and a fresh burst of refused frames every time; the other miners'
latency paid for it (tests/reliability/test_hostile.py::test_latency_under_attack).

In-memory streams under trio's autojump clock, as in test_runtime.py: the hold
(half the auth timeout) and the cooldown's end are mock time, not real sleeps.
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

import bettensor_ws.node
from bettensor_ws import (
    MinerWebSocketManager,
    ValidatorWebSocketManager,
    WelcomeMessage,
    decode,
    verify,
)
from bettensor_ws.node.cli import build_parser, main
from bettensor_ws.protocol.auth import build_auth
from bettensor_ws.protocol.ratelimit import FloodCooldown
from tests.helpers import bare_refusal
from tests.test_runtime import Net, authenticate, expect_close, raw_client, wait_for

Keypair = Any  # bittensor_wallet.Keypair (fixtures alice, bob, charlie)

COOLDOWN = 60.0
HOLD = 5.0  # half the default auth_timeout (10 s)
RETRY = re.compile(r"^flood cooldown: retry in (\d+) s$")


def flooding_validator(keypair: Keypair, **kwargs: Any) -> ValidatorWebSocketManager:
    """Rate 1/s, burst 3: the 24th frame sent at once is the 21st refused, past the limit (20)."""
    return ValidatorWebSocketManager(keypair, rate_limit=1.0, rate_burst=3, **kwargs)


async def flood_until_closed(validator: ValidatorWebSocketManager, keypair: Keypair) -> float:
    """Authenticate as ``keypair``, flood until closed for it; the (mock) time of the close."""
    async with raw_client(validator) as ws:
        await authenticate(ws, keypair)
        with contextlib.suppress(ConnectionClosed):  # closed before the last ones
            for _ in range(30):
                await ws.send_message("{}")
        assert await expect_close(ws) == (1008, "rate limit exceeded")
    return trio.current_time()


async def auth_answer(ws: WebSocketConnection, frame: dict[str, Any]) -> tuple[str | bytes, float]:
    """Send ``frame`` as the auth frame: the first answer and how long it took (mock time)."""
    start = trio.current_time()
    await ws.send_message(orjson.dumps(frame).decode())
    answer = await ws.get_message()
    return answer, trio.current_time() - start


# ---- the bounded list --------------------------------------------------------------------------


def test_cooldown_expires() -> None:
    cooldown = FloodCooldown(60.0)
    assert cooldown.remaining("a", 0.0) is None
    cooldown.ban("a", 10.0)
    assert cooldown.remaining("a", 10.0) == 60.0
    assert cooldown.remaining("a", 69.5) == pytest.approx(0.5)
    assert cooldown.remaining("a", 70.0) is None  # over: forgotten
    assert len(cooldown) == 0


def test_a_second_ban_starts_a_new_cooldown() -> None:
    cooldown = FloodCooldown(60.0)
    cooldown.ban("a", 0.0)
    cooldown.ban("b", 30.0)
    cooldown.ban("a", 50.0)
    assert cooldown.remaining("a", 100.0) == pytest.approx(10.0)
    cooldown.prune(95.0)  # b ended at 90; a (re-banned) is still there
    assert len(cooldown) == 1 and cooldown.remaining("b", 95.0) is None


def test_cooldown_is_bounded() -> None:
    """Past ``max_entries`` the oldest ban goes; ended bans are pruned on the next ban."""
    cooldown = FloodCooldown(60.0, max_entries=3)
    for i in range(5):
        cooldown.ban(f"k{i}", float(i))
    assert len(cooldown) == 3
    assert [cooldown.remaining(f"k{i}", 5.0) is not None for i in range(5)] == [False, False, True, True, True]
    cooldown.ban("late", 63.5)  # k2 (ended at 62) and k3 (63) are pruned
    assert len(cooldown) == 2


def test_zero_disables_and_bad_values_are_refused() -> None:
    cooldown = FloodCooldown(0.0)
    cooldown.ban("a", 0.0)
    assert cooldown.remaining("a", 0.0) is None and len(cooldown) == 0
    with pytest.raises(ValueError):
        FloodCooldown(-1.0)
    with pytest.raises(ValueError):
        FloodCooldown(1.0, max_entries=0)


# ---- the validator ----------------------------------------------------------------------------


async def test_flooder_is_refused_after_a_hold_then_admitted_when_cooled(
    alice: Keypair, bob: Keypair, charlie: Keypair, autojump_clock: Any
) -> None:
    validator = flooding_validator(alice)
    closed_at = await flood_until_closed(validator, bob)
    # right back: held for half the auth timeout, then the bare error and 1008 saying when
    guard_before = len(validator.guard)
    async with raw_client(validator) as ws:
        answer, waited = await auth_answer(ws, build_auth(bob))
        code, reason = await expect_close(ws)
    left = COOLDOWN - (trio.current_time() - closed_at)
    expected = f"flood cooldown: retry in {math.ceil(left)} s"
    assert bare_refusal(answer, validator.hotkey) == {"status": "error", "message": expected}
    assert (code, reason) == (1008, expected)
    assert waited == pytest.approx(HOLD)
    assert expected == "flood cooldown: retry in 55 s"  # 60 s from the close, less the hold
    # refused before the signature check: a forged frame for bob gets the same answer, not
    # "bad signature", and no auth nonce was recorded in the replay guard
    forged = build_auth(charlie)
    forged["hotkey"] = bob.ss58_address
    async with raw_client(validator) as ws:
        answer, _ = await auth_answer(ws, forged)
        assert RETRY.match(orjson.loads(answer)["message"])
        assert (await expect_close(ws))[0] == 1008
    assert len(validator.guard) == guard_before
    # nobody else is affected
    async with raw_client(validator) as ws:
        await authenticate(ws, charlie)
        assert validator.connected_hotkeys == [charlie.ss58_address]
    # once the cooldown is over, bob is welcome again at once
    await trio.sleep_until(closed_at + COOLDOWN)
    async with raw_client(validator) as ws:
        answer, waited = await auth_answer(ws, build_auth(bob))
        assert waited == 0
        assert validator.connected_hotkeys == [bob.ss58_address]
    rejections = validator.stats()["rejections"]
    assert rejections["flooding"] == 1
    assert rejections["flood cooldown"] == 2
    assert "bad signature" not in rejections


async def test_a_ban_ending_during_the_hold_admits_that_connection(
    alice: Keypair, bob: Keypair, autojump_clock: Any
) -> None:
    validator = flooding_validator(alice)
    closed_at = await flood_until_closed(validator, bob)
    await trio.sleep_until(closed_at + COOLDOWN - 3.0)
    async with raw_client(validator) as ws:
        answer, waited = await auth_answer(ws, build_auth(bob))
        assert waited == pytest.approx(3.0)
        welcome = decode(answer)  # the normal checks ran: a signed Welcome
        assert isinstance(welcome, WelcomeMessage) and verify(welcome)
        assert validator.connected_hotkeys == [bob.ss58_address]
    assert "flood cooldown" not in validator.stats()["rejections"]


async def test_no_cooldown_when_disabled(alice: Keypair, bob: Keypair, autojump_clock: Any) -> None:
    validator = flooding_validator(alice, flood_cooldown=0)
    await flood_until_closed(validator, bob)
    async with raw_client(validator) as ws:
        answer, waited = await auth_answer(ws, build_auth(bob))
        assert waited == 0 and orjson.loads(answer)["type"] == "welcome"


async def test_other_closes_start_no_cooldown(alice: Keypair, bob: Keypair, autojump_clock: Any) -> None:
    """Only the flooding close bans: a miner that leaves, or is replaced, comes back at once."""
    validator = flooding_validator(alice)
    async with raw_client(validator) as ws:
        await authenticate(ws, bob)
        async with raw_client(validator) as replacement:
            await authenticate(replacement, bob)
            assert await expect_close(ws) == (1000, "New connection established")
    async with raw_client(validator) as ws:
        answer, waited = await auth_answer(ws, build_auth(bob))
        assert waited == 0 and orjson.loads(answer)["type"] == "welcome"
    assert "flood cooldown" not in validator.stats()["rejections"]


async def test_a_crowd_that_never_authenticates_is_refused_spread_out(
    alice: Keypair, autojump_clock: Any
) -> None:
    """Peers that connect together are refused between auth_timeout and 10% later, not at once.

    The same instant for all (and their reconnects right after) was a burst that held
    up the other miners (tests/reliability/test_hostile.py, the slowloris runs).
    """
    validator = ValidatorWebSocketManager(alice, auth_timeout=10.0)
    refused_after: list[float] = []

    async def silent_peer() -> None:
        async with raw_client(validator) as ws:
            start = trio.current_time()
            assert orjson.loads(await ws.get_message())["message"] == "auth timeout"
            refused_after.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(silent_peer)
    assert len(refused_after) == 20
    assert all(10.0 <= t <= 11.0 for t in refused_after), refused_after
    assert max(refused_after) - min(refused_after) > 0.2  # spread (20 uniform draws over 1 s)


# ---- the miner --------------------------------------------------------------------------------


async def test_miner_waits_out_the_cooldown_it_is_told(
    alice: Keypair, bob: Keypair, autojump_clock: Any
) -> None:
    """Refused with "retry in N s", our miner waits N s, not its 1 s backoff: two dials, not ten."""
    net = Net()
    url = "ws://validator/ws"
    validator = flooding_validator(alice)
    closed_at = await flood_until_closed(validator, bob)
    miner = MinerWebSocketManager(bob, [(alice.ss58_address, url)], stream_opener=net.open,
                                  reconnect_base_interval=1.0, max_reconnect_interval=2.0)
    async with trio.open_nursery() as nursery:
        net.attach(url, validator, nursery)
        await nursery.start(miner.run)
        await wait_for(lambda: alice.ss58_address in miner.last_error)
        assert RETRY.match(miner.last_error[alice.ss58_address].removeprefix("validator refused auth: "))
        await miner.wait_connected(alice.ss58_address)
        assert trio.current_time() >= closed_at + COOLDOWN
        assert len(net.dials[url]) == 2
        nursery.cancel_scope.cancel()


# ---- the command line -------------------------------------------------------------------------


def test_cli_flag_reaches_the_validator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert build_parser().parse_args(["validator"]).flood_cooldown == COOLDOWN
    seen: dict[str, Any] = {}

    def fake_node(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise RuntimeError("stop here")  # reported as a database error: exit 2

    monkeypatch.setattr(bettensor_ws.node, "ValidatorNode", fake_node)
    db = str(tmp_path / "v.db")
    assert main(["validator", "--hotkey-uri", "//Alice", "--db", db, "--flood-cooldown", "5"]) == 2
    assert seen["flood_cooldown"] == 5.0
    capsys.readouterr()
    for bad in ("-1", "nan"):
        assert main(["validator", "--hotkey-uri", "//Alice", "--db", db, "--flood-cooldown", bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--flood-cooldown must be at least 0" in err

