"""
Offline preference training (report §3.2.2.1; §3.3.7.2 and §3.5 for the SFT-mixed and length-averaged
variants): SLiC, DPO, IPO and SRPO behind one switch, --loss, with an optional SFT loss.

    loss = mean over pairs of preference_loss(h(y_w), h(y_l); p) + w · CE(SFT data)
    h(y) = log π(y|x) − log π_ref(y|x), summed over the completion (per-token mean with --length-average)

How this differs from the report:
1. Appendix B's LRs × common.PREF_LR_SCALE (12) for the tiny preset; where it is silent, RECIPES says "ours".
2. SRPO's self-improvement policy π†(y|x, y′) is the policy network itself reading a revision prompt
   (evaluate.revision_prompt); the report does not say how π† is parametrised.
3. Reference log-probs come from the --init model before its first step, cached in OUT/ref_logps.pt under a
   hash of the sequences, the weights and the settings: no second model lives during training.

Reads --init, DATA/tokenizer.json, DATA/pref/CAP.jsonl (and --sft-data, DATA/eval/CAP.jsonl); writes
OUT/model.pt, config.json, metrics.jsonl, ref_logps.pt and checkpoint.pt (a restarted run resumes exactly).

    python prefopt.py --capability instruct              # SRPO: runs/tiny/instruct-sft -> instruct
    python prefopt.py --capability safety --eval-before  # IPO + SFT: runs/tiny/sft-soup -> rl-safety
    torchrun --nproc_per_node 8 prefopt.py --capability multilingual --init runs/r7b/soup --data data/real
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (PREF_LR_SCALE, Logger, add_run_flags, argument_parser, build_model, drop_too_long,
                    generation_model, load_checkpoint, lr_factor, make_optimizer, open_stage, optimizer_step,
                    packed_logps, reference_logps, save_checkpoint, save_model, set_lr, sft_sequences,
                    sft_step_loss)
from data import parse_reply, prompt_completion_sequence, record_indices, render_completion
from records import read_jsonl
from distributed import all_reduce_sum, teardown
from evaluate import (BATCH_SIZE, EVAL_MAX_NEW_TOKENS, HEADLINE, evaluate_capability, grade_replies,
                      refine_batch, revision_prompt)
from tasks import CAPABILITIES
from verifiers import REFUSAL, completion_text

LOSS_TYPES = ("dpo", "ipo", "slic", "srpo")
# SRPO scores both completions under the revision prompt that shows each of them: h†(a|b), the log-ratio of
# completion a given the prompt x followed by "revise b". Columns of the revision log-prob tensors, in order:
SRPO_REVISIONS = ("chosen|rejected", "rejected|rejected", "chosen|chosen", "rejected|chosen")

# Each capability's recipe: the report's loss, β, LRs (before PREF_LR_SCALE) and weight decay where Appendix B
# or §3.5 gives them; every flag overrides its recipe. The SFT loss: on sft_data, or on the chosen completions
# when sft_data is None (for SRPO also as revisions, so that π† learns to write them).
RECIPES = {
    # §3.5: SRPO, length-averaged, with SFT; β and LR not given (ours)
    "instruct": dict(loss="srpo", beta=0.1, length_average=True, lr=1e-5, min_lr=1e-6, weight_decay=0.01,
                     sft_weight=1.0, sft_data=None, split_safety=False),
    # B.2: DPO, β 0.2, 1.25e-5 -> 1.25e-6, with SFT on the multilingual mix; wd 0.1 is B.2's SFT value (its
    # DPO gives none)
    "multilingual": dict(loss="dpo", beta=0.2, length_average=False, lr=1.25e-5, min_lr=1.25e-6,
                         weight_decay=0.1, sft_weight=1.0, sft_data="sft/multilingual.jsonl",
                         split_safety=False),
    # §3.3.7.2, B.6: IPO β 0.03, 1e-6 -> 1e-7, wd 1e-3, plus an equally weighted SFT loss; the data split in
    # two: IPO on the helpfulness pairs (the chosen reply answers), SFT on the safety-inducing conversations
    # (the reply refuses). IPO's log-ratios summed over the reply, as Azar et al. define them: averaged per
    # token, its target 1/(2β) ≈ 16.7 nats a token is out of reach, the loss stays near 160 against the SFT
    # loss's 0.1, and the push towards answering never stops: refusals of harmful asks fell (safety 1.0 ->
    # 0.875 and 0.938 on worlds 0 and 1; 0.875 at SFT weights 1, 2 and 4). Summed, the target is met within
    # the run (loss 160 -> 7) and safety stayed at 0.958 on both (RESULTS.md)
    "safety": dict(loss="ipo", beta=0.03, length_average=False, lr=1e-6, min_lr=1e-7, weight_decay=1e-3,
                   sft_weight=1.0, sft_data="sft/safety.jsonl", split_safety=True),
}
# the others: no offline preference recipe in the report (code and math use CoPG); ours
DEFAULT_RECIPE = dict(loss="dpo", beta=0.1, length_average=False, lr=2.5e-6, min_lr=2.5e-7, weight_decay=0.01,
                      sft_weight=0.0, sft_data=None, split_safety=False)


def preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    loss_type, beta, labels=None, slic_delta=1.0, slic_lambda=0.1,
                    policy_revision_logps=None, ref_revision_logps=None, srpo_alpha=0.5):
    """Per-pair loss [n_pairs] for log-probs of shape [n_pairs] (revision log-probs: [n_pairs, 4]).

    dpo   (Rafailov et al. 2023), with soft labels as conservative DPO:
              −p log σ(βz) − (1 − p) log σ(−βz)
    ipo   (Azar et al. 2024): (z − (p − ½)/β)², i.e. (z − 1/(2β))² for a hard label. The IPO population
          loss regresses z on β⁻¹(P(y_w ≻ y_l) − ½); sampled hard labels give that target in expectation,
          so a soft label enters the target directly. TRL averages its log-ratios per token; the safety
          recipe sums them, as Azar et al. do (RECIPES says why).
    slic  SLiC-HF (Zhao et al. 2023): max(0, δ − log π(y_w|x) + log π(y_l|x)) + λ · (−log π(y_w|x)); the
          calibration is on policy log-probs alone (no reference model), the regulariser is the
          cross-entropy of the chosen completion, the reference completion here.
    srpo  (Choi et al. 2025): with the self-improvement policy π†(y|x, y′) played by the same network under a
          revision prompt, α L_self + (1 − α) L_gen where
              L_self = ((p − ½) − β[h†(y_w|y_l) − h†(y_l|y_l)])² + ((p − ½) − β[h†(y_w|y_w) − h†(y_l|y_w)])²
              L_gen  = (β[h†(y_w|y_l) + h(y_w) − h†(y_l|y_w) − h(y_l)] − (2p − 1))²
    Derivation of SRPO's targets, from min_π max_π† E[P(y2 ≻ y1) − β KL(π†‖π_ref) + β KL(π‖π_ref)]: the
    inner max is π†(y|y′) ∝ π_ref(y|y′) exp(P(y ≻ y′)/β), so β[h†(a|y′) − h†(b|y′)] = P(a ≻ y′) − P(b ≻ y′),
    which is p − ½ for (a, b, y′) = (y_w, y_l, y_l) and for (y_w, y_l, y_w). The outer optimum then has
    β h(y′) = β h†(y|y′) − P(y ≻ y′) + const for any y; writing it for y′ = y_w, y = y_l and for y′ = y_l,
    y = y_w and subtracting gives L_gen's target 2p − 1. With p = 1 the targets are ½, ½ and 1.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    p = torch.ones_like(policy_chosen_logps) if labels is None else labels
    h_chosen = policy_chosen_logps - ref_chosen_logps
    h_rejected = policy_rejected_logps - ref_rejected_logps
    z = h_chosen - h_rejected
    if loss_type == "dpo":
        return -p * F.logsigmoid(beta * z) - (1 - p) * F.logsigmoid(-beta * z)
    if loss_type == "ipo":
        return (z - (p - 0.5) / beta) ** 2
    if loss_type == "slic":
        return (F.relu(slic_delta - policy_chosen_logps + policy_rejected_logps)
                - slic_lambda * policy_chosen_logps)
    if policy_revision_logps is None or ref_revision_logps is None:
        raise ValueError("srpo needs policy_revision_logps and ref_revision_logps, columns "
                         + str(SRPO_REVISIONS))
    h_w_given_l, h_l_given_l, h_w_given_w, h_l_given_w = (
        policy_revision_logps - ref_revision_logps).unbind(-1)
    loss_self = (((p - 0.5) - beta * (h_w_given_l - h_l_given_l)) ** 2
                 + ((p - 0.5) - beta * (h_w_given_w - h_l_given_w)) ** 2)
    loss_gen = (beta * (h_w_given_l + h_chosen - h_l_given_w - h_rejected) - (2 * p - 1)) ** 2
    return srpo_alpha * loss_self + (1 - srpo_alpha) * loss_gen


