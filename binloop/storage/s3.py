"""The S3/MinIO blob store (the `minio` SDK): one bucket, content-addressed keys, sha256 checked.

Every object carries the sha256 of its bytes as user metadata (x-amz-meta-sha256). A put first
asks for that metadata and skips the upload when the same bytes are already there; a get
recomputes the digest and refuses bytes that no longer match it. Large blobs (models, dataset
snapshots) go up as multipart uploads. S3 failures are mapped onto binloop's error tree:
unreachable endpoint, 5xx, timeouts -> StoreUnavailableError (retry later); missing key ->
MissingBlobError; corrupted bytes -> ChecksumMismatchError.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError
from minio.helpers import DictType

from binloop.errors import (
    ChecksumMismatchError,
    MissingBlobError,
    PermanentError,
    StoreUnavailableError,
)
from binloop.observability import metrics
from binloop.settings import ServiceSettings
from binloop.storage.protocol import BlobExistsError, sha256_hex
from schemas.base import BlobRef

SHA256_METADATA = "sha256"
SHA256_HEADER = "x-amz-meta-sha256"
# S3 allows 5 MiB to 5 GiB per part; 16 MiB keeps a typical ONNX model in one or a few parts.
DEFAULT_PART_SIZE = 16 * 1024 * 1024
DEFAULT_PRESIGN_EXPIRY = timedelta(hours=1)

_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchObject"})
_BUCKET_TAKEN_CODES = frozenset({"BucketAlreadyOwnedByYou", "BucketAlreadyExists"})
# Codes S3 and MinIO answer with when they are busy or briefly broken, or when credentials are
# wrong: all fixable without touching the message, so the message waits instead of dying.
_RETRYABLE_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "XMinioServerNotInitialized",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "XMinioStorageFull",
        "XMinioAdminBucketQuotaExceeded",
    }
)
_EXISTS_CODES = frozenset({"PreconditionFailed"})
"""A create-only put (If-None-Match: *) whose key exists."""
_CONDITIONAL_CONFLICT_CODES = frozenset({"ConditionalRequestConflict"})
"""S3's 409 for a conditional write racing another one on the same key: try again."""
_RETRYABLE_STATUS = frozenset({408, 429})
"""Besides any 5xx: a store that timed out or throttles, whatever code it names."""


