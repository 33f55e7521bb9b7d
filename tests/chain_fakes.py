"""The chain, without a chain: the SDK's own seam, ``bittensor.Subtensor(substrate=...)``.

``FakeSubstrate`` answers the one runtime call a metagraph read makes
(``SubnetInfoRuntimeApi.get_metagraph``) with a record of the shape the
runtime returns and the SDK parses (``bittensor.metagraph._build``): columns
per uid, axons as ``{ip: int, port, ip_type, ...}``, stakes in rao. Everything
above it (the SDK's Subtensor, its loop thread, its Metagraph, our
``read_metagraph`` and ``ChainSource``) is the code the CLI runs.
"""

from __future__ import annotations

import copy
import ipaddress
import threading
from typing import Any

import attrs
from bittensor import Balance

RAO = 10**9


@attrs.define
class Peer:
    """One uid's row: a hotkey, a stake (in the subnet's units), a permit, an axon."""

    hotkey: str
    stake: float = 1.0
    permit: bool = False
    ip: str | None = None
    port: int = 0


def axon(ip: str | None, port: int) -> dict[str, Any]:
    """An AxonInfo record as the runtime answers it (ip as an integer; 0 when not served)."""
    address = ipaddress.ip_address(ip) if ip else None
    return {
        "block": 1,
        "version": 1,
        "ip": int(address) if address is not None else 0,
        "port": port,
        "ip_type": address.version if address is not None else 4,
        "protocol": 4,
        "placeholder1": 0,
        "placeholder2": 0,
    }


def metagraph_record(netuid: int, block: int, peers: list[Peer]) -> dict[str, Any]:
    """The ``get_metagraph`` runtime record for these uids (uid = position)."""
    n = len(peers)
    return {
        "netuid": netuid,
        "name": list(b"bettensor"),
        "symbol": list("\u03b2".encode()),
        "block": block,
        "tempo": 360,
        "last_step": block - 10,
        "blocks_since_last_step": 10,
        "owner_hotkey": peers[0].hotkey if peers else "",
        "owner_coldkey": peers[0].hotkey if peers else "",
        "network_registered_at": 1,
        "num_uids": n,
        "max_uids": 256,
        "hotkeys": [p.hotkey for p in peers],
        "coldkeys": [p.hotkey for p in peers],
        "identities": [None] * n,
        "axons": [axon(p.ip, p.port) for p in peers],
        "active": [True] * n,
        "validator_permit": [p.permit for p in peers],
        "last_update": [block] * n,
        "block_at_registration": [1] * n,
        "rank": [0] * n,
        "trust": [0] * n,
        "consensus": [0] * n,
        "incentives": [0] * n,
        "dividends": [0] * n,
        "pruning_score": [0] * n,
        "emission": [0] * n,
        "alpha_stake": [int(p.stake * RAO) for p in peers],
        "tao_stake": [0] * n,
        "total_stake": [int(p.stake * RAO) for p in peers],
        "tao_in": 10 * RAO,
        "alpha_in": 20 * RAO,
    }


class FakeSubstrate:
    """An in-memory chain holding one subnet; ``set()`` changes it, ``fail`` makes
    every read raise (an unreachable chain), ``hold`` blocks reads until set."""

    def __init__(self, netuid: int = 7, peers: list[Peer] | None = None, block: int = 1000) -> None:
        self.netuid = netuid
        self.token_symbols: dict[int, str] = {}
        self.fail: Exception | None = None
        self.hold: threading.Event | None = None
        self.calls: list[tuple[str, str, list[Any]]] = []
        self.block: int = block
        self.record: dict[str, Any] = {}
        self.set(peers or [], block)

    def set(self, peers: list[Peer], block: int | None = None) -> None:
        self.block = block if block is not None else self.block + 100
        self.record = metagraph_record(self.netuid, self.block, peers)

    def balance(self, rao: int, netuid: int = 0) -> Balance:
        return Balance.from_rao(rao, netuid)

    async def connect(self) -> None:
        if self.fail is not None:
            raise self.fail

    async def close(self) -> None:
        pass

    async def block_number(self) -> int:
        if self.fail is not None:
            raise self.fail
        return self.block

    async def block_hash(self, block: int | None = None) -> str:
        return f"0x{(block or self.block):064x}"

    async def query_map(self, module: str, storage_function: str, params: Any = None,
                        block_hash: str | None = None) -> list[tuple[Any, Any]]:
        return []  # the token symbols the SDK scans on connect: none

    async def runtime_call(self, api: str, method: str, params: list[Any], block_hash: str | None = None) -> Any:
        self.calls.append((api, method, list(params)))
        if self.hold is not None:
            self.hold.wait(30)
        if self.fail is not None:
            raise self.fail
        assert (api, method) == ("SubnetInfoRuntimeApi", "get_metagraph"), (api, method)
        return copy.deepcopy(self.record) if params == [self.netuid] else None
