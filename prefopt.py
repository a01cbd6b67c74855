"""
Offline preference training (report §3.2.2.1; §3.3.7.2 and §3.5 for the SFT-mixed and length-averaged
variants; Appendix B for β and LRs): SLiC, DPO, IPO and SRPO behind one switch, and SRPO self-refinement.

Notation (DESIGN §9): h(y) = log π(y|x) − log π_ref(y|x), summed over the completion's tokens, or averaged per
token with `--length-average` (§3.5, following Grinsztajn et al. 2024); z = h(y_w) − h(y_l); p = the soft
label P(y_w ≻ y_l) in [0.5, 1] that every pair carries (1 = a hard label). The loss: `preference_loss`.

- SRPO: one network plays π(y|x) and the self-improvement policy π†(y|x, y′). π† is the same model reading
  the revision prompt, an ordinary chat continuation built by data.render (no new special tokens):
      <BOS> ...the prompt's turns... <SOT><CHATBOT> y′ <EOT> <SOT><USER> REVISION_REQUEST <EOT> <SOT><CHATBOT>
  i.e. the conversation, the draft y′ as the chatbot's reply, then a user turn asking for a revision; the
  completion scored (and generated) after it is the revision. `revision_prompt` builds it. At inference,
  `refine(model, enc, messages, n_revisions, max_new_tokens)` generates, then revises N times, each
  revision reading only the latest draft (π† conditions on one y′); `refine_batch` does it for a list of
  conversations at once. evaluate.py --refine N uses them.
- `--sft-weight w` adds w × the cross-entropy of the chosen completions (for SRPO: also of the chosen as a
  revision of either completion), or, with `--sft-data FILE`, of a separate SFT set (the safety recipe,
  §3.3.7.2: IPO on helpfulness pairs + an equally weighted SFT loss on safety data; the multilingual
  recipe, B.2: DPO + SFT on the SFT mix). `--sft-data all` mixes every capability's SFT data: polishing
  (§3.5) uses it so that SRPO on instruct pairs does not erode the other skills.
- Reference log-probs are computed once, before training, by the --init model itself (the policy before its
  first step), and cached at OUT/ref_logps.pt. The cache is keyed by a hash of everything they depend on:
  the exact token sequences scored (so the data file, the tokenizer, the revision prompt and the records
  kept at --seq-len), the --init model.pt bytes, --length-average and the device type (bf16 on GPU). A cache
  with another key is recomputed, with a message, never reused. No second model lives during training.
- `--capability CAP` picks DATA/pref/CAP.jsonl and RECIPES[CAP]; every flag overrides its recipe.

Appendix B's LRs are for a 111B model pretrained at 2.5e-4; as in sft.py every LR here is the report's ×
LR_SCALE = 12 (the tiny preset pretrains at 3e-3). Where Appendix B is silent we say so and chose for tiny.

| capability   | report: loss, β; LR (peak → end), wd                   | tiny: β, peak LR; SFT loss; steps x pairs        |
|--------------|--------------------------------------------------------|--------------------------------------------------|
| instruct     | SRPO, length-averaged + SFT (§3.5); β, LR not given    | 0.1, 1.2e-4 (ours); w 1 on the chosen; 50 x 16   |
| multilingual | DPO, β 0.2; 1.25e-5 → 1.25e-6, wd 0.1 (B.2)            | 0.2, 1.5e-4; w 1 on sft/multilingual; 50 x 16    |
| safety       | IPO (per-token avg.), β 0.03; 1e-6 → 1e-7, wd 1e-3 (B.6) | 0.03, 1.2e-5; w 1 on sft/safety; 50 x 16       |
| others       | none (the report uses CoPG for code and math)          | DPO 0.1, 3e-5 (ours); none; 50 x 16              |

Reads --init (model.pt + config.json), DATA/tokenizer.json, DATA/pref/CAP.jsonl (--sft-data, DATA/eval/CAP.jsonl);
writes OUT/model.pt, config.json, metrics.jsonl, checkpoint.pt (a restarted run resumes exactly), ref_logps.pt.

    python prefopt.py --capability safety --init runs/tiny/sft-safety --eval-before     # IPO + SFT, CPU
    python prefopt.py --capability instruct --init runs/tiny/instruct --eval-revisions 2  # SRPO + refinement
    python prefopt.py --loss dpo --beta 0.1 --data-file pref/style.jsonl --capability instruct
    torchrun --nproc_per_node 8 prefopt.py --capability multilingual --init runs/r7b/sft-multilingual ...
"""

