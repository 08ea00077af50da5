"""Encryption of the SigV4 secrets kept in the store, with a key file in servelet's data folder.

SigV4 proves a request by an HMAC keyed with the secret itself: to check a signature the gateway must recompute
it, so it needs the secret, not a hash of it. The store therefore keeps each secret encrypted (Fernet: AES-128-CBC
with an HMAC-SHA256 tag, from `cryptography`), under a key that never enters the store: a database dump or a
PostgreSQL replica alone reveals no secret. The key file is created readable by servelet's user only (0600).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

KEY_FILE = "secrets.key"


class SecretBoxError(RuntimeError):
    """The key file is missing or is not the one the secrets were encrypted with."""


class SecretBox:
    def __init__(self, data_dir: Path):
        self.path = Path(data_dir).expanduser() / KEY_FILE
        self._fernet: Fernet | None = None

    def encrypt(self, secret: str) -> str:
        return self._key(create=True).encrypt(secret.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._key(create=False).decrypt(token.encode()).decode()
        except InvalidToken:
            raise SecretBoxError(f"{self.path} is not the key the SigV4 secrets were encrypted with") from None

    def _key(self, create: bool) -> Fernet:
        if self._fernet is None:
            if not self.path.exists():
                if not create:
                    raise SecretBoxError(f"{self.path} is missing: the SigV4 secrets in the store cannot be read")
                _write_new_key(self.path)
            self._fernet = Fernet(self.path.read_bytes().strip())
        return self._fernet


def _write_new_key(path: Path) -> None:
    """Create the key file 0600 from the start (never readable by others, even for an instant) and whole (linked
    into place once written); of two processes creating it at once, the first wins and both read its key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(f".{path.name}.{os.getpid()}")
    descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(Fernet.generate_key())
    try:
        os.link(draft, path)
    except FileExistsError:
        pass
    finally:
        draft.unlink()
