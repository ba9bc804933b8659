"""The config stream's endpoint: one WebSocket per proxy at `/api/v1/stream`.

The upgrade carries `Authorization: Bearer <dataplane token>`. The connection is accepted
first, so that every refusal can say why: a `refuse` message, then a close with a 44xx
code (the table is in docs/config-stream.md). The first message must be a `hello`; once it
is accepted, the dataplane is registered (created or updated in the store), the stream
gets its snapshot, and from then on pushes and ACK/NACKs cross in both directions.

One task reads the socket; one writes it, so that a push offered while a slow proxy is
still receiving the previous one just replaces it (only the newest snapshot matters).
The stream lasts as long as the token it was opened with: when the token expires, or is
revoked, the stream is refused (`unauthenticated`, 4401) and closed, and the proxy
reconnects with the token it has then.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from starlette.websockets import WebSocket, WebSocketDisconnect

from meshling.configstream import (
    Ack,
    Hello,
    Nack,
    ProtocolError,
    Refusal,
    decode_client,
    encode,
)
from meshling.configstream.messages import TELEMETRY_FEATURE, Stats, TapEvents
from meshling.controlplane.api.ca import is_revoked
from meshling.controlplane.distributor.service import (
    CLOSE_INVALID,
    CLOSE_UNAUTHENTICATED,
    Distributor,
    Session,
    to_view,
)
from meshling.controlplane.resources import (
    DATAPLANE_KIND,
    MESH_KIND,
    Dataplane,
    Mesh,
    parse_dataplane,
)
from meshling.controlplane.store import AlreadyExists, Conflict, NotFound, Store, StoreError
from meshling.controlplane.tokens import TokenClaims, TokenError, TokenSigner
from meshling.snapshot.load import SnapshotError
from meshling.snapshot.model import TlsFiles

log = logging.getLogger(__name__)

HELLO_TIMEOUT: Final = 10.0
CLOSE_FORBIDDEN: Final = 4403
CLOSE_HELLO_TIMEOUT: Final = 4408
CLOSE_UNAVAILABLE: Final = 4503
# how long a refusal may take to reach a proxy before the socket is dropped
CLOSE_GRACE: Final = 5.0
# Whether the server negotiates permessage-deflate (uvicorn's `ws_per_message_deflate`):
# no. A snapshot is ~11 KB at 1000 proxies and goes out only when it changes, while
# compression keeps ~49 KB of zlib state per stream and costs ~30% of the CPU of pushing
# a change to every proxy (measured in docs/config-stream.md, "Compression").
PER_MESSAGE_DEFLATE: Final = False

Clock = Callable[[], dt.datetime]


class Refused(Exception):
    def __init__(self, reason: str, message: str, code: int) -> None:
        super().__init__(message)
        self.reason, self.message, self.code = reason, message, code


class WebSocketStream:
    """The writing half of one stream: the newest offered push, the telemetry messages
    (`send`) in order, then at most one refusal."""

    def __init__(self, websocket: WebSocket) -> None:
        self._websocket = websocket
        self._next: str | None = None
        # telemetry, tap and untap frames: few, and each one counts (not conflated)
        self._frames: deque[str] = deque(maxlen=256)
        self._refusal: Refused | None = None
        self._wake = asyncio.Event()

    def offer(self, version: str, frame: str) -> None:
        self._next = frame
        self._wake.set()

    def send(self, frame: str) -> None:
        self._frames.append(frame)
        self._wake.set()

    def refuse(self, reason: str, message: str, code: int) -> None:
        if self._refusal is None:
            self._refusal = Refused(reason, message, code)
            self._wake.set()

    @property
    def refused(self) -> bool:
        return self._refusal is not None

    async def run(self) -> None:
        """Write until refused; a dropped connection ends it too."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._refusal is not None:
                break
            if self._next is not None:
                frame, self._next = self._next, None
                await self._websocket.send_text(frame)
            while self._frames and self._refusal is None:
                await self._websocket.send_text(self._frames.popleft())
        refusal = self._refusal
        if refusal.code >= 4000:
            await self._websocket.send_text(encode(Refusal(refusal.reason, refusal.message)))
        # a close reason is at most 123 bytes; the refusal above has the whole message
        await self._websocket.close(
            refusal.code, refusal.message.encode()[:120].decode(errors="ignore")
        )


