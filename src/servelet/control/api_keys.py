"""API keys and SigV4 credentials, kept in the control-plane store beside the other resources.

An API key is 256 random bits, so the store keeps only its SHA-256: nobody can guess a preimage of a random
256-bit value, so a slow password hash (bcrypt, argon2), which exists to stretch low-entropy passwords, would add
nothing but latency to every request; a plain hash also lets the gateway find the key by an indexed lookup.
A SigV4 secret cannot be hashed (the gateway recomputes the signature with it): it is kept encrypted
(`secret_box.py`).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import JSON, Column, DateTime, MetaData, String, Table, Text, insert, select
from sqlalchemy.exc import IntegrityError

from .resources import now
from .scopes import Grant, ScopeError, check_scope
from .secret_box import SecretBox
from .store import Store

API_KEY_PREFIX = "svl-"
ACCESS_KEY_PREFIX = "SVLT"  # AWS's are AKIA...; 20 characters like theirs, so tools that check the length accept it
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

metadata = MetaData()
api_keys = Table(
    "api_keys",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("creation_time", DateTime(timezone=True), nullable=False),
    Column("key_hash", String(64), unique=True, nullable=True),  # API keys: SHA-256 of the key, hex
    Column("access_key_id", String(32), unique=True, nullable=True),  # SigV4 credentials
    Column("secret", Text, nullable=True),  # SigV4: the secret access key, encrypted
    Column("scopes", JSON, nullable=False),
)


class KeyRefused(ValueError):
    """A key that cannot be made or found; the message says why."""


@dataclass
class KeyRecord:
    """What `servelet keys list` shows: never the key or the secret."""

    name: str
    scopes: list[str]
    creation_time: datetime
    access_key_id: str | None = None

    @property
    def kind(self) -> str:
        return "aws" if self.access_key_id else "api"


@dataclass
class NewKey:
    """A key just made: the only moment its secret exists outside the caller's hands."""

    record: KeyRecord
    secrets: dict[str, str] = field(default_factory=dict)  # {"key"} or {"access_key_id", "secret_access_key"}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """The keys in one store; the SigV4 secrets are encrypted with the data folder's key file."""

    def __init__(self, store: Store, box: SecretBox):
        self.engine = store.engine
        self.box = box
        metadata.create_all(self.engine)

    def create(self, name: str, scopes: list[str], aws: bool = False) -> NewKey:
        if not KEY_NAME.match(name):
            raise KeyRefused(f"key name {name!r} is not valid: letters, digits, '.', '_', '-' (at most 63)")
        if not scopes:
            raise KeyRefused("give the key at least one --scope")
        try:
            scopes = sorted({check_scope(s) for s in scopes})
        except ScopeError as exc:
            raise KeyRefused(str(exc)) from None
        record = KeyRecord(name=name, scopes=scopes, creation_time=now())
        row = {"name": name, "creation_time": record.creation_time, "scopes": scopes}
        if aws:
            record.access_key_id = ACCESS_KEY_PREFIX + "".join(
                secrets.choice(string.ascii_uppercase + string.digits) for _ in range(16)
            )
            secret = secrets.token_urlsafe(30)  # 40 characters, as AWS's secret access keys
            row |= {"access_key_id": record.access_key_id, "secret": self.box.encrypt(secret)}
            made = {"access_key_id": record.access_key_id, "secret_access_key": secret}
        else:
            key = API_KEY_PREFIX + secrets.token_urlsafe(32)
            row["key_hash"] = hash_key(key)
            made = {"key": key}
        try:
            with self.engine.begin() as connection:
                connection.execute(insert(api_keys).values(row))
        except IntegrityError:
            raise KeyRefused(f"a key named {name!r} exists already (revoke it first, or pick another name)") from None
        return NewKey(record, made)

    def list(self) -> list[KeyRecord]:
        query = select(api_keys.c.name, api_keys.c.scopes, api_keys.c.creation_time, api_keys.c.access_key_id)
        with self.engine.connect() as connection:
            rows = connection.execute(query.order_by(api_keys.c.creation_time, api_keys.c.name)).all()
        return [KeyRecord(r.name, list(r.scopes), r.creation_time, r.access_key_id) for r in rows]

    def revoke(self, name: str) -> bool:
        with self.engine.begin() as connection:
            return connection.execute(api_keys.delete().where(api_keys.c.name == name)).rowcount > 0

    def grant_for_key(self, key: str) -> Grant | None:
        """The grant of an API key, None when no key has that hash."""
        query = select(api_keys.c.name, api_keys.c.scopes).where(api_keys.c.key_hash == hash_key(key))
        with self.engine.connect() as connection:
            row = connection.execute(query).first()
        return None if row is None else Grant(row.name, frozenset(row.scopes))

    def sigv4_credentials(self, access_key_id: str) -> tuple[Grant, str] | None:
        """The grant and the decrypted secret of an access key id, None when no key has that id."""
        query = select(api_keys.c.name, api_keys.c.scopes, api_keys.c.secret).where(
            api_keys.c.access_key_id == access_key_id
        )
        with self.engine.connect() as connection:
            row = connection.execute(query).first()
        if row is None or row.secret is None:
            return None
        return Grant(row.name, frozenset(row.scopes)), self.box.decrypt(row.secret)
