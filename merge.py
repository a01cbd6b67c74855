"""
Merging (report §3.4): experts trained in parallel from one parent become one model by averaging their
weights. Every merge the report uses is linear, θ = Σ w_i θ_i with Σ w_i = 1: soups of experts (--weights),
seed merging (uniform), Polyak averaging of one run's checkpoints, interpolation toward a parent (CHILD PARENT
--weights 0.7 0.3), and task arithmetic (BASE E1 E2 --weights 1−Nλ λ λ). SLERP (--method slerp, two models) is
a comparison.

How this differs from the report:
1. --search (§3.4.3.1, §3.4.3.3) scores a candidate by its retention, each domain's headline metric over its
   expert's (capped at 1): the mean over domains and the worst domain's, averaged (`objective`). The worst
   domain counts because the aim is every capability close to its expert (§3.4.3): on the mean alone the tiny
   searches took candidates that gave one capability away for a little more of the others (RESULTS.md). It
   tries the start, then the report's moves: upweight the weakest domain's experts (by 0.2, 0.4, 0.8; the
   others implicitly lowered), then, once no such move is left, every leave-one-out merge (which shows
   "collisions") and random log-normal perturbations, until --budget candidates; the report describes the
   moves, not an algorithm. With --base PARENT the search is over task-arithmetic scales (Ilharco et al.
   2023): θ = θ_parent + Σ λ_i (θ_i − θ_parent), still a linear merge (weights 1 − Σλ, λ_1, ...), but Σλ is
   not held at 1: after the uniform average (λ = 1/N) it tries every expert's change 2x and 3x as large, and
   upweighting moves λ between experts at the same Σλ. The tiny experts' changes are large and partly
   collide, so the plain average keeps little of each (RESULTS.md). With a parent, retention is of each
   expert's gain over the parent, (merge − parent) / (expert − parent), the share of what the expert added
   (merge / expert would count a merge that falls back to the parent's score as partly kept).
2. Inputs are streamed: each tensor is read alone from its torch.save archive, so the peak memory is the
   output model plus one input tensor (`python bench.py merge` measures it). Inputs whose configs, tokenizers,
   tensor names or shapes differ are refused with a message naming the difference.

Writes OUT/model.pt and config.json (with the weights); --search also writes OUT/search.jsonl, one line per
candidate, which a restarted search with the same models, data and settings replays.

    python merge.py --out runs/tiny/sft-code --models runs/tiny/sft-code-seed0 runs/tiny/sft-code-seed1
    python merge.py --search --out runs/tiny/soup --models runs/tiny/instruct runs/tiny/sft-{rag,code,safety}
    python merge.py --search --out runs/tiny/soup --base runs/tiny/instruct --models runs/tiny/sft-{rag,code}
"""

import hashlib
import json
import math
import pickle
import random
import zipfile
from collections import OrderedDict
from pathlib import Path
from statistics import mean

import torch

from common import argument_parser, atomic_save, load_config, model_path, write_json
from data import load_tokenizer
from evaluate import BATCH_SIZE, HEADLINE, SELECTION_PROMPTS, evaluate_capability
from model import Config, Transformer

STORAGE_DTYPES = {"FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16,
                  "HalfStorage": torch.float16, "DoubleStorage": torch.float64, "LongStorage": torch.int64,
                  "IntStorage": torch.int32, "BoolStorage": torch.bool}


