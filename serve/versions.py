"""Model versions for serving: what a checkpoint's version is, whether a new checkpoint can replace the live one in
place, and the error a refused switch answers with. Plain functions over checkpoint folders (no Ray, no vLLM).

A **model version** is the digest of the artifact's manifest (``pipelines.artifacts.manifest_digest``, the same
sha256 a downstream manifest records of its inputs), shortened to its first 16 hex digits, when the checkpoint is
the artifact folder itself or its ``model/`` folder and the artifact is finished; otherwise (a bare checkpoint
folder, a stage still running, a checkpoint nested deeper) a content hash of the weight files, ``w-`` + 16 hex
digits. The server names it in every response, ``/v1/models`` and the feedback store.

An **in-place switch** (weights reloaded into the running engine) needs the same architecture (``config.json``
minus its dtype), the same tokenizer and chat template (the ingress keeps encoding with the live ones) and the same
weight names and shapes; ``incompatibilities`` lists what differs.

**The switch itself** (``VersionSwitch``, driven by the ingress's ``POST /admin/models``): the checkpoint is checked
here, recorded on the application's live board (``serve.live``: a generator replica that starts meanwhile loads it),
then every replica of the generator deployment switches (``Generator.switch``: drain, reload, resume) through Ray
Serve's public ``DeploymentHandle.broadcast``, one call per running replica. The switch succeeds only when every
replica Serve reports running (``serve.status()``) answered for the new version; a replica that fails, or replicas
the broadcast did not reach within ``settle_s``, fail the switch with a ``SwitchError`` naming them, after the
replicas that did switch were switched back (the old version keeps serving). The orchestration takes the handle and
the replica count as arguments: tests drive it without Ray.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from pipelines.artifacts import MANIFEST, artifact_of, exists, join, manifest_digest, parent, read_manifest
from serve.errors import ServeError, unwrap

log = logging.getLogger(__name__)

VERSION_DIGITS = 16
# config.json keys that do not change what the weights mean (a bf16 export of the same model reloads fine)
IGNORED_CONFIG_KEYS = {"torch_dtype", "dtype", "transformers_version", "use_cache"}
TOKENIZER_FILES = (
    "tokenizer.tiktoken",
    "tokenizer_spec.json",
    "tokenizer_config.json",
    "tokenizer.json",  # an imported model's own tokenizer and chat template
    "chat_template.jinja",
    "special_tokens_map.json",
)
WEIGHTS_INDEX = "model.safetensors.index.json"


class SwitchError(ServeError):
    """A refused or failed version switch; ``status`` is the HTTP answer (400 bad checkpoint, 404 missing, 409
    incompatible, 503 busy) and ``code`` its OpenAI-style error code. The old version keeps serving."""

    def __init__(self, message: str, status: int = 400, code: str = "checkpoint_invalid") -> None:
        super().__init__(message, status, code)  # all three in args: the error crosses Ray handles (pickle)
        self.message, self.status, self.code, self.param = message, status, code, "model"

    def __str__(self) -> str:
        return self.message


def weight_files(local: str | Path) -> list[str]:
    """The safetensors files of a local checkpoint folder: ``model.safetensors``, or the shards its index names."""
    local = Path(local)
    if (local / "model.safetensors").is_file():
        return [str(local / "model.safetensors")]
    index = local / WEIGHTS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise SwitchError(f"{index} is corrupt ({e!r}); re-export the checkpoint") from None
        missing = [s for s in shards if not (local / s).is_file()]
        if missing:
            raise SwitchError(f"{local}: weight shards {missing[:3]} named in {WEIGHTS_INDEX} are missing")
        return [str(local / s) for s in shards]
    raise SwitchError(
        f"{local} holds no weights (model.safetensors or {WEIGHTS_INDEX}); pass a checkpoint folder a "
        "genloop training stage wrote"
    )


def weights_digest(local: str | Path) -> str:
    h = hashlib.sha256()
    for f in weight_files(local):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return "w-" + h.hexdigest()[:VERSION_DIGITS]


def model_version(checkpoint: str, local: str | Path | None = None) -> str:
    """The version of the checkpoint folder ``checkpoint`` (a path or URI, already resolved to the folder holding
    ``config.json``): its finished artifact's manifest digest, else a content hash of the weights (read from
    ``local``, the folder's local copy, default ``checkpoint`` itself)."""
    checkpoint = str(checkpoint).rstrip("/")
    art = artifact_of(checkpoint, levels=1)
    if art is not None and art.rstrip("/") in (checkpoint, parent(checkpoint)) and exists(join(art, MANIFEST)):
        try:
            if read_manifest(art).get("status") == "finished":
                return manifest_digest(art)[:VERSION_DIGITS]
        except ValueError as e:  # a corrupt manifest: fall back to the weights
            log.warning("%s: %s; the version is the weights' hash", art, e)
    return weights_digest(local or checkpoint)


