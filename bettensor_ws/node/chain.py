"""The metagraph from the chain, through the Bittensor SDK (the ``chain`` extra).

The SDK is blocking here (``bittensor.Subtensor`` used directly runs its own
event loop on a thread), so every read runs in a worker thread that a shutdown
abandons rather than waits for. What the rest of the code sees is a plain,
immutable :class:`SubnetGraph`: each neuron's uid, hotkey, stake, validator
permit and served axon. The last one read is kept on disk beside the database,
so a node restarted while the chain is unreachable goes on with it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from ..protocol.identity import canonical_hotkey
from ..protocol.refusals import bounded

__all__ = [
    "DEFAULT_REFRESH",
    "NETWORKS",
    "ChainError",
    "ChainSource",
    "Neuron",
    "SubnetGraph",
    "load_snapshot",
    "merged_validators",
    "open_subtensor",
    "read_metagraph",
    "resolve_network",
    "save_snapshot",
    "snapshot_path",
]

log = logging.getLogger("bettensor_ws.chain")

NETWORKS = ("finney", "test", "local")
"""The network names bittensor's tools take (``--subtensor.network``)."""

DEFAULT_NETWORK = "finney"

DEFAULT_REFRESH = 600.0
"""Seconds between metagraph reads: about one tempo (360 blocks of 12 s is 72 min;
registrations and permits change between tempos, so ten minutes is fresh enough)."""

READ_TIMEOUT = 60.0
"""The longest one metagraph read may take before it is abandoned as failed."""

SNAPSHOT_VERSION = 1
SDK_MISSING = "the chain options need the Bittensor SDK: pip install 'bettensor_ws[chain]'"


class ChainError(Exception):
    """The metagraph could not be had: the chain unreachable, no such subnet, a bad answer."""


@attrs.frozen
class Neuron:
    """One uid of the subnet, as the link needs it."""

    uid: int
    hotkey: str
    stake: float
    validator_permit: bool
    axon: str | None = None
    """``ip:port`` (``[ip]:port`` for IPv6) when an axon is served, else None."""

    @property
    def url(self) -> str | None:
        """``ws://IP:PORT/ws`` of a served axon; None when it serves none (ip 0.0.0.0, port 0)."""
        if not self.axon:
            return None
        host, _, port = self.axon.rpartition(":")
        if not host or host in ("0.0.0.0", "[::]") or not port.isdigit() or not 0 < int(port) < 65536:
            return None
        return f"ws://{host}:{int(port)}/ws"


