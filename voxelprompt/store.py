"""Persistent state of the REST service: sessions and messages in SQLite (WAL), files on disk.

Layout of the state folder::

    state.sqlite3                     sessions, messages (WAL journal, synchronous=FULL)
    sessions/<id>/uploads/<name>.nii.gz      uploaded inputs
    sessions/<id>/transcript.json (.md, .html)   the conversation's transcript
    sessions/<id>/turn-<n>/outputs/...       output volumes and previews
    sessions/<id>/turn-<n>/calls/...         masks of every segment() call

Every write commits before the service answers, so an acknowledged session or message survives
a crash or restart. One connection is shared under a lock (SQLite serialises writers anyway).
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any

from .transcript import now_iso

SESSION_ID = re.compile(r"^[0-9a-f]{32}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id       TEXT PRIMARY KEY,
    created  TEXT NOT NULL,
    updated  TEXT NOT NULL,
    inputs   TEXT NOT NULL,          -- JSON: [{key, name, path, sha256, uploaded}]
    bytes    INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    idx        INTEGER NOT NULL,
    prompt     TEXT NOT NULL,
    status     TEXT NOT NULL,        -- running, done, step_limit, ..., repeated_error, error, interrupted
    message    TEXT,
    answer     TEXT,                 -- JSON response body
    created    TEXT NOT NULL,
    finished   TEXT,
    PRIMARY KEY (session_id, idx)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


class Store:
    """The service's database and session folders.

    Args:
        root: the state folder (created).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        (self.root / "sessions").mkdir(parents=True, exist_ok=True)
        self.path = self.root / "state.sqlite3"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', '1')")
            # messages that were running when the service stopped did not finish
            self._db.execute("UPDATE messages SET status='interrupted', message='the service stopped while this "
                             "message ran', finished=? WHERE status='running'", (now_iso(),))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @property
    def journal_mode(self) -> str:
        with self._lock:
            return self._db.execute("PRAGMA journal_mode").fetchone()[0]

    def session_dir(self, sid: str) -> Path:
        if not SESSION_ID.match(sid):
            raise ValueError("bad session id")
        return self.root / "sessions" / sid

    # ------------------------------------------------------------------ sessions
    def create_session(self, sid: str, inputs: list[dict], nbytes: int) -> dict:
        t = now_iso()
        with self._lock:
            self._db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?)", (sid, t, t, json.dumps(inputs), nbytes))
        return self.get_session(sid)

    def get_session(self, sid: str) -> dict | None:
        if not SESSION_ID.match(sid):
            return None
        with self._lock:
            row = self._db.execute("SELECT * FROM sessions WHERE id=?", (sid,)).fetchone()
        if row is None:
            return None
        d = dict(row)
        d["inputs"] = json.loads(d["inputs"])
        return d

    def delete_session(self, sid: str) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM sessions WHERE id=?", (sid,))
        d = self.session_dir(sid)
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)
        return cur.rowcount > 0

    def session_ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT id FROM sessions ORDER BY created")]

    # ------------------------------------------------------------------ messages
    def add_message(self, sid: str, idx: int, prompt: str) -> None:
        t = now_iso()
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO messages (session_id, idx, prompt, status, created) "
                             "VALUES (?, ?, ?, 'running', ?)", (sid, idx, prompt, t))
            self._db.execute("UPDATE sessions SET updated=? WHERE id=?", (t, sid))

    def finish_message(self, sid: str, idx: int, status: str, message: str | None, answer: dict | None) -> None:
        t = now_iso()
        with self._lock:
            self._db.execute("UPDATE messages SET status=?, message=?, answer=?, finished=? WHERE session_id=? AND idx=?",
                             (status, message, json.dumps(answer) if answer is not None else None, t, sid, idx))
            self._db.execute("UPDATE sessions SET updated=? WHERE id=?", (t, sid))

    def messages(self, sid: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM messages WHERE session_id=? ORDER BY idx", (sid,)).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["answer"] = json.loads(d["answer"]) if d["answer"] else None
            out.append(d)
        return out
