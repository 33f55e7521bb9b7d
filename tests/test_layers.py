"""The three layers and the curated API, enforced (as trio enforces its own exports)."""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import bettensor_ws

PACKAGE = Path(bettensor_ws.__file__).parent

PUBLIC = {
    "AuthError", "AuthInfo", "CloseCode", "Confirmation", "ConfirmationMessage",
    "ConfirmationResult", "Connection", "ConnectionSettings", "DecodeError", "Dispatcher",
    "ErrorMessage", "GameUpdateMessage", "HandshakeRefused", "HeartbeatAckMessage",
    "HeartbeatMessage", "LinkClosed", "MessageTypeConflict", "MinerWebSocketManager",
    "PredictionMessage", "Refusal", "RefusalKind", "ReplayGuard", "TeamGame",
    "TeamGamePrediction", "TokenBucket", "ValidatorWebSocketManager", "WebSocketMessage",
    "WelcomeMessage", "build_auth", "check_auth", "decode", "echo_handler", "encode",
    "message_types", "sign", "verify",
}


def imports_of(path: Path) -> set[str]:
    """Absolute names of the modules a file imports, relative imports resolved."""
    tree = ast.parse(path.read_text())
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[: len(parts) - node.level]
                found.add(".".join((*base, node.module)) if node.module else ".".join(base))
            elif node.module:
                found.add(node.module)
    return found


def layer_files(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).glob("*.py"))


def test_the_public_names_are_exactly_the_curated_ones() -> None:
    assert set(bettensor_ws.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(bettensor_ws, name) is not None


def test_the_three_layers_are_packages() -> None:
    names = {m.name for m in pkgutil.iter_modules([str(PACKAGE)])}
    assert {"protocol", "link", "node", "testing"} <= names
    # nothing but the curated entry points lives beside the three layers
    assert names <= {"protocol", "link", "node", "testing", "__main__"}


def test_protocol_imports_no_io_and_no_upper_layer() -> None:
    for path in layer_files("protocol"):
        for name in imports_of(path):
            top = name.split(".")[0]
            assert top not in {"trio", "trio_websocket", "socket", "sqlite3", "asyncio"}, (path, name)
            assert not name.startswith(("bettensor_ws.link", "bettensor_ws.node")), (path, name)


def test_link_never_imports_the_application() -> None:
    for path in layer_files("link"):
        for name in imports_of(path):
            assert not name.startswith("bettensor_ws.node"), (path, name)
            assert name.split(".")[0] != "sqlite3", (path, name)
