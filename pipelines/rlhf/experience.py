"""Making experience on the learner's rank 0: prompts in a seeded, resumable order -> rollout engines -> rewards ->
one ``Experience`` batch; and pushing the learner's weights into every engine.

Prompts are JSONL rows (a file or an artifact folder holding ``train.jsonl``): ``{"prompt": str}`` or
``{"messages": [...]}`` (an sft-data set; a final assistant turn is dropped), rendered with the policy checkpoint's
chat template (``models/chat.py encode_prompt``). The text the reward functions see is the last user message; a
row's other fields are its columns, passed to the reward functions per answer (``rewards.py``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)


# ---- prompts -------------------------------------------------------------------------------------------------------
@dataclass
class PromptSet:
    texts: list[str]  # the last user message of each prompt (what reward functions see)
    ids: list[list[int]]  # the rendered prompt ids, ending in the assistant header
    counts: dict[str, int] = field(default_factory=dict)  # lines read, kept, dropped per reason
    # the rows' other fields, each a list aligned with ``ids`` (None where a row lacks the field)
    columns: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def columns_for(self, idx: Sequence[int], repeat: int = 1) -> dict[str, list[Any]]:
        """The columns of prompts ``idx``, each value repeated ``repeat`` times in a row (one per answer of a
        group): aligned with answers laid out prompt-major, as ``Driver.score`` and ``evaluate`` lay them out."""
        return {k: [v[i] for i in idx for _ in range(repeat)] for k, v in self.columns.items()}


def prompts_file(path: str) -> str:
    """An sft-data artifact folder -> its train.jsonl; a file as is."""
    if os.path.isdir(path):
        f = os.path.join(path, "train.jsonl")
        if not os.path.exists(f):
            raise FileNotFoundError(
                f"--prompts {path} is a folder without train.jsonl; pass an sft-data output (file or folder)"
            )
        return f
    return path


def load_prompts(path: str, tok, fmt, max_prompt_tokens: int, tasks: Sequence[str] = ()) -> PromptSet:
    """Prompts from JSONL rows (``pipelines.conversations.read_prompt_rows``). Bad lines, rows of other
    ``meta.task`` kinds and prompts longer than ``max_prompt_tokens`` are counted and dropped; none left is a clear
    error naming the file. Each row's other fields become ``columns`` (None where a row lacks one)."""
    from models.chat import encode_prompt
    from pipelines.conversations import read_prompt_rows

    counts: Counter = Counter()
    src = prompts_file(path)
    texts, ids, cols = [], [], []
    for msgs, _, columns in read_prompt_rows(src, counts):
        meta = columns.get("meta") if isinstance(columns.get("meta"), dict) else {}
        if tasks and meta.get("task") and meta["task"] not in tasks:
            counts["other_task"] += 1
            continue
        p_ids = encode_prompt(tok, fmt, msgs)
        if len(p_ids) > max_prompt_tokens:
            counts["too_long"] += 1
            continue
        texts.append(msgs[-1]["content"])
        ids.append(p_ids)
        cols.append(columns)
    counts["kept"] = len(ids)
    if not ids:
        raise ValueError(
            f"--prompts {src}: no usable prompt (counts: {dict(counts)}); expected JSONL lines of "
            '{"prompt": "..."} or {"messages": [{"role": "user", ...}, ...]} (sft-data or `genloop '
            f"tasks` output) with prompts of at most {max_prompt_tokens} tokens"
        )
    names = sorted({k for c in cols for k in c if k not in ("prompts", "responses")})
    return PromptSet(texts, ids, dict(counts), {k: [c.get(k) for c in cols] for k in names})


def prompt_order(n_prompts: int, iteration: int, per_iter: int, seed: int) -> list[int]:
    """The prompt indices of ``iteration``: a seeded permutation per epoch over the set, read in order, so a run
    resumed at iteration i takes exactly the prompts it would have taken."""
    out: list[int] = []
    pos = iteration * per_iter
    while len(out) < per_iter:
        epoch, offset = divmod(pos, n_prompts)
        perm = np.random.default_rng([seed, epoch]).permutation(n_prompts)
        take = min(per_iter - len(out), n_prompts - offset)
        out += perm[offset : offset + take].tolist()
        pos += take
    return out


def sample_seed(seed: int, iteration: int, prompt_index: int) -> int:
    """vLLM's per-request seed for one prompt's group at one iteration (answers reproducible on resume)."""
    return int(np.random.default_rng([seed, iteration, prompt_index]).integers(0, 2**31 - 1))


