"""pretrain.py: a run end to end, exact resume, resharding under torchrun (gloo), the cooldown's context
schedule, µP's coordinate check, the dry run, and bad input."""

import json
import math
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import pretrain
from data import (IGNORE, SPECIAL_TOKENS, load_tokenizer, open_shard, save_tokenizer, shard_batch, train_bpe,
                  write_shard)
from model import Config, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a short constant-LR run (no cooldown): its first steps are those of any longer run, which resume tests need
FAST = ["--dim", "64", "--n-layers", "2", "--batch-size", "4", "--seq-len", "64", "--warmup", "2",
        "--cooldown-steps", "0", "--log-every", "1", "--eval-every", "100", "--eval-batches", "2"]


def sentences(rng: random.Random, n: int) -> list[str]:
    names, verbs, things = (["Ada", "Bo", "Cy", "Di"], ["sells", "buys", "makes"],
                            ["lamps", "tea", "maps", "rope"])
    return [" ".join(f"{rng.choice(names)} {rng.choice(verbs)} {rng.randint(1, 99)} {rng.choice(things)}."
                     for _ in range(rng.randint(2, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tokenizer and corpus / corpus_long / val shards of a small templated world, as data.py writes
    them, and a copy probe (eval/copy.jsonl)."""
    folder = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    texts = {"corpus": sentences(rng, 600), "val": sentences(rng, 60),
             "corpus_long": [" ".join(sentences(rng, 12)) for _ in range(40)]}
    save_tokenizer(folder / "tokenizer.json", train_bpe(texts["corpus"], vocab_size=320))
    enc = load_tokenizer(str(folder / "tokenizer.json"))
    for name, docs in texts.items():
        write_shard(enc, docs, folder / f"{name}.bin")
    probes = [{"text": f"{' '.join(sentences(rng, 2 * length))} The code is {code}. Answer: ", "answer": code,
               "name": f"needle@{length}x"}
              for length, code in ((1, "417"), (1, "52"), (2, "903"), (2, "61"))]
    (folder / "eval").mkdir()
    (folder / "eval" / "copy.jsonl").write_text("".join(json.dumps(probe) + "\n" for probe in probes))
    return folder


def run(data, out, *flags):
    pretrain.main(["--data", str(data), "--out", str(out), *FAST, *flags])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def torchrun(data, out, nproc, *flags):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(ROOT, "pretrain.py"), "--data", str(data), "--out", str(out), *FAST, *flags]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(metrics):
    return [m["loss"] for m in metrics]


@pytest.fixture(scope="module")
def parent(data, tmp_path_factory):
    """A fresh model.pt + config.json: runs at different world sizes start from it (a fresh initialisation
    draws each rank's shard separately, so only a shared --init makes them comparable)."""
    out = tmp_path_factory.mktemp("parent")
    enc = load_tokenizer(str(data / "tokenizer.json"))
    args = pretrain.parse_args(["--data", str(data), *FAST])
    config = pretrain.model_config(args, enc.n_vocab)
    torch.manual_seed(0)
    torch.save(Transformer(config).state_dict(), out / "model.pt")
    common.write_config(out, "init", "tiny", config, args, str(data / "tokenizer.json"), None)
    return out


@pytest.fixture(scope="module")
def reference(data, parent, tmp_path_factory):
    """Six uninterrupted steps in one process from `parent`."""
    out = tmp_path_factory.mktemp("reference")
    return run(data, out, "--init", str(parent), "--steps", "6")


# --- one process ------------------------------------------------------------------------------------------

def test_run_writes_artifacts_learns_and_reports_bits_per_byte(data, tmp_path):
    metrics = run(data, tmp_path, "--steps", "30", "--lr", "1e-2", "--eval-every", "30")
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0
    probes = {"copy_needle@1x", "copy_needle@2x"}
    assert {"step", "loss", "lr", "tokens", "val_loss", "val_bpb"} | probes <= set(metrics[-1])
    assert all(0 <= metrics[-1][name] <= 1 for name in probes)
    assert metrics[-1]["tokens"] == 30 * 4 * 64
    info = json.loads((tmp_path / "config.json").read_text())
    enc = load_tokenizer(str(data / "tokenizer.json"))
    assert (info["model"]["vocab_size"] == enc.n_vocab and info["stage"] == "pretrain"
            and info["args"]["steps"] == 30)
    model, _ = common.load_model(tmp_path)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in checkpoint["model"].items())


def test_bits_per_byte_is_loss_times_tokens_over_text_bytes(data, tmp_path):
    """bpb = val_loss * n_targets / (ln 2 * bytes), the bytes decoded independently from the targets' text."""
    metrics = run(data, tmp_path, "--steps", "2")
    enc = load_tokenizer(str(data / "tokenizer.json"))
    val = open_shard(data / "val.bin", enc)
    targets = torch.cat([shard_batch(enc, val, i, 4, 64)["targets"].flatten() for i in range(2)])
    targets = targets[targets != IGNORE]
    text_bytes = len(enc.decode_bytes([t for t in targets.tolist() if t < enc.n_vocab - len(SPECIAL_TOKENS)]))
    expected = metrics[-1]["val_loss"] * len(targets) / (math.log(2) * text_bytes)
    assert metrics[-1]["val_bpb"] == pytest.approx(expected, rel=1e-9)


def test_interrupted_run_resumes_to_the_same_losses(data, parent, reference, tmp_path, monkeypatch):
    calls, clip_grad_norm = [], common.clip_grad_norm

    def clip_then_interrupt(model, max_norm):
        calls.append(1)
        if len(calls) == 5:  # during step 5: the checkpoint of step 4 is the last one
            raise KeyboardInterrupt
        return clip_grad_norm(model, max_norm)

    with monkeypatch.context() as patch:
        patch.setattr(common, "clip_grad_norm", clip_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            run(data, tmp_path, "--init", str(parent), "--steps", "6", "--save-every", "2")
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 4
    assert losses(run(data, tmp_path, "--init", str(parent), "--steps", "6")) == losses(reference)


def test_two_accumulated_micro_batches_of_two_rows_equal_one_batch_of_four(data, parent, reference, tmp_path):
    metrics = run(data, tmp_path, "--init", str(parent), "--steps", "3", "--batch-size", "2",
                  "--grad-accum", "2")
    assert losses(metrics) == pytest.approx(losses(reference)[:3], abs=1e-5)


def test_recomputing_activations_changes_no_loss_nor_checkpoint_key(data, parent, reference, tmp_path):
    assert losses(run(data, tmp_path, "--init", str(parent), "--steps", "3",
                      "--recompute")) == losses(reference)[:3]
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    assert list(saved) == list(torch.load(parent / "model.pt", weights_only=True))


def test_crash_while_saving_leaves_the_previous_checkpoint_loadable(data, tmp_path, monkeypatch):
    run(data, tmp_path, "--steps", "2")
    real_save = torch.save

    def save_half_then_crash(obj, path):
        real_save(obj, path)
        with open(path, "r+b") as file:
            file.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        run(data, tmp_path, "--steps", "4")
    monkeypatch.undo()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2


def test_nan_loss_stops_with_one_message_and_keeps_the_checkpoint(data, tmp_path, monkeypatch):
    real_loss = Transformer.loss
    calls = []

    def loss_nan_at_step_3(self, *args):
        calls.append(1)
        return real_loss(self, *args) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(Transformer, "loss", loss_nan_at_step_3)
    with pytest.raises(FloatingPointError, match="loss is nan at step 3.*checkpoint.pt"):
        run(data, tmp_path, "--steps", "4", "--save-every", "2")
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2


def test_missing_empty_or_wrong_dtype_data_is_refused(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        run(tmp_path / "nowhere", tmp_path / "out")
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    enc = load_tokenizer(str(broken / "tokenizer.json"))
    write_shard(enc, [], broken / "corpus.bin")
    with pytest.raises(ValueError, match="corpus.bin: the shard is empty"):
        run(broken, tmp_path / "out")
    sidecar = json.loads((data / "corpus.bin.json").read_text()) | {"dtype": "uint32"}
    (broken / "corpus.bin.json").write_text(json.dumps(sidecar))
    np.fromfile(data / "corpus.bin", dtype=np.uint16).astype(np.uint32).tofile(broken / "corpus.bin")
    with pytest.raises(ValueError, match="wrong dtype"):
        run(broken, tmp_path / "out")


def test_a_different_model_on_the_same_out_is_refused(data, tmp_path):
    run(data, tmp_path, "--steps", "1")
    with pytest.raises(ValueError, match="different model"):
        run(data, tmp_path, "--steps", "1", "--n-layers", "4")


# --- schedules --------------------------------------------------------------------------------------------

def test_lr_warms_up_holds_then_cools_down_linearly_to_the_minimum():
    factors = [common.lr_factor(s, 20, warmup=4, cooldown=6, min_ratio=0.004, cosine=False)
               for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0] and factors[4:15] == [1.0] * 11
    assert factors[14:] == pytest.approx([1.0, 0.8008, 0.6016, 0.4024, 0.2032, 0.004])
    cosine = [common.lr_factor(s, 20, warmup=4, cooldown=0, min_ratio=0.1, cosine=True) for s in range(20)]
    assert (cosine[3] == 1.0 and cosine[-1] == pytest.approx(0.1)
            and cosine == sorted(cosine[:4]) + sorted(cosine[4:])[::-1])


def test_context_schedule_interleaves_long_batches_every_fourth_step():
    stages = pretrain.parse_context_schedule("64:4,128:8,256:4", 64)
    plan = [pretrain.step_plan(s, 20, stages, 64) for s in range(20)]  # cooldown = the last 16 steps
    lengths = [length for _, length, _ in plan]
    assert lengths == [64] * 4 + [64] * 4 + [64, 64, 64, 128] * 2 + [64, 64, 64, 256]
    main_steps = [d for long, _, d in plan if not long]
    long_steps = [d for long, _, d in plan if long]
    # each shard read in order, nothing skipped
    assert main_steps == list(range(17)) and long_steps == [0, 1, 2]
    with pytest.raises(ValueError, match="first stage is the base length"):
        pretrain.parse_context_schedule("128:4,256:4", 64)


def test_fp8_runs_from_fp8_after_until_the_cooldown_and_never_in_it():
    args = pretrain.parse_args(["--steps", "20", "--seq-len", "64", "--context-schedule", "64:4,128:2",
                                "--fp8-after", "5"])
    cooldown_start = args.steps - args.cooldown_steps  # the last 6 steps
    fp8 = [pretrain.fp8_on(step, args.fp8_after, cooldown_start) for step in range(args.steps)]
    assert fp8 == [False] * 5 + [True] * 9 + [False] * 6  # bf16, FP8, then the bf16 cooldown (§2.5)
    assert not any(pretrain.fp8_on(step, None, cooldown_start) for step in range(args.steps))


def test_cooldown_run_feeds_long_batches_with_the_same_tokens_per_step(data, tmp_path):
    metrics = run(data, tmp_path, "--steps", "12", "--context-schedule", "64:2,128:4,256:4",
                  "--cooldown-steps", "10", "--fp8-after", "1")
    assert [m["seq_len"] for m in metrics] == [64] * 7 + [128] + [64] * 3 + [256]
    assert [m["tokens"] for m in metrics] == [256 * (s + 1) for s in range(12)]
    assert metrics[-1]["lr"] == pytest.approx(3e-3 / 250)


# --- several processes (torchrun, gloo) -------------------------------------------------------------------

@pytest.mark.torchrun
def test_two_processes_match_one_and_their_checkpoint_resumes_in_one(data, parent, reference, tmp_path):
    """2 ranks x 2 rows = 1 rank x 4 rows, the same rows in the same order; fp32 losses agree to 1e-5 (the
    reductions add in another order). The 2-rank checkpoint then resumes in one process."""
    two = torchrun(data, tmp_path, 2, "--init", str(parent), "--steps", "3", "--batch-size", "2")
    assert losses(two) == pytest.approx(losses(reference)[:3], abs=1e-5)
    resumed = run(data, tmp_path, "--init", str(parent), "--steps", "6")
    assert losses(resumed) == pytest.approx(losses(reference), abs=1e-5)


@pytest.mark.torchrun
def test_hsdp_mesh_resumes_a_one_process_checkpoint(data, parent, reference, tmp_path):
    """A 2 x 1 (replicate x shard) mesh, with activation recomputation under FSDP too."""
    run(data, tmp_path, "--init", str(parent), "--steps", "3")
    hsdp = torchrun(data, tmp_path, 2, "--init", str(parent), "--steps", "6", "--batch-size", "2",
                    "--replicate", "2", "--recompute")
    assert losses(hsdp) == pytest.approx(losses(reference), abs=1e-5)


# --- µP and the dry run -----------------------------------------------------------------------------------

def coordinate_slopes(mup: bool, widths=(64, 128, 256, 512), steps=8, lr=1e-2) -> dict[str, float]:
    """Train each width a few AdamW steps on the same random batch; return the log-log slope against width of
    the mean |coordinate| of the last block's output and of the logits (µP: ~0; standard: clearly > 0)."""
    sizes = {"hidden": [], "logits": []}
    torch.manual_seed(0)
    idx = torch.randint(256, (4, 33))
    for width in widths:
        torch.manual_seed(0)
        model = Transformer(Config(vocab_size=256, dim=width, n_layers=2, n_heads=4, n_kv_heads=2,
                                   ffn_dim=2 * width, window=16, mup_base_dim=64 if mup else None))
        optimizer = common.make_optimizer(model, lr, weight_decay=0.0)
        for _ in range(steps):
            model.loss(idx[:, :-1], idx[:, 1:]).backward()
            optimizer.step()
            optimizer.zero_grad()
        block_outputs = []
        model.blocks[-1].register_forward_hook(lambda module, args, output: block_outputs.append(output))
        with torch.no_grad():
            logits = model(idx[:, :-1])
        sizes["hidden"].append(block_outputs[-1].abs().mean().item())
        sizes["logits"].append(logits.abs().mean().item())
    log_widths = np.log(widths)
    return {name: np.polyfit(log_widths, np.log(values), 1)[0] for name, values in sizes.items()}


def test_mup_coordinate_check_activations_stay_flat_in_width():
    mup, standard = coordinate_slopes(mup=True), coordinate_slopes(mup=False)  # measured: µP -0.03 and -0.11
    assert abs(mup["hidden"]) < 0.25 and abs(mup["logits"]) < 0.25, mup
    assert standard["hidden"] > 1.0 and standard["logits"] > 0.3, standard  # measured: 2.4 and 0.54


def test_dry_run_plans_command_a_without_allocating(capsys):
    pretrain.main(["--model", "command-a", "--dry-run", "8,64,256", "--batch-size", "1", "--seq-len", "8192"])
    out = capsys.readouterr().out
    assert "111.06B parameters" in out
    rows = [line.split() for line in out.splitlines() if line.strip().split(" ")[0] in ("8", "64", "256")]
    assert [row[0] for row in rows] == ["8", "64", "256"]
    assert float(rows[0][2]) == pytest.approx(111.06e9 * 4 / 8 / 2**30, rel=1e-3)  # fp32 params over 8 shards
