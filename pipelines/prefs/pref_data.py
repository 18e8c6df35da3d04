"""``genloop pref-data --policy CKPT --prompts SFT_DATA --out DIR [--human FILE]``: preference pairs without humans.

For every code-writing prompt of an ``sft-data`` set or of ``{"prompt": ...}`` rows (a JSONL file or its artifact
folder; a prompt is code-writing when it names a function signature in backticks, ``pipelines/judge.py``), the
policy samples ``samples`` answers with vLLM (``models/engine.py``, in one Ray task that asks for a GPU on a GPU
cluster); the judge scores each, and the set's reference answer is a candidate too. Pairs: the best-scored candidate
(ties: a policy sample first, it is on-policy) against up to ``pairs_per_prompt`` distinct worse ones, kept only
when the judge scores differ by at least ``min_margin``. Human preferences from ``--human`` (what ``genloop feedback
export`` writes, or any form ``pipelines/prefs/pairs.py`` reads) merge in, deduplicated; every pair names its
``source`` (``judge`` or the human file's).

Held-out split: prompts from the sft-data set's held-out file stay held out; otherwise ``val_fraction`` of prompts
(by hash). Output ``DIR``: ``train.jsonl`` + ``val.jsonl`` (``{"prompt", "chosen", "rejected", "source",
"chosen_score", "rejected_score"}``, what ``genloop reward`` / ``genloop dpo`` read), ``samples.jsonl`` (every
candidate with its score), ``quarantine.jsonl`` (bad input lines), ``manifest.json`` (counts; the policy's judge
pass rate and mean score).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from models.engine import EngineConfig
from pipelines.judge import judge, requested_signature
from pipelines.prefs.pairs import PrefPair

log = logging.getLogger(__name__)

SFT_TRAIN, SFT_VAL = "train.jsonl", "val.jsonl"


@dataclass
class PrefDataConfig:
    policy: str = ""  # the checkpoint that samples (an SFT model folder or artifact)
    prompts: str = ""  # the sft-data set: a JSONL file (its .val.jsonl beside it is used) or an artifact folder
    out: str = ""
    human: str = ""  # optional human preference JSONL (genloop feedback export), merged in
    # fn: reward parts (rlhf's --reward spec, reading the rows' columns, e.g. fn:exact_answer,fn:number_answer) that
    # score the candidates instead of the code judge; every prompt row is used, code-writing or not. "": the judge
    reward: str = ""
    samples: int = 4  # answers sampled per prompt
    max_prompts: int = 0  # 0 = every code-writing prompt
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    min_margin: float = 0.25  # judge-score difference a pair needs
    pairs_per_prompt: int = 2
    include_reference: bool = True  # the sft-data answer is a candidate
    val_fraction: float = 0.1  # the held-out share: of the prompts (no held-out file), or of max_prompts
    num_cpus: float = 1.0  # the sampling task's CPU ask (it asks one GPU when the cluster has GPUs)
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(max_num_seqs=64))
    seed: int = 0
    overwrite: bool = False


@dataclass
class Candidate:
    text: str
    score: float
    origin: str  # "policy" | "reference"


# ---- pure parts ----------------------------------------------------------------------------------------------------
def code_prompt(obj: Any) -> tuple[list[dict] | None, str, str]:
    """(prompt messages, reference answer, "") of a prompt row asking for code, else (None, "", reason). A row is
    ``{"prompt": str}`` or ``{"messages": [...]}`` (a final assistant turn, or a ``"response"``, is the reference
    answer; ``pipelines.conversations.parse_prompt_record``)."""
    from pipelines.conversations import parse_prompt_record

    if not isinstance(obj, dict) or ("messages" not in obj and "prompt" not in obj):
        return None, "", "not_a_conversation"
    msgs, reference, _, reason = parse_prompt_record(obj)
    if msgs is None:
        return (
            None,
            "",
            {"no_user_turn": "no_user_turn", "not_an_object": "not_a_conversation"}.get(reason, "bad_messages"),
        )
    if requested_signature(msgs[-1]["content"]) is None:
        return None, "", "not_code_writing"
    return [dict(m) for m in msgs], reference, ""


def read_prompts(
    path: str, counts: Counter, quarantine: list[dict], code_only: bool = True
) -> list[tuple[list[dict], str, dict[str, Any]]]:
    """(prompt messages, reference answer, columns) of the code-writing prompts of a JSONL file (``code_only``;
    else of every prompt row); other lines counted (non-code ones are not errors)."""
    from pipelines.artifacts import NOT_JSON, jsonl_lines
    from pipelines.conversations import parse_prompt_record

    out = []
    for i, line, obj in jsonl_lines(path):
        counts["prompt_lines"] += 1
        if obj is NOT_JSON:
            counts["bad_prompt_not_json"] += 1
            quarantine.append({"file": path, "line": i, "reason": "not_json", "text": line[:500]})
            continue
        msgs, ref, reason = code_prompt(obj)
        if reason == "not_code_writing" and not code_only:
            msgs, ref, _, reason = parse_prompt_record(obj)
        if reason == "not_code_writing":
            counts["skipped_not_code_writing"] += 1
            continue
        if reason:
            counts[f"bad_prompt_{reason}"] += 1
            quarantine.append({"file": path, "line": i, "reason": reason, "text": line[:500]})
            continue
        out.append((msgs, ref, parse_prompt_record(obj)[2]))
    return out


def prompt_files(prompts: str) -> tuple[str, str | None]:
    """(train file, held-out file or None) of an sft-data set given as a folder or a ``.jsonl`` file."""
    from pipelines.artifacts import exists, is_dir, join

    if is_dir(prompts):
        train, val = join(prompts, SFT_TRAIN), join(prompts, SFT_VAL)
        if not exists(val) and exists(join(prompts, "heldout.jsonl")):  # `genloop tasks` output
            val = join(prompts, "heldout.jsonl")
    else:
        train = prompts
        val = prompts[: -len(".jsonl")] + ".val.jsonl" if prompts.endswith(".jsonl") else ""
    if not exists(train):
        raise FileNotFoundError(f"--prompts {prompts}: no {train}; make the set with `genloop sft-data --out ...`")
    return train, (val if val and exists(val) else None)


def make_pairs(candidates: Sequence[Candidate], min_margin: float, max_pairs: int) -> list[tuple[Candidate, Candidate]]:
    """(chosen, rejected): the best candidate (ties: policy samples first, then order) against up to ``max_pairs``
    distinct worse ones (lowest score first) whose score is at least ``min_margin`` lower."""
    if not candidates:
        return []
    order = sorted(range(len(candidates)), key=lambda i: (-candidates[i].score, candidates[i].origin != "policy", i))
    best = candidates[order[0]]
    pairs: list[tuple[Candidate, Candidate]] = []
    seen = {best.text}
    for i in reversed(order[1:]):
        c = candidates[i]
        if len(pairs) >= max_pairs or best.score - c.score < min_margin:
            break
        if c.text in seen or not c.text.strip():
            continue
        seen.add(c.text)
        pairs.append((best, c))
    return pairs


# ---- sampling (vLLM, in a Ray task) --------------------------------------------------------------------------------
def sample_answers(
    policy: str,
    prompt_ids: list[list[int]],
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stop_ids: list[int],
    seed: int,
    engine_cfg: EngineConfig,
) -> list[list[list[int]]]:
    """``n`` sampled answers (token ids, stop token removed) per prompt from a vLLM engine over ``policy``."""
    from models import engine
    from pipelines.artifacts import local_copy

    # the task's process is nothing but this engine and exits with it (max_calls=1): the engine runs in it, on every
    # core of the machine unless engine.cpu_threads says otherwise (spawned, vLLM's CPU engine binds one OpenMP thread
    # per reserved CPU: 256 prompts x 8 answers took 514 s on one core)
    if not engine_cfg.cpu_threads:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        engine_cfg = dataclasses.replace(engine_cfg, cpu_threads=cores)
    llm = engine.make_llm(local_copy(policy), engine_cfg, in_process=True)
    params = engine.sampling_params(max_new_tokens, temperature, top_p, stop_token_ids=stop_ids, seed=seed, n=n)
    outs = engine.generate_ids(llm, prompt_ids, params)
    return [[[t for t in ids if t not in stop_ids] for ids in per_prompt] for per_prompt in outs]


def _sample_remote(cfg: PrefDataConfig, prompt_ids: list[list[int]], stop_ids: list[int]) -> list[list[list[int]]]:
    import ray

    from pipelines.runtime import use_gpu_default

    # max_calls=1: the worker process exits with the task. Otherwise Ray keeps it as an idle worker, and with it the
    # engine's spawned processes (~2 GB and a busy-polling core on CPU) for the rest of the driver's life.
    task = ray.remote(num_cpus=cfg.num_cpus, num_gpus=1 if use_gpu_default() else 0, max_retries=0, max_calls=1)(
        sample_answers
    )
    return ray.get(
        task.remote(
            cfg.policy,
            prompt_ids,
            cfg.samples,
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.top_p,
            stop_ids,
            cfg.seed,
            cfg.engine,
        )
    )


# ---- the stage -----------------------------------------------------------------------------------------------------
def run(cfg: PrefDataConfig) -> dict[str, Any]:
    """Sample, judge, pair, merge, split, write. Needs a ready Ray runtime. Returns counts and metrics."""
    from models.chat import ChatFormat, encode_prompt
    from models.checkpoint import load_config, load_tokenizer
    from pipelines.artifacts import join, local_copy, resolve_checkpoint, write_text
    from pipelines.lifecycle import absolute_paths, begin_stage
    from pipelines.prefs.pairs import read_pairs, split_pairs, write_pairs, write_quarantine

    for key in ("policy", "prompts", "out"):
        if not getattr(cfg, key):
            raise ValueError(f"pref-data needs --{key} (see genloop pref-data --help)")
    if cfg.samples < 1 or cfg.pairs_per_prompt < 1:
        raise ValueError(f"pref-data.samples={cfg.samples} and pairs_per_prompt={cfg.pairs_per_prompt} must be >= 1")
    if not 0 < cfg.min_margin <= 1 and not (cfg.reward and cfg.min_margin > 0):
        raise ValueError(f"pref-data.min_margin={cfg.min_margin} must be in (0, 1] (judge scores lie in [0, 1])")
    from pipelines.rewards import function_rewards

    rewards = function_rewards(cfg.reward)  # fn: parts only; a bad spec fails before any work
    source = "reward" if rewards is not None else "judge"
    cfg = absolute_paths(cfg, "policy", "prompts", "human", "out")
    cfg = dataclasses.replace(cfg, policy=resolve_checkpoint(cfg.policy))
    train_file, val_file = prompt_files(cfg.prompts)
    # no checkpoints to resume from: an unfinished run's files are cleared and the set is rebuilt
    artifact = begin_stage(
        "pref-data",
        cfg.out,
        cfg,
        inputs={"--policy": cfg.policy, "--prompts": cfg.prompts, "--human": cfg.human},
        overwrite=cfg.overwrite,
        resume=False,
    )
    policy_local = local_copy(cfg.policy)  # a checkpoint on s3:// is read through the local cache
    tok = load_tokenizer(policy_local)
    fmt = ChatFormat.from_checkpoint(policy_local)

    counts: Counter = Counter()
    quarantine: list[dict] = []
    code_only = rewards is None
    prompts = [(m, r, "train", c) for m, r, c in read_prompts(train_file, counts, quarantine, code_only)]
    val = [(m, r, "val", c) for m, r, c in read_prompts(val_file, counts, quarantine, code_only)] if val_file else []
    if cfg.max_prompts:  # at most max_prompts in all; the held-out prompts keep at least their share (val_fraction)
        n_val = min(len(val), max(1, round(cfg.max_prompts * cfg.val_fraction)))
        n_train = min(len(prompts), cfg.max_prompts - n_val)
        prompts, val = prompts[:n_train], val[: cfg.max_prompts - n_train]
    prompts += val
    if not prompts:
        raise ValueError(
            f"--prompts {cfg.prompts}: no usable prompt ({dict(counts)}); expected rows "
            '{"prompt": "... `def name(args)` ..."} or {"messages": [{"role": "user", ...}, ...]} '
            "(code-writing ones for the judge; any with --reward fn:...)"
        )
    counts["prompts_read"] = len(prompts)

    limit = cfg.engine.max_model_len or load_config(policy_local).max_seq_len
    encoded = [(encode_prompt(tok, fmt, m), p) for p in prompts for m in [p[0]]]
    kept = [(ids, p) for ids, p in encoded if len(ids) + cfg.max_new_tokens <= limit]
    counts["dropped_prompt_too_long"] = len(encoded) - len(kept)
    if not kept:
        raise ValueError(
            f"pref-data: every prompt is longer than the context ({limit} tokens) minus "
            f"max_new_tokens={cfg.max_new_tokens}; lower max_new_tokens or use shorter prompts"
        )
    prompt_ids, prompts = [ids for ids, _ in kept], [p for _, p in kept]
    if rewards is not None:  # a column a reward function needs: refused before sampling
        names = sorted({k for p in prompts for k in p[3]})
        rewards.check_columns(
            {k: [p[3].get(k) for p in prompts] for k in names}, len(prompts), source=f"--prompts {cfg.prompts}"
        )
    t0 = time.perf_counter()
    answers = _sample_remote(cfg, prompt_ids, [tok.im_end_id, tok.eot_id])
    sample_s = time.perf_counter() - t0

    pairs: dict[str, list[PrefPair]] = {"train": [], "val": []}
    sample_lines, policy_scores = [], []

    def score(user: str, texts: list[str], columns: dict[str, Any]) -> list[float]:
        if rewards is None:
            return [judge(user, t) for t in texts]
        return rewards.score([user] * len(texts), texts, None, {k: [v] * len(texts) for k, v in columns.items()})[0]

    for (msgs, ref, side, columns), outs in zip(prompts, answers):
        user = [m for m in msgs if m["role"] == "user"][-1]["content"]  # the request the judge reads
        texts = [tok.decode(ids) for ids in outs]
        cands = [Candidate(t, s, "policy") for t, s in zip(texts, score(user, texts, columns))]
        policy_scores += [c.score for c in cands]
        if cfg.include_reference and ref:
            cands.append(Candidate(ref, score(user, [ref], columns)[0], "reference"))
        sample_lines.append({"prompt": user, "candidates": [dataclasses.asdict(c) for c in cands]})
        made = make_pairs(cands, cfg.min_margin, cfg.pairs_per_prompt)
        if not made:
            counts["prompts_without_margin"] += 1
        for chosen, rejected in made:
            pairs[side].append(PrefPair(msgs, chosen.text, rejected.text, 0.0, source, chosen.score, rejected.score))
            counts[f"pairs_{source}_chosen_{chosen.origin}"] += 1
    counts[f"pairs_{source}"] = len(pairs["train"]) + len(pairs["val"])

    if cfg.human:
        human = read_pairs(cfg.human, counts, quarantine, default_source="human")
        seen = {p.key() for side in pairs.values() for p in side}
        fresh = [p for p in human if p.key() not in seen]
        counts["human_duplicates_of_judge_pairs"] = len(human) - len(fresh)
        counts["pairs_human"] = len(fresh)
        h_train, h_val = split_pairs(fresh, cfg.val_fraction, cfg.seed)
        pairs["train"] += h_train
        pairs["val"] += h_val
    if not val_file:  # no held-out prompts in the set: split the judge pairs by prompt
        judge_train, judge_val = split_pairs(
            [p for p in pairs["train"] if p.source == source], cfg.val_fraction, cfg.seed
        )
        pairs = {
            "train": judge_train + [p for p in pairs["train"] if p.source != source],
            "val": judge_val + pairs["val"],
        }
    if not pairs["train"]:
        raise ValueError(
            f"pref-data: no training pair with a judge margin >= {cfg.min_margin} ({dict(counts)}); "
            "sample more answers (samples=), raise the temperature, or lower min_margin"
        )

    for side, file in (("train", "train.jsonl"), ("val", "val.jsonl")):
        write_pairs(join(cfg.out, file), pairs[side])
    write_text(join(cfg.out, "samples.jsonl"), "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in sample_lines))
    write_quarantine(cfg.out, quarantine)
    counts.update(
        prompts=len(prompts),
        train_pairs=len(pairs["train"]),
        val_pairs=len(pairs["val"]),
        quarantined=len(quarantine),
        samples=len(policy_scores),
    )
    metrics = {
        f"policy_{source}_pass_rate": sum(s == 1.0 for s in policy_scores) / max(1, len(policy_scores)),
        f"policy_{source}_mean_score": sum(policy_scores) / max(1, len(policy_scores)),
        "sample_seconds": sample_s,
    }
    artifact.finish(counts=dict(counts), metrics=metrics)
    log.info(
        "pref-data: %d prompts x %d samples -> %d train + %d held-out pairs (policy %s pass rate %.2f) -> %s",
        len(prompts),
        cfg.samples,
        counts["train_pairs"],
        counts["val_pairs"],
        source,
        metrics[f"policy_{source}_pass_rate"],
        cfg.out,
    )
    return {"out": cfg.out, **metrics, "counts": dict(counts)}