import argparse
import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import (Logger, all_reduce_sum, atomic_save, autocast, build_model, load_checkpoint, lr_factor,
                    make_optimizer, model_path, open_stage, optimizer_step, save_checkpoint, save_model, set_lr,
                    teardown, whole_model)
from data import (END_OF_TURN, chat_stop_tokens, pack, parse_reply, prompt_completion_sequence, read_jsonl,
                  read_sft_data, record_indices, render, render_completion, render_prompt)
from model import generate
from evaluate import EVAL_MAX_NEW_TOKENS, HEADLINE, evaluate_capability, grade_replies
from tasks import CAPABILITIES

LOSS_TYPES = ("dpo", "ipo", "slic", "srpo")
# SRPO scores both completions under the revision prompt that shows each of them: h†(a|b), the log-ratio of
# completion a given the prompt x followed by "revise b". Columns of the revision log-prob tensors, in order:
SRPO_REVISIONS = ("chosen|rejected", "rejected|rejected", "chosen|chosen", "rejected|chosen")
REVISION_REQUEST = "Revise your reply: keep what is right, fix what is wrong, and follow every instruction."

LR_SCALE = 12  # tiny pretraining LR (3e-3) / the report's (2.5e-4), as in sft.py
RECIPES = {  # report values where Appendix B gives them (LRs before LR_SCALE); see the table above
    "instruct": dict(loss="srpo", beta=0.1, length_average=True, lr=1e-5, min_lr=1e-6, weight_decay=0.01,
                     sft_weight=1.0, sft_data=None),
    "multilingual": dict(loss="dpo", beta=0.2, length_average=False, lr=1.25e-5, min_lr=1.25e-6, weight_decay=0.1,
                         sft_weight=1.0, sft_data="sft/multilingual.jsonl"),
    "safety": dict(loss="ipo", beta=0.03, length_average=True, lr=1e-6, min_lr=1e-7, weight_decay=1e-3,
                   sft_weight=1.0, sft_data="sft/safety.jsonl"),
}
DEFAULT_RECIPE = dict(loss="dpo", beta=0.1, length_average=False, lr=2.5e-6, min_lr=2.5e-7, weight_decay=0.01,
                      sft_weight=0.0, sft_data=None)


def preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    loss_type, beta, labels=None, slic_delta=1.0, slic_lambda=0.1,
                    policy_revision_logps=None, ref_revision_logps=None, srpo_alpha=0.5):
    """Per-pair loss [n_pairs] for log-probs of shape [n_pairs] (revision log-probs: [n_pairs, 4]).

    dpo   (Rafailov et al. 2023), with soft labels as conservative DPO:
              −p log σ(βz) − (1 − p) log σ(−βz)
    ipo   (Azar et al. 2024): (z − (p − ½)/β)², i.e. (z − 1/(2β))² for a hard label. The IPO population
          loss regresses z on β⁻¹(P(y_w ≻ y_l) − ½); sampled hard labels give that target in expectation,
          so a soft label enters the target directly. Used on per-token-averaged log-ratios, as in TRL.
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
    y = y_w and subtracting gives L_gen's target 2p − 1. With p = 1 these are DESIGN §9's ½, ½ and 1.
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
        return F.relu(slic_delta - policy_chosen_logps + policy_rejected_logps) - slic_lambda * policy_chosen_logps
    if policy_revision_logps is None or ref_revision_logps is None:
        raise ValueError("srpo needs policy_revision_logps and ref_revision_logps, columns " + str(SRPO_REVISIONS))
    h_w_given_l, h_l_given_l, h_w_given_w, h_l_given_w = (policy_revision_logps - ref_revision_logps).unbind(-1)
    loss_self = ((p - 0.5) - beta * (h_w_given_l - h_l_given_l)) ** 2 + ((p - 0.5) - beta * (h_w_given_w - h_l_given_w)) ** 2
    loss_gen = (beta * (h_w_given_l + h_chosen - h_l_given_w - h_rejected) - (2 * p - 1)) ** 2
    return srpo_alpha * loss_self + (1 - srpo_alpha) * loss_gen


# -----------------------------------------------------------------------------
# Sequences: pairs, the revision prompt, self-refinement


def revision_prompt(enc, messages: list[dict], draft) -> list[int]:
    """The prompt under which π† writes a revision of `draft` (the response text, a chatbot message, or the
    token ids model.generate sampled after data.render_prompt): the conversation, the draft as the chatbot's
    reply, a user turn asking for a revision (REVISION_REQUEST), then the chatbot's turn opener. For a text
    draft it is render_prompt(messages + [draft reply, revision request])."""
    if isinstance(draft, (str, dict)):
        prompt_ids, draft_ids = render_completion(enc, messages, draft)
    else:
        prompt_ids, draft_ids = render_prompt(enc, messages), list(draft)
    end_of_turn = enc.encode_single_token(END_OF_TURN)
    if draft_ids[-1:] != [end_of_turn]:  # a sampled draft cut off at max_new_tokens still closes its turn
        draft_ids.append(end_of_turn)
    request = render_prompt(enc, [{"role": "user", "content": REVISION_REQUEST}])[1:]  # without its <BOS>
    return prompt_ids + draft_ids + request


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


@torch.no_grad()
def refine_batch(model, enc, conversations: list[list[dict]], n_revisions: int, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> list[list[list[int]]]:
    """SRPO self-refinement at inference (§3.2.2.1), batched: a first reply from π to every conversation, then
    n_revisions revisions by π†, each written under the revision prompt that shows the previous one. Returns,
    per conversation, its n_revisions + 1 completions as token ids ([0] the first draft, [-1] the final
    answer); parse them with data.parse_reply."""
    stop_tokens = chat_stop_tokens(enc)
    drafts = generate(model, [render_prompt(enc, messages) for messages in conversations], max_new_tokens,
                      temperature, top_p, stop_tokens, generator)
    completions = [[draft] for draft in drafts]
    for _ in range(n_revisions):
        revision_prompts = [revision_prompt(enc, messages, draft) for messages, draft in zip(conversations, drafts)]
        drafts = generate(model, revision_prompts, max_new_tokens, temperature, top_p, stop_tokens, generator)
        for history, draft in zip(completions, drafts):
            history.append(draft)
    return completions


def refine(model, enc, messages: list[dict], n_revisions: int, max_new_tokens: int, temperature: float = 0.0,
           top_p: float = 1.0, generator: torch.Generator | None = None) -> list[list[int]]:
    """refine_batch for one conversation: its n_revisions + 1 completions (token ids; [-1] the final answer)."""
    return refine_batch(model, enc, [messages], n_revisions, max_new_tokens, temperature, top_p, generator)[0]


def evaluate_refinement(model, enc, records: list[dict], n_revisions: int, max_new_tokens: int,
                        batch_size: int = 16) -> list[dict]:
    """evaluate.grade_replies of greedy replies to eval records after 0, 1, ..., n_revisions revisions: one dict
    of mean metrics per number of revisions."""
    completions = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        completions += refine_batch(model, enc, [r["messages"] for r in chunk], n_revisions, max_new_tokens)
    return [grade_replies(records, [parse_reply(enc, history[revisions]) for history in completions])
            for revisions in range(n_revisions + 1)]


# -----------------------------------------------------------------------------
# Log-probs and the reference cache


def packed_logps(model, enc, sequences: list, seq_len: int, runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs of each sequence's completion [n], differentiable; its number of tokens [n]), the
    sequences packed into rows of seq_len. Divide the two for per-token averages (--length-average)."""
    batch = {k: v.to(runtime.device) for k, v in pack(enc, sequences, seq_len).items()}
    with autocast(runtime):
        sums = model.sequence_logps(batch["tokens"], batch["targets"], batch["doc_ids"], len(sequences),
                                    batch["positions"])
    counts = torch.tensor([sum(mask[1:]) for _, mask in sequences], dtype=torch.float32, device=runtime.device)
    return sums.float(), counts


def reference_key(sequences: list, init: str, average: bool, device_type: str) -> str:
    """What reference log-probs depend on, hashed: the exact (ids, mask) sequences (hence the data, the
    tokenizer, the revision prompt and the records kept), the init weights' file, averaging, the device type."""
    key = hashlib.sha256()
    for ids, mask in sequences:
        key.update(np.asarray([len(ids), *ids, *mask], dtype=np.int64).tobytes())
    with open(model_path(init), "rb") as file:
        key.update(hashlib.file_digest(file, "sha256").digest())
    key.update(f"average={average} device={device_type}".encode())
    return key.hexdigest()


