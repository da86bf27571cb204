"""A sample request: one request body exactly as a client sends it, with its content type.

Packrat profiles and warms an archive it did not build with it: a batch of b is b copies,
decoded as TorchServe 0.12's worker decodes bodies (ts.protocol.otf_message_handler): JSON
(application/json) to an object, text/* to str, anything else stays bytes. No torch here.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packrat.errors import ArchiveError

# Types mimetypes may not know on every system, and what a client would send for them.
_EXTRA_TYPES = {".json": "application/json", ".txt": "text/plain", ".png": "image/png",
                ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".npy": "application/octet-stream"}
MAX_SAMPLE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Sample:
    body: bytes
    content_type: str
    source: str = "<sample>"  # where it came from, for messages

    @staticmethod
    def load(path: str | Path, content_type: str | None = None) -> Sample:
        """Read FILE; its content type from the extension unless given."""
        path = Path(path)
        try:
            size = path.stat().st_size
            if size > MAX_SAMPLE_BYTES:
                raise ArchiveError(f"sample {path} is {size} bytes, over the "
                                   f"{MAX_SAMPLE_BYTES} a request body may have")
            body = path.read_bytes()
        except FileNotFoundError:
            raise ArchiveError(f"sample {path} does not exist; give one request body as a "
                               "client sends it (an image, a text, a JSON file)") from None
        except IsADirectoryError:
            raise ArchiveError(f"sample {path} is a directory; give one file") from None
        except OSError as e:
            raise ArchiveError(f"cannot read sample {path}: {e}") from None
        if content_type is None:
            content_type = content_type_of(path)
        if not content_type or "/" not in content_type:
            raise ArchiveError(f"content type {content_type!r} of sample {path} is not a "
                               "MIME type like image/png or application/json")
        return Sample(body, content_type, str(path))

    def decoded(self) -> Any:
        """The body as a TorchServe worker hands it to the handler (falling back to bytes, as
        the worker does, where JSON or UTF-8 decoding fails)."""
        if self.content_type == "application/json":
            try:
                return json.loads(self.body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                return self.body
        if self.content_type.startswith("text"):
            try:
                return self.body.decode("utf-8")
            except UnicodeDecodeError:
                return self.body
        return self.body

    def digest(self) -> str:
        """Identifies the sample in profile cache keys."""
        h = hashlib.sha256(self.content_type.encode() + b"\0" + self.body)
        return h.hexdigest()[:20]


def content_type_of(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in _EXTRA_TYPES:
        return _EXTRA_TYPES[suffix]
    guessed, _ = mimetypes.guess_type(str(path))
    return guessed or "application/octet-stream"