# ---- one iteration's batch ------------------------------------------------------------------------------------------
@dataclass
class Experience:
    """``B = prompts x group_size`` answers, grouped consecutively (plain lists: broadcast to every learner rank)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    rollout_logp: list[list[float]]  # vLLM's log-prob of each response token
    scores: list[float]  # the combined reward per answer
    parts: dict[str, list[float]]  # each reward part's own scores
    truncated: list[bool]  # hit max_new_tokens without a stop token
    prompt_texts: list[str]
    response_texts: list[str]

    def groups(self, chosen: Sequence[int], group_size: int) -> "Experience":
        """The answers of groups ``chosen`` (indices of consecutive ``group_size`` blocks), in that order."""
        rows = [g * group_size + j for g in chosen for j in range(group_size)]

        def pick(xs: list) -> list:
            return [xs[r] for r in rows]

        return Experience(
            pick(self.prompt_ids),
            pick(self.response_ids),
            pick(self.rollout_logp),
            pick(self.scores),
            {k: pick(v) for k, v in self.parts.items()},
            pick(self.truncated),
            pick(self.prompt_texts),
            pick(self.response_texts),
        )


def engine_nodes(engines: list, wait_s: float = 600.0) -> list[str]:
    """Each engine actor's node id, waiting while an actor Ray is re-creating comes back up (after a dead engine the
    restarted learner gets here while vLLM is still starting; without the wait each such try costs one of
    ``train.max_failures``)."""
    import ray
    from ray.exceptions import ActorUnavailableError

    start = time.monotonic()
    waited = False
    while True:
        try:
            nodes = ray.get([e.node_id.remote() for e in engines])
            if waited:
                log.info("rlhf: the rollout engines are up after %.0f s", time.monotonic() - start)
            return nodes
        except ActorUnavailableError:
            if time.monotonic() - start > wait_s:
                raise
            if not waited:
                log.info("rlhf: a rollout engine is restarting; waiting up to %.0f s for it", wait_s)
            waited = True
            time.sleep(2.0)


class Driver:
    """Rank 0's side of an iteration: engines (Ray actors), reward functions / reward-model actors, the prompts."""

    def __init__(
        self, engines: list, prompts: PromptSet, rewards, rm_actors: list, tok, group_size: int, sampling, seed: int
    ) -> None:
        import ray

        self.engines = engines
        self.prompts = prompts
        self.rewards = rewards
        self.rm_actors = rm_actors
        self.tok = tok
        self.specials = set(tok.special_tokens.values())  # stop tokens are in the ids, not in the text
        self.group_size = group_size
        self.sampling = sampling
        self.seed = seed
        self.node = ray.get_runtime_context().get_node_id()
        self.engine_nodes = engine_nodes(engines)

    def generate(self, iteration: int, per_iter: int, fail_marker: str = "") -> tuple[list[int], list[list[Any]]]:
        """(prompt indices, completions per prompt): the prompts split over the engines, sampled in parallel.
        ``fail_marker``: fault injection, the first engine exits (once) instead of generating."""
        import ray

        idx = prompt_order(len(self.prompts), iteration, per_iter, self.seed)
        parts = np.array_split(np.arange(len(idx)), len(self.engines))
        refs = []
        for k, (eng, part) in enumerate(zip(self.engines, parts)):
            if len(part) == 0:
                continue
            sel = [idx[i] for i in part]
            refs.append(
                eng.generate.remote(
                    [self.prompts.ids[i] for i in sel],
                    self.group_size,
                    self.sampling,
                    [sample_seed(self.seed, iteration, i) for i in sel],
                    fail_marker if k == 0 else "",
                )
            )
        completions = [c for chunk in ray.get(refs) for c in chunk]
        return idx, completions

    def score(self, idx: list[int], completions: list[list[Any]]) -> Experience:
        import ray

        p_ids, r_ids, r_lp, trunc, p_txt, r_txt = [], [], [], [], [], []
        columns = self.prompts.columns_for(idx, self.group_size)  # TRL's convention: one value per answer
        for i, group in zip(idx, completions):
            if len(group) != self.group_size:
                raise RuntimeError(f"an engine returned {len(group)} answers for a group of {self.group_size}")
            for c in group:
                p_ids.append(self.prompts.ids[i])
                r_ids.append(list(c.token_ids))
                r_lp.append(list(c.logprobs))
                trunc.append(c.finish_reason == "length")
                p_txt.append(self.prompts.texts[i])
                r_txt.append(
                    self.tok.decode([t for t in c.token_ids if t < self.tok.n_vocab and t not in self.specials])
                )
        rm_score = None
        if self.rm_actors:

            def rm_score() -> list[float]:
                chunks = np.array_split(np.arange(len(p_ids)), len(self.rm_actors))
                refs = [
                    a.score.remote([p_ids[j] for j in ch], [r_ids[j] for j in ch])
                    for a, ch in zip(self.rm_actors, chunks)
                    if len(ch)
                ]
                return [s for part in ray.get(refs) for s in part]

        scores, parts = self.rewards.score(p_txt, r_txt, rm_score, columns)
        return Experience(p_ids, r_ids, r_lp, scores, parts, trunc, p_txt, r_txt)

    def holds_checkpoint(self, path: str) -> bool:
        """Every engine still holds the weights of the checkpoint at ``path`` (built from it, none pushed since)."""
        import ray

        return all(ray.get([e.holds_checkpoint.remote(path) for e in self.engines]))

    def sync(self, state_dict: dict, version: int) -> float:
        """Push the learner's full state dict into every engine in place; seconds until all have it.

        Engines on this node reload from one safetensors file in /dev/shm; engines on other nodes get the tensors
        through Ray's object store (one ``ray.put``). On a GPU cluster this is where an NCCL broadcast (vLLM's
        weight-transfer API) would replace the file.
        """
        import ray

        from models.engine import write_weights_file

        t0 = time.perf_counter()
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(suffix=".safetensors", prefix="genloop-rlhf-", dir=shm)
        os.close(fd)
        try:
            local = [e for e, n in zip(self.engines, self.engine_nodes) if n == self.node]
            remote = [e for e, n in zip(self.engines, self.engine_nodes) if n != self.node]
            refs = []
            if local:
                write_weights_file(state_dict, path)
                refs += [e.update_from_file.remote(path, version) for e in local]
            if remote:
                sd_ref = ray.put(state_dict)
                refs += [e.update_from_state.remote(sd_ref, version) for e in remote]
            ray.get(refs)
        finally:
            if os.path.exists(path):
                os.unlink(path)
        return time.perf_counter() - t0