def reference_logps(model, enc, sequences: list, init: str, average: bool, cache: Path, runtime,
                    seq_len: int, batch_size: int = 64) -> torch.Tensor:
    """log π_ref of every sequence [n] (summed, or per-token averaged with `average`), on the CPU. `model` must
    hold the --init weights: call this before the first optimizer step. Computed once and saved at `cache`
    with its reference_key; a cache with another key is recomputed (with a message), never reused. Under
    FSDP every rank scores every sequence (simple; a sliced pass would save world_size x on a pass that
    costs about a third of one training epoch) and rank 0 writes the file."""
    key = reference_key(sequences, init, average, runtime.device.type)
    if cache.is_file():
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        if saved["key"] == key:
            return saved["logps"]
        print(f"{cache} was computed for other data, init weights or settings: recomputing it")
    chunks = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            sums, counts = packed_logps(model, enc, sequences[start:start + batch_size], seq_len, runtime)
            chunks.append((sums / counts if average else sums).cpu())
    logps = torch.cat(chunks)
    if runtime.is_main:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({"key": key, "logps": logps}, cache)
    return logps


def fitting_records(records: list[dict], sequences: list[list], seq_len: int, what: str):
    """The records (and their sequences) whose every sequence fits a row of seq_len; says how many were left out."""
    kept = [i for i, group in enumerate(sequences) if max(len(ids) for ids, _ in group) <= seq_len]
    if len(kept) < len(records):
        print(f"{what}: left out {len(records) - len(kept)} of {len(records)} records longer than --seq-len {seq_len}")
    if not kept:
        raise ValueError(f"{what}: no record fits --seq-len {seq_len}")
    return [records[i] for i in kept], [sequences[i] for i in kept]


def sft_sequences(enc, data: Path, name: str, seq_len: int) -> list:
    """The conversations of --sft-data (a JSONL in DATA, or "all": data.read_sft_data), rendered with their
    loss masks, those that fit seq_len (the SFT regulariser of prefopt.py and copg.py)."""
    records = read_sft_data(data, name)
    return fitting_records(records, [[render(enc, r["messages"])] for r in records], seq_len, str(data / name))[1]


def sft_step_loss(model, enc, sequences: list, step: int, args, runtime) -> torch.Tensor:
    """Cross-entropy of this step's --sft-batch-size conversations of `sequences`, packed into rows of
    --seq-len (each record once per epoch, disjoint across ranks)."""
    indices = record_indices(len(sequences), step, args.sft_batch_size, args.seed + 1, runtime.rank,
                             runtime.world_size)
    batch = {k: v.to(runtime.device) for k, v in pack(enc, [sequences[i][0] for i in indices], args.seq_len).items()}
    with autocast(runtime):
        return model.loss(batch["tokens"], batch["targets"], batch["doc_ids"], batch["positions"])


def evaluate(model, enc, data: Path, args, when: str) -> dict:
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
            print(f"  {revisions} revision(s): {headline} {values[headline]:.3f}, reward {values['reward']:.3f}, "
                  f"chat format {values['format']:.3f}, empty replies {values['empty']:.3f}")
            metrics |= {f"revisions_{revisions}_{name}": value for name, value in values.items()}
    return metrics


# -----------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capability", default="instruct", choices=CAPABILITIES, help="picks the pair file, "
                        "the recipe and the eval set")
    parser.add_argument("--init", help="parent model (default: runs/tiny/instruct for instruct, else "
                                       "runs/tiny/sft-CAP)")
    parser.add_argument("--data", default="data/tiny", help="folder with tokenizer.json, pref/, sft/, eval/")
    parser.add_argument("--data-file", help="pair JSONL in DATA (default: pref/CAP.jsonl)")
    parser.add_argument("--out", help="default: runs/tiny/pref-CAP")
    parser.add_argument("--loss", choices=LOSS_TYPES, help="default: the recipe's")
    parser.add_argument("--beta", type=float, help="default: the recipe's")
    parser.add_argument("--length-average", action=argparse.BooleanOptionalAction,
                        help="per-token averaged log-probs (§3.5); default: the recipe's")
    parser.add_argument("--srpo-alpha", type=float, default=0.5, help="SRPO: α L_self + (1 − α) L_gen")
    parser.add_argument("--slic-delta", type=float, default=1.0, help="SLiC: the hinge margin δ")
    parser.add_argument("--slic-lambda", type=float, default=0.1, help="SLiC: weight of the chosen CE")
    parser.add_argument("--sft-weight", type=float, help="weight of the SFT loss (default: the recipe's)")
    parser.add_argument("--sft-data", help="SFT JSONL in DATA for that loss, or all: every sft/*.jsonl "
                                           "(default: the recipe's; none = the chosen completions)")
    parser.add_argument("--sft-batch-size", type=int, help="conversations per step from --sft-data "
                                                           "(default: --batch-size)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per step and process")
    parser.add_argument("--seq-len", type=int, default=256, help="packed row length")
    parser.add_argument("--lr", type=float, help="peak LR (default: the recipe's x LR_SCALE)")
    parser.add_argument("--min-lr", type=float, help="final LR of the cosine (default: the recipe's x LR_SCALE)")
    parser.add_argument("--weight-decay", type=float, help="default: the recipe's")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--eval-before", action="store_true", help="also evaluate the --init model first")
    parser.add_argument("--eval-revisions", type=int, default=0, help="also evaluate after 1..N self-refinements")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args(argv)
    recipe = RECIPES.get(args.capability, DEFAULT_RECIPE)
    for name in ("loss", "beta", "length_average", "weight_decay", "sft_weight", "sft_data"):
        if getattr(args, name) is None:
            setattr(args, name, recipe[name])
    args.lr = recipe["lr"] * LR_SCALE if args.lr is None else args.lr
    args.min_lr = recipe["min_lr"] * LR_SCALE if args.min_lr is None else args.min_lr
    expert = f"runs/tiny/sft-{args.capability}"
    args.init = args.init or ("runs/tiny/instruct" if args.capability == "instruct" else expert)
    args.data_file = args.data_file or f"pref/{args.capability}.jsonl"
    args.out = args.out or f"runs/tiny/pref-{args.capability}"
    args.sft_data = args.sft_data or None  # --sft-data "" turns the recipe's set off (SFT on the chosen)
    args.sft_batch_size = args.sft_batch_size or args.batch_size
    return args


