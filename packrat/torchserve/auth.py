"""TorchServe's token authorization: the keys in key_file.json, sent as a Bearer token, and
renewed once when TorchServe refuses one (see the facts in packrat.torchserve)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import requests
from requests.auth import AuthBase

from packrat.errors import TorchServeError

logger = logging.getLogger(__name__)


class Bearer(AuthBase):
    """`Authorization: Bearer KEY` with the current key of one API (inference or management)."""

    def __init__(self, keys: Keys, api: str):
        self.keys = keys
        self.api = api

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self.keys.get(self.api)}"
        return r

    @staticmethod
    def sent_key(r: requests.Response) -> str:
        """The key a response's request carried."""
        return str(r.request.headers.get("Authorization", "")).removeprefix("Bearer ")


class Keys:
    """The server's keys, read from its key_file.json and renewed when TorchServe refuses one
    (HTTP 400 InvalidKeyException, see the facts in packrat.torchserve)."""

    def __init__(
        self,
        key_file: Path,
        server: str,
        management_url: str,
        session: Callable[[], requests.Session],
        timeout_s: float,
    ):
        self.key_file = key_file
        self.server = server  # how messages name the server: "the TorchServe of DIR"
        self.management_url = management_url
        self.session = session
        self.timeout_s = timeout_s
        self._keys: dict[str, str] | None = None
        self._lock = threading.Lock()

    def get(self, api: str) -> str:
        with self._lock:
            if self._keys is None:
                self._keys = self._load()
            return self._keys[api]

    def renew(self, api: str, refused: str) -> None:
        """After `refused` was refused: take a newer key from key_file.json, else (the file
        holds the same key: it expired) have TorchServe make a new one with the API key."""
        with self._lock:
            keys = self._load()
            if keys[api] == refused:
                logger.info("%s key refused, probably expired: asking for a new one", api)
                url = f"{self.management_url}/token"
                try:
                    r = self.session().post(
                        url,
                        params={"type": api},
                        headers={"Authorization": f"Bearer {keys['api']}"},
                        timeout=self.timeout_s,
                    )
                except requests.RequestException as e:
                    raise TorchServeError(f"POST {url}?type={api} -> failed: {e}") from None
                if r.status_code != 200:
                    text = (
                        f"POST {r.url} -> {r.status_code}: {response_message(r)} (TorchServe refused "
                        f"the API key of {self.key_file} while renewing the {api} key; "
                        "restart the server)"
                    )
                    if is_token_refusal(r):
                        raise KeyRefused(text, response_message(r))
                    raise TorchServeError(text)
                keys = self._load()
            else:
                logger.info("%s key refused: using the newer key in %s", api, self.key_file)
            self._keys = keys

    def _load(self) -> dict[str, str]:
        # The frontend may be rewriting the file: try a few times before giving up.
        for _ in range(10):
            keys = read_key_file(self.key_file)
            if keys is not None:
                return keys
            if not self.key_file.exists():
                break
            time.sleep(0.05)
        raise NoKeys(
            f"cannot read TorchServe's keys from {self.key_file}; is {self.server} running? "
            "(start it, or set token_auth=False if it was started without token authorization)"
        )


def read_key_file(path: Path) -> dict[str, str] | None:
    """{"management", "inference", "api"} -> key from a key_file.json; None if unreadable."""
    # {"management": {"key", "expiration time"}, "inference": {...}, "API": {"key"}}; the
    # frontend rewrites it in place, so a read can catch it empty or half-written.
    try:
        data = json.loads(path.read_text())
        return {
            "management": data["management"]["key"],
            "inference": data["inference"]["key"],
            "api": data["API"]["key"],
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_token_refusal(r: requests.Response) -> bool:
    if r.status_code == 401:
        return True
    if r.status_code != 400:
        return False
    text = r.text
    return "InvalidKeyException" in text or "Token Authori" in text or "Token Authenti" in text


class NoKeys(TorchServeError):
    """key_file.json is missing or unreadable."""


class KeyRefused(TorchServeError):
    """TorchServe refused a key of key_file.json, even after a refresh."""

    def __init__(self, text: str, reason: str):
        super().__init__(text)
        self.reason = reason  # TorchServe's message


def response_message(r: requests.Response) -> str:
    """TorchServe's message in a response (its JSON "message", else the text), on one line."""
    try:
        data = r.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("message"):
        text = str(data["message"])
    else:
        text = r.text
    text = " ".join(text.split())
    return (text[:500] + "...") if len(text) > 500 else (text or r.reason or "no message")
