"""The service's durable state: sessions, training runs, checkpoints, samplers and future results.

SQLModel tables over SQLAlchemy: SQLite by default (`sqlite:///WORKDIR/serve.db`), Postgres by URL
(`postgresql://...`, with a driver installed). A restarted server on the same database and workdir still
answers every completed future and every saved checkpoint; futures that were pending when the old
process died are answered as failed (category "server").
"""

from __future__ import annotations

import json
import time

import sqlalchemy
from sqlmodel import Field, Session, SQLModel, create_engine, select


class SessionRow(SQLModel, table=True):
    __tablename__ = "sessions"
    id: str = Field(primary_key=True)
    created: float
    last_heartbeat: float
    tags: str = "[]"
    finished: str | None = None


class RunRow(SQLModel, table=True):
    """A training client: its LoRA spec and where it came from."""

    __tablename__ = "runs"
    model_id: str = Field(primary_key=True)
    session_id: str = Field(index=True)
    base_model: str
    rank: int
    seed: int
    train_attn: bool
    train_mlp: bool
    train_unembed: bool
    created: float


class RunMetadataRow(SQLModel, table=True):
    """A training run's `user_metadata` (create_model's), a JSON object of strings (a table of its own, so
    databases written before it still open)."""

    __tablename__ = "run_metadata"
    model_id: str = Field(primary_key=True)
    user_metadata: str = "{}"


class CheckpointRow(SQLModel, table=True):
    """A saved `tinker://MODEL_ID/{weights|sampler_weights}/NAME`; `directory` is its orbax directory."""

    __tablename__ = "checkpoints"
    path: str = Field(primary_key=True)
    model_id: str = Field(index=True)
    kind: str
    name: str
    directory: str
    rank: int
    train_attn: bool
    train_mlp: bool
    train_unembed: bool
    has_optimizer: bool
    created: float


class SamplerRow(SQLModel, table=True):
    __tablename__ = "samplers"
    id: str = Field(primary_key=True)
    session_id: str
    base_model: str
    model_path: str | None = None


class FutureRow(SQLModel, table=True):
    """A future's outcome: status "pending" | "done" | "failed"; payload is JSON or protobuf bytes."""

    __tablename__ = "futures"
    request_id: str = Field(primary_key=True)
    kind: str
    status: str
    content_type: str = "application/json"
    payload: bytes = b""
    created: float


class Store:
    def __init__(self, url: str):
        connect_args = {"check_same_thread": False} if url.startswith("sqlite") else {}
        self.engine = create_engine(url, connect_args=connect_args)
        SQLModel.metadata.create_all(self.engine)
        with Session(self.engine) as s:  # the previous process's pending work is lost: say so
            for row in s.exec(select(FutureRow).where(FutureRow.status == "pending")):
                row.status = "failed"
                row.payload = json.dumps(
                    {"error": "the server restarted before this finished", "category": "server"}
                ).encode()
                s.add(row)
            s.commit()

    def put(self, *rows) -> None:
        with Session(self.engine) as s:
            for row in rows:
                s.merge(row)
            s.commit()

    def get(self, cls, key):
        with Session(self.engine) as s:
            return s.get(cls, key)

    def where(self, cls, **equal) -> list:
        with Session(self.engine) as s:
            query = select(cls)
            for name, value in equal.items():
                query = query.where(getattr(cls, name) == value)
            return list(s.exec(query))

    def count(self, cls) -> int:
        with Session(self.engine) as s:
            return s.exec(select(sqlalchemy.func.count()).select_from(cls)).one()

    def new_session(self, session_id: str, tags) -> None:
        now = time.time()
        self.put(SessionRow(id=session_id, created=now, last_heartbeat=now, tags=json.dumps(list(tags or []))))

    def finish_future(self, request_id: str, status: str, content_type: str, payload: bytes) -> None:
        with Session(self.engine) as s:
            row = s.get(FutureRow, request_id)
            if row is None:
                return
            row.status, row.content_type, row.payload = status, content_type, payload
            s.add(row)
            s.commit()
