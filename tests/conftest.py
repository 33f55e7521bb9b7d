from __future__ import annotations

import pytest
from bittensor_wallet import Keypair


@pytest.fixture(scope="session")
def alice() -> Keypair:
    return Keypair.create_from_uri("//Alice")


@pytest.fixture(scope="session")
def bob() -> Keypair:
    return Keypair.create_from_uri("//Bob")


@pytest.fixture(scope="session")
def charlie() -> Keypair:
    return Keypair.create_from_uri("//Charlie")
