"""Drive one plain (non-asyncio) ZeroMQ socket from an asyncio event loop, cheaply.

pyzmq's zmq.asyncio wraps every send and receive in its own future and event-mask
bookkeeping, which costs more than our whole codec on a small message. `SocketPump`
does the minimum instead: it watches the socket's notification descriptor with
`loop.add_reader`, and when it fires drains every waiting message with non-blocking
receives into a callback; sends are attempted at once and queued only when ZeroMQ
pushes back (high-water mark).

The ZeroMQ descriptor is edge-triggered: it signals that the socket's state changed,
not that a message is waiting, and any send or receive may consume that signal. So
after every operation we read `zmq.EVENTS` and schedule another drain ourselves when
input is pending (the rule pyzmq's own asyncio layer follows).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable

import zmq

log = logging.getLogger(__name__)

DRAIN_BATCH = 64  # messages handled per drain before yielding to other callbacks
SEND_RETRY_S = 0.001  # first back-off when a send is refused (peer queue full), doubling ...
SEND_RETRY_MAX_S = 0.05  # ... up to this, so a dead peer costs a few wake-ups a second


class SocketPump:
    """Feeds incoming multipart messages to `on_message(frames)` and sends without copies.

    `on_message` runs inside the event loop's reader callback: it must be quick and must
    not raise (exceptions are logged and the message dropped).
    """

    def __init__(self, sock: zmq.Socket, on_message: Callable[[list[zmq.Frame]], None]):
        self.sock = sock
        self.on_message = on_message
        self.loop = asyncio.get_running_loop()
        self._fd = sock.FD
        self._queue: collections.deque[tuple[list, asyncio.Future]] = collections.deque()
        self._paused = False
        self._closed = False
        self._scheduled = False
        self._retry: asyncio.TimerHandle | None = None
        self._retry_s = SEND_RETRY_S
        self.loop.add_reader(self._fd, self._on_ready)
        self._schedule()  # messages may already be waiting; the descriptor will not say so

    # ---- receiving

    def pause(self) -> None:
        """Stop reading (messages wait in ZeroMQ's queue, which pushes back on senders)."""
        self._paused = True

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self.loop.call_soon(self._on_ready)

    def _on_ready(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        self._flush()
        if not self._paused:
            for _ in range(DRAIN_BATCH):
                try:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                except zmq.ZMQError as exc:
                    log.warning("receive failed: %s", exc)
                    break
                try:
                    self.on_message(frames)
                except Exception:  # a consumer bug must not stop the pump
                    log.exception("message handler failed; message dropped")
                if self._paused or self._closed:
                    break
        self._rearm()

    def _rearm(self) -> None:
        """Schedule another pass if input (or, for queued sends, output room) is pending."""
        if self._closed:
            return
        events = self.sock.getsockopt(zmq.EVENTS)
        if events & zmq.POLLIN and not self._paused:
            self._schedule()
        elif self._queue and events & zmq.POLLOUT and self._retry is None:
            self._schedule()

    # ---- sending

    def send(self, frames: list) -> asyncio.Future:
        """Hand a multipart message to ZeroMQ (zero-copy); the future completes once it is queued.

        Raises zmq.ZMQError (e.g. EHOSTUNREACH on a ROUTER_MANDATORY socket) through the future.
        """
        future = self.loop.create_future()
        if self._closed:
            future.set_exception(zmq.ZMQError(zmq.ENOTSOCK, "socket pump is closed"))
            return future
        if not self._queue and self._try_send(frames, future):
            self._rearm()  # the send may have consumed a pending input signal
            return future
        self._queue.append((frames, future))
        self._rearm()
        return future

    def send_now(self, frames: list) -> bool:
        """Hand a multipart message to ZeroMQ at once (zero-copy) or not at all: False when
        ZeroMQ pushes back (EAGAIN), and the caller keeps the message. Raises zmq.ZMQError
        otherwise (e.g. EHOSTUNREACH). For callers that queue per destination themselves;
        do not mix with `send` on the same socket (its queue would be overtaken)."""
        if self._closed:
            raise zmq.ZMQError(zmq.ENOTSOCK, "socket pump is closed")
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        finally:
            self._rearm()  # a send may consume a pending input signal
        return True

    def _try_send(self, frames: list, future: asyncio.Future) -> bool:
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if not future.done():
                future.set_exception(exc)
            return True
        if not future.done():
            future.set_result(None)
        return True

    def _flush(self) -> None:
        while self._queue:
            frames, future = self._queue[0]
            if future.done():  # cancelled by a caller's deadline
                self._queue.popleft()
                continue
            if not self._try_send(frames, future):
                # A ROUTER may report room while this peer's queue is full: retry on a timer
                # rather than spinning on call_soon.
                if self._retry is None:
                    self._retry = self.loop.call_later(self._retry_s, self._retry_now)
                    self._retry_s = min(2 * self._retry_s, SEND_RETRY_MAX_S)
                return
            self._queue.popleft()
            self._retry_s = SEND_RETRY_S

    def _retry_now(self) -> None:
        self._retry = None
        self._schedule()

    # ---- closing

    def close(self) -> None:
        """Stop watching the socket and fail queued sends; the caller closes the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        try:
            self.loop.remove_reader(self._fd)
        except (ValueError, OSError):  # loop already closed
            pass
        while self._queue:
            _, future = self._queue.popleft()
            if not future.done():
                future.set_exception(zmq.ZMQError(zmq.ENOTSOCK, "socket pump closed"))
