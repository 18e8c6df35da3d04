"""Durable feedback: every served response is recorded (prompt + response); users rate one or prefer one of two.

``export`` writes what the reward-model stage reads (JSONL):
- preferences: ``{"prompt", "chosen", "rejected", "messages", "source"}``: explicit preferences, plus pairs made from
  an up-rated and a down-rated response to the same prompt (``source: "ratings"``);
- ratings: ``{"prompt", "response", "rating", "score", "messages", "model_version"}`` with ``score`` in [-1, 1]
  (up = 1, down = -1, stars 1..5 -> (n - 3) / 2).
Every response is stored with the ``model_version`` that produced it (the checkpoint digest the server names), so
``export(..., model_version=V)`` writes one version's ratings and pairs: the next reward round's input. Pair rows
carry ``chosen_model_version``, ``rejected_model_version`` and ``model_version`` (theirs when they agree, else null).
``prompt`` is the conversation as the model saw it without retrieved context (ChatML text ending with the assistant
turn's header), ``messages`` the conversation as a list (null for plain completions).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

from ray import serve

from serve.errors import ServeError, unwrap
from serve.sqlite import add_columns, open_db

log = logging.getLogger(__name__)

RATINGS = {"up": 1.0, "down": -1.0, "thumbs_up": 1.0, "thumbs_down": -1.0}


class FeedbackError(ServeError):
    """Bad feedback (unknown response id, bad rating); the message says what to do."""


class NotFound(FeedbackError):
    status, code = 404, "response_not_found"


def rating_score(rating: Any) -> float:
    """``"up"``/``"down"`` -> 1/-1, integers 1..5 -> (n - 3) / 2; anything else is a FeedbackError."""
    if isinstance(rating, str) and rating.lower() in RATINGS:
        return RATINGS[rating.lower()]
    if (
        isinstance(rating, (int, float))
        and not isinstance(rating, bool)
        and float(rating).is_integer()
        and 1 <= rating <= 5
    ):
        return (float(rating) - 3.0) / 2.0
    raise FeedbackError(f"rating must be 'up', 'down' or an integer 1..5, got {rating!r}")


_RESPONSE_COLUMNS = "id, model, prompt, messages, response, created, model_version"


def storable(value: Any) -> Any:
    """``value`` as SQLite and UTF-8 can hold it: strings with lone UTF-16 surrogates (no character; SQLite refuses
    them with UnicodeEncodeError) get U+FFFD in their place, in lists and dicts too; anything else is returned as is."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if isinstance(value, list):
        return [storable(v) for v in value]
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    return value


