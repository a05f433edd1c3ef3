"""The control channel between prefill and decode ranks: one zmq PULL socket per rank, PUSH sockets to peers.

Each rank binds one PULL socket (its control endpoint, published through the bootstrap service or carried
in the transfer request) and connects a PUSH socket to each peer it talks to. zmq keeps messages from one
PUSH socket to one PULL socket in order and reconnects by itself; a full queue (a peer that stopped
reading) is reported, never waited on. Frames are `kvtransfer.messages` control messages (msgpack).

Threads: only the owning manager's background thread calls `recv`; `send` may be called from any thread
(the PUSH sockets are guarded by a lock, which is the memory barrier zmq asks for when a socket changes
threads).
"""

from __future__ import annotations

import logging
import threading

import zmq

from kvtransfer.messages import ControlMessage, decode_control, encode_control
from kvtransfer.state import KVProtocolError

log = logging.getLogger(__name__)

# On close, how long queued messages (a closing manager's aborts) may still go out to reachable peers.
_CLOSE_LINGER_MS = 200


class ControlChannel:
    """A rank's control endpoint: `recv` what peers send, `send` to any peer's endpoint.

    Args:
        host: the address peers reach this rank at; the socket binds it on a free port.
        send_queue: messages queued per peer before `send` reports the peer as not reading.
    Attributes: `endpoint` ("tcp://host:port"), `num_peer_sockets`. Call `close()` to close every socket.
    """

    def __init__(self, host: str = "127.0.0.1", send_queue: int = 1000) -> None:
        self._context = zmq.Context()
        self._send_queue = send_queue
        self._pull = self._context.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        try:
            port = self._pull.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError:
            self._pull.close()
            self._context.term()
            raise
        self.endpoint = f"tcp://{host}:{port}"
        self._poller = zmq.Poller()
        self._poller.register(self._pull, zmq.POLLIN)
        self._push: dict[str, zmq.Socket] = {}
        self._lock = threading.Lock()
        self._closed = False

    def send(self, endpoint: str, message: ControlMessage) -> bool:
        """Queue `message` for the peer at `endpoint`; False if the channel is closed or the peer's queue is
        full (it has not been reading: treat it as gone)."""
        frame = encode_control(message)
        with self._lock:
            if self._closed:
                return False
            socket = self._push.get(endpoint)
            if socket is None:
                socket = self._context.socket(zmq.PUSH)
                socket.setsockopt(zmq.LINGER, 0)
                socket.setsockopt(zmq.SNDHWM, self._send_queue)
                socket.connect(endpoint)
                self._push[endpoint] = socket
            try:
                socket.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                log.warning("control channel: %s is not reading; dropped a %s", endpoint, type(message).__name__)
                return False
        return True

    def recv(self, timeout_s: float) -> ControlMessage | None:
        """The next valid message, or None after `timeout_s` (background thread only). Frames that are not
        our messages are logged and dropped: a stray client must not stop the channel."""
        if not self._poller.poll(int(timeout_s * 1000)):
            return None
        frame = self._pull.recv(zmq.NOBLOCK)
        try:
            return decode_control(frame)
        except KVProtocolError as exc:
            log.warning("control channel %s dropped a frame: %s", self.endpoint, exc)
            return None

    def forget(self, endpoint: str) -> None:
        """Close the PUSH socket to a peer we no longer talk to (reopened on the next send)."""
        with self._lock:
            socket = self._push.pop(endpoint, None)
        if socket is not None:
            socket.close()

    @property
    def num_peer_sockets(self) -> int:
        return len(self._push)

    def close(self) -> None:
        """Close every socket and the zmq context. Call after the receiving thread has stopped. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for socket in self._push.values():
                socket.close(linger=_CLOSE_LINGER_MS)  # let the last aborts out, briefly
            self._push.clear()
        self._pull.close()
        self._context.term()
