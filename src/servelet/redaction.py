"""Secrets in model URIs kept out of logs and health answers.

A model URI can carry its credentials: `https://user:token@host/...` or a presigned URL's `?X-Amz-Signature=...`.
The URI is needed to fetch the model, nowhere else: logs, `/ping` and error messages show it redacted (the
userinfo and every query value as `***`), and instances get it through their environment, which only servelet's
user can read, never on a command line, which every user can (`ps`).
"""

from __future__ import annotations

import logging
import re

MASK = "***"
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@?#'\"]+@")
_QUERY = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#'\"]*\?)(?P<query>[^\s#'\"]*)")
_VALUE = re.compile(r"=[^&;]*")


def redact(text: str) -> str:
    """`text` with the userinfo and query values of every URL in it masked (`https://***@host/m?X-Amz-Signature=***`)."""
    if "://" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _QUERY.sub(lambda m: m["head"] + _VALUE.sub(f"={MASK}", m["query"]), text)


class RedactSecrets(logging.Filter):
    """A handler filter: every record it passes is redacted, whichever logger (servelet's, httpx's) wrote it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if "://" in message or (record.exc_text and "://" in record.exc_text):
            record.msg, record.args = redact(message), None
            if record.exc_text:
                record.exc_text = redact(record.exc_text)
        return True


def configure_logging() -> None:
    """INFO to stderr, as every servelet process logs, with secrets in URLs redacted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())
