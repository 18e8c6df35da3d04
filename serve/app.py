"""``genloop serve``: a checkpoint behind OpenAI-compatible HTTP on Ray Serve, with RAG, memory and feedback.

Deployments composed with ``.bind()``::

    Ingress (FastAPI, @serve.ingress) ──► Generator (vLLM AsyncLLM, token ids in/out)
                                     ├──► Retriever (knowledge store: SQLite FTS5/BM25 + faiss vectors; memory)
                                     └──► Feedback  (every response recorded; ratings and preferences; one writer)

Each has its own replica count or ``autoscaling_config`` and ``ray_actor_options`` (``serve.generator.*``,
``serve.retriever.*``, ``serve.ingress.*``, ``serve.feedback.*``), so the generator scales apart from the retriever. The ingress tokenizes
with the checkpoint's genloop tokenizer, renders chat with the checkpoint's template (``models.chat``), enforces
keys/limits, adds retrieved context, detokenizes the engine's token stream and records every response for feedback.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both ``stream: true`` as SSE ending in
``data: [DONE]``), ``POST /v1/embeddings``, ``GET /v1/models``, ``GET /health``, ``POST /v1/documents``,
``GET|DELETE /v1/documents/{id}``, ``POST|GET /v1/memory``, ``DELETE /v1/memory/{id}``, ``POST /v1/feedback``,
``POST /admin/models`` (switch the model version in place; admin key). Every answer names its ``model_version``.

Security: with ``--api-key-file`` every ``/v1`` route needs ``Authorization: Bearer KEY``; ``/admin`` routes need a
key from ``admin_key_file`` (none configured: 403). Rate limit: a token bucket per key **per ingress replica**
(``rate_limit_per_minute``; R replicas admit up to R x the limit). Memory is scoped to (API key, ``user``): one user
never sees another's facts. Body size, document size and ``max_tokens`` are capped;
prompt + max_tokens beyond the context is a 400 with the numbers.

Modules: ``serve.config`` (ServeConfig, checks, ``ray_env``), ``serve.generator`` (the vLLM deployment, stream
coalescing), ``serve.api`` (the HTTP ingress, over ``serve.schemas``, ``serve.auth``, ``serve.ratelimit``,
``serve.detokenize``, ``serve.errors``), ``serve.versions`` (model versions, the switch of every generator replica),
``serve.retriever`` / ``serve.feedback`` (the other deployments); this module composes them (``build_app``) and
deploys on a running Ray (``start``). ``--model`` may be an ``s3://`` URI:
each replica downloads the checkpoint once into its node's cache (``pipelines.artifacts.checkpoint_dir``).

Cluster: ``serve deploy serve/serve_config.yaml`` deploys the same application through ``app_builder``.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from ray import serve

from pipelines.artifacts import absolute, resolve_checkpoint
from serve.api import Ingress
from serve.auth import load_api_keys
from serve.config import (
    THROUGHPUT_ENV,
    DeploymentOptions,
    ServeConfig,
    check_config,
    direct_ingress_env,
    direct_ingress_on,
    ray_env,
    spare_port,
    use_direct_ingress,
)
from serve.generator import Generator

log = logging.getLogger(__name__)

__all__ = [
    "THROUGHPUT_ENV",
    "DeploymentOptions",
    "ServeConfig",
    "app_builder",
    "build_app",
    "direct_ingress_env",
    "ray_env",
    "start",
    "use_direct_ingress",
]


def build_app(cfg: ServeConfig):
    """The bound application: Ingress(Generator, Retriever, Feedback), each with its own options."""
    from serve.feedback import FeedbackServer
    from serve.retriever import RetrieverServer

    check_config(cfg)
    # replicas may run elsewhere (another cwd or node): hand them absolute paths (a model URI stays a URI)
    knowledge, memory_db, feedback_db = (str(Path(p).resolve()) for p in cfg.state_paths())
    cfg = replace(
        cfg,
        model=absolute(resolve_checkpoint(cfg.model)),
        model_name=cfg.served_name(),
        knowledge=knowledge,
        memory_db=memory_db,
        feedback_db=feedback_db,
    )
    keys = load_api_keys(cfg.api_key_file) if cfg.api_key_file else frozenset()
    admin = load_api_keys(cfg.admin_key_file) if cfg.admin_key_file else frozenset()
    env = THROUGHPUT_ENV if cfg.throughput_optimized else None
    deployment_id = uuid.uuid4().hex  # replicas started after a version switch find the live model under it
    generator = Generator.options(**cfg.generator.serve_options(env)).bind(
        cfg.model,
        cfg.engine,
        cfg.stream_messages_per_s,
        cfg.max_stream_interval_ms,
        cfg.switch_drain_timeout_s,
        cfg.structured_outputs,
        deployment_id,
        cfg.json_any_whitespace,
    )
    retriever = RetrieverServer.options(**cfg.retriever.serve_options(env)).bind(
        knowledge,
        memory_db,
        cfg.chunk_chars,
        cfg.chunk_overlap,
        cfg.max_document_chars,
        cfg.rag_embedder,
        cfg.rag_rrf_k,
        cfg.rag_candidates,
        cfg.rag_reindex,
    )
    feedback = FeedbackServer.options(**cfg.feedback.serve_options(env)).bind(feedback_db)
    return Ingress.options(**cfg.ingress.serve_options(env)).bind(
        generator, retriever, feedback, cfg, keys, admin, deployment_id
    )


def app_builder(args: dict[str, Any]):
    """Ray Serve application builder for ``serve deploy`` / ``serve run serve.app:app_builder config=demo ...``:
    ``args`` are ``config`` (preset or YAML) plus ServeConfig keys (dotted keys allowed)."""
    from pipelines.config import build_config

    args = dict(args or {})
    preset = args.pop("config", None)
    return build_app(build_config(ServeConfig, "serve", preset, args))


def start(cfg: ServeConfig, blocking: bool = False) -> str:
    """Deploy the app on the running Ray (the caller starts it, with ``ray_env(cfg, address)`` in its environment
    first); returns its base URL (``cfg.host:cfg.port``).

    With direct ingress on (``ray_env`` set it for a local Ray with one ingress replica) the ingress replica itself
    listens on ``cfg.port`` and the Serve proxy takes a spare port; otherwise the Serve proxy listens on ``cfg.port``."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError(
            "serve.app.start deploys on a running Ray: set os.environ from ray_env(cfg, address), "
            "start Ray (cluster.runtime.init_ray), then call start"
        )
    app = build_app(cfg)
    proxy_port = cfg.port
    if direct_ingress_on(cfg):
        proxy_port = spare_port(cfg.host)
        log.info(
            "direct ingress: the ingress replica serves %s:%d, the Serve proxy %s:%d",
            cfg.host,
            cfg.port,
            cfg.host,
            proxy_port,
        )
    serve.start(http_options={"host": cfg.host, "port": proxy_port})
    serve.run(
        app,
        name=cfg.app_name,
        route_prefix=cfg.route_prefix,
        blocking=blocking,
        logging_config={"enable_access_log": cfg.access_log, "log_level": "INFO" if cfg.access_log else "WARNING"},
    )
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
