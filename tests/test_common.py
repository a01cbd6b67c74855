"""common.py: optimizer groups, artifacts that the next stage loads, atomic writes, metrics on resume; and
distributed.py in one process. (Distribution, checkpoints across world sizes and the LR schedule are exercised
through pretrain.py in test_pretrain.py.)"""

import argparse
import json

import pytest
import torch

import common
import distributed
import pretrain
from model import Config, Transformer

CONFIG = Config(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, window=8)


def one_process() -> distributed.Runtime:
    return distributed.setup("cpu")


def test_setup_without_torchrun_needs_no_process_group():
    runtime = one_process()
    assert (runtime.rank, runtime.world_size, runtime.mesh, runtime.is_main) == (0, 1, None, True)
    assert distributed.all_reduce_sum(2.5, runtime) == 2.5
    distributed.teardown(runtime)


def test_precision_picks_the_training_matmuls_dtype_and_bf16_stays_close_to_fp32():
    # auto: fp32 on CPU (the default of every stage); bf16: autocast, weights fp32
    assert not distributed.setup("cpu").bf16 and distributed.setup("cpu", precision="bf16").bf16
    with pytest.raises(ValueError, match="precision 'fp16'"):
        distributed.setup("cpu", precision="fp16")
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    for precision, dtype in [("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)]:
        with distributed.autocast(distributed.setup("cpu", precision=precision)):
            assert (a @ b).dtype == dtype
    # a training loss under bf16 autocast: the fp32 loss up to bf16 rounding (8 bits of mantissa), its
    # gradients flowing into the fp32 weights
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    tokens, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    fp32 = model.loss(tokens, targets)
    with distributed.autocast(distributed.setup("cpu", precision="bf16")):
        bf16 = model.loss(tokens, targets)
    bf16.backward()
    assert bf16.dtype == torch.float32 and abs(bf16.item() - fp32.item()) < 0.01 * fp32.item()
    assert bf16.item() != fp32.item()   # the matmuls did run in bf16
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("cpuinfo, native", [("flags\t: fpu avx512f amx_bf16 amx_tile\n", True),
                                             ("flags\t: fpu avx512f avx512_bf16\n", True),
                                             ("flags\t: fpu avx2 avx512f\n", False), (None, False)])
def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, cpuinfo, native):
    def read_text(path, *args, **kwargs):
        if cpuinfo is None:
            raise FileNotFoundError(path)
        return cpuinfo
    monkeypatch.setattr(distributed.Path, "read_text", read_text)
    assert distributed.cpu_has_native_bf16() is native


def test_weight_decay_only_on_block_matrices_and_mup_scales_their_lr():
    for base_dim, matrix_lr in ((None, 1e-3), (8, 1e-3 / 4)):
        model = Transformer(Config(**{**CONFIG.__dict__, "mup_base_dim": base_dim}))
        names = {id(p): n for n, p in model.named_parameters()}
        matrices, others = common.make_optimizer(model, 1e-3, weight_decay=0.1).param_groups
        assert sorted(names[id(p)].split(".")[-2]
                      for p in matrices["params"]) == ["in_proj"] * 2 + ["out_proj"] * 2
        assert {names[id(p)] for p in others["params"]} == {"embed.weight", "norm.weight",
                                                            "blocks.0.norm.weight", "blocks.1.norm.weight"}
        assert (matrices["weight_decay"], others["weight_decay"]) == (0.1, 0.0)
        assert (matrices["lr"], others["lr"]) == pytest.approx((matrix_lr, 1e-3))


def test_set_lr_scales_every_group_from_its_own_peak():
    model = Transformer(Config(**{**CONFIG.__dict__, "mup_base_dim": 16}))
    optimizer = common.make_optimizer(model, 1e-2, weight_decay=0.0)
    common.set_lr(optimizer, 0.5)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2.5e-3, 5e-3])


def test_saved_model_loads_back_with_its_config(tmp_path):
    runtime = one_process()
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    common.save_model(tmp_path, model, runtime)
    common.write_config(tmp_path, "pretrain", "tiny", CONFIG, argparse.Namespace(steps=3), "tok.json", None)
    loaded, info = common.load_model(tmp_path)
    assert loaded.config == CONFIG and info["tokenizer"] == "tok.json" and info["args"] == {"steps": 3}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    again, _ = common.load_model(tmp_path / "model.pt")
    assert torch.equal(again.embed.weight, model.embed.weight)
    with pytest.raises(FileNotFoundError, match="config.json"):
        common.load_config(tmp_path / "elsewhere")


def test_atomic_save_never_leaves_a_half_written_file(tmp_path, monkeypatch):
    common.atomic_save({"step": 1}, tmp_path / "x.pt")

    def crash(obj, path):
        open(path, "wb").write(b"half")
        raise OSError("killed")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        common.atomic_save({"step": 2}, tmp_path / "x.pt")
    monkeypatch.undo()
    assert torch.load(tmp_path / "x.pt") == {"step": 1}


def test_logger_on_resume_keeps_only_the_lines_up_to_the_checkpoint(tmp_path):
    runtime = one_process()
    logger = common.Logger(tmp_path, runtime, 0, 5)
    for step in range(1, 6):
        logger.log(step, 10 * step, loss=1.0 / step)
    logger.close()
    common.Logger(tmp_path, runtime, 3, 5).close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3] and lines[1]["tokens"] == 20
    assert "tokens_per_s" in lines[1] and "mfu" not in lines[1]  # MFU only on GPU


class Oracle(torch.nn.Module):
    """Logits that put all the mass on the next token of `ids`, except at the positions `wrong_at`."""

    def __init__(self, ids: list[int], vocab: int, wrong_at: tuple = ()):
        super().__init__()
        self.ids, self.vocab, self.wrong_at = ids, vocab, wrong_at

    def forward(self, tokens):
        logits = torch.zeros(1, tokens.shape[1], self.vocab)
        for t in range(tokens.shape[1]):
            logits[0, t, (self.ids[t + 1] + (t in self.wrong_at)) % self.vocab] = 1.0
        return logits


def test_copy_accuracy_is_the_share_of_answer_tokens_predicted_by_teacher_forcing(world, enc):
    from data import BOS
    probe = {"text": "The pass code of Ada Vel is 48213. Question: What is the pass code of Ada Vel?\n"
                     "Answer: ", "answer": "48213", "name": "needle@1x"}
    prompt = [enc.encode_single_token(BOS)] + enc.encode_ordinary(probe["text"])
    ids = [enc.encode_single_token(BOS)] + enc.encode_ordinary(probe["text"] + probe["answer"])
    n, runtime = len(ids) - len(prompt), one_process()
    assert n >= 2 and ids[:len(prompt)] == prompt
    score = lambda oracle, probes: pretrain.copy_accuracy(oracle, enc, probes, runtime)
    assert score(Oracle(ids, enc.n_vocab), [probe]) == {"copy_needle@1x": 1.0}
    # the position before the answer predicts its first token; a wrong prediction in the text does not count
    first_wrong = Oracle(ids, enc.n_vocab, wrong_at=(len(prompt) - 1,))
    assert score(first_wrong, [probe]) == {"copy_needle@1x": (n - 1) / n}
    assert score(Oracle(ids, enc.n_vocab, wrong_at=(len(prompt) - 2,)), [probe]) == {"copy_needle@1x": 1.0}
    wrong_last = Oracle(ids, enc.n_vocab, wrong_at=(len(ids) - 2,))
    assert score(wrong_last, [probe, {**probe, "name": "math"}]) == {"copy_needle@1x": (n - 1) / n,
                                                                      "copy_math": (n - 1) / n}