class LazyCheckpoint:
    """The tensors of a torch.save'd state dict, each read from the zip archive only when asked for.

    torch.save writes `data.pkl` (the dict, whose tensors point at storages by key) and one uncompressed
    `data/<key>` entry per storage. We unpickle data.pkl with the storages replaced by their keys, then read a
    storage's bytes on demand. Only the few globals a state dict of plain tensors needs are allowed, so a
    checkpoint cannot run code while it is read."""

    def __init__(self, path):
        self.path = Path(path)
        self.archive = zipfile.ZipFile(self.path)
        self.root = self.archive.namelist()[0].split("/")[0]

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                    return lambda storage, offset, size, stride, *_: (storage, offset, tuple(size),
                                                                      tuple(stride))
                if (module, name) == ("collections", "OrderedDict"):
                    return OrderedDict
                if module == "torch" and name in STORAGE_DTYPES:
                    return STORAGE_DTYPES[name]
                raise pickle.UnpicklingError(f"{path}: unexpected {module}.{name} in a state dict")

            def persistent_load(self, pid):  # ("storage", dtype, key, location, numel)
                return pid[1], pid[2]

        self.entries = Unpickler(self.archive.open(f"{self.root}/data.pkl")).load()

    def shape(self, name) -> tuple:
        return self.entries[name][2]

    def __getitem__(self, name) -> torch.Tensor:
        (dtype, key), offset, size, stride = self.entries[name]
        data = bytearray(self.archive.read(f"{self.root}/data/{key}"))
        return torch.frombuffer(data, dtype=dtype).as_strided(size, stride, offset)


def tokenizer_digest(info: dict, model: str) -> str:
    """What identifies a checkpoint's tokenizer: the sha256 of its file (paths may differ between
    machines)."""
    path = Path(info["tokenizer"])
    if not path.is_file():
        raise ValueError(f"{model}: its tokenizer {path} is not a file here (a relative path in config.json "
                         "is relative to the folder the stage ran in: run merge.py from there)")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_compatible(paths, infos, checkpoints):
    """Refuse inputs that cannot be averaged: a different model config, tokenizer, tensor set or shape."""
    first, first_info, first_ckpt = paths[0], infos[0], checkpoints[0]
    first_tokenizer = tokenizer_digest(first_info, first) if len(paths) > 1 else None   # read once
    for path, info, ckpt in zip(paths[1:], infos[1:], checkpoints[1:]):
        for field in first_info["model"]:
            if info["model"][field] != first_info["model"][field]:
                raise ValueError(f"{path}: model config {field} = {info['model'][field]}, but {first} has "
                                 f"{first_info['model'][field]}")
        if tokenizer_digest(info, path) != first_tokenizer:
            raise ValueError(f"{path}: tokenizer {info['tokenizer']} differs from "
                             f"{first}'s {first_info['tokenizer']}")
        if set(ckpt.entries) != set(first_ckpt.entries):
            raise ValueError(f"{path}: tensors {sorted(set(ckpt.entries) ^ set(first_ckpt.entries))[:3]} "
                             f"are not in both {path} and {first}")
        for name in first_ckpt.entries:
            if ckpt.shape(name) != first_ckpt.shape(name):
                raise ValueError(f"{path}: tensor {name} has shape {ckpt.shape(name)}, {first} has "
                                 f"{first_ckpt.shape(name)}")