class FeedbackStore:
    """Responses (with the model version that produced each), ratings and preferences in one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = open_db(
            self.path,
            "CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, model TEXT, prompt TEXT, messages TEXT, "
            "response TEXT, created REAL, model_version TEXT)",
            "CREATE TABLE IF NOT EXISTS feedback (id TEXT PRIMARY KEY, kind TEXT, response_id TEXT, rejected_id TEXT, "
            "rating TEXT, score REAL, who TEXT, created REAL)",
        )
        # a store written before responses named their model version: its old responses have none (NULL)
        add_columns(self._db, "responses", {"model_version": "TEXT"})
        with self._db:
            self._db.execute("CREATE INDEX IF NOT EXISTS responses_version ON responses (model_version)")

    @staticmethod
    def _row(r: dict, now: float) -> tuple:
        """One record as a row, its text made storable (``storable``); a record that cannot be one (a missing key, a
        non-string id) raises FeedbackError."""
        if not isinstance(r, dict) or not isinstance(r.get("response_id"), str) or not r["response_id"]:
            raise FeedbackError(f"a response record needs a non-empty string 'response_id', got {r!r:.200}")
        try:
            row = (
                r["response_id"],
                r["model"],
                r["prompt"],
                json.dumps(storable(r["messages"])) if r.get("messages") is not None else None,
                r["response"],
                now,
                r.get("model_version"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FeedbackError(
                f"response record {r.get('response_id')!r} is malformed ({type(e).__name__}: {e})"
            ) from None
        bad = [v for v in row if v is not None and not isinstance(v, (str, float))]
        if bad:
            raise FeedbackError(
                f"response record {r['response_id']!r} holds a {type(bad[0]).__name__} where text belongs"
            )
        return tuple(storable(v) for v in row)

    def record_response(
        self,
        response_id: str,
        model: str,
        prompt: str,
        response: str,
        messages: list[dict] | None = None,
        model_version: str | None = None,
    ) -> None:
        """``model_version``: the digest of the checkpoint that answered (what the response itself names)."""
        self.record_responses(
            [
                {
                    "response_id": response_id,
                    "model": model,
                    "prompt": prompt,
                    "response": response,
                    "messages": messages,
                    "model_version": model_version,
                }
            ]
        )

    def record_responses(self, records: list[dict]) -> int:
        """Several ``record_response`` keyword dicts (``model_version`` optional in each) in one transaction;
        returns how many were recorded. Text SQLite cannot hold is made storable (``storable``); a record that still
        cannot be stored (malformed) is skipped with an error in the log, never failing the others in its batch."""
        now = time.time()
        rows = []
        for r in records:
            try:
                rows.append(self._row(r, now))
            except FeedbackError as e:
                log.error("not recorded for feedback: %s", e)
        sql = f"INSERT OR REPLACE INTO responses ({_RESPONSE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
        try:
            with self._lock, self._db:
                self._db.executemany(sql, rows)
            return len(rows)
        except (sqlite3.InterfaceError, sqlite3.DataError, sqlite3.IntegrityError, UnicodeError):
            pass  # one row SQLite refuses: store the others one by one (below)
        done = 0
        for row in rows:
            try:
                with self._lock, self._db:
                    self._db.execute(sql, row)
                done += 1
            except (sqlite3.InterfaceError, sqlite3.DataError, sqlite3.IntegrityError, UnicodeError) as e:
                log.error("not recorded for feedback: response %r (%s: %s)", row[0], type(e).__name__, e)
        return done

    def response(self, response_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, model, prompt, messages, response, model_version FROM responses WHERE id = ?",
                (response_id,),
            ).fetchone()
        if row is None:
            return None
        return {
            "id": row[0],
            "model": row[1],
            "prompt": row[2],
            "messages": json.loads(row[3]) if row[3] else None,
            "response": row[4],
            "model_version": row[5],
        }

    def versions(self) -> dict[str | None, int]:
        """``{model_version: responses recorded}`` (None: responses recorded without a version), most first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT model_version, COUNT(*) AS n FROM responses GROUP BY model_version "
                "ORDER BY n DESC, model_version"
            ).fetchall()
        return {v: int(n) for v, n in rows}

    def _need(self, response_id: Any, field: str) -> dict:
        if not isinstance(response_id, str) or not response_id:
            raise FeedbackError(f"'{field}' must be the id of a response this server returned")
        if storable(response_id) != response_id:  # no id this server returned holds text SQLite cannot hold
            raise NotFound(
                f"no response with id {storable(response_id)!r} ('{field}'); use the 'id' of a "
                "completion this server returned"
            )
        r = self.response(response_id)
        if r is None:
            raise NotFound(
                f"no response with id {response_id!r} ('{field}'); use the 'id' of a completion this server returned"
            )
        return r

    def rate(self, response_id: str, rating: Any, who: str = "") -> dict:
        score = rating_score(rating)
        self._need(response_id, "response_id")
        fid = "fb-" + uuid.uuid4().hex[:16]
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO feedback VALUES (?, 'rating', ?, NULL, ?, ?, ?, ?)",
                (fid, response_id, json.dumps(rating), score, who, time.time()),
            )
        return {"id": fid, "kind": "rating", "response_id": response_id, "score": score}

    def prefer(self, chosen_id: str, rejected_id: str, who: str = "") -> dict:
        chosen, rejected = self._need(chosen_id, "chosen_id"), self._need(rejected_id, "rejected_id")
        if chosen_id == rejected_id:
            raise FeedbackError("'chosen_id' and 'rejected_id' are the same response; compare two responses")
        if chosen["prompt"] != rejected["prompt"]:
            raise FeedbackError(
                "the two responses answer different prompts; a preference compares two answers to the same prompt"
            )
        fid = "fb-" + uuid.uuid4().hex[:16]
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO feedback VALUES (?, 'preference', ?, ?, NULL, NULL, ?, ?)",
                (fid, chosen_id, rejected_id, who, time.time()),
            )
        return {"id": fid, "kind": "preference", "chosen_id": chosen_id, "rejected_id": rejected_id}

    def preference_rows(self, model_version: str | None = None) -> list[dict]:
        """Explicit preferences, then pairs derived from ratings. With ``model_version``: only pairs whose two
        answers both came from that version. Each row names ``chosen_model_version``, ``rejected_model_version``
        and ``model_version`` (theirs when they agree, else null)."""
        only = "" if model_version is None else " AND c.model_version = :v AND r.model_version = :v"
        both = "" if model_version is None else " AND g.model_version = :v AND b.model_version = :v"
        with self._lock:
            explicit = self._db.execute(
                "SELECT c.prompt, c.response, r.response, c.messages, c.model_version, r.model_version FROM feedback f "
                "JOIN responses c ON c.id = f.response_id JOIN responses r ON r.id = f.rejected_id "
                "WHERE f.kind = 'preference'" + only + " ORDER BY f.created",
                {"v": model_version},
            ).fetchall()
            # pairs from ratings: an up-rated (score > 0) and a down-rated (score < 0) response to the same prompt
            derived = self._db.execute(
                "SELECT g.prompt, g.response, b.response, g.messages, g.model_version, b.model_version FROM "
                "(SELECT r.* FROM feedback f JOIN responses r ON r.id = f.response_id WHERE f.kind='rating' "
                " AND f.score > 0) g JOIN "
                "(SELECT r.* FROM feedback f JOIN responses r ON r.id = f.response_id WHERE f.kind='rating' "
                " AND f.score < 0) b ON g.prompt = b.prompt AND g.id != b.id" + both + " ORDER BY g.created, b.created",
                {"v": model_version},
            ).fetchall()

        def row(p: str, c: str, r: str, m: str | None, vc: str | None, vr: str | None, source: str) -> dict:
            return {
                "prompt": p,
                "chosen": c,
                "rejected": r,
                "messages": json.loads(m) if m else None,
                "source": source,
                "model_version": vc if vc == vr else None,
                "chosen_model_version": vc,
                "rejected_model_version": vr,
            }

        out = [row(*x, "user") for x in explicit]
        seen = {(o["prompt"], o["chosen"], o["rejected"]) for o in out}
        for x in derived:
            p, c, r = x[:3]
            if (p, c, r) not in seen and c != r:
                seen.add((p, c, r))
                out.append(row(*x, "ratings"))
        return out

    def rating_rows(self, model_version: str | None = None) -> list[dict]:
        """Every rating with the rated response (and its ``model_version``); only that version's when given."""
        only = "" if model_version is None else " AND r.model_version = :v"
        with self._lock:
            rows = self._db.execute(
                "SELECT r.prompt, r.response, f.rating, f.score, r.messages, r.model_version FROM feedback f "
                "JOIN responses r ON r.id = f.response_id WHERE f.kind = 'rating'" + only + " ORDER BY f.created",
                {"v": model_version},
            ).fetchall()
        return [
            {
                "prompt": p,
                "response": resp,
                "rating": json.loads(rt),
                "score": s,
                "messages": json.loads(m) if m else None,
                "model_version": v,
            }
            for p, resp, rt, s, m, v in rows
        ]

    def export(self, out: str | Path, ratings_out: str | Path | None = None, model_version: str | None = None) -> dict:
        """Write preferences to ``out`` and ratings to ``ratings_out`` (default ``<out stem>.ratings.jsonl``); with
        ``model_version``, only that version's (a FeedbackError names the versions there are when no response of
        it was recorded)."""
        if model_version is not None:
            known = self.versions()
            if model_version not in known:
                have = ", ".join(f"{v} ({n} responses)" for v, n in known.items() if v is not None) or "none"
                raise FeedbackError(
                    f"no response of model version {model_version!r} is in {self.path}; versions "
                    f"recorded: {have}. Pass one of them (every response names its model_version)"
                )
        out = Path(out)
        ratings_out = Path(ratings_out) if ratings_out else out.with_name(out.stem + ".ratings.jsonl")
        out.parent.mkdir(parents=True, exist_ok=True)
        ratings_out.parent.mkdir(parents=True, exist_ok=True)
        prefs, ratings = self.preference_rows(model_version), self.rating_rows(model_version)
        for path, rows in ((out, prefs), (ratings_out, ratings)):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            tmp.replace(path)
        return {
            "preferences": len(prefs),
            "ratings": len(ratings),
            "out": str(out),
            "ratings_out": str(ratings_out),
            "model_version": model_version,
        }