def http_client(*, timeout_s: float = 10.0, retries: int = 2) -> urllib3.PoolManager:
    """minio's own default waits five minutes and retries five times; a service that retries
    through its bus wants to hear about an unreachable store within seconds instead."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(
            total=retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
        ),
    )


class S3BlobStore:
    """A bucket on S3 or MinIO. The bucket is created on the first write if it is missing."""

    backend = "s3"

    def __init__(
        self,
        client: Minio,
        bucket: str,
        *,
        endpoint: str,
        part_size: int = DEFAULT_PART_SIZE,
        presigning_client: Minio | None = None,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.endpoint = endpoint
        self.part_size = part_size
        # A URL is signed for the host in it: one that browsers open must name the host they
        # reach the store at, which in a cluster is not the service name this client uses.
        self.presigning_client = presigning_client or client
        self._bucket_ready = False

    @classmethod
    def from_settings(
        cls,
        settings: ServiceSettings,
        *,
        part_size: int = DEFAULT_PART_SIZE,
        timeout_s: float = 10.0,
        retries: int = 2,
    ) -> S3BlobStore:
        def client_for(endpoint: str, secure: bool) -> Minio:
            return Minio(
                endpoint,
                access_key=settings.s3_access_key,
                secret_key=settings.s3_secret_key.get_secret_value(),
                secure=secure,
                region=settings.s3_region,
                http_client=http_client(timeout_s=timeout_s, retries=retries),
            )

        presigning_client = None
        if settings.s3_public_url:
            public = urlsplit(settings.s3_public_url)
            presigning_client = client_for(public.netloc, public.scheme == "https")
        return cls(
            client_for(settings.s3_endpoint, settings.s3_secure),
            settings.s3_bucket,
            endpoint=settings.s3_endpoint,
            part_size=part_size,
            presigning_client=presigning_client,
        )

    @contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        """Translate the SDK's and urllib3's exceptions into binloop's error tree."""
        where = f"{action} {self.uri(key)} at {self.endpoint}"
        try:
            yield
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                raise MissingBlobError(f"no blob at {self.uri(key)} ({exc.code})") from exc
            status = exc.response.status if exc.response is not None else 0
            if exc.code in _RETRYABLE_CODES or status >= 500 or status in _RETRYABLE_STATUS:
                # A full disk or a quota is fixed by an operator, not by changing the blob:
                # the blob waits (and nothing is dead-lettered) until it is.
                raise StoreUnavailableError(f"{where}: {exc.code}: {exc.message}") from exc
            raise PermanentError(f"{where} refused: {exc.code}: {exc.message}") from exc
        except (ServerError, InvalidResponseError) as exc:
            raise StoreUnavailableError(f"{where}: {exc}") from exc
        except urllib3.exceptions.HTTPError as exc:
            # Connection refused, reset, timed out, or 5xx after the client's own retries.
            raise StoreUnavailableError(f"{where}: {type(exc).__name__}: {exc}") from exc

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        with self._errors("create bucket for", ""):
            if not self.client.bucket_exists(self.bucket):
                try:
                    self.client.make_bucket(self.bucket)
                except S3Error as exc:
                    # Another process made it between our check and our create: same outcome.
                    if exc.code not in _BUCKET_TAKEN_CODES:
                        raise
        self._bucket_ready = True

    def stored_sha256(self, key: str) -> str | None:
        """The sha256 recorded with the object, or None when the object (or its record) is not
        there, e.g. an object written through a presigned URL."""
        try:
            with self._errors("stat", key):
                stat = self.client.stat_object(self.bucket, key)
        except MissingBlobError:
            return None
        recorded = stat.metadata.get(SHA256_HEADER) if stat.metadata else None
        return str(recorded) if recorded else None

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> BlobRef:
        digest = sha256_hex(data)
        unchanged = self.stored_sha256(key) == digest
        if not unchanged:
            self._ensure_bucket()
            try:
                self._upload(key, data, content_type, digest)
            except MissingBlobError:
                # Someone removed the bucket after we made it: make it again, once.
                self._bucket_ready = False
                self._ensure_bucket()
                self._upload(key, data, content_type, digest)
        metrics.BLOB_PUTS.labels(self.backend, "unchanged" if unchanged else "written").inc()
        return BlobRef(
            key=key, uri=self.uri(key), sha256=digest, size=len(data), content_type=content_type
        )

    def _upload(self, key: str, data: bytes, content_type: str, digest: str) -> None:
        with self._errors("put", key):
            # Above part_size the SDK switches to a multipart upload, parts sent in parallel.
            self.client.put_object(
                self.bucket,
                key,
                io.BytesIO(data),
                len(data),
                content_type=content_type,
                metadata={SHA256_METADATA: digest},
                part_size=self.part_size,
            )

    def put_new(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> BlobRef:
        """A conditional PutObject (If-None-Match: *, honoured by S3 since 2024, MinIO and
        moto): the store itself refuses a key that exists, so no race between a check and a
        write. Always a single PUT: a multipart upload would need the condition on its
        completion instead."""
        digest = sha256_hex(data)
        headers: DictType = {
            "Content-Type": content_type,
            SHA256_HEADER: digest,
            "If-None-Match": "*",
        }
        self._ensure_bucket()
        try:
            with self._errors("create-only put", key):
                try:
                    # put_object() turns every extra header into x-amz-meta-*: the condition
                    # has to go through the SDK's plain PutObject call.
                    self.client._put_object(self.bucket, key, data, headers=headers)
                except S3Error as exc:
                    if exc.code in _EXISTS_CODES:
                        raise BlobExistsError(f"{self.uri(key)} exists already") from exc
                    if exc.code in _CONDITIONAL_CONFLICT_CODES:
                        raise StoreUnavailableError(
                            f"create-only put {self.uri(key)}: {exc.code}: {exc.message}"
                        ) from exc
                    raise
        except MissingBlobError:
            # Someone removed the bucket after we made it: make it again, once.
            self._bucket_ready = False
            return self.put_new(key, data, content_type)
        metrics.BLOB_PUTS.labels(self.backend, "written").inc()
        return BlobRef(
            key=key, uri=self.uri(key), sha256=digest, size=len(data), content_type=content_type
        )

    def get(self, key: str) -> bytes:
        with self._errors("get", key):
            response = self.client.get_object(self.bucket, key)
            try:
                data = response.read()
                recorded = response.headers.get(SHA256_HEADER)
            finally:
                response.close()
                response.release_conn()
        if recorded:
            actual = sha256_hex(data)
            if actual != recorded:
                raise ChecksumMismatchError(self.uri(key), recorded, actual)
        return data

    def exists(self, key: str) -> bool:
        try:
            with self._errors("stat", key):
                self.client.stat_object(self.bucket, key)
        except MissingBlobError:
            return False
        return True

    def delete(self, key: str) -> None:
        try:
            with self._errors("delete", key):
                self.client.remove_object(self.bucket, key)
        except MissingBlobError:
            return

    def list(self, prefix: str) -> list[str]:
        try:
            with self._errors("list", prefix):
                objects = self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
                return sorted(str(obj.object_name) for obj in objects)
        except MissingBlobError:
            return []

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def presigned_get_url(self, key: str, expires: timedelta = DEFAULT_PRESIGN_EXPIRY) -> str:
        """A URL that reads `key` without credentials until it expires (for Label Studio)."""
        with self._errors("presign GET", key):
            return str(
                self.presigning_client.presigned_get_object(self.bucket, key, expires=expires)
            )

    def presigned_put_url(self, key: str, expires: timedelta = DEFAULT_PRESIGN_EXPIRY) -> str:
        """A URL that writes `key` without credentials until it expires. The uploader must send
        a Content-Type header (some S3 servers store an empty body without one). Such an object
        has no recorded sha256: readers check it against the sha256 of the event instead."""
        self._ensure_bucket()
        with self._errors("presign PUT", key):
            return str(
                self.presigning_client.presigned_put_object(self.bucket, key, expires=expires)
            )
