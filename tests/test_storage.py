"""The blob stores: one behaviour suite run on the local folder and on S3 (moto over real HTTP),
then what only S3 has: bucket creation, multipart, presigned URLs, an endpoint that is down."""

from __future__ import annotations

import http.server
import io
import os
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from binloop.errors import (
    ChecksumMismatchError,
    MissingBlobError,
    StoreUnavailableError,
    TransientError,
    UnknownUriError,
)
from binloop.settings import ServiceSettings
from binloop.storage import (
    BlobExistsError,
    BlobStore,
    LocalBlobStore,
    PresigningStore,
    S3BlobStore,
    frame_key,
    open_store,
    read_verified,
    sha256_hex,
)
from binloop.storage.s3 import SHA256_METADATA
from schemas.base import BlobRef

if TYPE_CHECKING:
    from tests.s3fixture import MotoS3
pytest_plugins = ["tests.s3fixture"]

MIB = 1024 * 1024
SEED = Path(__file__).resolve().parent.parent / "data" / "demo" / "seed"
CAPTURED_AT = datetime(2025, 1, 1, tzinfo=UTC)


@dataclass
class Backend:
    """A store under test, and a way to change an object's bytes behind the store's back."""

    name: str
    store: BlobStore
    tamper: Callable[[str, bytes], None]


def _local_backend(tmp_path: Path) -> Backend:
    store = LocalBlobStore(tmp_path / "blobs")
    return Backend("local", store, lambda key, data: (store.root / key).write_bytes(data))


def _s3_backend(overrides: dict[str, Any]) -> Backend:
    store = open_store(ServiceSettings(**overrides))
    assert isinstance(store, S3BlobStore)

    def tamper(key: str, data: bytes) -> None:
        # Keep the recorded sha256 of the original bytes: what bit rot or a rogue writer leaves.
        recorded = store.stored_sha256(key)
        assert recorded is not None
        store.client.put_object(
            store.bucket, key, io.BytesIO(data), len(data), metadata={SHA256_METADATA: recorded}
        )

    return Backend("s3", store, tamper)


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        return _local_backend(tmp_path)
    return _s3_backend(request.getfixturevalue("s3_overrides"))


def _puts(backend: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "binloop_blob_puts_total", {"backend": backend, "outcome": outcome}
    )
    return value or 0.0


def _photo() -> bytes:
    return min(SEED.glob("*/*.jpg")).read_bytes()


# ---- the same behaviour on every backend --------------------------------------------------


def test_put_then_get_returns_the_bytes_and_a_reference_to_them(backend: Backend) -> None:
    data = _photo()
    key = frame_key("bin-1", CAPTURED_AT, sha256_hex(data))

    ref = backend.store.put(key, data, "image/jpeg")

    assert backend.store.get(key) == data
    assert (ref.key, ref.sha256, ref.size, ref.content_type) == (
        key,
        sha256_hex(data),
        len(data),
        "image/jpeg",
    )
    assert ref.uri == backend.store.uri(key)
    assert ref.uri.startswith({"local": "file:///", "s3": "s3://"}[backend.name])
    assert read_verified(ref) == data


def test_a_create_only_put_writes_a_new_key_and_refuses_an_existing_one(
    backend: Backend,
) -> None:
    store = backend.store
    key = "models/m/v00001/claim.json"

    ref = store.put_new(key, b"first", "application/json")

    assert (ref.key, ref.sha256, ref.size) == (key, sha256_hex(b"first"), 5)
    assert read_verified(ref) == b"first"
    for data in (b"second", b"first"):  # even the same bytes: the key is taken
        with pytest.raises(BlobExistsError, match="exists already"):
            store.put_new(key, data, "application/json")
    assert store.get(key) == b"first"
    assert store.list("models/m/") == [key]  # no temporary file left behind


def test_a_create_only_put_refuses_a_key_an_ordinary_put_wrote(backend: Backend) -> None:
    backend.store.put("models/m/v00002/model.onnx", b"onnx")
    with pytest.raises(BlobExistsError):
        backend.store.put_new("models/m/v00002/model.onnx", b"other")
    assert backend.store.get("models/m/v00002/model.onnx") == b"onnx"