def stream_endpoint(
    store: Store, signer: TokenSigner, distributor: Distributor, clock: Clock
) -> Callable[[WebSocket], Any]:
    """The ASGI WebSocket handler of the config stream."""

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        stream = WebSocketStream(websocket)
        writer = asyncio.create_task(stream.run(), name="meshling-stream-writer")
        session: Session | None = None
        try:
            session = await _handshake(websocket, stream, store, signer, distributor, clock)
            reader = asyncio.create_task(_read(websocket, stream, distributor, session))
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect):
                await reader
        except Refused as e:
            stream.refuse(e.reason, e.message, e.code)
        except (WebSocketDisconnect, OSError):
            pass
        finally:
            if session is not None:
                distributor.unregister(session)
                distributor.taps.disconnected(session.key, stream.send)
                distributor.telemetry.disconnected(session.key)
            if not stream.refused:
                stream.refuse("closed", "stream ended", 1000)
            try:
                await asyncio.wait_for(writer, CLOSE_GRACE)
            except (TimeoutError, RuntimeError, OSError, WebSocketDisconnect):
                writer.cancel()
            except Exception:  # the socket is gone whatever went wrong: log, do not raise
                log.debug("stream writer ended with an error", exc_info=True)

    return endpoint


async def _read(
    websocket: WebSocket, stream: WebSocketStream, distributor: Distributor, session: Session
) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        try:
            decoded = decode_client(_payload(message))
        except ProtocolError as e:
            stream.refuse("invalid", str(e), CLOSE_INVALID)
            return
        if isinstance(decoded, Stats):
            distributor.telemetry.record(session.key, session.service, decoded, time.monotonic())
        elif isinstance(decoded, TapEvents):
            distributor.taps.events(session.key, decoded)
        elif isinstance(decoded, Ack):
            if not distributor.ack(session, decoded.version):
                log.info("%s/%s acked unknown version %s", *session.key, decoded.version)
        elif isinstance(decoded, Nack):
            log.warning(
                "%s/%s refused snapshot %s: %s", *session.key, decoded.version, decoded.reason
            )
            if not distributor.nack(session, decoded.version, decoded.reason):
                log.info("%s/%s nacked unknown version %s", *session.key, decoded.version)
        else:
            stream.refuse("invalid", "hello: sent twice; a stream has one hello", CLOSE_INVALID)
            return


def _payload(message: Any) -> str | bytes:
    text = message.get("text")
    if text is not None:
        return str(text)
    return bytes(message.get("bytes") or b"")


async def _authenticate(
    websocket: WebSocket, store: Store, signer: TokenSigner, clock: Clock
) -> TokenClaims:
    values = websocket.headers.getlist("authorization")
    scheme, _, credentials = (values[0] if len(values) == 1 else "").strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise Refused(
            "unauthenticated",
            "missing dataplane token: send 'Authorization: Bearer <dataplane token>' "
            "(meshling token dataplane --service NAME makes one)",
            CLOSE_UNAUTHENTICATED,
        )
    try:
        claims = signer.verify(credentials.strip(), clock())
        if await is_revoked(store, claims):
            raise TokenError("revoked", f"token id {claims.jti}")
    except TokenError as e:
        raise Refused("unauthenticated", str(e), CLOSE_UNAUTHENTICATED) from None
    return claims


