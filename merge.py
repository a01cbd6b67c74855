"""
Merging (report §3.4): expert models trained in parallel from one parent become one model by averaging their
weights. Every merge the report uses is linear, θ = Σ w_i θ_i with Σ w_i = 1:

    soup of experts                 python merge.py --out OUT --models E1 E2 ... E7 --weights 0.2 0.1 ...
    seed merging (uniform)          python merge.py --out OUT --models SEED0 SEED1
    Polyak averaging                python merge.py --out OUT --models RUN/step300 RUN/step400 RUN/step500
    interpolation toward a parent   python merge.py --out OUT --models CHILD PARENT --weights 0.7 0.3
      (capability recovery, WARP-style: pull an RL expert part of the way back to its SFT parent)
    task arithmetic (comparison)    base + λ Σ (θ_i − base) is the linear merge with weights (1 − Nλ, λ, ..., λ):
                                    python merge.py --out OUT --models BASE E1 E2 --weights 0.4 0.3 0.3

SLERP (`--method slerp`, two models, comparison only) interpolates each tensor along the great circle between
the two, which keeps its norm where a linear merge of dissimilar tensors shrinks it.

Streaming: the inputs are never loaded whole. Each checkpoint's tensors are read one at a time straight from its
torch.save zip archive, so the peak memory is the output model plus one input tensor, whatever the number of
experts (`python merge.py --bench` measures it). Inputs whose model configs, tokenizers, tensor names or shapes
differ are refused with a message that names the difference.

Status: linear merges and SLERP; leave-one-out merges and the evaluated weight search (`--search`) need
evaluate.py (issue 7).
"""

import argparse
import hashlib
import json
import math
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from common import atomic_save, load_config, model_path
from model import PRESETS, Transformer


STORAGE_DTYPES = {"FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16,
                  "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "BoolStorage": torch.bool}


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
                    return lambda storage, offset, size, stride, *_: (storage, offset, tuple(size), tuple(stride))
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


def tokenizer_digest(info: dict) -> str:
    """What identifies a checkpoint's tokenizer: the sha256 of its file (paths may differ between machines)."""
    path = Path(info["tokenizer"])
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else f"missing file {path}"


def check_compatible(paths, infos, checkpoints):
    """Refuse inputs that cannot be averaged: a different model config, tokenizer, tensor set or shape."""
    first, first_info, first_ckpt = paths[0], infos[0], checkpoints[0]
    for path, info, ckpt in zip(paths[1:], infos[1:], checkpoints[1:]):
        for field in first_info["model"]:
            if info["model"][field] != first_info["model"][field]:
                raise ValueError(f"{path}: model config {field} = {info['model'][field]}, but {first} has "
                                 f"{first_info['model'][field]}")
        if tokenizer_digest(info) != tokenizer_digest(first_info):
            raise ValueError(f"{path}: tokenizer {info['tokenizer']} differs from {first}'s {first_info['tokenizer']}")
        if set(ckpt.entries) != set(first_ckpt.entries):
            raise ValueError(f"{path}: tensors {sorted(set(ckpt.entries) ^ set(first_ckpt.entries))[:3]} are not in "
                             f"both {path} and {first}")
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
    direction = (torch.sin((1 - t) * omega) * a / a_norm + torch.sin(t * omega) * b / b_norm) / torch.sin(omega)
    return direction * ((1 - t) * a_norm + t * b_norm)


def merge(paths, weights=None, method="linear", normalize=False) -> tuple[dict, dict]:
    """The merged state dict and the first input's config.json. Linear: Σ w_i θ_i, accumulated one input tensor
    at a time (uniform weights by default). SLERP: two models, t = weights[1]."""
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


def write_merge(out, merged: dict, info: dict, paths, weights, method):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save(merged, out / "model.pt")
    record = info | {"stage": "merge", "parent": [str(p) for p in paths],
                     "args": {"method": method, "weights": weights}}
    partial = out / "config.json.tmp"
    partial.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(partial, out / "config.json")


# -----------------------------------------------------------------------------
# Benchmark: peak memory of merging 7 `small` checkpoints, against one model's size


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: since its exec, unlike getrusage's ru_maxrss)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024


def child_peak_rss_mib(code: str, *argv) -> float:
    output = subprocess.run([sys.executable, "-c", code, *argv], check=True, capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout
    return float(output.split()[-1])


def bench(n_models: int, preset: str):
    config = PRESETS[preset]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Path(tmp) / "tokenizer.json"
        tokenizer.write_text("{}")
        paths = []
        for i in range(n_models):
            torch.manual_seed(i)
            model_dir = Path(tmp) / f"expert{i}"
            model_dir.mkdir()
            torch.save(Transformer(config).state_dict(), model_dir / "model.pt")
            info = {"stage": "bench", "preset": preset, "model": config.__dict__, "tokenizer": str(tokenizer)}
            (model_dir / "config.json").write_text(json.dumps(info))
            paths.append(str(model_dir))
        model_mib = config.num_params() * 4 / 2**20
        # the baseline child imports what the merge imports (torch alone is a few hundred MiB) and stops
        baseline = child_peak_rss_mib("import merge; print(merge.peak_rss_mib())")
        peak = child_peak_rss_mib("import sys, merge; merge.main(sys.argv[1:]); print(merge.peak_rss_mib())",
                                  "--out", str(Path(tmp) / "soup"), "--models", *paths)
    print(f"merging {n_models} `{preset}` checkpoints of {model_mib:.0f} MiB each ({n_models * model_mib:.0f} MiB):")
    print(f"  peak RSS {peak:.0f} MiB, of which {baseline:.0f} MiB is the interpreter with torch imported")
    print(f"  merge memory {peak - baseline:.0f} MiB = {(peak - baseline) / model_mib:.2f}x one model "
          f"(the output model plus one input tensor at a time)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help="the --out folders (or model.pt files) of the models to merge")
    parser.add_argument("--weights", type=float, nargs="+", help="one per model, summing to 1 (default: uniform)")
    parser.add_argument("--normalize", action="store_true", help="rescale the weights to sum to 1")
    parser.add_argument("--method", default="linear", choices=["linear", "slerp"])
    parser.add_argument("--out", help="where to write model.pt and config.json")
    parser.add_argument("--bench", action="store_true", help="measure the peak memory of a 7-expert merge")
    parser.add_argument("--bench-models", type=int, default=7)
    parser.add_argument("--bench-preset", default="small", choices=PRESETS)
    args = parser.parse_args(argv)
    if args.bench:
        return bench(args.bench_models, args.bench_preset)
    if not (args.models and args.out):
        parser.error("--models and --out are required")
    merged, info = merge(args.models, args.weights, args.method, args.normalize)
    write_merge(args.out, merged, info, args.models, args.weights, args.method)
    print(f"merged {len(args.models)} models ({args.method}) into {Path(args.out) / 'model.pt'}")


if __name__ == "__main__":
    main()
