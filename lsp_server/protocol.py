"""pygls 2.1.1's protocol with the fixes an always-on editor server needs.

- A future per notification: `_execute_handler` stores one under a fresh uuid in `_request_futures` for every
  generator or async handler (didOpen/didChange/didClose, initialized, every nested handler of a generator)
  and only request ids are ever popped. Here every future is forgotten once done.
- A request whose params do not structure got no answer at all (the reader loop only logged it), so the
  client waited forever. Here it gets an InvalidParams error; a bad notification is logged and dropped.
- Text sync: the documents live in the server's session (`Session.documents`), not in pygls' workspace, so
  the builtin didOpen/didChange/didClose only dispatch. pygls' copy would double the memory and apply
  ranges by its own rules.
- Capabilities: the position encoding the server chose, no completion provider for clients that show
  inline completions (they would see every draft twice), and no workspace-folder support (unused).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cattrs
from lsprotocol import types
from pygls.exceptions import (
    JsonRpcContentModified,
    JsonRpcException,
    JsonRpcInvalidParams,
    JsonRpcRequestCancelled,
)
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.language_server import lsp_method

if TYPE_CHECKING:
    from lsp_server.server import SuperpieServer

log = logging.getLogger(__name__)

_EXPECTED_ERRORS = (JsonRpcInvalidParams, JsonRpcContentModified, JsonRpcRequestCancelled)


@dataclass
class MalformedRequest:
    """A request whose params did not match the method's schema: answered with InvalidParams."""

    id: int | str
    method: str
    reason: str
    jsonrpc: str = "2.0"


@dataclass
class MalformedNotification:
    method: str
    reason: str
    jsonrpc: str = "2.0"


def _describe(err: JsonRpcException) -> str:
    cause = err.__cause__
    if isinstance(cause, (cattrs.ClassValidationError, cattrs.IterableValidationError)):
        return "; ".join(cattrs.transform_error(cause))
    return str(cause or err) or type(err).__name__


def _valid_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


class _ClientWriter:
    """The client's stdin as pygls writes to it. An editor that quits may close it before reading the answer to
    `shutdown`: that is the end of the session, logged once, not a traceback per message still to send."""

    def __init__(self, writer: Any) -> None:
        self._writer = writer
        self.gone = False

    def write(self, data: bytes) -> Any:
        if self.gone:
            return None
        try:
            return self._writer.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.gone = True
            log.info("the client closed the connection; nothing more is sent")
            return None

    def close(self) -> Any:
        try:
            return self._writer.close()
        except OSError:  # already closed by the client
            return None


class SuperpieProtocol(LanguageServerProtocol):
    _server: SuperpieServer

    def set_writer(self, writer: Any, include_headers: bool = True) -> None:
        super().set_writer(_ClientWriter(writer), include_headers)

    # -- no future outlives its handler --------------------------------------------------------------------

    def _execute_handler(self, msg_id, handler, callback: Callable[[Future[Any]], None], args=None, kwargs=None):
        def forget_then(future: Future[Any]) -> None:
            if self._request_futures.get(msg_id) is future:
                del self._request_futures[msg_id]
            callback(future)

        super()._execute_handler(msg_id, handler, forget_then, args, kwargs)

    # -- expected request errors are answers, not server errors ----------------------------------------------

    def _send_handler_result(self, future: Future[Any], *, msg_id):
        """InvalidParams, ContentModified and RequestCancelled are normal outcomes of a request: pygls would
        log each with a traceback and report it as a server error."""
        if not future.cancelled() and isinstance(err := future.exception(), _EXPECTED_ERRORS):
            self._request_futures.pop(msg_id, None)
            log.debug("request %r: %s", msg_id, err)
            self._send_response(msg_id, error=err.to_response_error())
            return
        super()._send_handler_result(future, msg_id=msg_id)

    # -- malformed messages get an answer, never a crash -----------------------------------------------------

    def structure_message(self, data: dict[str, Any]):
        try:
            return super().structure_message(data)
        except JsonRpcException as err:
            reason = _describe(err)
            method = data.get("method")
            if not isinstance(method, str):
                log.warning("dropping a message that does not structure: %s", reason)
                return data  # a nested object or a response we cannot read: handle_message ignores dicts
            if "id" in data and _valid_id(data["id"]):
                return MalformedRequest(data["id"], method, reason)
            return MalformedNotification(method, reason)

    def handle_message(self, message):
        if isinstance(message, MalformedRequest):
            log.warning("invalid params for %s (request %r): %s", message.method, message.id, message.reason)
            self._send_response(message.id, error=types.ResponseError(
                code=JsonRpcInvalidParams.CODE, message=f"invalid params for {message.method}: {message.reason}"))
            return
        if isinstance(message, MalformedNotification):
            log.warning("ignoring %s with invalid params: %s", message.method, message.reason)
            return
        if not hasattr(message, "jsonrpc"):
            log.warning("ignoring a message that is not a JSON-RPC object: %.200r", message)
            return
        super().handle_message(message)

    # -- capabilities ---------------------------------------------------------------------------------------

    @lsp_method(types.INITIALIZE)
    def lsp_initialize(self, params: types.InitializeParams):
        result = yield from super().lsp_initialize(params)
        caps = result.capabilities
        caps.position_encoding = self._server.position_encoding
        caps.workspace = None
        if self._server.client_shows_inline_completions():
            caps.completion_provider = None
        return result

    # -- text sync: the server keeps the documents ----------------------------------------------------------

    @lsp_method(types.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(self, params: types.DidOpenTextDocumentParams):
        self._server.did_open(params)

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: types.DidChangeTextDocumentParams):
        self._server.did_change(params)

    @lsp_method(types.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params: types.DidCloseTextDocumentParams):
        self._server.did_close(params)
