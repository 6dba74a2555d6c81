"""Group commit for `POST /messages`: many messages, one fenced transaction, one commit.

A message costs a few statements, but a transaction of its own costs several round trips
more (BEGIN, the write gate, the lease check, COMMIT) plus the commit's flush to disk. Under
load, the handlers therefore only validate and authenticate, then queue the message here and
park the request (a `Deferred`: no thread waits). One committer thread takes everything queued
so far, writes it in one transaction (`chat.post_messages`, pipelined on PostgreSQL) and, only
after the commit succeeded, answers each request. A lone message is written at once: nothing
waits for a batch to fill, so latency at low load is one transaction.

Failure keeps the per-request guarantees: if the batch cannot be written (not the active node,
fenced, database down) every request in it gets that error, and none was acknowledged; if one
message breaks the transaction for an unexpected reason, each is retried alone so the others
still land; a commit whose outcome is unknown answers 503 to all (a retry with the same
Idempotency-Key is safe).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from hachat.api.context import ApiContext
from hachat.api.errors import forbidden, not_found
from hachat.api.views import message_view
from hachat.api.writes import fenced_write
from hachat.http.messages import Deferred, HTTPError, Response, json_response
from hachat.store.chat import MessageDraft, PostOutcome, post_messages

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Queued:
    draft: MessageDraft
    username: str
    deferred: Deferred


def _outcome_unknown() -> Response:
    return HTTPError(503, "write_timeout",
                     "the message could not be confirmed in time; retry with the same "
                     "Idempotency-Key (or clientMessageId) to be sure it is stored once",
                     headers=(("Retry-After", "1"),)).to_response()


def _conflict(message_id: int) -> Response:
    return HTTPError(409, "idempotency_conflict",
                     "this idempotency key was already used for a different message",
                     extra={"messageId": message_id}).to_response()


def _deleted(message_id: int | None) -> Response:
    return HTTPError(410, "message_deleted",
                     "this idempotency key belongs to a message that was stored and has been "
                     "deleted since; it is not stored again", extra={"messageId": message_id}
                     ).to_response()


class MessageCommitter:
    """Queues message drafts and commits them in batches on one thread of its own.

    `submit` (any thread) returns a `Deferred` answered after the commit. `max_batch` bounds a
    transaction; `queue_limit` bounds memory (past it `submit` answers 503 at once).
    """

    def __init__(self, ctx: ApiContext, *, max_batch: int = 256, queue_limit: int = 8192,
                 answer_timeout: float = 60.0) -> None:
        self.ctx = ctx
        self.max_batch = max_batch
        self.queue_limit = queue_limit
        self.answer_timeout = answer_timeout
        self._queue: deque[_Queued] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.messages = 0
        self.writing = 0  # messages in the batch being written now

    def start(self) -> None:
        if self._thread is None:
            self._closed = False
            self._thread = threading.Thread(target=self._run, name="hachat-message-commit",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def submit(self, draft: MessageDraft, username: str) -> Deferred:
        deferred = Deferred(self.answer_timeout, _outcome_unknown, working=True)
        with self._cond:
            if self._closed or self._thread is None:
                raise HTTPError(503, "shutting_down", "the server is shutting down",
                                headers=(("Retry-After", "1"),))
            if len(self._queue) >= self.queue_limit:
                raise HTTPError(503, "busy", "too many messages are waiting to be written; "
                                "retry shortly", headers=(("Retry-After", "1"),))
            self._queue.append(_Queued(draft, username, deferred))
            self._cond.notify()
        return deferred

    def stats(self) -> dict[str, Any]:
        return {"queued": len(self._queue), "writing": self.writing, "batches": self.batches,
                "messages": self.messages}

    # -- the committer thread --------------------------------------------------------------
    def _run(self) -> None:
        queue = self._queue
        while True:
            with self._cond:
                while not queue and not self._closed:
                    self._cond.wait()
                if not queue:
                    return  # closed and drained
                batch = [queue.popleft() for _ in range(min(len(queue), self.max_batch))]
                self.writing = len(batch)
            # A request whose client left or whose answer timed out was promised nothing.
            batch = [item for item in batch if not item.deferred.done]
            if batch:
                self._commit(batch)
            self.writing = 0

    def _commit(self, batch: list[_Queued]) -> None:
        try:
            answers = self._write(batch)
        except HTTPError as exc:
            answers = [exc.to_response()] * len(batch)
        except Exception:
            if len(batch) > 1:
                log.warning("a batch of %d messages failed; writing them one by one",
                            len(batch), exc_info=True)
                for item in batch:
                    self._commit([item])
                return
            log.exception("writing a message failed")
            answers = [HTTPError(500, "internal_error", "internal server error").to_response()]
        self.batches += 1
        self.messages += len(batch)
        for item, answer in zip(batch, answers, strict=True):
            item.deferred.resolve(answer)

    def _write(self, batch: list[_Queued]) -> list[Response]:
        answers: list[Response] = []
        with fenced_write(self.ctx) as w:
            results = post_messages(w.session, [item.draft for item in batch], w.epoch)
            created = []
            for item, result in zip(batch, results, strict=True):
                draft = item.draft
                if result.outcome is PostOutcome.NO_GROUP:
                    answers.append(not_found("group", draft.group_id).to_response())
                elif result.outcome is PostOutcome.NOT_MEMBER:
                    answers.append(forbidden(
                        f"you are not a member of group {draft.group_id}").to_response())
                elif result.outcome is PostOutcome.DELETED:
                    answers.append(_deleted(result.deleted_message_id))
                elif result.outcome is PostOutcome.EXISTING:
                    message = result.message
                    if message.group_id != draft.group_id or message.content != draft.content:
                        answers.append(_conflict(message.id))
                    else:
                        answers.append(json_response(200, message_view(message,
                                                                       item.username)))
                else:
                    view = message_view(result.message, item.username)
                    created.append(("message.created", draft.group_id, None, view))
                    answers.append(json_response(201, view))
            w.emit_many(created)
        return answers
