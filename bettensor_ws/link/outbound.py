"""A connection's bounded send queue: replies go ahead of broadcasts."""

from __future__ import annotations

import trio

from ..protocol.link import Frame

__all__ = ["Frame", "OutboundQueue"]


class OutboundQueue:
    """Two bounded memory channels and one wake-up.

    Replies (confirmations, errors, heartbeat acks) apply backpressure to the
    task producing them; broadcasts never wait: a full queue refuses them, and
    the link's protocol object decides when "full" has lasted too long.
    """

    def __init__(self, replies: int = 256, broadcasts: int = 256) -> None:
        self._reply_send, self._reply_recv = trio.open_memory_channel[Frame](replies)
        self._bcast_send, self._bcast_recv = trio.open_memory_channel[Frame](broadcasts)
        self._ready = trio.Event()

    async def put_reply(self, frame: Frame) -> None:
        await self._reply_send.send(frame)
        self._ready.set()

    def put_reply_nowait(self, frame: Frame) -> bool:
        try:
            self._reply_send.send_nowait(frame)
        except trio.WouldBlock:
            return False
        self._ready.set()
        return True

    def put_broadcast_nowait(self, frame: Frame) -> bool:
        try:
            self._bcast_send.send_nowait(frame)
        except trio.WouldBlock:
            return False
        self._ready.set()
        return True

    def broadcasts_full(self) -> bool:
        stats = self._bcast_send.statistics()
        return stats.current_buffer_used >= stats.max_buffer_size

    def pending(self) -> int:
        return (
            self._reply_send.statistics().current_buffer_used
            + self._bcast_send.statistics().current_buffer_used
        )

    async def get(self) -> Frame | None:
        """The next frame, replies first; waits while both are empty.

        Returns None when woken by :meth:`wake` with nothing queued, so the
        writer can look at work kept outside the queue (batched results).
        """
        try:
            return self._reply_recv.receive_nowait()
        except trio.WouldBlock:
            pass
        try:
            return self._bcast_recv.receive_nowait()
        except trio.WouldBlock:
            self._ready = trio.Event()
            await self._ready.wait()
            return None

    def wake(self) -> None:
        """Wake the writer without queueing a frame."""
        self._ready.set()

    def get_nowait(self) -> Frame | None:
        """The next frame without waiting (replies first), or None when empty."""
        for channel in (self._reply_recv, self._bcast_recv):
            try:
                return channel.receive_nowait()
            except (trio.WouldBlock, trio.ClosedResourceError, trio.EndOfChannel):
                continue
        return None

    def close(self) -> None:
        """Wake any producer blocked on a full queue: sending now raises ClosedResourceError."""
        self._reply_send.close()
        self._bcast_send.close()
        self._reply_recv.close()
        self._bcast_recv.close()
