"""Secrets kept out of logs and health answers: credentials in URLs and in authentication headers.

A model URI can carry its credentials: `https://user:token@host/...` or a presigned URL's `?X-Amz-Signature=...`.
The URI is needed to fetch the model, nowhere else: logs, `/ping` and error messages show it redacted (the
userinfo and every query value as `***`), and instances get it through their environment, which only servelet's
user can read, never on a command line, which every user can (`ps`). A client's request line can carry a presigned
query too, and an `Authorization` or `x-api-key` value can reach a log record in a message or a traceback: every
handler, uvicorn's access and error logs included, masks them.
"""

from __future__ import annotations

import logging
import re

MASK = "***"
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@?#'\"]+@")
_QUERY = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#'\"]*\?)(?P<query>[^\s#'\"]*)")
_VALUE = re.compile(r"=[^&;]*")
_SECRET_HEADER = r"(?:proxy-)?authorization|x-api-key|x-amz-security-token"
# A header's value as a repr or a dict shows it (`'authorization': 'Bearer k'`, `(b'x-api-key', b'k')`): up to the
# closing quote. As a header line (`Authorization: Bearer k`): up to the end of the line.
_QUOTED_HEADER = re.compile(
    rf"(?P<head>(?P<q1>['\"])(?:{_SECRET_HEADER})(?P=q1)\s*[:,=]\s*b?(?P<q2>['\"]))(?:\\.|(?!(?P=q2)).)*", re.IGNORECASE
)
_HEADER_LINE = re.compile(rf"(?P<head>\b(?:{_SECRET_HEADER})\s*[:=]\s*)(?![\s'\"]|\*\*\*)[^\r\n]*", re.IGNORECASE)
# Every secret header's name contains one of these: ASCII text without any is left alone without running the header
# patterns (a log line per request and per async job: the patterns were most of a record's cost).
_SECRET_HEADER_WORDS = ("authorization", "x-api-key", "x-amz-security-token")


def redact(text: str) -> str:
    """`text` with the userinfo and query values of every URL in it masked (`https://***@host/m?X-Amz-Signature=***`),
    and the values of `Authorization`, `x-api-key` and `x-amz-security-token` headers."""
    if "://" in text:
        if "@" in text:
            text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
        if "?" in text:
            text = _QUERY.sub(lambda m: m["head"] + _VALUE.sub(f"={MASK}", m["query"]), text)
    # Only ASCII is checked cheaply: IGNORECASE matches a few non-ASCII letters to ASCII ones (ı, ſ, K).
    if text.isascii() and not any(word in text.lower() for word in _SECRET_HEADER_WORDS):
        return text
    text = _QUOTED_HEADER.sub(lambda m: f"{m['head']}{MASK}", text)
    return _HEADER_LINE.sub(lambda m: f"{m['head']}{MASK}", text)


def redact_target(target: str) -> str:
    """A request target (`/path?query`) with every query value masked: a presigned query signs with them."""
    path, question, query = target.partition("?")
    return redact(path) + (question + _VALUE.sub(f"={MASK}", query) if question else "")


class RedactSecrets(logging.Filter):
    """A handler filter: every record it passes is redacted, whichever logger (servelet's, httpx's, uvicorn's) wrote
    it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("uvicorn") and isinstance(record.args, tuple):
            # uvicorn's access log (and its WebSocket lines) pass the request target as an argument, and its access
            # formatter reads the arguments, not the message: mask the target's query where it stands.
            record.args = tuple(
                redact_target(arg) if isinstance(arg, str) and arg.startswith("/") else arg for arg in record.args
            )
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        redacted = redact(message)
        if redacted != message and record.name != "uvicorn.access":
            record.msg, record.args = redacted, None
            record.__dict__.pop("color_message", None)  # uvicorn's coloured copy of the message, unredacted
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def configure_logging() -> None:
    """INFO to stderr, as every servelet process logs, with secrets redacted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())


def uvicorn_log_config() -> dict:
    """uvicorn's own logging config (its access and error logs do not propagate to the root logger's handler) with
    RedactSecrets on each of its handlers; for uvicorn.Config's `log_config`."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact_secrets": {"()": RedactSecrets}}
    for handler in config["handlers"].values():
        handler["filters"] = ["redact_secrets"]
    return config
