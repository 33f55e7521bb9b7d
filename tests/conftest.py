from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from bittensor_wallet import Keypair

from bettensor_ws.node.store import ValidatorStore


@pytest.fixture(scope="session")
def alice() -> Keypair:
    return Keypair.create_from_uri("//Alice")


@pytest.fixture(scope="session")
def bob() -> Keypair:
    return Keypair.create_from_uri("//Bob")


@pytest.fixture(scope="session")
def charlie() -> Keypair:
    return Keypair.create_from_uri("//Charlie")


@pytest.fixture
def vstore(tmp_path: Path) -> Iterator[ValidatorStore]:
    """A validator store holding the games g1 (a tie possible) and g2 (no tie)."""
    from .test_store import game

    store = ValidatorStore(tmp_path / "validator.db")
    store.upsert_games([game("g1"), game("g2", can_tie=False)])
    yield store
    store.close()
