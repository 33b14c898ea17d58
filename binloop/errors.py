"""binloop's exception tree. A consumer's reaction depends only on which branch an error is on.

BinloopError
├── PermanentError        the message can never be processed: dead-letter it, ack, move on
│   ├── CorruptFrameError     bytes that do not decode as an image
│   ├── UnknownUriError       a blob URI with a scheme no backend serves
│   ├── ChecksumMismatchError bytes whose sha256 is not the one promised
│   ├── MissingBlobError      a referenced blob that is not there (a model promotion waits)
│   ├── UnfinishedHandlingError (binloop.bus.handling) handling kept ending the process
│   └── StoppedHandlingError  (binloop.bus.handling) handling kept being cut off by stops
├── TransientError        try again later: nak with a delay (dead-lettered after max attempts)
│   ├── StoreUnavailableError the object store did not answer
│   └── NotReadyError         the service cannot work yet (no model loaded, ...)
└── ConfigError           settings or files that make no sense; raised at start-up
"""

from __future__ import annotations


class BinloopError(Exception):
    """Root of every error binloop raises on purpose."""


class PermanentError(BinloopError):
    """Retrying cannot help; the message goes to the dead-letter subject."""


class CorruptFrameError(PermanentError):
    pass


class UnknownUriError(PermanentError):
    pass


class ChecksumMismatchError(PermanentError):
    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"{what}: expected sha256 {expected}, got {actual}")
        self.what = what
        self.expected = expected
        self.actual = actual

    def __reduce__(self) -> tuple[type[ChecksumMismatchError], tuple[str, str, str]]:
        # Rebuilt from its own arguments (it crosses from the trainer's worker process).
        return type(self), (self.what, self.expected, self.actual)


class MissingBlobError(PermanentError):
    pass


class ModelLoadError(PermanentError):
    """A model file that cannot be loaded, or that does not match its card."""


class TransientError(BinloopError):
    """Might work later; the message is redelivered after a delay."""


class StoreUnavailableError(TransientError):
    pass


class NotReadyError(TransientError):
    pass


class ConfigError(BinloopError):
    pass
