"""A hub and a bin's leaf node, two real nats-servers with their own JetStream domains: what the
bin stores while the link is down reaches the hub's stream once the link returns, exactly once,
and promotions published at the hub reach the bin. The hub runs the shipped nats.conf (one
server, loopback ports), so the leaf user's permissions are what every sourcing test runs
under; a bin that asks for more is refused."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from binloop.bus import ensure_streams
from binloop.natsserver import NatsServer
from binloop.process import free_port
from edge.streams import (
    BIN_ENGINE_MAX_BYTES,
    CLOUD_ONLY_SUBJECTS,
    EDGE_STREAMS,
    EDGE_SUBJECTS,
    HUB_TO_BIN_SUBJECT,
    bound_bin_engine,
    source_bin_into_hub,
    source_models_into_bin,
)
from schemas.base import BlobRef
from schemas.events import FrameCaptured
from schemas.routes import (
    DATASETS_SNAPSHOT,
    FRAMES_CAPTURED,
    LABELS_ANNOTATED,
    MODELS_PROMOTED,
    STREAMS,
    TRAINING_REQUESTED,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
LEAF_CONF = ROOT / "edge" / "nats" / "leaf.conf"
HUB_CONF = ROOT / "deploy" / "k8s" / "base" / "nats" / "nats.conf"
BIN_ID = "bin-7"
LEAF_USER = "bin"
LEAF_PASSWORD = "s3cret-leaf"


class LinkProxy:
    """The network between bin and hub: a TCP relay the test cuts and restores."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def is_up(self) -> bool:
        return self._server is not None

    async def up(self) -> None:
        self._server = await asyncio.start_server(
            self._relay, "127.0.0.1", self.port, reuse_address=True
        )

    async def down(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        self._server = None

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except ConnectionError:
                pass  # the other direction was cut: the link is down, which is the point
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


@dataclass
class Hub:
    server: NatsServer
    leaf_port: int


def _without_block(text: str, opening: str) -> str:
    """`text` less the `opening {...}` block (braces balanced)."""
    start = text.index(opening)
    depth = 0
    for index in range(start, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[:start] + text[index + 1 :]
    raise AssertionError(f"unbalanced {opening!r} block")


def shipped_hub(
    folder: Path, monkeypatch: pytest.MonkeyPatch, leafnode_tls: str = ""
) -> tuple[NatsServer, int]:
    """deploy/k8s/base/nats/nats.conf as one server on loopback: without the cluster routes,
    the leafnode listener on a free port, `leafnode_tls` as leafnode-tls.conf (the Secret's
    certificate in Kubernetes) and the pod's environment; ports, store folder and pid file
    from the command line. Returns the server, to start, and its leaf port."""
    leaf_port = free_port()
    folder.mkdir()
    text = _without_block(HUB_CONF.read_text(encoding="utf-8"), "cluster {")
    for line in ("port: 7422", "store_dir: /data/jetstream"):
        assert line in text
    text = text.replace("port: 7422", f"listen: 127.0.0.1:{leaf_port}")
    (folder / "nats.conf").write_text(
        text.replace("store_dir: /data/jetstream", ""), encoding="utf-8"
    )
    (folder / "leafnode-tls.conf").write_text(leafnode_tls, encoding="utf-8")
    for name, value in {
        "POD_NAME": "binloop-hub",
        "JETSTREAM_MAX_FILE_STORE": "1GB",
        "LEAF_USER": LEAF_USER,
        "LEAF_PASSWORD": LEAF_PASSWORD,
    }.items():
        monkeypatch.setenv(name, value)
    config = ["-c", str(folder / "nats.conf"), "-m", "-1", "-P", str(folder / "nats.pid")]
    return NatsServer(folder / "js", extra_args=config), leaf_port


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hub]:
    server, leaf_port = shipped_hub(tmp_path / "hub", monkeypatch)
    with server:
        yield Hub(server, leaf_port)


@pytest.fixture
async def link(hub: Hub) -> AsyncIterator[LinkProxy]:
    proxy = LinkProxy(hub.leaf_port)
    await proxy.up()
    yield proxy
    if proxy.is_up:
        await proxy.down()


@pytest.fixture
def leaf(link: LinkProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsServer]:
    """The shipped leaf.conf with the leaf user's password; only the site's TLS include is
    empty on loopback."""
    folder = tmp_path / "leaf-conf"
    folder.mkdir()
    shutil.copy(LEAF_CONF, folder / "leaf.conf")
    (folder / "leaf-auth.conf").write_text("# loopback: no credentials\n", encoding="utf-8")
    monkeypatch.setenv("BINLOOP_BIN_ID", BIN_ID)
    monkeypatch.setenv(
        "BINLOOP_HUB_LEAF_URL", f"nats-leaf://{LEAF_USER}:{LEAF_PASSWORD}@127.0.0.1:{link.port}"
    )
    # -m -1: the config's fixed monitoring port, moved to a free one.
    config = ["-c", str(folder / "leaf.conf"), "-m", "-1"]
    with NatsServer(tmp_path / "leaf-js", extra_args=config) as server:
        yield server


async def _connect(server: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(server.url)
    yield client
    await client.drain()


@pytest.fixture
async def leaf_js(leaf: NatsServer) -> AsyncIterator[JetStreamContext]:
    async for client in _connect(leaf):
        js = client.jetstream()
        await ensure_streams(js)
        await source_models_into_bin(js)  # what `python -m edge.streams bin` does
        await bound_bin_engine(js)
        yield js


def _frame(sequence: int) -> FrameCaptured:
    digest = f"{sequence:064x}"
    return FrameCaptured(
        producer="frame-ingestor",
        bin_id=BIN_ID,
        frame_sha256=digest,
        spool=BlobRef(
            key=f"frames/{BIN_ID}/{digest}.jpg",
            uri=f"file:///spool/{digest}.jpg",
            sha256=digest,
            size=1000,
            content_type="image/jpeg",
        ),
        captured_at=datetime.now(UTC),
        width=160,
        height=120,
        source="test",
        sequence=sequence,
    )


async def _publish(js: JetStreamContext, event: FrameCaptured) -> int:
    ack = await js.publish(
        FRAMES_CAPTURED.subject(BIN_ID),
        event.model_dump_json().encode(),
        headers={"Nats-Msg-Id": str(event.event_id)},
    )
    return ack.seq


class StreamReader:
    """An ordered consumer on the hub's FRAMES stream: what hub-side consumers would read."""

    def __init__(self) -> None:
        self.msg_ids: list[str] = []
        self.sequences: list[int] = []

    async def attach(self, js: JetStreamContext) -> StreamReader:
        self._changed = asyncio.Event()

        async def on_msg(msg: Msg) -> None:
            self.msg_ids.append((msg.headers or {}).get("Nats-Msg-Id", ""))
            self.sequences.append(FrameCaptured.model_validate_json(msg.data).sequence)
            self._changed.set()

        await js.subscribe(FRAMES_CAPTURED.wildcard, cb=on_msg, ordered_consumer=True)
        return self

    async def wait_for_sequence(self, sequence: int, timeout: float = 30) -> None:
        async def loop() -> None:
            while sequence not in self.sequences:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(loop(), timeout)


async def test_events_buffered_at_the_bin_reach_the_hub_exactly_once_after_an_outage(
    hub: Hub, link: LinkProxy, leaf: NatsServer, leaf_js: JetStreamContext
) -> None:
    async for hub_client in _connect(hub.server):
        hub_js = hub_client.jetstream()
        await ensure_streams(hub_js)
        assert await source_bin_into_hub(hub_js, BIN_ID) == list(EDGE_STREAMS)
        assert await source_bin_into_hub(hub_js, BIN_ID) == []  # idempotent
        reader = await StreamReader().attach(hub_js)

        # Online: the first frame crosses (this also waits for the link to come up).
        assert await _publish(leaf_js, _frame(0)) == 1
        await reader.wait_for_sequence(0)

        # Offline: the bin's own JetStream keeps acking, and deduplicating redeliveries.
        await link.down()
        offline = [_frame(sequence) for sequence in range(1, 21)]
        for event in offline:
            await _publish(leaf_js, event)
        assert await _publish(leaf_js, offline[4]) == 6  # same Nats-Msg-Id: the stored seq
        assert (await leaf_js.stream_info("FRAMES")).state.messages == 21
        assert reader.sequences == [0]
        assert (await hub_js.stream_info("FRAMES")).state.messages == 1

        # Back online: the hub's source resumes where it stopped.
        await link.up()
        await _publish(leaf_js, _frame(99))
        # Sourcing keeps order: once the last frame is in, everything before it is too.
        # A source that stalled is retried with JetStream's own backoff (10 s, then 20 s).
        await reader.wait_for_sequence(99, timeout=90)
        expected = [0, *(e.sequence for e in offline), 99]
        assert reader.sequences == expected
        assert len(set(reader.msg_ids)) == len(expected)
        info = await hub_js.stream_info("FRAMES")
        assert info.state.messages == len(expected)
        assert [source.name for source in info.config.sources or []] == ["FRAMES"]
    # The outage was real: the bin's server saw its link to the hub close and come back.
    log = "\n".join(leaf.log_tail)
    assert log.count("Leafnode connection created") >= 2
    assert "Leafnode connection closed" in log


async def test_cloud_services_starting_keep_the_hubs_sources(hub: Hub) -> None:
    async for hub_client in _connect(hub.server):
        hub_js = hub_client.jetstream()
        await ensure_streams(hub_js)
        await source_bin_into_hub(hub_js, BIN_ID)
        await ensure_streams(hub_js)  # what every cloud service does when it starts
        info = await hub_js.stream_info("FRAMES")
        assert [s.name for s in info.config.sources or []] == ["FRAMES"]


async def test_promotions_published_at_the_hub_reach_the_bin(
    hub: Hub, leaf_js: JetStreamContext
) -> None:
    arrived: asyncio.Queue[Msg] = asyncio.Queue()
    await leaf_js.subscribe(MODELS_PROMOTED.wildcard, cb=arrived.put, ordered_consumer=True)
    async for hub_client in _connect(hub.server):
        hub_js = hub_client.jetstream()
        await ensure_streams(hub_js)
        msg_id = str(uuid.uuid4())
        ack = await hub_js.publish(
            MODELS_PROMOTED.subject(), b'{"probe": true}', headers={"Nats-Msg-Id": msg_id}
        )
        assert ack.stream == "ENGINE"
        msg = await asyncio.wait_for(arrived.get(), 30)
        assert msg.headers is not None
        assert msg.headers["Nats-Msg-Id"] == msg_id
        assert arrived.empty()
        assert (await leaf_js.stream_info("ENGINE")).state.messages == 1


def test_leaf_config_denies_what_sourcing_carries() -> None:
    """Plain forwarding next to sourcing would store every edge event twice at the hub."""
    text = LEAF_CONF.read_text(encoding="utf-8")
    exports = re.search(r"deny_exports:\s*\[([^\]]*)\]", text)
    imports = re.search(r"deny_imports:\s*\[([^\]]*)\]", text)
    assert exports is not None
    assert imports is not None
    assert re.findall(r'"([^"]+)"', exports.group(1)) == list(EDGE_SUBJECTS)
    assert re.findall(r'"([^"]+)"', imports.group(1)) == [
        *EDGE_SUBJECTS,
        HUB_TO_BIN_SUBJECT,
        *CLOUD_ONLY_SUBJECTS,
    ]
    assert "domain: $BINLOOP_BIN_ID" in text


def _issue_tls(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 signed by it: (ca, cert, key) PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)

    def build(
        subject: str,
        issuer: x509.Name | None,
        key: ec.EllipticCurvePrivateKey,
        signer: ec.EllipticCurvePrivateKey,
        ca: bool,
    ) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            address = ipaddress.ip_address("127.0.0.1")
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(address)]), critical=False
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = build("binloop test CA", None, ca_key, ca_key, ca=True)
    hub_key = ec.generate_private_key(ec.SECP256R1())
    hub_cert = build("hub", ca_cert.subject, hub_key, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    paths = folder / "ca.pem", folder / "hub.pem", folder / "hub-key.pem"
    paths[0].write_bytes(ca_cert.public_bytes(pem))
    paths[1].write_bytes(hub_cert.public_bytes(pem))
    paths[2].write_bytes(
        hub_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


async def test_a_bin_joins_a_hub_that_wants_tls_and_a_password_with_the_shipped_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub as deploy/k8s/base/nats/nats.conf and leafnode-tls.conf ship it (the leaf user,
    TLS), the bin as edge/nats/leaf.conf + leaf-auth.conf ship."""
    ca, cert, key = _issue_tls(tmp_path)
    tls = (HUB_CONF.parent / "leafnode-tls.conf").read_text(encoding="utf-8")
    tls = tls.replace("/etc/nats-leaf-tls/tls.crt", str(cert))
    tls = tls.replace("/etc/nats-leaf-tls/tls.key", str(key))
    hub, leaf_port = shipped_hub(tmp_path / "hub", monkeypatch, leafnode_tls=tls)
    folder = tmp_path / "leaf-conf"
    folder.mkdir()
    shutil.copy(LEAF_CONF, folder / "leaf.conf")
    shutil.copy(LEAF_CONF.with_name("leaf-auth.conf"), folder / "leaf-auth.conf")
    monkeypatch.setenv("BINLOOP_BIN_ID", BIN_ID)
    monkeypatch.setenv("BINLOOP_HUB_CA_FILE", str(ca))
    monkeypatch.setenv(
        "BINLOOP_HUB_LEAF_URL", f"tls://{LEAF_USER}:{LEAF_PASSWORD}@127.0.0.1:{leaf_port}"
    )
    with (
        hub,
        NatsServer(
            tmp_path / "leaf-js", extra_args=["-c", str(folder / "leaf.conf"), "-m", "-1"]
        ) as leaf,
    ):
        async for leaf_client in _connect(leaf):
            leaf_js = leaf_client.jetstream()
            await ensure_streams(leaf_js)
            await source_models_into_bin(leaf_js)
            arrived: asyncio.Queue[Msg] = asyncio.Queue()
            await leaf_js.subscribe(MODELS_PROMOTED.wildcard, cb=arrived.put, ordered_consumer=True)
            async for hub_client in _connect(hub):
                hub_js = hub_client.jetstream()
                await ensure_streams(hub_js)
                await hub_js.publish(MODELS_PROMOTED.subject(), b'{"probe": true}')
                msg = await asyncio.wait_for(arrived.get(), 30)  # only across the TLS link
                assert msg.data == b'{"probe": true}'


async def test_a_bin_stores_only_the_cloud_events_it_reads(
    hub: Hub, leaf_js: JetStreamContext
) -> None:
    """The bin's ENGINE stream has the hub's subjects: whatever the leaf imports of labels.*,
    datasets.* and training.* (the whole fleet's, read by no edge service) it would keep for the
    stream's year, until the bin's store is full."""
    arrived: asyncio.Queue[Msg] = asyncio.Queue()
    await leaf_js.subscribe(MODELS_PROMOTED.wildcard, cb=arrived.put, ordered_consumer=True)
    async for hub_client in _connect(hub.server):
        hub_js = hub_client.jetstream()
        await ensure_streams(hub_js)
        await asyncio.sleep(1)  # the leaf's interest reaches the hub
        for route in (LABELS_ANNOTATED, DATASETS_SNAPSHOT, TRAINING_REQUESTED):
            await hub_js.publish(route.subject(), b'{"probe": true}')
        # A promotion, which the bin does read (sourced), published last, as the barrier.
        await hub_js.publish(MODELS_PROMOTED.subject(), b'{"probe": true}')
        await asyncio.wait_for(arrived.get(), 30)
        await asyncio.sleep(1)  # plain messages cross on another path than the sourcing
        info = await leaf_js.stream_info("ENGINE", subjects_filter=">")
        assert sorted(info.state.subjects or {}) == [MODELS_PROMOTED.subject()]


async def test_the_bins_engine_is_capped_and_a_service_start_keeps_the_cap(
    hub: Hub, leaf_js: JetStreamContext
) -> None:
    """Beside the rare promotions, the bin's ENGINE keeps the fleet's samples.selected (its
    subject names no bin): capped in bytes on the bin only, whatever the hub keeps."""
    await ensure_streams(leaf_js)  # what each edge service does when it starts
    engine = (await leaf_js.stream_info("ENGINE")).config
    assert engine.max_bytes == BIN_ENGINE_MAX_BYTES
    assert [source.name for source in engine.sources or []] == ["ENGINE"]
    assert not await bound_bin_engine(leaf_js)  # idempotent
    async for hub_client in _connect(hub.server):
        hub_js = hub_client.jetstream()
        await ensure_streams(hub_js)
        hub_engine = (await hub_js.stream_info("ENGINE")).config
        assert hub_engine.max_bytes == -1
        assert hub_engine.max_age == STREAMS["ENGINE"].max_age_s


async def test_a_bin_cannot_delete_the_hubs_streams(
    hub: Hub, leaf: NatsServer, leaf_js: JetStreamContext
) -> None:
    """The leaf password sits on every bin in the field: with it, a bin must not have the hub's
    JetStream API (here: deleting the ENGINE stream, every sample, label, dataset, training and
    model decision)."""
    arrived: asyncio.Queue[Msg] = asyncio.Queue()
    await leaf_js.subscribe(MODELS_PROMOTED.wildcard, cb=arrived.put, ordered_consumer=True)
    async for hub_client in _connect(hub.server):
        hub_js = hub_client.jetstream()
        await ensure_streams(hub_js)
        # The link is up and the bin's sourcing works under the leaf user's permissions.
        await hub_js.publish(MODELS_PROMOTED.subject(), b'{"probe": true}')
        await asyncio.wait_for(arrived.get(), 30)
        async for leaf_client in _connect(leaf):
            # Refused or unanswered, both are right.
            with contextlib.suppress(nats.errors.Error):
                await leaf_client.request("$JS.hub.API.STREAM.DELETE.ENGINE", b"", timeout=5)
        assert "ENGINE" in {info.config.name for info in await hub_js.streams_info()}


async def _rogue_leaf(port: int, subject: str) -> bytes:
    """A leaf node that ignores what the hub allows it (a tampered bin): it logs in as the leaf
    user and sends `subject` as its server would, whatever the permissions. The hub's answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()  # INFO
    connect = {"user": LEAF_USER, "pass": LEAF_PASSWORD, "headers": True, "name": "rogue"}
    writer.write(f"CONNECT {json.dumps(connect)}\r\nPING\r\n".encode())
    writer.write(f"LMSG {subject} 2\r\n{{}}\r\nPING\r\n".encode())
    await writer.drain()
    answers = b""
    with contextlib.suppress(TimeoutError):
        while chunk := await asyncio.wait_for(reader.read(65536), 2):
            answers += chunk
    writer.close()
    return answers


@pytest.mark.parametrize(
    "subject",
    [
        "$JS.hub.API.STREAM.DELETE.ENGINE",
        "$JS.hub.API.STREAM.PURGE.ENGINE",
        "$JS.API.STREAM.DELETE.ENGINE",
        "$JS.hub.API.CONSUMER.DELETE.ENGINE.sampler",
        MODELS_PROMOTED.subject(),
        TRAINING_REQUESTED.subject(),
        DATASETS_SNAPSHOT.subject(),
        LABELS_ANNOTATED.subject(),
    ],
)
async def test_the_hub_refuses_a_tampered_bin_its_api_and_the_clouds_subjects(
    hub: Hub, subject: str
) -> None:
    """The hub enforces the leaf user's permissions itself: a bin whose own server was changed
    to ignore them still cannot manage the hub's streams and consumers or publish the cloud's
    events."""
    async for hub_client in _connect(hub.server):
        hub_js = hub_client.jetstream()
        await ensure_streams(hub_js)
        await hub_js.publish(MODELS_PROMOTED.subject(), b'{"probe": true}')
        await hub_js.add_consumer("ENGINE", durable_name="sampler")
        answers = await _rogue_leaf(hub.leaf_port, subject)
        assert b"PONG" in answers  # it was logged in
        assert b"Permissions Violation" in answers, answers
        engine = await hub_js.stream_info("ENGINE")
        assert engine.state.messages == 1
        assert (await hub_js.consumer_info("ENGINE", "sampler")).name == "sampler"
