"""Fixtures shared by the stage tests: a small synthetic world with its tokenizer and shards, and a fresh
dim-64 model saved as an earlier stage's --out."""

import argparse

import pytest
import torch

import common
import tasks
from data import load_tokenizer, save_tokenizer, train_bpe, write_shard
from records import read_jsonl
from model import Config, Transformer

SMALL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, window=32)  # a dim-64 model: fast


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A twentieth of the tiny world (sft/, pref/, rl/, eval/, copg/), a 600-token BPE, and its corpus and
    val shards."""
    folder = tmp_path_factory.mktemp("world")
    tasks.build(folder, seed=0, scale=0.05)
    texts = {name: [r["text"] for r in read_jsonl(folder / f"{name}.jsonl", "text")]
             for name in ("corpus", "val")}
    save_tokenizer(folder / "tokenizer.json", train_bpe(texts["corpus"], vocab_size=600))
    enc = load_tokenizer(str(folder / "tokenizer.json"))
    for name, docs in texts.items():
        write_shard(enc, docs, folder / f"{name}.bin")
    return folder


@pytest.fixture(scope="session")
def enc(world):
    return load_tokenizer(str(world / "tokenizer.json"))


def save_parent(folder, enc, world, seed=0):
    """A fresh dim-64 model saved as an earlier stage's --out (model.pt + config.json)."""
    config = Config(vocab_size=enc.n_vocab, **SMALL)
    torch.manual_seed(seed)
    torch.save(Transformer(config).state_dict(), folder / "model.pt")
    common.write_config(folder, "init", "tiny", config, argparse.Namespace(),
                        str(world / "tokenizer.json"), None)
    return folder


@pytest.fixture(scope="session")
def parent(world, enc, tmp_path_factory):
    return save_parent(tmp_path_factory.mktemp("parent"), enc, world)


def save_reward_model(folder, parent):
    """A reward.py --out folder: the parent's weights as the trunk and a random head."""
    folder.mkdir()
    for name in ("model.pt", "config.json"):
        (folder / name).write_bytes((parent / name).read_bytes())
    torch.manual_seed(0)
    torch.save(torch.nn.Linear(SMALL["dim"], 1, bias=False).state_dict(), folder / "head.pt")
    return folder