def test_of_racing_create_only_puts_exactly_one_wins(backend: Backend) -> None:
    key = "models/m/v00003/claim.json"
    won: list[bytes] = []
    lost: list[bytes] = []

    def write(data: bytes) -> None:
        try:
            backend.store.put_new(key, data)
        except BlobExistsError:
            lost.append(data)
        else:
            won.append(data)

    writers = [threading.Thread(target=write, args=(b"writer-%d" % n,)) for n in range(8)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert (len(won), len(lost)) == (1, 7)
    assert backend.store.get(key) == won[0]


def test_exists_list_and_delete(backend: Backend) -> None:
    store = backend.store
    for key in ["models/m/v00001/model.onnx", "models/m/v00002/model.onnx", "datasets/d/a.json"]:
        store.put(key, key.encode())

    assert store.exists("models/m/v00001/model.onnx")
    assert not store.exists("models/m/v00003/model.onnx")
    assert store.list("models/m/") == ["models/m/v00001/model.onnx", "models/m/v00002/model.onnx"]
    assert store.list("models/m/v00002") == ["models/m/v00002/model.onnx"]
    assert store.list("labels/") == []

    store.delete("models/m/v00001/model.onnx")
    store.delete("models/m/v00001/model.onnx")  # gone already: still fine

    assert not store.exists("models/m/v00001/model.onnx")
    assert store.list("models/") == ["models/m/v00002/model.onnx"]
    with pytest.raises(MissingBlobError, match=r"v00001/model\.onnx"):
        store.get("models/m/v00001/model.onnx")


def test_a_repeated_put_of_the_same_bytes_writes_nothing(backend: Backend) -> None:
    written, unchanged = _puts(backend.name, "written"), _puts(backend.name, "unchanged")
    first = backend.store.put("datasets/d/v00001/manifest.json", b'{"v": 1}', "application/json")
    again = backend.store.put("datasets/d/v00001/manifest.json", b'{"v": 1}', "application/json")

    assert again == first
    assert _puts(backend.name, "written") == written + 1
    assert _puts(backend.name, "unchanged") == unchanged + 1

    # Different bytes under the same key are a real write, and the new bytes win.
    backend.store.put("datasets/d/v00001/manifest.json", b'{"v": 2}', "application/json")
    assert _puts(backend.name, "written") == written + 2
    assert backend.store.get("datasets/d/v00001/manifest.json") == b'{"v": 2}'


def test_read_verified_refuses_a_reference_that_promises_other_bytes(backend: Backend) -> None:
    ref = backend.store.put("labels/d/a.json", b"real")
    lying = ref.model_copy(update={"sha256": sha256_hex(b"promised")})

    with pytest.raises(ChecksumMismatchError) as caught:
        read_verified(lying)

    assert caught.value.expected == sha256_hex(b"promised")
    assert caught.value.actual == sha256_hex(b"real")
    assert ref.uri in str(caught.value)


def test_bytes_changed_behind_the_store_are_rejected(backend: Backend) -> None:
    data = _photo()
    ref = backend.store.put(f"frames/bin-1/2025/01/01/{sha256_hex(data)}.jpg", data, "image/jpeg")
    backend.tamper(ref.key, data[:-10] + b"corrupted!")

    with pytest.raises(ChecksumMismatchError, match=ref.sha256):
        read_verified(ref)


def test_a_missing_blob_is_a_permanent_missing_blob_error(backend: Backend) -> None:
    ref = backend.store.put("frames/bin-1/x.jpg", b"x")
    backend.store.delete(ref.key)

    with pytest.raises(MissingBlobError, match=r"frames/bin-1/x\.jpg"):
        read_verified(ref)
    with pytest.raises(MissingBlobError):
        backend.store.get(ref.key)


# ---- S3 only ------------------------------------------------------------------------------


@pytest.fixture
def s3_store(s3_overrides: dict[str, Any]) -> S3BlobStore:
    store = open_store(ServiceSettings(**s3_overrides))
    assert isinstance(store, S3BlobStore)
    return store


def test_open_store_picks_the_backend_from_settings(
    tmp_path: Path, s3_overrides: dict[str, Any]
) -> None:
    local = open_store(ServiceSettings(blob_root=tmp_path / "b"))
    s3 = open_store(ServiceSettings(**s3_overrides))

    assert isinstance(local, LocalBlobStore)
    assert local.root == (tmp_path / "b").resolve()
    assert isinstance(s3, S3BlobStore)
    assert s3.bucket == s3_overrides["s3_bucket"]
    assert isinstance(s3, PresigningStore)
    assert not isinstance(local, PresigningStore)


def test_the_bucket_is_created_on_the_first_write(s3_store: S3BlobStore) -> None:
    assert not s3_store.client.bucket_exists(s3_store.bucket)
    # Reads of a bucket that does not exist yet see an empty store.
    assert s3_store.list("") == []
    assert not s3_store.exists("a")
    with pytest.raises(MissingBlobError):
        s3_store.get("a")

    s3_store.put("a", b"first")

    assert s3_store.client.bucket_exists(s3_store.bucket)
    assert s3_store.list("") == ["a"]


def test_a_bucket_removed_behind_the_store_is_made_again(s3_store: S3BlobStore) -> None:
    s3_store.put("a", b"first")
    s3_store.client.remove_object(s3_store.bucket, "a")
    s3_store.client.remove_bucket(s3_store.bucket)

    s3_store.put("b", b"second")

    assert s3_store.list("") == ["b"]


def test_objects_carry_their_sha256_as_metadata(s3_store: S3BlobStore) -> None:
    ref = s3_store.put("models/m/v00001/card.json", b"{}", "application/json")
    stat = s3_store.client.stat_object(s3_store.bucket, ref.key)

    assert stat.metadata is not None
    assert stat.metadata["x-amz-meta-sha256"] == sha256_hex(b"{}")
    assert stat.content_type == "application/json"


def test_a_large_artifact_goes_up_in_parts_and_comes_back_whole(
    s3_overrides: dict[str, Any],
) -> None:
    store = S3BlobStore.from_settings(ServiceSettings(**s3_overrides), part_size=5 * MIB)
    artifact = os.urandom(11 * MIB)

    ref = store.put("models/m/v00001/model.onnx", artifact)

    etag = store.client.stat_object(store.bucket, ref.key).etag
    assert etag is not None
    assert etag.endswith("-3"), f"expected a 3-part upload, etag {etag}"
    assert store.get(ref.key) == artifact
    assert store.stored_sha256(ref.key) == sha256_hex(artifact)
    unchanged = _puts("s3", "unchanged")
    store.put(ref.key, artifact)
    assert _puts("s3", "unchanged") == unchanged + 1


def test_a_presigned_get_url_reads_the_object_without_credentials(s3_store: S3BlobStore) -> None:
    data = _photo()
    ref = s3_store.put(f"frames/bin-1/2025/01/01/{sha256_hex(data)}.jpg", data, "image/jpeg")

    url = s3_store.presigned_get_url(ref.key)
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"] == "image/jpeg"
        assert response.read() == data


def test_a_presigned_put_url_writes_an_object_readers_can_verify(s3_store: S3BlobStore) -> None:
    data = _photo()
    key = f"frames/bin-2/2025/01/01/{sha256_hex(data)}.jpg"

    url = s3_store.presigned_put_url(key)
    # Without a Content-Type moto stores an empty body, so a client must always send one.
    request = urllib.request.Request(
        url, data=data, method="PUT", headers={"Content-Type": "image/jpeg"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200

    assert s3_store.get(key) == data
    assert s3_store.stored_sha256(key) is None  # nobody recorded one: the event's sha256 rules
    ref = BlobRef(key=key, uri=s3_store.uri(key), sha256=sha256_hex(data), size=len(data))
    assert read_verified(ref) == data


def test_presigned_urls_name_the_public_host_that_browsers_reach(
    s3_overrides: dict[str, Any],
) -> None:
    """In a cluster the services reach the store as minio:9000, which a browser cannot; with
    s3_public_url the URLs name (and are signed for) the public host, and they still work."""
    endpoint = s3_overrides["s3_endpoint"]
    public_url = "http://localhost:" + endpoint.rsplit(":", 1)[1]
    store = S3BlobStore.from_settings(ServiceSettings(**s3_overrides, s3_public_url=public_url))
    data = _photo()
    ref = store.put(f"frames/bin-3/2025/01/01/{sha256_hex(data)}.jpg", data, "image/jpeg")

    url = store.presigned_get_url(ref.key)

    assert url.startswith(f"{public_url}/{store.bucket}/"), url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == data
    put_url = store.presigned_put_url(ref.key + ".copy")
    assert put_url.startswith(f"{public_url}/"), put_url
    # The host is part of what is signed (moto does not check signatures; MinIO and S3 do).
    assert "X-Amz-SignedHeaders=host" in url


@pytest.mark.parametrize("bad", ["minio:9000", "ftp://files.example.org", "https://a/b"])
def test_s3_public_url_must_be_a_bare_http_base_url(bad: str) -> None:
    with pytest.raises(ValidationError, match="s3_public_url"):
        ServiceSettings(s3_public_url=bad)


def test_read_verified_needs_an_open_store_for_the_bucket() -> None:
    ref = BlobRef(key="k", uri="s3://nobody-opened-this/k", sha256="0" * 64, size=1)
    with pytest.raises(UnknownUriError, match="nobody-opened-this"):
        read_verified(ref)
    with pytest.raises(UnknownUriError, match="gs://"):
        read_verified(ref.model_copy(update={"uri": "gs://b/k"}))


# ---- an endpoint that is down or broken ---------------------------------------------------


def _fast_failing(overrides: dict[str, Any]) -> S3BlobStore:
    return S3BlobStore.from_settings(ServiceSettings(**overrides), timeout_s=2.0, retries=0)


def test_a_store_that_goes_down_is_unavailable_then_serves_again(own_moto_s3: MotoS3) -> None:
    server = own_moto_s3
    store = _fast_failing(server.overrides())
    ref = store.put("frames/bin-1/a.jpg", b"frame", "image/jpeg")
    server.stop()

    operations: list[Callable[[], object]] = [
        lambda: store.get(ref.key),
        lambda: store.put("frames/bin-1/b.jpg", b"other"),
        lambda: store.exists(ref.key),
        lambda: store.list("frames/"),
        lambda: store.delete(ref.key),
    ]
    for operation in operations:
        with pytest.raises(StoreUnavailableError, match=server.endpoint) as caught:
            operation()
        assert isinstance(caught.value, TransientError)

    server.start()
    assert store.get(ref.key) == b"frame"
    assert store.list("frames/") == ["frames/bin-1/a.jpg"]


def test_a_closed_port_is_unavailable_not_missing(own_moto_s3: MotoS3) -> None:
    own_moto_s3.stop()
    store = _fast_failing(own_moto_s3.overrides())

    with pytest.raises(StoreUnavailableError, match=r"ConnectionRefused|MaxRetryError"):
        store.put("a", b"a")


class _Overloaded(http.server.BaseHTTPRequestHandler):
    """Answers every request like an S3 front end that is overloaded."""

    status = 503
    code = "SlowDown"

    def _unavailable(self) -> None:
        body = f"<Error><Code>{self.code}</Code><Message>not now</Message></Error>".encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_DELETE = _unavailable

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(
    params=[(503, "SlowDown"), (507, "XMinioStorageFull"), (429, "NoSuchCodeAnywhere")],
    ids=["overloaded", "disk-full", "throttled"],
)
def overloaded_endpoint(request: pytest.FixtureRequest) -> Iterator[str]:
    status, code = request.param
    handler = type("_Answer", (_Overloaded,), {"status": status, "code": code})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_a_busy_full_or_throttling_store_is_unavailable_not_refused(
    overloaded_endpoint: str, moto_s3: MotoS3
) -> None:
    """Nothing is dead-lettered for what an operator fixes: the blob waits."""
    overrides = {**moto_s3.overrides(), "s3_endpoint": overloaded_endpoint}
    store = _fast_failing(overrides)

    for operation in (lambda: store.get("a"), lambda: store.put("a", b"a")):
        with pytest.raises(StoreUnavailableError, match=overloaded_endpoint):
            operation()


def test_a_file_uri_is_read_only_inside_a_served_folder_and_at_its_promised_size(
    tmp_path: Path,
) -> None:
    from binloop.errors import PermanentError, UnknownUriError
    from binloop.storage import LocalBlobStore, read_verified

    store = LocalBlobStore(tmp_path / "served")
    ref = store.put("a/b.bin", b"hello")
    assert read_verified(ref) == b"hello"

    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(b"hello")
    with pytest.raises(UnknownUriError, match="outside every blob folder"):
        read_verified(ref.model_copy(update={"uri": outside.as_uri()}))
    with pytest.raises(UnknownUriError):
        read_verified(ref.model_copy(update={"uri": "file:///dev/zero"}))
    with pytest.raises(PermanentError, match="promised 4"):
        read_verified(ref.model_copy(update={"size": 4}))


def test_a_local_store_reads_a_blob_only_at_its_promised_size(tmp_path: Path) -> None:
    from binloop.errors import PermanentError

    store = LocalBlobStore(tmp_path / "served")
    store.put("a/b.bin", b"hello")
    (tmp_path / "served" / "folder").mkdir()
    assert store.read_sized("a/b.bin", 5) == b"hello"
    with pytest.raises(PermanentError, match="holds 5 bytes; the reference promised 4"):
        store.read_sized("a/b.bin", 4)
    with pytest.raises(MissingBlobError):
        store.read_sized("a/missing.bin", 5)
    with pytest.raises(MissingBlobError):
        store.read_sized("a/b.bin/below-a-file", 5)
    with pytest.raises(MissingBlobError):
        store.read_sized("folder", 0)
    os.mkfifo(tmp_path / "served" / "pipe")  # opened without blocking, then refused
    with pytest.raises(MissingBlobError, match="not a regular file"):
        store.read_sized("pipe", 0)


def test_a_local_store_refuses_keys_that_lead_out_of_its_folder(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "store")
    (tmp_path / "store-next-door").mkdir()
    (tmp_path / "store-next-door" / "f").write_bytes(b"outside")
    (tmp_path / "store" / "out").symlink_to(tmp_path / "store-next-door")
    for key in ("../store-next-door/f", "a/../../store-next-door/f", "/etc/hostname", "out/f"):
        with pytest.raises(UnknownUriError, match="escapes the store root"):
            store.read_sized(key, 7)
        with pytest.raises(UnknownUriError):
            store.put(key, b"x")
    store.put("a/../b.bin", b"inside")
    assert store.read_sized("b.bin", 6) == b"inside"
    assert (tmp_path / "store" / "b.bin").read_bytes() == b"inside"
