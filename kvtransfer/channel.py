"""The control channel between prefill and decode ranks: one zmq PULL socket per rank, PUSH sockets to peers.

Each rank binds one PULL socket (its control endpoint, published through the bootstrap service or carried
in the transfer request) and connects a PUSH socket to each peer it talks to. zmq keeps messages from one
PUSH socket to one PULL socket in order and reconnects by itself; a full queue (a peer that stopped
reading) is reported, never waited on. Frames are `kvtransfer.messages` control messages (msgpack).

Authentication: with a key (the deployment's `--kv-auth-token`, which every prefill and decode rank of
the deployment knows), each frame starts with a 16-byte HMAC-SHA256 of the rest under that key, and frames
without a valid one are dropped and counted (`num_refused`): a stranger who reaches a control port cannot
abort rooms or make a prefill rank write its KV to an engine of its choosing. Without a key the channel is
open, as the bootstrap service's lookups are (a per-instance secret cannot help here: decode ranks of
another instance never learn it).

Threads: only the owning manager's background thread calls `recv`; `send` may be called from any thread
(the PUSH sockets are guarded by a lock, which is the memory barrier zmq asks for when a socket changes
threads).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading

import zmq

from kvtransfer.messages import ControlMessage, decode_control, encode_control
from kvtransfer.state import KVProtocolError

log = logging.getLogger(__name__)

# On close, how long queued messages (a closing manager's aborts) may still go out to reachable peers.
_CLOSE_LINGER_MS = 200
_MAC_BYTES = 16  # truncated HMAC-SHA256: 128 bits, as TLS's truncated MACs


class ControlChannel:
    """A rank's control endpoint: `recv` what peers send, `send` to any peer's endpoint.

    Args:
        host: the address peers reach this rank at; the socket binds it on a free port.
        send_queue: messages queued per peer before `send` reports the peer as not reading.
        key: frames are signed with it and only frames signed with it are taken (see the module docstring);
            None: unsigned frames, as every peer must then send.
    Attributes: `endpoint` ("tcp://host:port"), `num_peer_sockets`, `num_refused` (frames dropped for a
    missing or wrong signature). Call `close()` to close every socket.
    """

    def __init__(self, host: str = "127.0.0.1", send_queue: int = 1000, key: str | None = None) -> None:
        self._key = key.encode() if key else None
        self.num_refused = 0
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
        if self._key is not None:
            frame = self._mac(frame) + frame
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
        if self._key is not None:
            mac, frame = frame[:_MAC_BYTES], frame[_MAC_BYTES:]
            if not hmac.compare_digest(mac, self._mac(frame)):
                self.num_refused += 1
                if self.num_refused & (self.num_refused - 1) == 0:  # 1st, 2nd, 4th, ...: loud, not a flood
                    log.warning("control channel %s dropped %d frame(s) without this deployment's signature "
                                "(a stranger, or a peer without the same --kv-auth-token)", self.endpoint,
                                self.num_refused)
                return None
        try:
            return decode_control(frame)
        except KVProtocolError as exc:
            log.warning("control channel %s dropped a frame: %s", self.endpoint, exc)
            return None

    def _mac(self, frame: bytes) -> bytes:
        assert self._key is not None
        return hmac.new(self._key, frame, hashlib.sha256).digest()[:_MAC_BYTES]

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
