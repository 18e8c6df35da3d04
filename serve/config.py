"""``genloop serve``'s configuration: the typed ``ServeConfig`` (deployments' scale and resources, limits, RAG,
streaming), its checks, and the environment a command sets before it starts Ray for serving (``ray_env``: Ray
Serve's throughput settings and direct ingress, which replicas and the proxy read at import)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.engine import EngineConfig
from pipelines.artifacts import exists, name

log = logging.getLogger(__name__)


# Ray Serve's own throughput settings (those of RAY_SERVE_THROUGHPUT_OPTIMIZED, minus direct ingress and gRPC
# transport, which change how clients and replicas connect): user code and the handle's router run on the replica's
# event loop instead of extra threads/loops, request-path logs are buffered. On a small CPU every thread hop per
# streamed piece costs; bench/serve_bench.py measures the difference (`serve.throughput_optimized=false`).
THROUGHPUT_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
}


def direct_ingress_env(port: int) -> dict[str, str]:
    """Ray Serve direct ingress on ``port``: the ingress replica runs the HTTP server itself, so a request (and every
    streamed piece) skips the Serve proxy actor, one process hop less. The controller and replicas read these at
    import, so they must be in the environment before Ray starts. One port: one ingress replica per node."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),  # exclusive bound
        # no external load balancer has to notice a stopped replica, and a restarted app binds the same port again
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
    }


@dataclass
class DeploymentOptions:
    """One deployment's scale and resources. ``autoscaling`` (Ray Serve ``autoscaling_config``: min_replicas,
    max_replicas, target_ongoing_requests, ...) replaces ``num_replicas`` when set."""

    num_replicas: int = 1
    autoscaling: dict[str, Any] | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing_requests: int = 64

    def serve_options(self, env: dict[str, str] | None = None) -> dict[str, Any]:
        actor: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if env:
            actor["runtime_env"] = {"env_vars": dict(env)}
        opts: dict[str, Any] = {"ray_actor_options": actor, "max_ongoing_requests": self.max_ongoing_requests}
        if self.autoscaling:
            opts["autoscaling_config"] = dict(self.autoscaling)
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


EMBEDDINGS_FROM = ("model", "retriever")  # what /v1/embeddings serves (ServeConfig.embeddings_from)


@dataclass
class ServeConfig:
    model: str = ""  # checkpoint folder (Hugging Face format, written by a genloop training stage)
    model_name: str = ""  # the name clients send as "model"; default: the checkpoint folder's name
    knowledge: str = "runs/serve"  # knowledge store: a .db file, or a folder holding knowledge.db
    memory_db: str = ""  # default: memory.db next to the knowledge store
    feedback_db: str = ""  # default: feedback.db next to the knowledge store
    api_key_file: str = ""  # one key per line; empty: no authentication (loopback use)
    admin_key_file: str = ""  # admin keys (one per line) for POST /admin/models; empty: admin routes answer 403
    switch_drain_timeout_s: float = 120.0  # a version switch waits this long for in-flight requests, else 503
    structured_outputs: bool = True  # response_format json_object/json_schema (the engine loads the HF tokenizer)
    json_any_whitespace: bool = False  # false: response_format JSON has no whitespace between tokens (compact; a
    # small model may otherwise pad with whitespace up to max_tokens); true: vLLM's default grammar
    embedding_pooling: str = "mean"  # /v1/embeddings: "mean" of the final hidden states, or the "last" token's
    max_embedding_inputs: int = 256  # inputs per /v1/embeddings request
    # /v1/embeddings: "model" = the served model's pooled hidden states (token ids accepted); "retriever" = the
    # retriever's embedder, serve.rag_embedder (e.g. ckpt:DIR from `genloop embed-train`; text inputs only)
    embeddings_from: str = "model"
    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "genloop"
    route_prefix: str = "/"
    max_body_bytes: int = 1_000_000
    max_document_chars: int = 200_000
    max_tokens_cap: int = 1024  # largest max_tokens a request may ask for
    default_max_tokens: int = 128
    rate_limit_per_minute: int = 600  # per API key (or client address without keys), per ingress replica; 0: off
    access_log: bool = False  # Ray Serve's per-request log lines (costly on a small CPU)
    throughput_optimized: bool = True  # THROUGHPUT_ENV in every replica (and the proxy, when this starts Ray)
    # when `start` launches its own local Ray with one ingress replica: clients reach that replica's HTTP server on
    # `port` (Ray Serve direct ingress, no proxy hop); else (joining a cluster) the Serve proxy listens on `port`
    direct_ingress: bool = True
    stream_messages_per_s: float = 50.0  # per generator replica, shared by its streams (0: a message per step)
    max_stream_interval_ms: float = 250.0  # the longest a streamed piece waits for more tokens
    rag_top_k: int = 3
    # hybrid retrieval (serve.knowledge): "" = BM25 alone; hash:DIM, lsa:DIR or ckpt:DIR (serve.vectors) adds dense
    # vectors, both sides searched per request and fused by reciprocal rank fusion with k = rag_rrf_k (1-based ranks)
    rag_embedder: str = ""
    rag_rrf_k: float = 60.0
    rag_candidates: int = 50  # chunks taken from each side before fusion
    rag_reindex: bool = False  # the store was embedded by another embedder: re-embed it (else the retriever refuses)
    memory_top_k: int = 3
    chunk_chars: int = 600
    chunk_overlap: int = 80
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(max_num_seqs=32))
    generator: DeploymentOptions = field(default_factory=DeploymentOptions)
    retriever: DeploymentOptions = field(default_factory=lambda: DeploymentOptions(num_cpus=0.25))
    ingress: DeploymentOptions = field(
        default_factory=lambda: DeploymentOptions(num_cpus=0.25, max_ongoing_requests=256)
    )
    feedback: DeploymentOptions = field(
        default_factory=lambda: DeploymentOptions(num_cpus=0.1, max_ongoing_requests=256)
    )

    def served_name(self) -> str:
        return self.model_name or name(self.model)

    def state_paths(self) -> tuple[str, str, str]:
        """(knowledge, memory db, feedback db)."""
        from serve.knowledge import store_path

        base = store_path(self.knowledge).parent
        return (
            self.knowledge,
            self.memory_db or str(base / "memory.db"),
            self.feedback_db or str(base / "feedback.db"),
        )