async def _handshake(
    websocket: WebSocket,
    stream: WebSocketStream,
    store: Store,
    signer: TokenSigner,
    distributor: Distributor,
    clock: Clock,
) -> Session:
    try:
        claims = await _authenticate(websocket, store, signer, clock)
        try:
            first = await asyncio.wait_for(websocket.receive(), HELLO_TIMEOUT)
        except TimeoutError:
            raise Refused(
                "invalid", f"no hello within {HELLO_TIMEOUT:.0f}s", CLOSE_HELLO_TIMEOUT
            ) from None
        if first["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(int(first.get("code", 1000)))
        try:
            hello = decode_client(_payload(first))
        except ProtocolError as e:
            raise Refused("invalid", str(e), CLOSE_INVALID) from None
        if not isinstance(hello, Hello):
            raise Refused("invalid", "the first message must be a hello", CLOSE_INVALID)
        try:
            dataplane = parse_dataplane(hello.dataplane, "hello.dataplane")
        except SnapshotError as e:
            raise Refused("invalid", str(e), CLOSE_INVALID) from None
        if (claims.mesh, claims.service) != (dataplane.mesh, dataplane.service):
            raise Refused(
                "forbidden",
                f"the token is for service {claims.service!r} in mesh {claims.mesh!r}; "
                f"dataplane {dataplane.name!r} is service {dataplane.service!r} in mesh "
                f"{dataplane.mesh!r}: use a token for its service",
                CLOSE_FORBIDDEN,
            )
        mesh = await _mesh(store, dataplane.mesh)
        tls = (
            None
            if hello.tls_paths is None
            else TlsFiles(
                hello.tls_paths.certificate, hello.tls_paths.key, hello.tls_paths.trust_bundle
            )
        )
        if mesh.mtls.enabled and tls is None:
            raise Refused(
                "invalid",
                f"hello.tls_paths: mesh {mesh.name!r} has mTLS on; the proxy must send where "
                "it keeps its certificate, key and trust bundle",
                CLOSE_INVALID,
            )
        version = await _register(store, hello.dataplane, dataplane)
    except StoreError as e:
        raise Refused(
            "unavailable", f"the control plane cannot reach its store: {e}", CLOSE_UNAVAILABLE
        ) from None
    session = distributor.register(
        dataplane,
        version,
        tls,
        service=claims.service,
        jti=claims.jti,
        stream=stream,
        applied=hello.applied,
        expires=claims.expires,
    )
    features = hello.proxy.get("features")
    if isinstance(features, list) and TELEMETRY_FEATURE in features:
        # only a proxy that said it speaks them gets telemetry messages (older ones
        # would refuse an unknown type)
        distributor.taps.connected(session.key, claims.service, stream.send, time.monotonic())
    return session


async def _mesh(store: Store, name: str) -> Mesh:
    try:
        resource = await store.get(MESH_KIND, name, name)
    except NotFound:
        raise Refused(
            "invalid",
            f"hello.dataplane: metadata.mesh: mesh {name!r} does not exist; create it first "
            "(meshling apply)",
            CLOSE_INVALID,
        ) from None
    mesh = to_view(resource)
    if not isinstance(mesh, Mesh):
        raise Refused("invalid", f"the stored mesh {name!r} is not valid", CLOSE_INVALID)
    return mesh


async def _register(store: Store, document: dict[str, Any], dataplane: Dataplane) -> int:
    """Store the hello's dataplane (create, or update if it differs); its version."""
    spec = document.get("spec") or {}
    labels = dict(dataplane.labels)
    mesh, name = dataplane.mesh, dataplane.name
    for _ in range(5):
        try:
            existing = await store.get(DATAPLANE_KIND, mesh, name)
        except NotFound:
            try:
                return (await store.create(DATAPLANE_KIND, mesh, name, spec, labels)).version
            except AlreadyExists:
                continue
        if existing.spec.get("service") != dataplane.service:
            raise Refused(
                "forbidden",
                f"dataplane {name!r} in mesh {mesh!r} belongs to service "
                f"{existing.spec.get('service')!r}, not {dataplane.service!r}: give this "
                "proxy another name",
                CLOSE_FORBIDDEN,
            )
        if existing.spec == spec and existing.labels == labels:
            return existing.version
        try:
            return (
                await store.update(
                    DATAPLANE_KIND, mesh, name, spec, labels, version=existing.version
                )
            ).version
        except (Conflict, NotFound):
            continue
    raise StoreError(f"dataplane {name!r} keeps changing under the registration; retry")
