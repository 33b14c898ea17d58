"""Where frames come from: an image folder, a video file, a camera or stream, or a replay file.

Every source yields SourceFrame tuples (JPEG bytes, size, ground truth, description) for one
pass. What it cannot read it reports through `on_skip` and moves on; a source that cannot be
opened at all is an error (ConfigError), and so is a camera or stream that is lost for good
(SourceLostError): the capture must not go quiet while the service reports healthy.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import NamedTuple, Protocol

import cv2
import numpy as np
from pydantic import ValidationError

from binloop.errors import BinloopError, ConfigError, CorruptFrameError
from binloop.replay import ReplayStats, iter_replay_file
from binloop.storage import sha256_hex
from schemas.base import read_json
from schemas.events import FrameCaptured
from schemas.routes import FRAMES_CAPTURED, route_for_subject
from services.frame_ingestor.jpeg import as_jpeg, encode_jpeg

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
STREAM_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://")
REPLAY_SUFFIX = ".jsonl"
DESCRIPTION_MAX = 512
# A live stream that drops (RTSP hiccup, camera re-plugged) is reopened this often, this far
# apart, before the capture gives up on it; the same delay paces retries of the first open.
RECONNECT_ATTEMPTS = 5
RECONNECT_DELAY_S = 2.0

SkipHandler = Callable[[str, str], None]
"""on_skip(reason, detail): a frame the source could not use, and why."""


class SourceLostError(BinloopError):
    """A camera or stream that delivered no frame through all its reconnects. Raised out of the
    capture so the service turns unhealthy and its supervisor restarts it."""


class VideoCaptureLike(Protocol):
    """What VideoSource uses of cv2.VideoCapture (a seam for tests without a camera)."""

    def isOpened(self) -> bool: ...  # OpenCV's spelling

    def read(self) -> tuple[bool, object]: ...

    def release(self) -> None: ...


def open_with_opencv(target: str | int) -> VideoCaptureLike:
    return cv2.VideoCapture(target)


class SourceFrame(NamedTuple):
    jpeg: bytes
    width: int
    height: int
    ground_truth: str | None
    description: str


class FrameSource(Protocol):
    description: str

    @property
    def finite(self) -> bool:
        """True when a pass ends (folder, file); a camera or stream runs until stopped."""
        ...

    def frames(self, on_skip: SkipHandler) -> Generator[SourceFrame, None, None]:
        """One pass over the source. Closing the generator releases what it opened."""
        ...


def label_from_folder(name: str) -> str | None:
    """A folder name as a label: lower case, runs of other characters become one underscore."""
    label = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")[:64]
    return label or None


class ImageFolderSource:
    """Images under a folder, in sorted path order. With `labels_from_folders`, the folder an
    image sits in (ImageFolder layout: root/<class>/<image>) is its ground truth."""

    finite = True

    def __init__(self, root: Path, *, labels_from_folders: bool, jpeg_quality: int) -> None:
        if not root.is_dir():
            raise ConfigError(f"image folder {root} does not exist")
        self.root = root
        self.labels_from_folders = labels_from_folders
        self.jpeg_quality = jpeg_quality
        self.files = sorted(
            path
            for path in root.rglob("*")
            if path.suffix.lower() in IMAGE_SUFFIXES
            and path.is_file()
            and not any(part.startswith(".") for part in path.relative_to(root).parts)
        )
        if not self.files:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            raise ConfigError(f"image folder {root} holds no images ({suffixes})")
        self.description = f"folder:{root}"

    def _label(self, relative: Path) -> str | None:
        if not self.labels_from_folders or len(relative.parts) < 2:
            return None  # an image directly in the root has no class folder
        # The class folder right under the root, the trainer's rule too
        # (binloop.datasets.scan_image_folder): glass/bottles/b.jpg is glass.
        return label_from_folder(relative.parts[0])

    def frames(self, on_skip: SkipHandler) -> Generator[SourceFrame, None, None]:
        for path in self.files:
            relative = path.relative_to(self.root)
            try:
                jpeg = as_jpeg(path.read_bytes(), self.jpeg_quality)
            except OSError as exc:
                on_skip("unreadable", f"{path}: {exc}")
                continue
            except CorruptFrameError as exc:
                on_skip("corrupt", f"{path}: {exc}")
                continue
            description = f"folder:{relative.as_posix()}"[:DESCRIPTION_MAX]
            yield SourceFrame(
                jpeg.data, jpeg.width, jpeg.height, self._label(relative), description
            )


class VideoSource:
    """A video file, a camera index or a stream URL, read with cv2.VideoCapture.

    A live source (camera, stream) runs until stopped: when reads fail it is reopened up to
    `reconnect_attempts` times, `reconnect_delay_s` apart, and an open that delivers no frame
    counts as a failed attempt; after that the pass raises SourceLostError."""

    def __init__(
        self,
        target: str | int,
        *,
        live: bool,
        jpeg_quality: int,
        opener: Callable[[str | int], VideoCaptureLike] = open_with_opencv,
        reconnect_attempts: int = RECONNECT_ATTEMPTS,
        reconnect_delay_s: float = RECONNECT_DELAY_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.target = target
        self.live = live
        self.jpeg_quality = jpeg_quality
        self.opener = opener
        self.reconnect_attempts = reconnect_attempts
        self.reconnect_delay_s = reconnect_delay_s
        self.sleep = sleep
        kind = "camera" if isinstance(target, int) else "stream" if live else "video"
        self.description = f"{kind}:{target}"[:DESCRIPTION_MAX]

    @property
    def finite(self) -> bool:
        return not self.live

    def _open(self) -> VideoCaptureLike:
        capture = self.opener(self.target)
        if not capture.isOpened():
            capture.release()
            raise ConfigError(f"OpenCV cannot open {self.description}")
        return capture

    def check_available(self, timeout_s: float) -> None:
        """Open the source, read one frame and release it, retrying every
        `reconnect_delay_s` for up to `timeout_s` (a camera still booting). Called at
        start-up, so a wrong camera index or URL fails there, not in a background task."""
        deadline = time.monotonic() + timeout_s
        attempt = 0
        while True:
            attempt += 1
            try:
                capture = self._open()
            except ConfigError:
                problem = "does not open"
            else:
                try:
                    ok, image = capture.read()
                finally:
                    capture.release()
                if ok and image is not None:
                    return
                problem = "opens but delivers no frame"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConfigError(
                    f"source {self.description} {problem} (tried {attempt} times over "
                    f"{timeout_s:g}s); check the camera index or stream URL and that the "
                    "device is reachable (source_open_timeout_s sets how long to retry)"
                )
            log.warning(
                "%s %s yet (attempt %d); retrying for up to %.0fs more",
                self.description,
                problem,
                attempt,
                remaining,
            )
            self.sleep(min(self.reconnect_delay_s, remaining))

    def frames(self, on_skip: SkipHandler) -> Generator[SourceFrame, None, None]:
        # A file that cannot be opened is a ConfigError; a live source goes through the
        # reconnect loop below from its first open (it was checked at start-up).
        capture: VideoCaptureLike | None = None if self.live else self._open()
        first_open = True
        reopens = 0  # since the last frame read
        index = 0
        try:
            while True:
                if capture is None:
                    if not first_open:
                        self._before_reopen(reopens)
                        reopens += 1
                    first_open = False
                    try:
                        capture = self._open()
                    except ConfigError:
                        continue
                ok, image = capture.read()
                if not ok or image is None:
                    capture.release()
                    capture = None
                    if not self.live:
                        return  # end of the file
                    continue
                reopens = 0
                number, index = index, index + 1
                try:
                    jpeg = encode_jpeg(np.asarray(image, dtype=np.uint8), self.jpeg_quality)
                except CorruptFrameError as exc:
                    on_skip("corrupt", f"{self.description} frame {number}: {exc}")
                    continue
                description = f"{self.description}#{number}"[:DESCRIPTION_MAX]
                yield SourceFrame(jpeg.data, jpeg.width, jpeg.height, None, description)
        finally:
            if capture is not None:
                capture.release()

    def _before_reopen(self, reopens: int) -> None:
        """Wait before reopening a live source, or give up on it (SourceLostError)."""
        if reopens >= self.reconnect_attempts:
            message = (
                f"{self.description} lost: no frame after {reopens} reconnects "
                f"{self.reconnect_delay_s:g}s apart"
            )
            log.error("%s; stopping the capture so the service is restarted", message)
            raise SourceLostError(message)
        log.warning(
            "%s: no frames; reconnecting in %gs (attempt %d of %d)",
            self.description,
            self.reconnect_delay_s,
            reopens + 1,
            self.reconnect_attempts,
        )
        self.sleep(self.reconnect_delay_s)  # runs in the capture's worker thread


class ReplayFileSource:
    """The frames embedded in a replay file written by binloop.replay.record, with the ground
    truth they were recorded with. Other subjects in the file are ignored."""

    finite = True

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise ConfigError(f"replay file {path} does not exist")
        self.path = path
        self.description = f"replay:{path}"[:DESCRIPTION_MAX]

    def frames(self, on_skip: SkipHandler) -> Generator[SourceFrame, None, None]:
        stats = ReplayStats(on_bad_line=lambda message: on_skip("bad_line", message))
        where = self.path.name
        for message in iter_replay_file(self.path, stats):
            if route_for_subject(message.subject) is not FRAMES_CAPTURED:
                continue
            if message.frame is None:
                on_skip("no_frame", f"{where}:{message.line}: recorded without an embedded frame")
                continue
            try:
                recorded = read_json(FrameCaptured, message.data)
            except ValidationError as exc:
                on_skip("bad_event", f"{where}:{message.line}: not a FrameCaptured: {exc}")
                continue
            actual = sha256_hex(message.frame)
            if actual != recorded.frame_sha256:
                on_skip(
                    "checksum",
                    f"{where}:{message.line}: frame hashes to {actual}, "
                    f"event says {recorded.frame_sha256}",
                )
                continue
            yield SourceFrame(
                message.frame,
                recorded.width,
                recorded.height,
                recorded.ground_truth,
                f"replay:{where}:{message.line}"[:DESCRIPTION_MAX],
            )


def open_source(spec: str, *, labels_from_folders: bool, jpeg_quality: int) -> FrameSource:
    """The source a settings string names. Raises ConfigError when none matches."""
    if spec.isdigit():
        return VideoSource(int(spec), live=True, jpeg_quality=jpeg_quality)
    if spec.lower().startswith(STREAM_SCHEMES):
        return VideoSource(spec, live=True, jpeg_quality=jpeg_quality)
    path = Path(spec).expanduser()
    if path.is_dir():
        return ImageFolderSource(
            path, labels_from_folders=labels_from_folders, jpeg_quality=jpeg_quality
        )
    if path.suffix.lower() == REPLAY_SUFFIX:
        return ReplayFileSource(path)
    if path.is_file():
        return VideoSource(str(path), live=False, jpeg_quality=jpeg_quality)
    raise ConfigError(
        f"source {spec!r} is not an image folder, video or replay file, camera index or "
        f"stream URL ({', '.join(STREAM_SCHEMES)})"
    )