def _file_digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def weight_shapes(local: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers (no tensor is read). A truncated or corrupt file is a
    SwitchError."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in weight_files(local):
        try:
            with safe_open(f, framework="pt") as st:
                for k in st.keys():
                    shapes[k] = tuple(st.get_slice(k).get_shape())
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            raise SwitchError(
                f"{f} is not a readable safetensors file ({type(e).__name__}: {e}); re-export the checkpoint"
            ) from None
    return shapes


def _same_model(live: Path, new: Path) -> bool:
    """Do both configs describe the same network (``models.checkpoint.load_config``: sizes, heads, RoPE, vocabulary,
    tied head, biases)? A fine-tuned export of an imported model writes its config.json anew (transformers' extra
    keys dropped, ``rope_theta`` where transformers 4 put it), yet reloads in place."""
    from models.checkpoint import CheckpointError, load_config

    try:
        return load_config(live) == load_config(new)
    except CheckpointError:
        return False


def incompatibilities(live: str | Path, new: str | Path) -> list[str]:
    """What keeps the checkpoint folder ``new`` from replacing ``live`` in place (both local): differing
    ``config.json`` keys, tokenizer/chat template files, weight names or shapes. Empty: an in-place reload works."""
    live, new = Path(live), Path(new)
    out: list[str] = []
    cfgs = []
    for folder in (live, new):
        try:
            cfgs.append(
                {
                    k: v
                    for k, v in json.loads((folder / "config.json").read_text()).items()
                    if k not in IGNORED_CONFIG_KEYS
                }
            )
        except (OSError, json.JSONDecodeError) as e:
            raise SwitchError(
                f"{folder / 'config.json'} is missing or corrupt ({e}); re-export the checkpoint"
            ) from None
    if not _same_model(live, new):  # keys that do not change the model (a name, eos ids, rope_theta's place) pass
        keys = sorted(set(cfgs[0]) | set(cfgs[1]), key=str)
        out += [
            f"config.json {k}: {cfgs[0].get(k)!r} -> {cfgs[1].get(k)!r}"
            for k in keys
            if cfgs[0].get(k) != cfgs[1].get(k)
        ]
    out += [
        f"{f} differs (another tokenizer or chat template)"
        for f in TOKENIZER_FILES
        if _file_digest(live / f) != _file_digest(new / f)
    ]
    if not out:  # same config: the weights must still hold the same tensors
        a, b = weight_shapes(live), weight_shapes(new)
        missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        if missing:
            out.append(f"weights lack {missing[:3]}")
        if extra:
            out.append(f"weights have unexpected tensors {extra[:3]}")
        out += [f"weight {k} has shape {b[k]}, the live model {a[k]}" for k in sorted(set(a) & set(b)) if a[k] != b[k]][
            :3
        ]
    return out


def check_checkpoint(model: str, live_local: str | Path) -> tuple[str, str, str]:
    """``model`` (an absolute path or a URI; a folder holding ``config.json`` or an artifact with ``model/``) checked
    to replace the live checkpoint (local folder ``live_local``) in place: (resolved checkpoint, its local copy, its
    version). A missing checkpoint is a 404 SwitchError, an unreadable one a 400, an incompatible one a 409."""
    from models.checkpoint import CheckpointError, load_config, load_tokenizer
    from pipelines.artifacts import checkpoint_dir, is_uri, resolve_checkpoint

    if not model or not (is_uri(model) or Path(model).is_absolute()):
        raise SwitchError(
            f"model {model!r}: give an absolute checkpoint path or a URI (the server resolves paths "
            "on its own machine, not in your working directory)",
            400,
            "checkpoint_invalid",
        )
    try:
        resolved = resolve_checkpoint(model)
        local = checkpoint_dir(resolved)
    except (OSError, ValueError) as e:
        raise SwitchError(f"checkpoint {model} not found: {e}", 404, "checkpoint_not_found") from None
    try:
        cfg = load_config(local)
        tok = load_tokenizer(local)
    except CheckpointError as e:
        raise SwitchError(f"checkpoint {model} does not load: {e}", 400, "checkpoint_invalid") from None
    if tok.n_vocab > cfg.vocab_size:
        raise SwitchError(
            f"checkpoint {model}: its tokenizer has {tok.n_vocab} tokens, its config {cfg.vocab_size}",
            400,
            "checkpoint_invalid",
        )
    diffs = incompatibilities(live_local, local)
    if diffs:
        raise SwitchError(
            f"checkpoint {model} cannot replace the live model in place: {'; '.join(diffs[:4])}. Switching to "
            "another architecture or tokenizer needs new generator and ingress replicas, which this server does not "
            f"do while serving: start a new application (`genloop serve --model {model}`) and move clients to it",
            409,
            "incompatible_checkpoint",
        )
    return resolved, local, model_version(resolved, local)


# ---------------------------------------------------------------------------------------------------------------
# the switch of every generator replica


def running_replicas(app_name: str, deployment: str = "Generator") -> int:
    """How many replicas of ``deployment`` Ray Serve reports RUNNING in ``app_name`` (``serve.status()``; blocking)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or deployment not in app.deployments:
        raise SwitchError(
            f"Ray Serve reports no deployment {deployment!r} in application {app_name!r}; the switch "
            "cannot tell which replicas to reach",
            503,
            "switch_failed",
        )
    states = app.deployments[deployment].replica_states
    return sum(int(n) for state, n in states.items() if str(getattr(state, "value", state)) == "RUNNING")


def _replica_error(e: BaseException) -> SwitchError:
    """A replica's failure as the SwitchError to answer with (its own, or a 503 naming what happened)."""

    cause = unwrap(e)
    if isinstance(cause, SwitchError):
        return cause
    return SwitchError(
        f"a generator replica failed during the switch ({type(cause).__name__}: {cause})", 503, "switch_failed"
    )


class VersionSwitch:
    """Switch every replica of the generator deployment to another checkpoint, in place, or none of them.

    ``generator``: a handle to the deployment (``DeploymentHandle``: ``info.remote()`` and ``broadcast(method,
    *args)``); ``live_local``: the local folder of the checkpoint the application started with (a switch keeps its
    tokenizer and architecture); ``record``: ``(model, version) -> None``, called (in a thread) before the replicas
    switch so that a replica starting meanwhile loads the new checkpoint (``serve.live.record_live``);
    ``running``: ``() -> int``, the replicas Serve reports running (in a thread; ``running_replicas``).
    A broadcast that reached fewer replicas than are running (a replica the handle's router does not know yet) is
    sent again, every ``poll_s`` seconds for up to ``settle_s`` (``Generator.switch`` is idempotent: a replica on
    the new version answers ``changed: False``)."""

    def __init__(
        self,
        generator: Any,
        live_local: str | Path,
        record: Callable[[str, str], None],
        running: Callable[[], int],
        settle_s: float = 30.0,
        poll_s: float = 0.5,
        replica_timeout_s: float | None = None,
    ) -> None:
        self.generator, self.live_local, self.record, self.running = generator, live_local, record, running
        self.settle_s, self.poll_s, self.replica_timeout_s = settle_s, poll_s, replica_timeout_s
        self.lock = asyncio.Lock()

    async def _everywhere(self, model: str, version: str) -> list[dict]:
        """``Generator.switch(model, version)`` on every running replica: one result per replica, else SwitchError."""
        reached: dict[str, dict] = {}
        deadline = time.monotonic() + self.settle_s
        while True:
            try:
                results = await self.generator.broadcast("switch", model, version).results_async(
                    timeout_s=self.replica_timeout_s, return_exceptions=True
                )
            except Exception as e:  # noqa: BLE001  (no replica to reach, a timeout: a clear 503)
                raise _replica_error(e) from None
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                raise _replica_error(failed[0])
            for r in results:  # a replica's first answer keeps its drain and reload times
                reached.setdefault(str(r["replica"]), r)
            want = await asyncio.to_thread(self.running)
            if len(reached) >= want:
                return list(reached.values())
            if time.monotonic() >= deadline:
                raise SwitchError(
                    f"the switch to {version} reached {len(reached)} of the {want} running generator "
                    f"replicas within {self.settle_s:.0f}s (Ray Serve's handle does not see the others "
                    "yet); retry the switch",
                    503,
                    "switch_incomplete",
                )
            await asyncio.sleep(self.poll_s)

    async def switch(self, model: str) -> dict[str, Any]:
        """Check ``model`` (missing 404, unreadable 400, other architecture or tokenizer 409), then switch every
        generator replica; when one fails (or some are not reached) the others are switched back and the
        SwitchError is raised. Returns the ``model_switch`` answer. One switch at a time."""
        async with self.lock:
            t0 = time.perf_counter()
            resolved, _, version = await asyncio.to_thread(check_checkpoint, model, self.live_local)
            checked = time.perf_counter()
            live = await self.generator.info.remote()
            # recorded first, so that a replica starting during the switch loads the new checkpoint too
            await asyncio.to_thread(self.record, resolved, version)
            try:
                results = await self._everywhere(resolved, version)
            except SwitchError as e:
                log.warning(
                    "switch to %s failed (%s); switching the replicas back to %s", version, e, live["model_version"]
                )
                await asyncio.to_thread(self.record, live["model"], live["model_version"])
                try:
                    await self._everywhere(live["model"], live["model_version"])
                except SwitchError as back:
                    log.error(
                        "switching back to %s failed too (%s): the generator replicas may serve different "
                        "versions until the next switch",
                        live["model_version"],
                        back,
                    )
                raise
            log.info(
                "model version %s -> %s (%s) on %d generator replicas",
                live["model_version"],
                version,
                resolved,
                len(results),
            )
            return {
                "object": "model_switch",
                "model": resolved,
                "model_version": version,
                "previous_version": live["model_version"],
                "mode": "in_place",
                "replicas": len(results),
                "drain_s": max((r.get("drain_s", 0.0) for r in results), default=0.0),
                "reload_s": max((r.get("reload_s", 0.0) for r in results), default=0.0),
                "check_s": round(checked - t0, 3),
                "seconds": round(time.perf_counter() - t0, 3),
            }
