"""The RLHF learner's Ray Train worker function: the whole loop, generate -> score -> learn -> sync, each iteration.

Rank 0 drives the rollout actors and the rewards (``experience.Driver``) and broadcasts the batch; every rank runs
``Learner.update`` on its rows; then every rank joins the full-state-dict gather and rank 0 pushes the weights into
every engine. Checkpoints go through ``ray.train.report`` every ``train.ckpt_every`` iterations; after a restart (a
dead learner rank or rollout engine: Ray Train's ``FailureConfig``) or a re-run, the loop loads the newest checkpoint
and first pushes those weights into the engines, so they never generate from weights the learner no longer has.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import torch

from pipelines.artifacts import join
from pipelines.rlhf import algos
from pipelines.rlhf.config import RlhfConfig
from pipelines.rlhf.experience import Driver, Experience
from pipelines.rlhf.learner import Learner
from pipelines.train.session import fail_once

log = logging.getLogger(__name__)

MARKER_DIR = ".faults"


def broadcast(obj: Any, rank: int, world: int) -> Any:
    """Rank 0's picklable object on every rank (gloo/NCCL object broadcast)."""
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reward_stats(exp: Experience) -> dict[str, float]:
    s = np.asarray(exp.scores, dtype=np.float64)
    row = {"reward_mean": float(s.mean()), "reward_std": float(s.std())}
    for name, vals in exp.parts.items():
        row[f"reward/{name}"] = float(np.mean(vals))
    lens = [len(r) for r in exp.response_ids]
    row["response_len"] = float(np.mean(lens))
    row["truncated_frac"] = float(np.mean(exp.truncated))
    return row


def learner_loop(args: dict) -> None:
    """Ray Train's ``train_loop_per_worker``. ``args``: cfg, policy, value_init, engines, rm_actors, prompts (a
    ``PromptSet``), tokenizer (path), resume_dir."""
    from models.tokenizer import Tokenizer
    from pipelines.rewards import RewardSet
    from pipelines.rlhf.stage_io import write_history
    from pipelines.train.session import RaySession
    from pipelines.train.worker import worker_device

    cfg: RlhfConfig = args["cfg"]
    session = RaySession(args.get("resume_dir"))
    rank, world = session.rank, session.world
    device = worker_device(cfg.train, cfg.train.threads)
    tok = Tokenizer.load(args["tokenizer"])
    learner = Learner(cfg, args["policy"], args.get("value_init"), device, rank, world, pad_id=tok.pad_id)

    start, history = 0, []
    resume = session.latest_checkpoint()  # Ray Train's (a restart) or resume_dir (a re-run of a dead job)
    if resume:
        state = learner.load(resume)
        session.release_checkpoint()
        start, history = int(state["iteration"]), list(state["history"])
        log.info("rlhf: resumed at iteration %d from %s", start, resume)

    driver = None
    if rank == 0:
        driver = Driver(
            args["engines"],
            args["prompts"],
            RewardSet.from_spec(cfg.reward),
            args["rm_actors"],
            tok,
            cfg.rollout.group_size,
            cfg.rollout.sampling,
            cfg.seed,
        )
    # engines may hold other weights (a restarted actor: the start checkpoint; a crash: a later iteration; shared
    # engines: another run's); a fresh start on engines that still hold the checkpoint the learner loaded skips the
    # push (a state-dict gather, a safetensors file and a reload: seconds on a real model)
    fresh = start == 0 and (driver is None or driver.holds_checkpoint(args["policy"]))
    if not broadcast(fresh, rank, world):
        sd = learner.full_state_dict()
        if driver is not None:
            driver.sync(sd, start)
        del sd

    for it in range(start, cfg.iterations):
        if cfg.train.inject_failure_at and it == cfg.train.inject_failure_at and rank == world - 1:
            fail_once(
                join(args["out"], MARKER_DIR, f".injected_learner_failure_{it}"),
                "learner rank (train.inject_failure_at)",
            )
        row: dict[str, Any] = {"iteration": it + 1, "started_at": time.time()}  # unix time: start-up is before it
        t0 = time.perf_counter()
        exp = None
        if driver is not None:
            marker = ""
            if cfg.rollout.inject_failure_at and it == cfg.rollout.inject_failure_at:
                marker = join(args["out"], MARKER_DIR, f".injected_rollout_failure_{it}")
            idx, completions = driver.generate(it, cfg.rollout.prompts_per_iter * cfg.rollout.oversample, marker)
            t1 = time.perf_counter()
            exp = driver.score(idx, completions)
            t2 = time.perf_counter()
            n_resp = sum(len(r) for r in exp.response_ids)
            row.update(
                reward_stats(exp), t_generate=t1 - t0, t_score=t2 - t1, rollout_tokens_per_s=n_resp / max(t1 - t0, 1e-9)
            )
            if cfg.rollout.oversample > 1:  # the stats above are of every sampled answer: the policy as it is
                part = exp.parts[cfg.update.filter_groups] if cfg.update.filter_groups else exp.scores
                keep = algos.informative_groups(torch.tensor(part), cfg.rollout.group_size)
                row["groups_informative"] = float(keep.mean())  # of all sampled groups
                exp = exp.groups(
                    algos.pick_groups(keep, cfg.rollout.group_size, cfg.rollout.prompts_per_iter),
                    cfg.rollout.group_size,
                )
        exp = broadcast(exp, rank, world)
        t3 = time.perf_counter()
        stats = learner.update(exp, it)
        t4 = time.perf_counter()
        sd = learner.full_state_dict()
        if driver is not None:
            row["sync_s"] = driver.sync(sd, it + 1)
        del sd
        t5 = time.perf_counter()
        row.update({k: v for k, v in stats.items() if k != "learner_tokens"})
        row.update(
            t_learn=t4 - t3,
            t_sync=t5 - t4,
            learner_tokens_per_s=stats["learner_tokens"] / max(t4 - t3, 1e-9),
            t_iteration=t5 - t0,
        )
        history.append(row)
        if rank == 0:
            log.info(
                "rlhf it %d/%d: reward %.3f +- %.3f, kl %.4f, clip %.3f, mismatch %.2e, gen %.1fs learn %.1fs "
                "sync %.2fs",
                it + 1,
                cfg.iterations,
                row["reward_mean"],
                row["reward_std"],
                row["kl"],
                row["clip_frac"],
                row["mismatch_kl"],
                row["t_generate"],
                row["t_learn"],
                row["t_sync"],
            )
            write_history(args["out"], history)
        done = it + 1 == cfg.iterations
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))} if rank == 0 else {"iteration": it + 1}
        tmp = None
        if done or (cfg.train.ckpt_every and (it + 1) % cfg.train.ckpt_every == 0):
            tmp = tempfile.mkdtemp(prefix=f"genloop-rlhf-{it + 1}-")
            learner.save(tmp, {"iteration": it + 1, "history": history})
        session.report(metrics, tmp, it + 1)  # checkpoint step_<it + 1> when there is one
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    sd = learner.full_state_dict()
    if rank == 0:
        from pipelines.train.state import hf_export

        hf_export(args["tokenizer"])(learner.base, sd, args["out"])
        write_history(args["out"], history)
