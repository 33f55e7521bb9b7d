"""The public API as a handler author types it (architecture issue, deliver 5).

Not a test module: ``make lint`` runs ``mypy --strict`` on this file, so a
change that breaks these annotations fails the build.
"""

from __future__ import annotations

from bettensor_ws import Connection, PredictionMessage, ValidatorWebSocketManager


async def on_prediction(websocket: Connection, message: PredictionMessage) -> None:
    await websocket.send_json({"type": "confirmation", "status": "success",
                               "prediction_id": message.prediction.prediction_id})


def setup(validator: ValidatorWebSocketManager) -> None:
    validator.register_handler("prediction", on_prediction)