class ResponseBatcher:
    """Responses to record, sent to the store in batches: one call per ``interval_s`` instead of one per response (a
    call costs the store's replica a few ms of CPU: a few % of a 2-core machine at 30 responses/s).

    ``flush()`` sends what is pending and waits for it (and for a batch already on its way): the ingress flushes
    before it forwards a rating, so a rating sent through the same ingress replica always finds its response. A
    batch the store did not take because it was unreachable is kept for the next try (up to ``max_pending`` records;
    beyond that the oldest are dropped and counted in ``dropped``). A batch the store refused for its data (the
    store raised ``ValueError``, ``TypeError``, a ``sqlite3`` error...) is sent again one record at a time: the
    records the store takes are recorded, the ones it refuses are dropped with an error in the log and counted in
    ``rejected``, so one bad record never blocks the others, nor every later batch."""

    def __init__(
        self, send: Callable[[list[dict]], Awaitable[Any]], interval_s: float = 0.1, max_pending: int = 100_000
    ) -> None:
        self.send, self.interval_s, self.max_pending = send, interval_s, max_pending
        self.pending: list[dict] = []
        self.dropped = 0
        self.rejected = 0
        self._lock = asyncio.Lock()
        self._timer: asyncio.Task | None = None

    def add(self, **record: Any) -> None:
        self.pending.append(record)
        if len(self.pending) > self.max_pending:
            n = len(self.pending) - self.max_pending
            del self.pending[:n]
            self.dropped += n
            log.warning("feedback store unreachable: dropped the %d oldest unrecorded responses", self.dropped)
        if self._timer is None or self._timer.done():
            self._timer = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.interval_s)
        try:
            await self.flush()
        except Exception:
            log.exception("recording %d responses failed; retrying with the next batch", len(self.pending))

    async def flush(self) -> None:
        async with self._lock:  # a batch already on its way lands first
            batch, self.pending = self.pending, []
            if not batch:
                return
            try:
                await self.send(batch)
            except Exception as e:  # noqa: BLE001  (re-raised unless the store refused the data)
                if not refused_data(e):
                    self.pending[:0] = batch
                    raise
                log.warning(
                    "the feedback store refused a batch of %d responses (%s); recording them one by one",
                    len(batch),
                    unwrap(e),
                )
                await self._one_by_one(batch)
            except BaseException:
                self.pending[:0] = batch
                raise

    async def _one_by_one(self, batch: list[dict]) -> None:
        """Send each record alone: the ones the store refuses are dropped (``rejected``); when the store becomes
        unreachable meanwhile, that record and the rest are kept for the next try and the error is raised."""
        for i, record in enumerate(batch):
            try:
                await self.send([record])
            except Exception as e:  # noqa: BLE001  (re-raised unless the store refused the data)
                if not refused_data(e):
                    self.pending[:0] = batch[i:]
                    raise
                self.rejected += 1
                log.error(
                    "response %r not recorded for feedback: the store refused it (%s)",
                    record.get("response_id"),
                    unwrap(e),
                )
            except BaseException:
                self.pending[:0] = batch[i:]
                raise


def refused_data(e: BaseException) -> bool:
    """Whether the store refused a call for the data it carried (the store's own error, out of Ray's wrappers),
    rather than being unreachable (an actor that died, a timeout, a connection error)."""
    cause = unwrap(e)
    return isinstance(cause, (ValueError, TypeError, KeyError, AttributeError, sqlite3.Error))


@serve.deployment(name="Feedback")
class FeedbackServer(FeedbackStore):
    """The feedback store as its own deployment: one writer for the SQLite file however many ingress replicas run
    (keep ``num_replicas: 1``)."""