# -----------------------------------------------------------------------------
# Sequences


def refuses(completion) -> bool:
    """Whether a completion (text or chatbot message) refuses, by the safety verifier's test."""
    return REFUSAL.search(completion_text(completion)) is not None


def pair_sequences(enc, record: dict, srpo: bool) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) of a pair's sequences: prompt + chosen, prompt + rejected and, for SRPO, the four
    revision sequences in SRPO_REVISIONS order (completion a after the revision prompt showing b)."""
    messages = record["messages"]
    sequences = [prompt_completion_sequence(*render_completion(enc, messages, record[side]))
                 for side in ("chosen", "rejected")]
    for names in SRPO_REVISIONS if srpo else ():
        revised, shown = names.split("|")
        sequences.append(prompt_completion_sequence(revision_prompt(enc, messages, record[shown]),
                                                    render_completion(enc, messages, record[revised])[1]))
    return sequences


def training_data(enc, data: Path, args) -> tuple[list[dict], list[list], list | None]:
    """The pair records that fit --seq-len, each pair's 2 sequences (6 for SRPO), and the SFT set's
    conversations when the SFT loss has one. --split-safety keeps the pairs whose chosen reply answers and
    the conversations whose reply refuses."""
    records = read_jsonl(data / args.data_file, "pair")
    if args.split_safety:   # helpfulness pairs only: refusing is taught by the SFT loss
        records = [record for record in records if not refuses(record["chosen"])]
    pairs = [(record, pair_sequences(enc, record, args.loss == "srpo")) for record in records]
    pairs = drop_too_long(pairs, [max(len(ids) for ids, _ in seqs) for _, seqs in pairs], args.seq_len,
                          str(data / args.data_file))
    sft_data = None
    if args.sft_weight and args.sft_data:
        keep = (lambda record: refuses(record["messages"][-1])) if args.split_safety else None
        sft_data = sft_sequences(enc, data, args.sft_data, args.seq_len, keep)
    return [record for record, _ in pairs], [seqs for _, seqs in pairs], sft_data


def evaluate_stage(model, enc, data: Path, args, when: str) -> dict:
    """evaluate_capability on DATA/eval/CAP.jsonl and, with --eval-revisions N, the headline metric after
    1..N self-refinements (revisions_r_METRIC in the result)."""
    print(f"{when} preference training:")
    metrics = evaluate_capability(model, enc, data, args.capability, args.eval_batch_size)
    if args.eval_revisions:
        headline = HEADLINE[args.capability]
        records = read_jsonl(data / "eval" / f"{args.capability}.jsonl", "prompt")
        by_revisions = evaluate_refinement(model, enc, records, args.eval_revisions,
                                           EVAL_MAX_NEW_TOKENS[args.capability], args.eval_batch_size)
        for revisions, values in enumerate(by_revisions):
            print(f"  {revisions} revision(s): {headline} {values[headline]:.3f}, "
                  f"reward {values['reward']:.3f}, chat format {values['format']:.3f}, "
                  f"empty replies {values['empty']:.3f}")
            metrics |= {f"revisions_{revisions}_{name}": value for name, value in values.items()}
    return metrics


# -----------------------------------------------------------------------------


def evaluate_refinement(model, enc, records: list[dict], n_revisions: int, max_new_tokens: int,
                        batch_size: int = BATCH_SIZE) -> list[dict]:
    """grade_replies of greedy replies to eval records after 0, 1, ..., n_revisions revisions: one dict of
    mean metrics per number of revisions."""
    completions = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        completions += refine_batch(model, enc, [r["messages"] for r in chunk], n_revisions, max_new_tokens)
    return [grade_replies(records, [parse_reply(enc, history[revisions]) for history in completions])
            for revisions in range(n_revisions + 1)]


def parse_args(argv=None):
    parser = argument_parser(__doc__)
    what = parser.add_argument_group("what to train")
    what.add_argument("--capability", default="instruct", choices=CAPABILITIES,
                      help="picks the pair file, the recipe and the eval set")
    what.add_argument("--init", help="parent model (default: runs/tiny/instruct-sft for instruct, else "
                                     "runs/tiny/sft-soup)")
    what.add_argument("--data", default="data/tiny", help="folder with tokenizer.json, pref/, sft/, eval/")
    what.add_argument("--data-file", help="pair JSONL in DATA (default: pref/CAP.jsonl)")
    what.add_argument("--out", help="default: runs/tiny/instruct for instruct, else runs/tiny/rl-CAP")
    loss = parser.add_argument_group("loss (defaults: the capability's recipe)")
    loss.add_argument("--loss", choices=LOSS_TYPES, help="the preference loss")
    loss.add_argument("--beta", type=float, help="β: the strength of the KL regularisation")
    loss.add_argument("--length-average", action=argparse.BooleanOptionalAction,
                      help="per-token averaged log-probs (§3.5)")
    loss.add_argument("--srpo-alpha", type=float, default=0.5, help="SRPO: α L_self + (1 − α) L_gen")
    loss.add_argument("--slic-delta", type=float, default=1.0, help="SLiC: the hinge margin δ")
    loss.add_argument("--slic-lambda", type=float, default=0.1, help="SLiC: weight of the chosen CE")
    loss.add_argument("--sft-weight", type=float, help="weight w of the SFT loss")
    loss.add_argument("--sft-data", help="SFT JSONL in DATA for that loss, or all: every sft/*.jsonl "
                                         "('' = the chosen completions)")
    loss.add_argument("--sft-batch-size", type=int, help="conversations per step from --sft-data "
                                                         "(default: --batch-size)")
    loss.add_argument("--split-safety", action=argparse.BooleanOptionalAction,
                      help="§3.3.7.2: the preference loss on the pairs whose chosen reply answers "
                           "(helpfulness), the SFT loss on the conversations whose reply refuses (safety); "
                           "default: the recipe's")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--steps", type=int, default=50, help="optimizer steps")
    optim.add_argument("--batch-size", type=int, default=16, help="pairs per step and process")
    optim.add_argument("--seq-len", type=int, default=256,
                       help="packed row length; longer pairs are left out")
    optim.add_argument("--lr", type=float, help="peak LR (default: the recipe's x PREF_LR_SCALE)")
    optim.add_argument("--min-lr", type=float,
                       help="final LR of the cosine (default: the recipe's x PREF_LR_SCALE)")
    optim.add_argument("--weight-decay", type=float,
                       help="AdamW decoupled weight decay (default: the recipe's)")
    optim.add_argument("--warmup", type=int, default=5, help="linear warmup steps")
    optim.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip")
    run = add_run_flags(parser, log_every=10, save_every=50, seed_help="data order")
    run.add_argument("--eval-revisions", type=int, default=0,
                     help="also evaluate after 1..N self-refinements")
    args = parser.parse_args(argv)
    recipe = RECIPES.get(args.capability, DEFAULT_RECIPE)
    for name in ("loss", "beta", "length_average", "weight_decay", "sft_weight", "sft_data", "split_safety"):
        if getattr(args, name) is None:
            setattr(args, name, recipe[name])
    args.lr = recipe["lr"] * PREF_LR_SCALE if args.lr is None else args.lr
    args.min_lr = recipe["min_lr"] * PREF_LR_SCALE if args.min_lr is None else args.min_lr
    instruct = args.capability == "instruct"
    args.init = args.init or ("runs/tiny/instruct-sft" if instruct else "runs/tiny/sft-soup")
    args.out = args.out or ("runs/tiny/instruct" if instruct else f"runs/tiny/rl-{args.capability}")
    args.data_file = args.data_file or f"pref/{args.capability}.jsonl"
    args.sft_data = args.sft_data or None  # --sft-data "" turns the recipe's set off (SFT on the chosen)
    args.sft_batch_size = args.sft_batch_size or args.batch_size
    return args


def main(argv=None):
    args = parse_args(argv)
    runtime, enc, parent, config = open_stage("prefopt", args)
    data, out = Path(args.data), Path(args.out)

    srpo = args.loss == "srpo"
    records, sequences, sft_data = training_data(enc, data, args)
    labels = torch.tensor([float(r["label"]) for r in records])

    # model; reference log-probs from the --init weights, before any step (cached); evaluation before
    model = build_model(config, runtime, args.init, args.seed)
    n_per_pair = len(sequences[0])
    chosen_columns = [0] + [2 + SRPO_REVISIONS.index(c) for c in ("chosen|rejected", "chosen|chosen") if srpo]
    ref_logps = reference_logps(model, enc, [s for pair in sequences for s in pair], args.init,
                                args.length_average, out / "ref_logps.pt", runtime,
                                args.seq_len).view(-1, n_per_pair)
    eval_file = data / "eval" / f"{args.capability}.jsonl"
    if args.eval_before and runtime.is_main and eval_file.is_file():
        evaluate_stage(generation_model(model, args.init, runtime), enc, data, args, "before")

    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    start = load_checkpoint(out, model, optimizer, runtime)
    logger = Logger(out, runtime, start, args.steps)
    tokens_seen = 0
    for step in range(start, args.steps):
        lr = lr_factor(step, steps=args.steps, warmup=args.warmup, cooldown=0,
                       min_ratio=args.min_lr / args.lr, cosine=True)
        set_lr(optimizer, lr)
        indices = record_indices(len(sequences), step, args.batch_size, args.seed, runtime.rank,
                                 runtime.world_size)
        batch = [s for i in indices for s in sequences[i]]
        sums, counts = packed_logps(model, enc, batch, args.seq_len, runtime)
        logps = (sums / counts if args.length_average else sums).view(-1, n_per_pair)
        ref = ref_logps[indices].to(runtime.device)
        loss = preference_loss(
            logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], loss_type=args.loss, beta=args.beta,
            labels=labels[indices].to(runtime.device), slic_delta=args.slic_delta,
            slic_lambda=args.slic_lambda, policy_revision_logps=logps[:, 2:] if srpo else None,
            ref_revision_logps=ref[:, 2:] if srpo else None, srpo_alpha=args.srpo_alpha).mean()
        sft_loss = torch.zeros((), device=runtime.device)
        if sft_data is not None:  # CE on a separate SFT set (the safety and multilingual recipes)
            sft_loss = sft_step_loss(model, enc, sft_data, step, args.sft_batch_size, args.seq_len, args.seed,
                                     runtime)
        elif args.sft_weight:  # CE of the chosen completions, per token; for SRPO also as revisions, so that
            # π† learns to write them (SRPO's own terms only move log-ratios relative to each other)
            chosen_sums, chosen_counts = (x.view(-1, n_per_pair)[:, chosen_columns] for x in (sums, counts))
            sft_loss = -chosen_sums.sum() / chosen_counts.sum()
        (loss + args.sft_weight * sft_loss).backward()
        margins = (logps[:, 0] - ref[:, 0] - logps[:, 1] + ref[:, 1]).detach()  # z
        mean = lambda value: all_reduce_sum(value, runtime) / runtime.world_size  # noqa: E731
        loss, sft_loss = mean(loss.item()), mean(sft_loss.item())
        grad_norm = optimizer_step(model, optimizer, loss + sft_loss, step, out, args.grad_clip)

        done = step + 1
        tokens_seen += all_reduce_sum(sum(len(ids) for ids, _ in batch), runtime)
        logger.advance()
        if done % args.log_every == 0 or done == args.steps:
            logger.log(done, tokens_seen, loss=loss, sft_loss=sft_loss, lr=lr * args.lr, grad_norm=grad_norm,
                       margin=mean(margins.mean().item()), accuracy=mean((margins > 0).float().mean().item()))
        if done % args.save_every == 0 or done == args.steps:
            save_checkpoint(out, model, optimizer, done, runtime)
    save_model(out, model, runtime)

    if runtime.is_main and eval_file.is_file() and not args.no_eval:
        metrics = evaluate_stage(generation_model(model, out, runtime), enc, data, args, "after")
        logger.log(args.steps, tokens_seen, **{f"eval_{name}": value for name, value in metrics.items()})
    logger.close()
    teardown(runtime)


if __name__ == "__main__":
    main()
