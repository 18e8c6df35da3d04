"""The learner's tensor work, one object per Ray Train rank: the policy (DDP | FSDP2, wrapped as pretraining), a
frozen reference for the KL term, PPO's value model; one ``update`` per iteration. No Ray here: a test drives a
``Learner`` in process (strategy none); ``loop.py`` is the Ray Train worker around it.

Data layout: an iteration's ``Experience`` (B answers) is on every rank. The no-grad passes (old / reference
log-probs, values, entropy) are split: rank r computes rows r, r + world, ... and one all-reduce gives every rank the
whole (B, T) tables, so advantages (and PPO's whitening) are computed over the whole batch on every rank. Each epoch
is one seeded permutation of the B rows, the same on every rank and for any world size, cut into ``minibatches``
optimizer steps; of each minibatch rank r trains positions r, r + world, ... (the config makes every share the same
size, so FSDP's collectives line up). Losses are token means over the *global* minibatch (all ranks' tokens), so one
update gives the same weights on 1 process, DDP x N and FSDP2 x N, up to float summation order.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from models.parallel import autocast
from pipelines.rlhf import algos
from pipelines.rlhf.config import RlhfConfig
from pipelines.rlhf.experience import Experience
from pipelines.train.worker import all_sum

log = logging.getLogger(__name__)


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (m, L) prompt + response, right-padded with pad_id
    idx: torch.Tensor  # (m, T) the position whose logits predict response token j (prompt length - 1 + j)
    targets: torch.Tensor  # (m, T) response token ids
    mask: torch.Tensor  # (m, T) 1.0 on real response tokens


def collate(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> MicroBatch:
    m = len(prompts)
    L = max(len(p) + len(r) for p, r in zip(prompts, responses))
    T = max(1, max(len(r) for r in responses))
    input_ids = torch.full((m, L), pad_id, dtype=torch.long)
    idx = torch.zeros(m, T, dtype=torch.long)
    targets = torch.zeros(m, T, dtype=torch.long)
    mask = torch.zeros(m, T)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = list(p) + list(r)
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        n = len(r)
        idx[i, :n] = torch.arange(len(p) - 1, len(p) - 1 + n)
        targets[i, :n] = torch.tensor(list(r), dtype=torch.long)
        mask[i, :n] = 1.0
    return MicroBatch(input_ids.to(device), idx.to(device), targets.to(device), mask.to(device))


def response_logits(model: nn.Module, mb: MicroBatch) -> torch.Tensor:
    """(m, T, V) logits at the positions that predict each response token (the head runs only there)."""
    return model(mb.input_ids, logits_at=mb.idx)


def logp_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, T, V) logits, (m, T) targets -> log-prob of each target and the entropy of each position, both (m, T),
    under the distribution the rollout sampled from: softmax(logits / temperature), as vLLM's processed log-probs
    (verl and OpenRLHF divide the learner's logits by the sampling temperature the same way). At temperature 1 the
    ratio against vLLM's log-probs is the numerical mismatch alone; without the division, sampling at 0.5 made the
    ratio the gap between two different distributions (mismatch_kl ~0.5) and skewed the importance weights."""
    lsm = torch.log_softmax(logits.float() / temperature, -1)
    logp = lsm.gather(-1, targets[..., None]).squeeze(-1)
    return logp, -(lsm.exp() * lsm).sum(-1)


def response_values(value_model: nn.Module, mb: MicroBatch) -> torch.Tensor:
    """(m, T) the value model's score at the positions before each response token (the state that emits it)."""
    return value_model(mb.input_ids).gather(1, mb.idx).float()


def pad_rows(rows: Sequence[Sequence[float]], T: int) -> torch.Tensor:
    out = torch.zeros(len(rows), T)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.float32)
    return out


PRE_KEYS = ("old_logp", "ref_logp", "values", "entropy")