def slerp(t: float, a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation of two tensors viewed as vectors, with their norms interpolated linearly;
    a linear one when they are (nearly) parallel."""
    a_norm, b_norm = a.norm(), b.norm()
    cos = (a.flatten() @ b.flatten() / (a_norm * b_norm).clamp(min=eps)).clamp(-1, 1)
    omega = torch.arccos(cos)
    if omega < 1e-4 or a_norm < eps or b_norm < eps:
        return (1 - t) * a + t * b
    direction = (torch.sin((1 - t) * omega) * a / a_norm
                 + torch.sin(t * omega) * b / b_norm) / torch.sin(omega)
    return direction * ((1 - t) * a_norm + t * b_norm)


def merge(paths, weights=None, method="linear", normalize=False) -> tuple[dict, dict]:
    """The merged state dict and the first input's config.json. Linear: Σ w_i θ_i, accumulated one input
    tensor at a time (uniform weights by default). SLERP: two models, t = weights[1]."""
    infos = [load_config(p) for p in paths]
    checkpoints = [LazyCheckpoint(model_path(p)) for p in paths]
    check_compatible(paths, infos, checkpoints)
    weights = [1 / len(paths)] * len(paths) if weights is None else list(weights)
    if len(weights) != len(paths):
        raise ValueError(f"{len(weights)} weights for {len(paths)} models")
    if normalize:
        weights = [w / sum(weights) for w in weights]
    if not math.isclose(sum(weights), 1.0, abs_tol=1e-6):
        raise ValueError(f"weights {weights} sum to {sum(weights):.6f}, not 1 (or pass --normalize)")
    if method == "slerp" and len(paths) != 2:
        raise ValueError(f"slerp merges two models, got {len(paths)}")
    merged = {}
    for name in checkpoints[0].entries:
        if method == "slerp":
            merged[name] = slerp(weights[1], checkpoints[0][name].float(), checkpoints[1][name].float())
            continue
        merged[name] = checkpoints[0][name].float() * weights[0]
        for weight, checkpoint in zip(weights[1:], checkpoints[1:]):
            merged[name].add_(checkpoint[name].float(), alpha=weight)
    return merged, infos[0]


def model_domain(info: dict) -> str | None:
    """The capability a model was trained for (its stage's --capability), or None."""
    return info.get("args", {}).get("capability")


def write_merge(out, merged: dict, info: dict, paths, weights, method, **extra):
    """OUT/model.pt and OUT/config.json. The merge keeps a capability when the inputs that name one all name
    the same (seed merging, interpolation toward an unnamed parent or a soup), so a search can still tell its
    domain."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save(merged, out / "model.pt")
    capabilities = {model_domain(load_config(p)) for p in paths} - {None, "all"}   # "all": a soup's SFT
    args = {"method": method, "weights": weights, **extra}
    if len(capabilities) == 1:
        args["capability"] = capabilities.pop()
    write_json(info | {"stage": "merge", "parent": [str(p) for p in paths], "args": args},
               out / "config.json")


# -----------------------------------------------------------------------------
# Weight search (§3.4.3.1): upweight-the-weakest, then leave-one-out merges and random perturbations


def normalized(weights) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights]


def task_arithmetic(scales) -> list[float]:
    """The linear weights of θ_parent + Σ λ_i (θ_i − θ_parent) for scales [_, λ_1, ...]: the parent first."""
    return [1.0 - sum(scales[1:]), *scales[1:]]


def search_weights(domains: list, score, budget: int, start=None, step: float = 0.2, sigma: float = 0.3,
                   seed: int = 0, log=None, cache: dict | None = None,
                   base: bool = False) -> tuple[dict, list[dict]]:
    """Search merge weights for models whose domains are `domains` (one per model, None for none).
    `score(weights, names)` evaluates the merge with those weights on the named domains and returns {domain:
    headline metric}.

    Each expert is scored alone on its domain first (the reference; domains whose experts all score 0 have
    nothing to retain and are left out). Then `budget` candidates: the start (uniform by default), then the
    best candidate so far with its weakest domain's experts upweighted by `step`, 2 `step` or 4 `step` (a
    capability can need a large share before it shows at all; `upweighted`), then the next weakest domain (a
    domain whose three upweights all lost comes after the others, so that the budget goes where upweighting
    works); once every lagging domain was tried from the best candidate, the leave-one-out merges around it
    (once), then that candidate with each weight perturbed by a factor exp(sigma · N(0, 1)). Weights are
    renormalised to sum to 1; a candidate replaces the best only if better. With `base`, model 0 is the
    experts' parent and the search is over the others' task-arithmetic scales λ (the parent's weight is 1 −
    Σλ, so no renormalising): after the start, the experts' scales 2x and 3x; leave-one-out leaves out experts
    only. The parent is scored on the experts' domains too, and a domain's retention is the share of its
    expert's gain over the parent that a candidate keeps; a domain whose expert does not beat the parent keeps
    the parent's score as its reference, and the parent's own domain the parent's. Returns the best candidate
    and all of them; each is {"kind", "weights", "scores", "retention", "objective"}. Every evaluation is
    written as a JSON line to `log`; `cache` holds earlier ones (a restart replays them)."""
    n, rng, cache = len(domains), random.Random(seed), {} if cache is None else cache

    def cached_scores(weights, names) -> dict:
        key = search_key(weights, names)
        if key not in cache:
            cache[key] = score(weights, names)
        return cache[key]

    def logged(record: dict) -> dict:
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()
        return record

    reference = {}
    for i, domain in enumerate(domains):
        if domain is not None:
            alone = [float(j == i) for j in range(n)]
            record = logged({"kind": f"expert {i} alone", "weights": alone,
                             "scores": cached_scores(alone, [domain])})
            reference[domain] = max(reference.get(domain, 0.0), record["scores"][domain])
    parent = {}   # the parent's scores on the experts' domains: retention is of their gain over it
    gained = [d for d in reference if d != domains[0]] if base else []
    if gained:
        weights = [float(j == 0) for j in range(n)]
        parent = logged({"kind": "parent alone", "weights": weights,
                         "scores": cached_scores(weights, gained)})["scores"]
    # retention runs from floor (the domain without its expert's gain) to ceiling; where the expert adds
    # nothing, what the parent scores is what to keep
    floor = {d: parent.get(d, 0.0) if parent.get(d, 0.0) < value else 0.0 for d, value in reference.items()}
    ceiling = {d: max(value, parent.get(d, 0.0)) for d, value in reference.items()}
    scored = [d for d in reference if ceiling[d] > floor[d]]
    if not scored:
        print(f"no expert scores above 0 on its own domain ({reference}): nothing to search for, "
              "the start is kept")
        kept = {"kind": "start", "weights": normalized(start or [1.0] * n), "scores": {}, "retention": {},
                "objective": 0.0}
        return kept, [kept]
    print("expert scores: " + ", ".join(f"{d} {v:.3f}" + (f" (parent {parent[d]:.3f})" if d in parent else "")
                                        for d, v in reference.items())
          + (f" (left out: {', '.join(sorted(set(reference) - set(scored)))})"
             if len(scored) < len(reference) else ""))
    candidates = []

    def try_candidate(weights, kind):
        weights = task_arithmetic(weights) if base else normalized(weights)
        scores = cached_scores(weights, scored)
        retention = {d: min(1.0, (scores[d] - floor[d]) / (ceiling[d] - floor[d])) for d in scored}
        candidate = logged({"kind": kind, "weights": weights, "scores": scores, "retention": retention,
                            "objective": objective(retention)})
        candidates.append(candidate)
        print(f"candidate {len(candidates)}/{budget} ({kind}): objective {candidate['objective']:.3f} "
              f"(mean retention {mean(retention.values()):.3f}, worst {min(retention.values()):.3f}), "
              "weights " + " ".join(f"{w:.3f}" for w in weights))
        return candidate

    best = first = try_candidate(start or [1.0 / n] * n, "start")
    for factor in (2, 3) if base else ():   # the experts' changes larger than in the average
        if len(candidates) < budget:
            scaled = try_candidate([w * factor for w in first["weights"]], f"experts x{factor}")
            best = max(best, scaled, key=lambda c: c["objective"])
    def leave_one_out(around):  # the merges without each expert in turn: they show collisions
        nonlocal best
        for i in range(1 if base else 0, n if n > 2 else 0):
            if len(candidates) >= budget:
                return
            left_out = try_candidate([w if j != i else 0.0 for j, w in enumerate(around["weights"])],
                                     f"leave out {i}")
            for domain in scored:  # a collision: removing expert i helps another domain
                if domains[i] != domain and left_out["scores"][domain] > around["scores"][domain]:
                    print(f"  collision: leaving out model {i} ({domains[i]}) raises {domain} "
                          f"{around['scores'][domain]:.3f} -> {left_out['scores'][domain]:.3f}")
            best = max(best, left_out, key=lambda c: c["objective"])

    tried = set()  # (best weights, domain, k): upweights by step · 2^k already tried
    stuck = dict.fromkeys(scored, 0)  # per domain: how often all three of its upweights lost
    left_out_done = False
    while len(candidates) < budget:
        # the weakest first, but a domain whose upweights all lost goes after those whose did not
        lagging = sorted((d for d in scored if best["retention"][d] < 1),
                         key=lambda d: (stuck[d], best["retention"][d]))
        moves = [(search_key(best["weights"], []), d, k) for d in lagging for k in range(3)]
        moves = [move for move in moves if move not in tried]
        if moves:
            # the heuristic: upweight the weakest domain, by step, 2 step, 4 step; then the next weakest
            tried.add(moves[0])
            _, weakest, k = moves[0]
            amount = step * 2 ** k
            candidate = try_candidate(upweighted(best["weights"], domains, weakest, amount, base),
                                      f"upweight {weakest} by {amount:g}")
        elif not left_out_done:  # every move tried: the leave-one-out merges around the best, once
            left_out_done = True
            leave_one_out(best)
            continue
        else:  # brute force: perturb around the best candidate
            candidate = try_candidate([w * math.exp(sigma * rng.gauss(0, 1)) for w in best["weights"]],
                                      "perturb")
        if candidate["objective"] > best["objective"]:
            best = candidate
        elif moves and k == 2:   # by step, 2 step and 4 step from this best: all lost
            stuck[weakest] += 1
    return best, candidates


def upweighted(weights, domains, domain, amount, base=False) -> list[float]:
    """`weights` with `domain`'s experts' share raised by `amount` and every other expert's implicitly
    lowered (§3.4.3.1): w_d += amount / (its experts), then all divided by 1 + amount. With `base` (weights[0]
    the parent's) the same on the experts' task-arithmetic scales λ, their sum kept; for the parent's own
    domain every λ shrinks by 1 / (1 + amount) instead."""
    if not base:
        share = amount / domains.count(domain)
        return [(w + share * (d == domain)) / (1 + amount) for w, d in zip(weights, domains)]
    scales = weights[1:]
    if domains[0] == domain:
        return [0.0, *(w / (1 + amount) for w in scales)]
    total = sum(scales)
    return [0.0, *(total * w for w in upweighted(normalized(scales), domains[1:], domain, amount))]


def objective(retention: dict) -> float:
    """A candidate's score: the mean of its domains' retention and the worst domain's, averaged."""
    return (mean(retention.values()) + min(retention.values())) / 2


def search_key(weights, names) -> str:
    return json.dumps([[round(w, 4) for w in weights], sorted(names)])


def capability_scorer(paths, data, limit, batch_size: int = BATCH_SIZE):
    """score(weights, domains) for search_weights: merge the models in memory, evaluate each domain's headline
    metric on the first `limit` records of DATA/rl/DOMAIN.jsonl (greedy, as evaluate.py): prompts about
    training entities, so that the held-out eval sets judge the chosen soup without having chosen it."""
    enc = load_tokenizer(str(Path(data) / "tokenizer.json"))
    config = Config(**load_config(paths[0])["model"])

    def score(weights, domains):
        merged, _ = merge([p for p, w in zip(paths, weights) if w != 0], [w for w in weights if w != 0])
        with torch.device("meta"):
            model = Transformer(config)
        model.load_state_dict(merged, assign=True)
        return {d: evaluate_capability(model, enc, data, d, batch_size, limit, split="rl")[HEADLINE[d]]
                for d in domains}

    return score


def search_log_header(paths, args) -> dict:
    """What a search.jsonl's candidates depend on: a restart reuses them only if all of this is unchanged."""
    files = [model_path(p) for p in paths]
    return {"models": [str(p) for p in paths], "data": str(args.data), "split": "rl", "limit": args.limit,
            "files": [[f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def run_search(args):
    paths = [args.base, *args.models] if args.base else args.models
    infos = [load_config(p) for p in paths]
    check_compatible(paths, infos, [LazyCheckpoint(model_path(p)) for p in paths])
    domains = args.domains or [model_domain(info) for info in infos]
    if len(domains) != len(paths):
        raise ValueError(f"{len(domains)} --domains for {len(paths)} models (--base included)")
    domains = [d if d in HEADLINE else None for d in domains]   # e.g. "all": a soup's low-LR SFT
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header, log_path, cache = search_log_header(paths, args), out / "search.jsonl", {}
    if log_path.is_file():
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        if lines and lines[0] == {"header": header}:
            cache = {search_key(e["weights"], e["scores"]): e["scores"] for e in lines[1:]}
            print(f"{log_path}: reusing {len(cache)} evaluations")
    score = capability_scorer(paths, args.data, args.limit)
    print("domains: " + ", ".join(f"{p} = {d}" for p, d in zip(paths, domains)))
    with open(log_path, "w") as log:
        log.write(json.dumps({"header": header}) + "\n")
        start = [0.0, *args.weights] if args.base and args.weights else args.weights
        best, candidates = search_weights(domains, score, args.budget, start, args.step, args.sigma,
                                          args.seed, log, cache, base=bool(args.base))
    print(f"best of {len(candidates)} candidates ({best['kind']}): objective {best['objective']:.3f}")
    for domain, value in best["retention"].items():
        print(f"  {domain}: {best['scores'][domain]:.3f} ({value:.0%} of its expert)")
    merged, info = merge(paths, best["weights"])
    write_merge(out, merged, info, paths, best["weights"], "linear",
                search={"budget": args.budget, "limit": args.limit, "kind": best["kind"],
                        "retention": best["retention"], "objective": best["objective"]})


def main(argv=None):
    parser = argument_parser(__doc__)
    what = parser.add_argument_group("the merge")
    what.add_argument("--models", nargs="+",
                      help="the --out folders (or model.pt files) of the models to merge")
    what.add_argument("--weights", type=float, nargs="+",
                      help="one per model, summing to 1 (default: uniform); with --base, each model's λ")
    what.add_argument("--base", help="task arithmetic (Ilharco et al. 2023): the parent the --models were "
                                     "trained from; merges θ_base + Σ λ_i (θ_i − θ_base)")
    what.add_argument("--normalize", action="store_true", help="rescale the weights to sum to 1")
    what.add_argument("--method", default="linear", choices=["linear", "slerp"],
                      help="linear, or SLERP of two")
    what.add_argument("--out", help="where to write model.pt and config.json")
    search = parser.add_argument_group("weight search (§3.4.3)")
    search.add_argument("--search", action="store_true",
                        help="search the weights, scoring merges with evaluate.py")
    search.add_argument("--domains", nargs="+", help="each model's domain (default: its --capability)")
    search.add_argument("--data", default="data/tiny", help="the data folder with rl/ and tokenizer.json")
    search.add_argument("--budget", type=int, default=40, help="candidate merges to evaluate")
    search.add_argument("--limit", type=int, default=SELECTION_PROMPTS,
                        help="records of DATA/rl/DOMAIN.jsonl per domain and candidate (default: the "
                             "selection prompts, which online RL does not train on)")
    search.add_argument("--step", type=float, default=0.2,
                        help="share added to the weakest domain's experts (the others' lowered)")
    search.add_argument("--sigma", type=float, default=0.3, help="log-normal perturbation scale")
    search.add_argument("--seed", type=int, default=0, help="seed of the perturbations")
    args = parser.parse_args(argv)
    if not (args.models and args.out):
        parser.error("--models and --out are required")
    if args.search:
        return run_search(args)
    paths, weights = args.models, args.weights
    if args.base:
        if args.method != "linear" or args.normalize or not weights:
            parser.error("--base merges linearly with each model's λ in --weights (no --normalize)")
        paths, weights = [args.base, *paths], task_arithmetic([0.0, *weights])
    merged, info = merge(paths, weights, args.method, args.normalize)
    write_merge(args.out, merged, info, paths, weights, args.method)
    print(f"merged {len(paths)} models ({args.method}) into {Path(args.out) / 'model.pt'}")


if __name__ == "__main__":
    main()
