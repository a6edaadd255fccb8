# -*- test-case-name: tests.test_linkadmin -*-
"""
The state file: links added at run time, kept across restarts.

Like RabbitMQ's dynamic shovels, which live in the broker's definitions,
links added with C{msgmux link add} are written here and come back when the
control half starts.  The file holds each link's table as it was added
(JSON), and each is validated again at start-up with the configuration
file's checks, naming the state file and the key on an error.

Every change replaces the file atomically: the new contents go to a
temporary file in the same directory, which is flushed to disk and renamed
over the old one, and the directory is flushed too, so that a crash or power
loss leaves either the old or the new file, never a torn one.  The file is
created mode 0600: tenant tables hold tenant broker passwords.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from twisted.logger import Logger

from msgmux._toml import ConfigError
from msgmux.config import ControlConfig, LinkConfig, parse_link

__all__ = ["LinkStore", "StoredLink"]

FORMAT_VERSION = 1

StoredLink = tuple[dict[str, Any], LinkConfig]


class LinkStore:
    """
    One state file.

    @ivar path: where it lives.
    """

    _log = Logger()

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self, control: ControlConfig) -> list[StoredLink]:
        """
        Read and validate the stored links.  A link whose name or socket is
        now taken by a link of the configuration file is left out (the file
        wins) with a warning.

        @return: the links as (table, config); none when there is no file yet.
        @raise ConfigError: naming the state file and the key.
        """
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise ConfigError(self.path, "", f"cannot read: {e.strerror or e}") from None
        try:
            document = json.loads(data)
        except ValueError as e:
            raise ConfigError(self.path, "", f"is not valid JSON: {e}") from None
        if not isinstance(document, dict) or document.get("version") != FORMAT_VERSION:
            raise ConfigError(self.path, "version", f"must be {FORMAT_VERSION}")
        tables = document.get("links")
        if not isinstance(tables, list):
            raise ConfigError(self.path, "links", "must be an array")
        taken_names = {link.name for link in control.links}
        taken_sockets = {link.socket for link in control.links}
        links: list[StoredLink] = []
        for index, table in enumerate(tables):
            if not isinstance(table, dict):
                raise ConfigError(self.path, f"links[{index}]", f"must be a table, not {table!r}")
            link = parse_link(table, self.path, control, f"links[{index}]")
            if link.name in taken_names or link.socket in taken_sockets:
                self._log.warn(
                    "{path}: link {link} clashes with a link of the configuration file, which wins; not restored",
                    path=self.path,
                    link=link.name,
                )
                continue
            if any(link.name == other.name or link.socket == other.socket for _, other in links):
                raise ConfigError(self.path, f"links[{index}]", f"{link.name!r} or its socket is used by another link")
            links.append((table, link))
        return links

    def save(self, tables: list[dict[str, Any]]) -> None:
        """
        Replace the file with C{tables}, atomically and durably.  Blocking:
        run it in a thread.

        @raise OSError: when it could not be written; the old file is then
            untouched.
        """
        directory = os.path.dirname(self.path) or "."
        text = json.dumps({"version": FORMAT_VERSION, "links": tables}, indent=1, sort_keys=True).encode() + b"\n"
        fd, temporary = tempfile.mkstemp(prefix=".msgmux-links-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
