"""``genloop eval``: policies side by side on held-out code-writing prompts (the stage: ``pipelines.rlhf.evaluate``).

For each ``--policy``: judge pass rate (the requested function with the requested signature, not a trivial body),
the judge's mean score, the mean reward-model score (``--reward-model``) and the KL to ``--reference`` (exact over
the vocabulary, on the policy's own answers). Greedy answers unless ``--temperature`` > 0. ``--out FILE`` writes the
rows as JSON (the demo's summary reads it).
"""

from __future__ import annotations

import argparse
import json

from cluster.commands.base import add_address, start_ray

HELP = "compare policies on held-out code-writing prompts: judge pass rate, reward-model score, KL to a reference"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help=HELP, description=__doc__.split("\n\n")[1].replace("\n", " "),
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--policy", action="append", required=True, metavar="CKPT",
                   help="a checkpoint or artifact folder; repeat to compare several")
    p.add_argument("--prompts", required=True, metavar="SFT_DATA",
                   help="sft-data output; its held-out split (val.jsonl) is used when it is a folder")
    p.add_argument("--reference", default=None, metavar="CKPT", help="KL(policy || reference) per answer token")
    p.add_argument("--reward-model", default=None, metavar="RM_DIR", help="a `genloop reward` artifact or model")
    p.add_argument("--n-prompts", type=int, default=32, metavar="N")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--samples", type=int, default=1, metavar="K",
                   help="answers per prompt when sampling (--temperature > 0); rates are over all answers")
    p.add_argument("--out", default=None, metavar="FILE", help="write the rows as JSON here")
    add_address(p)
    return p


def heldout(prompts: str) -> str:
    """An sft-data folder's held-out file (the prompts no training stage saw); a file is used as given."""
    from pipelines.artifacts import exists
    from pipelines.sft.data import val_path

    val = val_path(prompts)
    return val if exists(val) else prompts


def run(args: argparse.Namespace) -> int:
    from pipelines.artifacts import exists, write_text

    for path in [*args.policy, args.prompts, args.reference, args.reward_model]:
        if path and not exists(path):
            raise FileNotFoundError(f"{path} does not exist; pass a checkpoint, artifact folder or sft-data output")
    if args.n_prompts < 1 or args.max_new_tokens < 1:
        raise ValueError("--n-prompts and --max-new-tokens must be >= 1")
    start_ray(args)
    from pipelines.rlhf.evaluate import evaluate_policy

    prompts = heldout(args.prompts)
    rows = []
    for policy in args.policy:
        r = evaluate_policy(policy, prompts, reference=args.reference, reward_model=args.reward_model,
                            n_prompts=args.n_prompts, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, samples=args.samples).as_dict()
        rows.append(r)
        rm = "-" if r["rm_score_mean"] is None else f"{r['rm_score_mean']:.3f}"
        kl = "-" if r["kl_to_reference"] is None else f"{r['kl_to_reference']:.4f}"
        print(f"{policy}: judge pass {r['judge_pass_rate']:.1%} (mean {r['judge_mean']:.3f}), reward model {rm}, "
              f"KL to reference {kl}, {r['prompts']} prompts, {r['decoding']}")
        for a in r["answers"][:2]:
            print(f"  judge {a['judge']:.2f}: {a['answer'][:100]!r}")
    if args.out:
        write_text(args.out, json.dumps({"prompts": prompts, "reference": args.reference,
                                         "reward_model": args.reward_model, "policies": rows}, indent=1))
    print(json.dumps([{k: v for k, v in r.items() if k != "answers"} for r in rows]))  # the last line: machine-readable
    return 0