def check_config(cfg: ServeConfig) -> None:
    """Fail before starting anything when the checkpoint is missing or limits make no sense (``model`` may be a
    URI; the knowledge store is SQLite and stays on a local disk)."""
    from models.checkpoint import load_config
    from pipelines.artifacts import checkpoint_dir, is_uri

    if not cfg.model:
        raise ValueError("no model: pass --model CHECKPOINT_DIR (a folder written by pretrain/sft/rlhf)")
    if not exists(cfg.model):
        raise FileNotFoundError(f"checkpoint {cfg.model} does not exist; pass the folder a training stage wrote")
    load_config(checkpoint_dir(cfg.model))
    for key in ("knowledge", "memory_db", "feedback_db"):
        if is_uri(getattr(cfg, key)):
            raise ValueError(
                f"serve.{key}={getattr(cfg, key)}: the stores are SQLite files on a local disk; give a "
                "local path (load documents from object storage with `genloop knowledge add s3://...`)"
            )
    if cfg.admin_key_file and not Path(cfg.admin_key_file).is_file():
        raise FileNotFoundError(
            f"serve.admin_key_file={cfg.admin_key_file} does not exist; write one admin key per "
            "line or leave it empty (admin routes off)"
        )
    from serve.embeddings import POOLINGS

    if cfg.embedding_pooling not in POOLINGS:
        raise ValueError(f"serve.embedding_pooling={cfg.embedding_pooling!r}: use one of {POOLINGS}")
    from serve.vectors import check_embedder_spec

    check_embedder_spec(cfg.rag_embedder)
    if cfg.embeddings_from not in EMBEDDINGS_FROM:
        raise ValueError(f"serve.embeddings_from={cfg.embeddings_from!r}: use one of {EMBEDDINGS_FROM}")
    if cfg.embeddings_from == "retriever" and not cfg.rag_embedder.strip():
        raise ValueError(
            "serve.embeddings_from=retriever serves serve.rag_embedder, which is empty: set it (e.g. ckpt:DIR from "
            "`genloop embed-train`) or use embeddings_from=model"
        )
    if cfg.rag_rrf_k < 0 or cfg.rag_candidates < 1:
        raise ValueError(
            f"serve: need rag_rrf_k >= 0 and rag_candidates >= 1, got {cfg.rag_rrf_k} and {cfg.rag_candidates}"
        )
    if cfg.switch_drain_timeout_s <= 0 or cfg.max_embedding_inputs < 1:
        raise ValueError("serve: switch_drain_timeout_s must be > 0 and max_embedding_inputs >= 1")
    if cfg.default_max_tokens < 1 or cfg.max_tokens_cap < cfg.default_max_tokens:
        raise ValueError(
            f"serve: need 1 <= default_max_tokens ({cfg.default_max_tokens}) <= max_tokens_cap ({cfg.max_tokens_cap})"
        )


def context_length(cfg: ServeConfig, local_model: str) -> int:
    """The served context: the checkpoint's ``max_seq_len``, capped by ``engine.max_model_len`` when set."""
    from models.checkpoint import load_config

    n = load_config(local_model).max_seq_len
    return min(n, cfg.engine.max_model_len) if cfg.engine.max_model_len else n


def use_direct_ingress(cfg: ServeConfig, address: str | None) -> bool:
    """Direct ingress needs the environment in place before Ray starts (so: a local Ray this process starts) and
    one ingress replica (one port)."""
    import ray

    if not cfg.direct_ingress:
        return False
    if address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        log.info("direct ingress off: joining a running Ray, whose Serve proxy listens on port %d", cfg.port)
        return False
    if cfg.ingress.autoscaling or cfg.ingress.num_replicas != 1:
        log.info(
            "direct ingress off: %s ingress replicas share port %d through the Serve proxy",
            "autoscaled" if cfg.ingress.autoscaling else cfg.ingress.num_replicas,
            cfg.port,
        )
        return False
    return True


def ray_env(cfg: ServeConfig, address: str | None) -> dict[str, str]:
    """What a command puts in ``os.environ`` before it starts Ray to serve ``cfg`` (the controller, proxy and
    replicas read these at import): direct ingress on ``cfg.port`` when ``use_direct_ingress`` (a local Ray this
    process starts, one ingress replica), and Ray Serve's throughput settings when ``throughput_optimized``. Empty
    when joining a running Ray. ``serve.app.start`` then finds direct ingress on and moves the proxy aside."""
    env: dict[str, str] = {}
    if use_direct_ingress(cfg, address):
        env.update(direct_ingress_env(cfg.port))
    import ray

    if cfg.throughput_optimized and not (address or os.environ.get("RAY_ADDRESS") or ray.is_initialized()):
        env.update(THROUGHPUT_ENV)
    return env


def direct_ingress_on(cfg: ServeConfig) -> bool:
    """Was the running Ray started with direct ingress on ``cfg.port`` (``ray_env``)?"""
    return os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1" and os.environ.get(
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"
    ) == str(cfg.port)


def spare_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