def main(argv=None):
    args = parse_args(argv)
    runtime, enc, parent, config = open_stage("prefopt", args)
    data, out = Path(args.data), Path(args.out)

    # data: each pair's 2 sequences (6 for SRPO), tokenized once; the SFT set if any
    srpo = args.loss == "srpo"
    records = read_jsonl(data / args.data_file, "pair")
    records, sequences = fitting_records(records, [pair_sequences(enc, r, srpo) for r in records], args.seq_len,
                                         str(data / args.data_file))
    labels = torch.tensor([float(r["label"]) for r in records])
    if args.sft_weight and args.sft_data:
        sft_data = sft_sequences(enc, data, args.sft_data, args.seq_len)

    # model; reference log-probs from the --init weights, before any step (cached); evaluation before
    model = build_model(config, runtime, args.init, args.seed)
    n_per_pair = len(sequences[0])
    chosen_columns = [0] + [2 + SRPO_REVISIONS.index(c) for c in ("chosen|rejected", "chosen|chosen") if srpo]
    ref_logps = reference_logps(model, enc, [s for pair in sequences for s in pair], args.init, args.length_average,
                                out / "ref_logps.pt", runtime, args.seq_len).view(-1, n_per_pair)
    eval_file = data / "eval" / f"{args.capability}.jsonl"
    if args.eval_before and runtime.is_main and eval_file.is_file():
        evaluate(whole_model(model, args.init, runtime), enc, data, args, "before")

    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    start = load_checkpoint(out, model, optimizer, runtime)
    logger = Logger(out, runtime, start, args.steps)
    tokens_seen = 0
    for step in range(start, args.steps):
        lr = lr_factor(step, args.steps, args.warmup, 0, args.min_lr / args.lr, cosine=True)
        set_lr(optimizer, lr)
        indices = record_indices(len(sequences), step, args.batch_size, args.seed, runtime.rank, runtime.world_size)
        batch = [s for i in indices for s in sequences[i]]
        sums, counts = packed_logps(model, enc, batch, args.seq_len, runtime)
        logps = (sums / counts if args.length_average else sums).view(-1, n_per_pair)
        ref = ref_logps[indices].to(runtime.device)
        pair_losses = preference_loss(
            logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], args.loss, args.beta, labels[indices].to(runtime.device),
            args.slic_delta, args.slic_lambda, logps[:, 2:] if srpo else None, ref[:, 2:] if srpo else None,
            args.srpo_alpha)
        loss = pair_losses.mean()
        sft_loss = torch.zeros((), device=runtime.device)
        if args.sft_weight and args.sft_data:  # the safety recipe: CE on a separate SFT set
            sft_loss = sft_step_loss(model, enc, sft_data, step, args, runtime)
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

    if runtime.is_main and eval_file.is_file():
        metrics = evaluate(whole_model(model, out, runtime), enc, data, args, "after")
        logger.log(args.steps, tokens_seen, **{f"eval_{name}": value for name, value in metrics.items()})
    logger.close()
    teardown(runtime)


if __name__ == "__main__":
    main()
