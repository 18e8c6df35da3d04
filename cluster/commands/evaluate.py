"""``genloop eval``: policies side by side on held-out prompts (the stage: ``pipelines.rlhf.evaluate``).

For each ``--policy``: each ``--reward`` part's pass rate (0/1 parts, Wilson 95% interval) or mean (95% interval,
mean +- 1.96 sd/sqrt(n)), reading the rows' columns (``fn:exact_answer,fn:number_answer`` on ``genloop tasks``
rows); judge pass rate (the requested function with the requested signature, not a trivial body), the judge's mean
score, the mean reward-model score (``--reward-model``) and the KL to ``--reference`` (exact over the vocabulary, on
the policy's own answers). Greedy answers unless ``--temperature`` > 0. One table, a column per policy; ``--out
FILE`` writes the rows as JSON (the demo's summary reads it).
"""

from __future__ import annotations

import argparse
import json

from cluster.commands.base import add_address, start_ray

HELP = "compare policies on held-out prompts: reward pass rates with confidence intervals, judge, reward model, KL"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help=HELP,
        description=__doc__.split("\n\n")[1].replace("\n", " "),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--policy",
        action="append",
        required=True,
        metavar="CKPT",
        help="a checkpoint or artifact folder; repeat to compare several",
    )
    p.add_argument(
        "--prompts",
        required=True,
        metavar="FILE_OR_DIR",
        help="JSONL prompt rows; a folder: its held-out split (val.jsonl, else heldout.jsonl)",
    )
    p.add_argument(
        "--reward",
        default=None,
        metavar="SPEC",
        help="reward functions scoring the answers: fn:NAME[:W],... (e.g. fn:exact_answer,fn:number_answer)",
    )
    p.add_argument("--reference", default=None, metavar="CKPT", help="KL(policy || reference) per answer token")
    p.add_argument("--reward-model", default=None, metavar="RM_DIR", help="a `genloop reward` artifact or model")
    p.add_argument("--n-prompts", type=int, default=32, metavar="N", help="prompts scored (a seeded sample)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument(
        "--samples",
        type=int,
        default=1,
        metavar="K",
        help="answers per prompt when sampling (--temperature > 0); rates are over all answers",
    )
    p.add_argument("--out", default=None, metavar="FILE", help="write the rows as JSON here")
    add_address(p)
    return p


def heldout(prompts: str) -> str:
    """A folder's held-out file (the prompts no training stage saw): sft-data's val.jsonl, else ``genloop tasks``'s
    heldout.jsonl; a file is used as given."""
    from pipelines.artifacts import exists, is_dir, join
    from pipelines.sft.data import val_path
    from pipelines.tasks import HELDOUT_FILE

    val = val_path(prompts)
    if exists(val):
        return val
    if is_dir(prompts) and exists(join(prompts, HELDOUT_FILE)):
        return join(prompts, HELDOUT_FILE)
    return prompts


def run(args: argparse.Namespace) -> int:
    from pipelines.artifacts import exists, write_text

    for path in [*args.policy, args.prompts, args.reference, args.reward_model]:
        if path and not exists(path):
            raise FileNotFoundError(f"{path} does not exist; pass a checkpoint, artifact folder or sft-data output")
    if args.n_prompts < 1 or args.max_new_tokens < 1:
        raise ValueError("--n-prompts and --max-new-tokens must be >= 1")
    from pipelines.rewards import function_rewards
    from pipelines.rlhf.evaluate import comparison_table, evaluate_policy

    function_rewards(args.reward)  # a bad spec fails before Ray starts
    start_ray(args)
    prompts = heldout(args.prompts)
    rows = []
    for policy in args.policy:
        r = evaluate_policy(
            policy,
            prompts,
            reference=args.reference,
            reward_model=args.reward_model,
            n_prompts=args.n_prompts,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            samples=args.samples,
            reward=args.reward,
        ).as_dict()
        rows.append(r)
        print(f"{policy}: {r['prompts']} prompts, {r['decoding']}")
        for a in r["answers"][:2]:
            if "reward" in a:
                score = f"reward {a['reward']:.2f}: "
            else:
                score = "" if a["judge"] is None else f"judge {a['judge']:.2f}: "
            print(f"  {score}{a['answer'][:100]!r}")
    print(comparison_table(args.policy, rows))
    if args.out:
        write_text(
            args.out,
            json.dumps(
                {
                    "prompts": prompts,
                    "reference": args.reference,
                    "reward": args.reward,
                    "reward_model": args.reward_model,
                    "policies": rows,
                },
                indent=1,
            ),
        )
    print(json.dumps([{k: v for k, v in r.items() if k != "answers"} for r in rows]))  # the last line: machine-readable
    return 0
