"""Where the server's log goes: a file (`--log-file`) and the client's log (window/logMessage).

Only superpie's own loggers reach the client: pygls logs every message it sends, and forwarding those would
send a message per message.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

from lsprotocol import types

OWN_LOGGERS = ("lsp_server", "inference", "kv_cache", "bench")

_MESSAGE_TYPES = ((logging.ERROR, types.MessageType.Error), (logging.WARNING, types.MessageType.Warning),
                  (logging.INFO, types.MessageType.Info), (logging.NOTSET, types.MessageType.Log))


class ClientLogHandler(logging.Handler):
    """Forwards superpie's own log records to the client as window/logMessage, from any thread."""

    def __init__(self, server: Any) -> None:
        """`server`: a pygls LanguageServer with a `loop` attribute (None until initialize)."""
        super().__init__()
        self.server = server
        self._local = threading.local()
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        loop = self.server.loop
        if loop is None or loop.is_closed() or getattr(self._local, "busy", False):
            return
        self._local.busy = True
        try:
            kind = next(t for level, t in _MESSAGE_TYPES if record.levelno >= level)
            params = types.LogMessageParams(kind, self.format(record))
            if _on_loop(loop):
                self.server.window_log_message(params)
            else:
                loop.call_soon_threadsafe(self.server.window_log_message, params)
        except Exception:
            self.handleError(record)
        finally:
            self._local.busy = False


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def apply_log_level(level: str) -> None:
    value = getattr(logging, level.upper())
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(value)
    # pygls logs every message body at INFO: only worth it when debugging the protocol itself
    logging.getLogger("pygls").setLevel(logging.DEBUG if value <= logging.DEBUG else logging.WARNING)


def configure_logging(server: Any, log_file: Path | None, level: str) -> None:
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper()))
    if log_file is not None:
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"))
        root.addHandler(handler)
    client = ClientLogHandler(server)
    for name in OWN_LOGGERS:
        logging.getLogger(name).addHandler(client)
    apply_log_level(level)
