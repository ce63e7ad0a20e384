"""The bearer tokens a coordinator accepts: a file of `SHA256-HEX NAME ROLE` lines, read
again whenever it changes, so adding or revoking a token needs no restart.

The file holds digests, never tokens, and a presented token is looked up by its digest, so
neither the file nor the time a lookup takes tells anything about a token. A file that no
longer reads (a typo while editing) accepts no token until it is fixed: failing open would
keep a revoked token working.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import structlog

from kaiwo_gpu.common import credentials
from kaiwo_gpu.common.errors import FailedPreconditionError, InvalidArgumentError
from kaiwo_gpu.common.identity import Identity, identity

log = structlog.get_logger(__name__)

_DIGEST = re.compile(r"[0-9a-f]{64}")
LINE_RULE = "SHA256-HEX NAME ROLE (the digest of the token, the identity's name and role)"


def parse_tokens(text: str, source: str = "token file") -> dict[str, Identity]:
    """Digest -> identity from a token file's text; `#` starts a comment."""
    table: dict[str, Identity] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        field = f"{source} line {number}"
        if len(words) != 3 or _DIGEST.fullmatch(words[0]) is None:
            raise InvalidArgumentError(field, " ".join(words)[:80], LINE_RULE)
        if words[0] in table:
            raise InvalidArgumentError(field, words[0][:12] + "...", "a digest listed once")
        table[words[0]] = identity(words[2], words[1], field)
    return table


class TokenFile:
    """The table of one token file, read at start (a bad file stops the coordinator there)
    and again on the first lookup after it changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = credentials.stamp(path)
        self._table: Mapping[str, Identity] = self._read()

    def _read(self) -> dict[str, Identity]:
        data = credentials.read(self.path, "--tokens")
        assert data is not None
        return parse_tokens(data.decode("utf-8", "replace"), str(self.path))

    def identity_of(self, token: str) -> Identity | None:
        now = credentials.stamp(self.path)
        if now != self._stamp:
            self._stamp = now
            try:
                self._table = self._read()
            except (InvalidArgumentError, FailedPreconditionError) as error:
                self._table = {}
                log.error("token file unreadable: no token is accepted", error=error.message)
            else:
                log.info("token file read again", path=str(self.path), tokens=len(self._table))
        return self._table.get(credentials.token_digest(token))