@attrs.frozen
class SubnetGraph:
    """A subnet's neurons at one block: what the validator admits and the miner dials."""

    netuid: int
    block: int
    neurons: tuple[Neuron, ...]
    network: str = ""
    taken_at: str = ""

    @property
    def hotkeys(self) -> list[str]:
        return [n.hotkey for n in self.neurons]

    def uid_of(self, hotkey: str) -> int | None:
        canonical = canonical_hotkey(hotkey)
        for neuron in self.neurons:
            if neuron.hotkey == canonical:
                return neuron.uid
        return None

    def admitted(self, min_stake: float = 0.0) -> frozenset[str]:
        """Registered hotkeys with at least ``min_stake``."""
        return frozenset(n.hotkey for n in self.neurons if n.stake >= min_stake)

    def validator_endpoints(self, exclude: str | None = None) -> dict[str, str]:
        """``{hotkey: ws://IP:PORT/ws}`` of every neuron with a validator permit and a
        served axon, but ``exclude`` (our own hotkey: a miner never dials itself)."""
        found: dict[str, str] = {}
        for neuron in self.neurons:
            url = neuron.url
            if neuron.validator_permit and url is not None and neuron.hotkey != exclude:
                found[neuron.hotkey] = url
        return found

    def describe(self) -> str:
        served = len(self.validator_endpoints())
        return (
            f"netuid {self.netuid} at block {self.block}: {len(self.neurons)} neurons, "
            f"{sum(n.validator_permit for n in self.neurons)} with a validator permit, "
            f"{served} of them serving an axon"
        )

    @classmethod
    def from_sdk(cls, metagraph: Any, network: str = "") -> SubnetGraph:
        """The SDK's ``Metagraph`` (``client.subnets.metagraph(netuid)``) as a plain value.

        A neuron whose hotkey is not an ss58 address is left out, with a WARNING."""
        neurons = []
        for n in metagraph.neurons:
            hotkey = canonical_hotkey(str(n.hotkey))
            if hotkey is None:
                log.warning("metagraph uid %s: hotkey %r is not an ss58 address; left out",
                            n.uid, bounded(str(n.hotkey), 64))
                continue
            stake = getattr(n.total_stake, "amount", n.total_stake)
            neurons.append(
                Neuron(
                    uid=int(n.uid),
                    hotkey=hotkey,
                    stake=float(stake or 0.0),
                    validator_permit=bool(n.validator_permit),
                    axon=str(n.axon) if n.axon else None,
                )
            )
        return cls(
            netuid=int(metagraph.netuid),
            block=int(metagraph.block),
            neurons=tuple(neurons),
            network=network,
            taken_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )

    def to_json(self) -> dict[str, Any]:
        return {"version": SNAPSHOT_VERSION, **attrs.asdict(self, recurse=True)}

    @classmethod
    def from_json(cls, raw: Any) -> SubnetGraph:
        """Read a snapshot back; ValueError names what is wrong with it."""
        if not isinstance(raw, dict) or raw.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"not a version {SNAPSHOT_VERSION} metagraph snapshot")
        try:
            neurons = []
            for i, item in enumerate(raw["neurons"]):
                hotkey = canonical_hotkey(str(item["hotkey"]))
                if hotkey is None:
                    raise ValueError(f"neurons[{i}].hotkey is not an ss58 address")
                axon = item.get("axon")
                neurons.append(
                    Neuron(
                        uid=int(item["uid"]),
                        hotkey=hotkey,
                        stake=float(item["stake"]),
                        validator_permit=bool(item["validator_permit"]),
                        axon=bounded(str(axon), 64) if axon else None,
                    )
                )
            return cls(
                netuid=int(raw["netuid"]),
                block=int(raw["block"]),
                neurons=tuple(neurons),
                network=bounded(str(raw.get("network", "")), 200),
                taken_at=bounded(str(raw.get("taken_at", "")), 64),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed metagraph snapshot ({type(exc).__name__}: {bounded(str(exc), 64)})") from None


# ---- the SDK ---------------------------------------------------------------------------------


def resolve_network(network: str | None, endpoint: str | None) -> str:
    """The SDK's label for ``--subtensor.network`` / ``--subtensor.chain_endpoint`` (the
    endpoint wins, as in bittensor's tools); ChainError when the SDK is missing,
    ValueError for a network it does not know."""
    try:
        from bittensor.settings import resolve_endpoint
    except ImportError:
        raise ChainError(SDK_MISSING) from None
    if endpoint and not endpoint.startswith(("ws://", "wss://")):
        raise ValueError(f"--subtensor.chain_endpoint {bounded(endpoint, 64)!r}: expected ws://HOST:PORT or wss://HOST:PORT")
    label, _ = resolve_endpoint(endpoint or network or DEFAULT_NETWORK)
    return label


def open_subtensor(network: str | None, endpoint: str | None, *, substrate: Any = None) -> Any:
    """A blocking ``bittensor.Subtensor`` for that network (cold: no I/O until a read).

    ``substrate`` replaces the SDK's RPC backend (its own seam, for tests)."""
    try:
        import bittensor
    except ImportError:
        raise ChainError(SDK_MISSING) from None
    return bittensor.Subtensor(endpoint or network or DEFAULT_NETWORK, substrate=substrate)


def read_metagraph(subtensor: Any, netuid: int, network: str = "") -> SubnetGraph:
    """Blocking (a worker thread): the metagraph of ``netuid``, through the SDK.

    One runtime-API call (``SubnetInfoRuntimeApi.get_metagraph``) at the head;
    commitments are not read."""
    try:
        metagraph = subtensor.subnets.metagraph(netuid, commitments=False)
    except Exception as exc:  # the SDK's errors (RpcConnectionError, ChainError, ...) and the transport's
        raise ChainError(f"{type(exc).__name__}: {bounded(str(exc), 200)}") from None
    if metagraph is None:
        raise ChainError(f"subnet {netuid} does not exist on {network or 'this network'}")
    return SubnetGraph.from_sdk(metagraph, network)


# ---- the snapshot ----------------------------------------------------------------------------


def snapshot_path(db_path: str | Path, netuid: int) -> Path:
    """Beside the database: ``validator.db`` keeps ``validator.db.metagraph-NETUID.json``."""
    db = Path(db_path)
    return db.with_name(f"{db.name}.metagraph-{netuid}.json")


def save_snapshot(path: Path, graph: SubnetGraph) -> None:
    """Blocking: write atomically (a temporary file, flushed, then renamed over the old)."""
    data = json.dumps(graph.to_json(), indent=1).encode()
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_snapshot(path: Path, netuid: int, network: str) -> SubnetGraph:
    """Blocking: the snapshot at ``path``, if it is of this subnet on this network;
    ValueError (or OSError) says why not."""
    try:
        raw = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON ({bounded(str(exc), 64)})") from None
    graph = SubnetGraph.from_json(raw)
    if graph.netuid != netuid:
        raise ValueError(f"it is of netuid {graph.netuid}, not {netuid}")
    if graph.network != network:
        raise ValueError(f"it is of network {graph.network!r}, not {network!r}")
    return graph


# ---- following the chain ---------------------------------------------------------------------


class ChainSource:
    """The metagraph of one subnet: read at start (or the snapshot), then refreshed.

    ``read`` is blocking (:func:`read_metagraph` bound to a subtensor); it runs in
    a worker thread, abandoned after ``timeout`` or when cancelled. Every good
    read is saved to ``snapshot``.
    """

    def __init__(
        self,
        read: Callable[[], SubnetGraph],
        snapshot: Path,
        netuid: int,
        network: str,
        *,
        timeout: float = READ_TIMEOUT,
    ) -> None:
        self._read = read
        self.snapshot = snapshot
        self.netuid = netuid
        self.network = network
        self.timeout = timeout
        self.graph: SubnetGraph | None = None
        self.from_snapshot = False
        self._busy = False
        self._wake = trio.Event()
        self.subtensor: Any = None

    @classmethod
    def open(
        cls, network: str | None, endpoint: str | None, netuid: int, db_path: str | Path, *, substrate: Any = None
    ) -> ChainSource:
        """The source the CLI uses: the SDK's Subtensor for that network."""
        label = resolve_network(network, endpoint)
        subtensor = open_subtensor(network, endpoint, substrate=substrate)
        source = cls(partial(read_metagraph, subtensor, netuid, label), snapshot_path(db_path, netuid), netuid, label)
        source.subtensor = subtensor
        return source

    def close(self) -> None:
        """Blocking: close the SDK's connection now (else the SDK does at exit)."""
        if self.subtensor is not None:
            self.subtensor.close()

    async def start(self) -> SubnetGraph:
        """The first metagraph: from the chain, else from the snapshot (with a WARNING);
        ChainError when neither can be had."""
        try:
            return await self._take(await self._read_chain())
        except ChainError as chain_error:
            try:
                graph = await trio.to_thread.run_sync(load_snapshot, self.snapshot, self.netuid, self.network)
            except FileNotFoundError:
                raise ChainError(
                    f"cannot read the metagraph of netuid {self.netuid} ({chain_error}) and there is "
                    f"no snapshot at {self.snapshot}"
                ) from None
            except (OSError, ValueError) as exc:
                raise ChainError(
                    f"cannot read the metagraph of netuid {self.netuid} ({chain_error}) and the "
                    f"snapshot {self.snapshot} is unusable: {exc}"
                ) from None
            log.warning(
                "cannot read the metagraph from the chain (%s); going on with the snapshot %s "
                "of block %d taken %s", chain_error, self.snapshot, graph.block, graph.taken_at or "at an unknown time",
            )
            self.graph = graph
            self.from_snapshot = True
            return graph

    async def refresh(self) -> SubnetGraph | None:
        """A fresh metagraph, saved; None (with a WARNING) when the read fails, and the
        last one stays."""
        try:
            return await self._take(await self._read_chain())
        except ChainError as exc:
            kept = f"block {self.graph.block}" if self.graph is not None else "nothing"
            log.warning("metagraph refresh failed (%s); keeping %s", exc, kept)
            return None

    def poke(self) -> None:
        """Refresh now (SIGHUP) rather than at the next interval."""
        self._wake.set()

    async def follow(
        self,
        apply: Callable[[SubnetGraph], object],
        interval: float,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Every ``interval`` seconds (or when poked), refresh and ``apply`` a good read."""
        task_status.started()
        while True:
            with trio.move_on_after(interval):
                await self._wake.wait()
            self._wake = trio.Event()
            graph = await self.refresh()
            if graph is not None:
                apply(graph)

    async def _read_chain(self) -> SubnetGraph:
        if self._busy:  # an abandoned read still hangs: do not pile up threads behind it
            await trio.lowlevel.checkpoint()
            raise ChainError("the previous read has not returned yet")
        self._busy = True

        def read() -> SubnetGraph:
            try:
                return self._read()
            finally:
                self._busy = False

        with trio.move_on_after(self.timeout):
            return await trio.to_thread.run_sync(read, abandon_on_cancel=True)
        raise ChainError(f"no answer within {self.timeout:g} s")

    async def _take(self, graph: SubnetGraph) -> SubnetGraph:
        if graph.netuid != self.netuid:
            raise ChainError(f"the chain answered for netuid {graph.netuid}, not {self.netuid}")
        self.graph = graph
        self.from_snapshot = False
        log.info("metagraph %s", graph.describe())
        try:
            await trio.to_thread.run_sync(save_snapshot, self.snapshot, graph, abandon_on_cancel=True)
        except OSError as exc:
            log.warning("cannot save the metagraph snapshot %s: %s", self.snapshot, exc)
        return graph


def merged_validators(manual: Iterable[tuple[str, str]], graph: SubnetGraph | None, own: str) -> dict[str, str]:
    """The validators a miner dials: the metagraph's, then the hand-made list (which wins
    for a hotkey in both)."""
    found = graph.validator_endpoints(exclude=own) if graph is not None else {}
    found.update((canonical_hotkey(hotkey) or hotkey, url) for hotkey, url in manual)
    return found