class Learner:
    """Policy (+ optimizer), reference, value model (+ optimizer) on one rank."""

    fuse_old_logp = True  # GRPO, one epoch of one minibatch: old log-probs from the training pass (see ``update``)

    def __init__(
        self,
        cfg: RlhfConfig,
        policy_path: str,
        value_init: str | None,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
        pad_id: int = 0,
    ) -> None:
        from models.checkpoint import load_checkpoint
        from models.parallel import wrap_model
        from pipelines.train.state import build_optimizer

        self.cfg, self.device, self.rank, self.world, self.pad_id = cfg, device, rank, world, pad_id
        self.temperature = cfg.rollout.sampling.temperature  # log-probs of the distribution the rollout sampled from
        tc = cfg.train
        torch.manual_seed(cfg.seed)
        self.base, _ = load_checkpoint(policy_path)
        self.policy = wrap_model(self.base, tc.strategy, device)
        self.opt = build_optimizer(self.policy, tc)
        self.ref = None
        if cfg.kl.coef > 0:
            self.ref = load_checkpoint(policy_path)[0].to(device).eval().requires_grad_(False)
        self.value = self.vopt = None
        if cfg.algo == "ppo":
            from models.scalar_model import from_causal_lm, load_scalar_model

            vbase = load_scalar_model(value_init)[0] if value_init else from_causal_lm(policy_path)[0]
            self.value = wrap_model(vbase, tc.strategy, device)
            self.vopt = build_optimizer(self.value, dataclasses.replace(tc, lr=cfg.update.vf_lr or tc.lr))

    # ---- no-grad passes, split over the ranks ----------------------------------------------------------------------
    @torch.no_grad()
    def _precompute(self, P: list, R: list, T: int | None = None, policy: bool = True) -> dict[str, torch.Tensor]:
        """(len(P), T) tables for the given rows: old_logp, ref_logp, values, entropy (0 past each answer's end);
        ``T`` defaults to the longest answer given. ``policy=False`` leaves old_logp / entropy to the training pass
        (see ``update``)."""
        mb_size = self.cfg.train.micro_batch_size
        T = T or max(1, max(len(r) for r in R))
        out = {k: torch.zeros(len(P), T) for k in PRE_KEYS}
        if not policy and self.ref is None and self.value is None:
            return out
        self.policy.eval()
        for lo in range(0, len(P), mb_size):
            sl = slice(lo, lo + mb_size)
            mb = collate(P[sl], R[sl], self.pad_id, self.device)
            t = mb.mask.shape[1]
            with autocast(self.cfg.train.autocast, self.device):
                if policy:
                    logp, ent = logp_and_entropy(response_logits(self.policy, mb), mb.targets, self.temperature)
                    out["old_logp"][sl, :t], out["entropy"][sl, :t] = logp.cpu(), ent.cpu()
                if self.ref is not None:
                    ref_logits = response_logits(self.ref, mb)
                    out["ref_logp"][sl, :t] = logp_and_entropy(ref_logits, mb.targets, self.temperature)[0].cpu()
                if self.value is not None:
                    out["values"][sl, :t] = response_values(self.value, mb).cpu()
        return out

    def _precompute_all(self, exp: Experience, T: int, policy: bool = True) -> dict[str, torch.Tensor]:
        """(B, T) tables for the whole batch on every rank: rank r computes rows r, r + world, ...; one all-reduce
        (SUM of disjoint rows) fills in the others'."""
        B = len(exp.scores)
        own = list(range(self.rank, B, self.world))
        part = self._precompute([exp.prompt_ids[i] for i in own], [exp.response_ids[i] for i in own], T, policy)
        if self.world == 1 or (not policy and self.ref is None and self.value is None):
            return part
        import torch.distributed as dist

        full = torch.zeros(len(PRE_KEYS), B, T, dtype=torch.float32)  # (4, B, T): this rank's rows, zeros elsewhere
        full[:, own] = torch.stack([part[k] for k in PRE_KEYS])
        full = full.to(self.device)
        dist.all_reduce(full, op=dist.ReduceOp.SUM)
        full = full.cpu()
        return {k: full[j] for j, k in enumerate(PRE_KEYS)}

    def _advantages(
        self, exp: Experience, pre: dict[str, torch.Tensor], mask: torch.Tensor, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) advantages and returns for the whole batch (the same on every rank). ``keep`` (B,): GRPO's
        group filter (``update.filter_groups``), 0.0 where a group gets no policy gradient."""
        a, kl = self.cfg.update, self.cfg.kl
        scores = torch.tensor(exp.scores, dtype=torch.float32)
        if self.cfg.algo == "grpo":
            seq_adv, _ = algos.get_adv_estimator("grpo")(
                scores, torch.ones(len(scores), 1), group_size=self.cfg.rollout.group_size, norm_std=a.norm_std
            )
            if a.negative_weight != 1.0:
                seq_adv = algos.weight_negatives(seq_adv, a.negative_weight)
            adv = seq_adv * mask  # (B, 1) * (B, T)
            if keep is not None:  # groups that all pass / all fail the filter's part: no policy gradient
                adv = adv * keep[:, None]
            return adv, adv
        kl_tok = torch.zeros_like(mask)
        if self.ref is not None and kl.mode == "reward":
            kl_tok = algos.kl_estimate(pre["old_logp"], pre["ref_logp"], "k1")
        tok_r = algos.kl_in_reward(scores, kl_tok, mask, kl.coef if kl.mode == "reward" else 0.0)
        adv, ret = algos.get_adv_estimator("gae")(tok_r, pre["values"], mask, gamma=a.gamma, lam=a.lam)
        if a.whiten_advantages:  # over the whole batch
            adv = algos.whiten(adv, mask)
        return adv, ret

    # ---- one iteration -------------------------------------------------------------------------------------------
    def update(self, exp: Experience, iteration: int) -> dict[str, float]:
        """One iteration's ``epochs x minibatches`` optimizer steps on the whole batch; every rank calls it with the
        same ``exp``. Returns the iteration's stats (token means over the batch), the same on every rank."""
        from models.parallel import set_gradient_sync

        cfg, a, tc = self.cfg, self.cfg.update, self.cfg.train
        B = len(exp.scores)
        if B % (a.minibatches * self.world):
            raise ValueError(
                f"a batch of {B} answers does not split into update.minibatches={a.minibatches} x "
                f"{self.world} ranks equal parts"
            )
        P, R = exp.prompt_ids, exp.response_ids
        T = max(1, max(len(r) for r in R))
        # One epoch of one minibatch (TRL's default, num_iterations=1): the one optimizer step runs on the weights
        # that define old_logp, so old_logp is the training pass's own logp, detached, and the separate no-grad
        # policy pass (a third of the learner's work) is skipped. GAE (PPO) needs the values before the loop.
        # update.old_logp=rollout: the ratio is against the engine's own sampling log-probs (the behaviour policy
        # itself, veRL's bypass mode): no old-log-prob pass at any epochs x minibatches, and no IS correction
        from_rollout = a.old_logp == "rollout"
        on_policy = not from_rollout and self.fuse_old_logp and a.epochs == 1 and a.minibatches == 1
        on_policy = on_policy and cfg.algo == "grpo"
        pre = self._precompute_all(exp, T, policy=not (on_policy or from_rollout))
        mask = pad_rows([[1.0] * len(r) for r in R], T)  # (B, T)
        rollout_logp = pad_rows(exp.rollout_logp, T)
        first_logp = None  # old_logp=rollout: epoch 0's training-pass log-probs, for the mismatch statistic
        own_rows: list[int] = []  # the rows this rank trained on in epoch 0 (its rows of the filled-in tables)
        if from_rollout:
            pre["old_logp"] = rollout_logp.clone()
            first_logp = torch.zeros_like(rollout_logp)
        keep = None
        if cfg.algo == "grpo" and a.filter_groups:
            keep = algos.informative_groups(torch.tensor(exp.parts[a.filter_groups]), cfg.rollout.group_size)
        adv, ret = self._advantages(exp, pre, mask, keep)  # GRPO: from the scores alone
        is_w = None
        if not (on_policy or from_rollout):
            is_w = algos.truncated_is_weights(pre["old_logp"], rollout_logp, mask, a.is_cap)[0]
        loss_fn = algos.get_policy_loss("clip")
        n_batch_tok = max(float(mask.sum()), 1.0)
        out: dict[str, float] = {}
        if keep is not None:
            out["groups_kept"] = float(keep.mean())
        # summed over this rank's micro-batches, then over the ranks
        sums = {"clip_frac": 0.0, "policy_loss": 0.0, "value_loss": 0.0, "grad_norm": 0.0, "learner_tokens": 0.0}
        steps = 0
        self.policy.train()
        for epoch in range(a.epochs):
            # the same global permutation on every rank and at any world size: a minibatch is the same rows always
            perm = np.random.default_rng([cfg.seed, iteration, epoch]).permutation(B)
            for part in np.array_split(perm, a.minibatches):
                mine = part[self.rank :: self.world].tolist()  # this rank's share of the minibatch
                n_tok = float(mask[part].sum())  # the whole minibatch's tokens (all ranks)
                # DDP / FSDP2 average gradients over ranks: divide the local sums by the global count / world
                denom_tok, denom_seq = max(n_tok, 1.0) / self.world, len(part) / self.world
                self.opt.zero_grad(set_to_none=True)
                if self.vopt is not None:
                    self.vopt.zero_grad(set_to_none=True)
                micros = [mine[i : i + tc.micro_batch_size] for i in range(0, len(mine), tc.micro_batch_size)]
                for k, micro in enumerate(micros):
                    mb = collate([P[i] for i in micro], [R[i] for i in micro], self.pad_id, self.device)
                    t = mb.mask.shape[1]
                    sel = lambda x: x[micro, :t].to(self.device)  # noqa: E731  (B, T) -> this micro-batch
                    last = k == len(micros) - 1
                    with set_gradient_sync(self.policy, tc.strategy, last):
                        with autocast(tc.autocast, self.device):
                            logits = response_logits(self.policy, mb)
                        logp, ent = logp_and_entropy(logits, mb.targets, self.temperature)
                        w = None if is_w is None else sel(is_w)
                        if on_policy:  # this rank's rows of the tables, filled in by the training pass itself
                            pre["old_logp"][micro, :t] = logp.detach().cpu()
                            pre["entropy"][micro, :t] = ent.detach().cpu()
                            w = algos.truncated_is_weights(
                                pre["old_logp"][micro, :t], rollout_logp[micro, :t], mask[micro, :t], a.is_cap
                            )[0].to(self.device)
                        elif first_logp is not None and epoch == 0:
                            first_logp[micro, :t] = logp.detach().cpu()
                            pre["entropy"][micro, :t] = ent.detach().cpu()
                            own_rows += micro
                        loss, st = loss_fn(
                            logp,
                            sel(pre["old_logp"]),
                            sel(adv),
                            mb.mask,
                            eps_low=a.eps_low,
                            eps_high=a.eps_high,
                            is_weights=w,
                            agg=a.loss_agg,
                            n_tokens=denom_tok,
                            n_seqs=denom_seq,
                        )
                        if self.ref is not None and cfg.kl.mode == "loss":
                            kl_t = algos.kl_estimate(logp, sel(pre["ref_logp"]), cfg.kl.estimator)
                            loss = loss + cfg.kl.coef * algos.agg_loss(kl_t, mb.mask, a.loss_agg, denom_tok, denom_seq)
                        if a.entropy_coef:
                            loss = loss - a.entropy_coef * algos.agg_loss(
                                ent, mb.mask, a.loss_agg, denom_tok, denom_seq
                            )
                        loss.backward()
                    mtok = float(mb.mask.sum())
                    sums["clip_frac"] += st["clip_frac"] * mtok
                    sums["policy_loss"] += float(loss.detach()) / self.world  # summed over ranks: the minibatch's loss
                    sums["learner_tokens"] += float(mb.input_ids.numel())
                    if self.value is not None:
                        with set_gradient_sync(self.value, tc.strategy, last):
                            with autocast(tc.autocast, self.device):
                                v = response_values(self.value, mb)
                            vl = algos.value_loss(
                                v, sel(pre["values"]), sel(ret), mb.mask, a.value_clip, a.loss_agg, denom_tok, denom_seq
                            )
                            vl.backward()
                        sums["value_loss"] += float(vl.detach()) / self.world
                clip = tc.grad_clip if tc.grad_clip > 0 else float("inf")
                gn = torch.nn.utils.clip_grad_norm_([p for p in self.policy.parameters() if p.requires_grad], clip)
                self.opt.step()
                if self.vopt is not None:
                    torch.nn.utils.clip_grad_norm_([p for p in self.value.parameters() if p.requires_grad], clip)
                    self.vopt.step()
                sums["grad_norm"] += float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn) / self.world
                steps += 1
        # entropy, KL to the reference and the engine/learner mismatch over the whole batch: every rank holds the
        # whole tables, unless the training pass filled them in (its own rows only, summed over the ranks)
        # (old_logp=rollout: the learner's log-probs of epoch 0, each row's first pass; after the minibatch steps
        # before it, so at minibatches > 1 the "mismatch" includes that drift)
        filled = on_policy or from_rollout
        rows = list(range(B))
        if on_policy:
            rows = sorted(set(perm[self.rank :: self.world].tolist()))
        elif from_rollout:
            rows = sorted(set(own_rows))
        m = mask[rows]
        old, roll = (first_logp if first_logp is not None else pre["old_logp"])[rows], rollout_logp[rows]
        log_ratio = (old - roll).clamp(-20.0, 20.0)
        sums["tok"] = float(m.sum())
        sums["entropy"] = float((pre["entropy"][rows] * m).sum())
        sums["mismatch_kl"] = float((algos.kl_estimate(roll, old, "k3") * m).sum())
        sums["is_clip"] = float(((log_ratio.exp() > a.is_cap).float() * m).sum()) if a.is_cap > 0 else 0.0
        if self.ref is not None:
            sums["kl"] = float((algos.kl_estimate(old, pre["ref_logp"][rows], "k3") * m).sum())
        if not filled:  # the same on every rank: count it once
            for k in ("tok", "entropy", "mismatch_kl", "is_clip", "kl"):
                if k in sums:
                    sums[k] /= self.world
        keys = list(sums)
        tot = dict(zip(keys, all_sum([sums[k] for k in keys], self.device, self.world)))
        n_tok = max(tot["tok"], 1.0)
        out.update(
            kl=tot["kl"] / n_tok if self.ref is not None else 0.0,
            entropy=tot["entropy"] / n_tok,
            mismatch_kl=tot["mismatch_kl"] / n_tok,
            is_clip_frac=tot["is_clip"] / n_tok,
        )
        out.update(
            clip_frac=tot["clip_frac"] / (n_batch_tok * a.epochs),
            policy_loss=tot["policy_loss"] / steps,
            grad_norm=tot["grad_norm"] / steps,
            learner_tokens=tot["learner_tokens"],
        )
        if self.value is not None:
            out["value_loss"] = tot["value_loss"] / steps
        return out

    # ---- state ---------------------------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's gathered CPU state dict (HF names); every rank must call it. A tied lm_head is left out (the
        engine and the checkpoint re-tie it)."""
        from pipelines.train.state import full_state_dict

        sd = full_state_dict(self.policy)
        if self.base.cfg.tie_embeddings:
            sd.pop("lm_head.weight", None)
        return sd

    def save(self, ckpt_dir: str, state: dict) -> None:
        import os

        from pipelines.train.state import save_train_state

        save_train_state(ckpt_dir, self.policy, self.opt, state, self.rank)
        if self.value is not None:
            save_train_state(os.path.join(ckpt_dir, "value"), self.value, self.vopt, {}, self.rank)

    def load(self, ckpt_dir: str) -> dict:
        import os

        from pipelines.train.state import load_train_state

        state = load_train_state(ckpt_dir, self.policy, self.opt)
        if self.value is not None:
            load_train_state(os.path.join(ckpt_dir, "value"), self.value, self.vopt)
        return state
