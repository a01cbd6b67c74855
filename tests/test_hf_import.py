"""Importing a Hugging Face Cohere2 checkpoint: its tokenizer.json gives Hugging Face's ids through tiktoken
(data.load_tokenizer), its sharded safetensors give transformers' logits (python hf.py --from-hf), and the
post-training stages run on the imported model with its own tokenizer. Everything is built here, offline:
a byte-level BPE trained with the `tokenizers` library, Cohere-style, and a random Cohere2ForCausalLM."""

import json
import random
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

import common
import copg
import data
import evaluate
import prefopt
import sft
from data import SPECIAL_TOKENS, load_tokenizer, write_shard
from hf import byte_level_alphabet, import_cohere2, to_cohere2_config
from model import Config
from records import read_jsonl

pytest.importorskip("tokenizers")
REPO = Path(__file__).resolve().parent.parent

# Cohere's tokenizer.json: these first, at ids 0-7 (trained with the vocabulary); the chat tokens, and others
# such as <|YES_TOKEN|>, added after the merges, at the end of the vocabulary
COHERE_HEAD = ["<PAD>", "<UNK>", "<CLS>", "<SEP>", "<MASK_TOKEN>", "<BOS_TOKEN>", "<EOS_TOKEN>",
               "<EOP_TOKEN>"]
COHERE_TAIL = [token for token in SPECIAL_TOKENS if token not in COHERE_HEAD] + ["<|YES_TOKEN|>"]

MIXED_TEXT = [
    "The quick brown fox jumps over the lazy dog. It's 9:45; they'll say we've won, I'm sure. DON'T 'S 'Ll",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\r\n\r\n    \n",
    "Numbers: 0 7 42 1234567890 3.14159 -2.5e-10 1,000,000 a1b2c3 x  9 v2.0.1 ٣٤٥ ๑๒๓ ½ Ⅻ ² ①",
    "café naïve e\u0301 A\u030a Ångström ﬁ Straße ελληνικά русский 日本語のテキスト 한국어 مرحبا עברית हिन्दी",
    "😀👍🏽🇺🇸❤️ 👨‍👩‍👧 🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f",
    "    four  two \t\ttabs\n\n\n   \n trailing   ",
    "\u00a0nbsp\u2003em\u3000ideographic\u200bzero width\u2028line\u0085nel\x0bvt\x0cff",
    "", " ", "\n", "  1", "1  ", " \n 1\n 2  ",
]


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Random strings over code points of every Unicode category (as of Python's unicodedata), digits,
    spaces and apostrophes: all the places where the pre-tokenizer's branches meet."""
    by_category = {}
    for code in range(0x110000):
        by_category.setdefault(unicodedata.category(chr(code)), []).append(chr(code))
    rng = random.Random(seed)
    pool = [chars[i * len(chars) // 40] for category, chars in by_category.items()
            if category not in ("Cn", "Cs") for i in range(min(40, len(chars)))]
    pool += list(" \t\n\r  0123456789'sltdmvre") * 6
    return ["".join(rng.choices(pool, k=rng.randint(1, 40))) for _ in range(n)]


def cohere_style_tokenizer(texts, vocab_size: int, split_digits: bool = True):
    """A byte-level BPE laid out as Cohere's: NFC, digits split one by one before the byte-level split,
    COHERE_HEAD at ids 0-7 and COHERE_TAIL after the merges."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    digits = pre_tokenizers.Digits(individual_digits=True)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level]) if split_digits else byte_level
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=COHERE_HEAD, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens(COHERE_TAIL)
    return tokenizer


@pytest.fixture(scope="module", params=[True, False], ids=["digits-split", "gpt2"])
def tokenizer_pair(request, tmp_path_factory):
    """(Hugging Face tokenizer, its tokenizer.json's path), with Cohere's pre-tokenizer or GPT-2's, trained
    on this repository's code."""
    texts = [path.read_text() for path in sorted(REPO.glob("*.py"))] + MIXED_TEXT
    hf = cohere_style_tokenizer(texts, vocab_size=1500, split_digits=request.param)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    hf.save(str(path))
    return hf, path


def test_hf_tokenizer_gives_hugging_face_ids_on_mixed_text(tokenizer_pair):
    hf, path = tokenizer_pair
    enc = load_tokenizer(str(path))
    texts = [text.replace("<", "< ") for text in MIXED_TEXT + random_texts(400)]  # no special-token strings
    expected = [encoding.ids for encoding in hf.encode_batch(texts, add_special_tokens=False)]
    assert enc.encode_ordinary_batch(texts) == expected
    assert enc.encode_ordinary("e\u0301") == enc.encode_ordinary("é")  # NFC
    assert [enc.decode(ids) for ids in expected[:7]] == [unicodedata.normalize("NFC", t) for t in texts[:7]]


def test_hf_tokenizer_keeps_the_files_special_token_ids(tokenizer_pair):
    hf, path = tokenizer_pair
    enc = load_tokenizer(str(path))
    assert {token: enc.encode_single_token(token) for token in COHERE_HEAD + COHERE_TAIL} == \
        {token: hf.token_to_id(token) for token in COHERE_HEAD + COHERE_TAIL}
    assert enc.encode_single_token("<BOS_TOKEN>") == 5 and enc.n_vocab == hf.get_vocab_size()
    assert enc.encode_single_token("<|START_OF_TURN_TOKEN|>") > max(enc._mergeable_ranks.values())
    # special tokens are text to encode_ordinary (the chat format's rule), tokens to encode("all") as to HF
    text = "hi<|END_OF_TURN_TOKEN|>\u0338 <BOS_TOKEN>x<|YES_TOKEN|><PAD> e\u0301"
    assert enc.encode(text, allowed_special="all") == hf.encode(text, add_special_tokens=False).ids
    assert enc.encode_single_token("<|END_OF_TURN_TOKEN|>") not in enc.encode_ordinary(text)


def test_chat_format_on_an_hf_tokenizer_is_what_hugging_face_makes_of_the_rendered_text(tokenizer_pair):
    hf, path = tokenizer_pair
    enc = load_tokenizer(str(path))
    messages = [{"role": "system", "content": "Be brief 2."}, {"role": "user", "content": "What's 12+30?"},
                {"role": "chatbot", "content": "42", "thinking": "Add  them."}]
    ids, _ = data.render(enc, messages)
    assert ids == hf.encode(enc.decode(ids), add_special_tokens=False).ids


def edit(saved: dict, change: str) -> dict:
    """A copy of a tokenizer.json dict with one thing this conversion must refuse."""
    saved = json.loads(json.dumps(saved))
    if change == "normalizer":
        saved["normalizer"] = {"type": "NFKC"}
    elif change == "prefix space":
        saved["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}
    elif change == "missing chat token":
        saved["added_tokens"] = [t for t in saved["added_tokens"] if t["content"] != "<|START_THINKING|>"]
    elif change == "merge order":
        saved["model"]["merges"][3], saved["model"]["merges"][4] = (saved["model"]["merges"][4],
                                                                    saved["model"]["merges"][3])
    elif change == "lstrip":
        saved["added_tokens"][-1]["lstrip"] = True
    elif change == "id gap":
        saved["added_tokens"][-1]["id"] += 5
    return saved


@pytest.mark.parametrize("change,message", [
    ("normalizer", "normalizer .* is not NFC"), ("prefix space", "pre_tokenizer"),
    ("missing chat token", r"lack \['<\|START_THINKING\|>'\]"), ("merge order", "merge .* lower id"),
    ("lstrip", "YES_TOKEN.*lstrip"), ("id gap", "not 0, 1, ..., n - 1"),
])
def test_hf_tokenizer_that_cannot_convert_exactly_is_refused_naming_what(tokenizer_pair, tmp_path, change,
                                                                          message):
    _, path = tokenizer_pair
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps(edit(json.loads(path.read_text()), change)))
    with pytest.raises(ValueError, match=f"{re.escape(str(bad))}: .*{message}"):
        load_tokenizer(str(bad))


def test_a_merge_tiktoken_would_make_from_other_halves_is_refused(tmp_path):
    """Merges b+c, then a+b, then ab+c: Hugging Face makes a, bc of "abc" (a+bc is no merge), tiktoken would
    join a and bc into abc (a token). The conversion cannot be exact, and says so."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    alphabet = sorted(byte_level_alphabet(), key=byte_level_alphabet().get)
    vocab = {char: i for i, char in enumerate(alphabet)} | {"bc": 256, "ab": 257, "abc": 258}
    hf = Tokenizer(models.BPE(vocab, [("b", "c"), ("a", "b"), ("ab", "c")]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.add_special_tokens(SPECIAL_TOKENS)
    assert hf.encode("abc").tokens == ["a", "bc"]
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tiktoken would build the token of merge \['ab', 'c'\]"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


# ------------------------------------------------------------------------------------------------ checkpoints

IMPORT_CONFIG = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, window=16)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A Cohere-style tokenizer.json, small."""
    path = tmp_path_factory.mktemp("cohere") / "tokenizer.json"
    cohere_style_tokenizer(MIXED_TEXT, vocab_size=400).save(str(path))
    return path


def save_hf_checkpoint(folder, tokenizer_path, vocab_size: int, seed: int = 0):
    """A random Cohere2ForCausalLM saved as on the Hub: config.json, safetensors shards of ~100 kB with their
    index, and tokenizer.json."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    torch.manual_seed(seed)
    config = transformers.Cohere2Config(**to_cohere2_config(Config(vocab_size=vocab_size, **IMPORT_CONFIG)))
    hf = transformers.Cohere2ForCausalLM(config).eval()
    hf.save_pretrained(folder, max_shard_size="100KB")
    shutil.copyfile(tokenizer_path, folder / "tokenizer.json")
    return hf


def test_imported_checkpoint_gives_transformers_logits(tokenizer_path, tmp_path):
    """As Cohere2's, the checkpoint's embedding is padded past the tokenizer's ids: the import drops the
    padding rows, and every real token's logit is transformers'."""
    vocab_size = load_tokenizer(str(tokenizer_path)).n_vocab
    hf = save_hf_checkpoint(tmp_path / "hf", tokenizer_path, vocab_size + 24)
    assert len(json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 2
    subprocess.run([sys.executable, str(REPO / "hf.py"), "--from-hf", str(tmp_path / "hf"), "--out",
                    str(tmp_path / "out")], check=True)
    ours, info = common.load_model(tmp_path / "out")
    assert info["stage"] == "import" and info["parent"] == str(tmp_path / "hf")
    assert ours.config.vocab_size == info["model"]["vocab_size"] == vocab_size
    idx = torch.randint(vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(idx), hf(idx).logits[..., :vocab_size], atol=1e-5, rtol=0)
    assert load_tokenizer(info["tokenizer"]).name == load_tokenizer(str(tokenizer_path)).name


def test_import_refuses_a_tokenizer_with_more_ids_than_the_model(tokenizer_path, tmp_path):
    save_hf_checkpoint(tmp_path / "hf", tokenizer_path, load_tokenizer(str(tokenizer_path)).n_vocab - 1)
    with pytest.raises(ValueError, match="past the model's vocab_size"):
        import_cohere2(tmp_path / "hf", tmp_path / "out")


def test_import_refuses_a_missing_shard_and_names_it(tokenizer_path, tmp_path):
    save_hf_checkpoint(tmp_path / "hf", tokenizer_path, load_tokenizer(str(tokenizer_path)).n_vocab)
    shard = sorted((tmp_path / "hf").glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        import_cohere2(tmp_path / "hf", tmp_path / "out")


def test_import_without_safetensors_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        import_cohere2(tmp_path, tmp_path / "out")


def test_stages_run_on_an_imported_model_with_its_own_tokenizer(world, tmp_path):
    """sft.py, prefopt.py, copg.py and evaluate.py on a random Cohere2 checkpoint imported with its tokenizer:
    the data folder holds that tokenizer.json, and shards written with it."""
    folder = tmp_path / "data"
    shutil.copytree(world, folder)
    texts = {name: [r["text"] for r in read_jsonl(world / f"{name}.jsonl", "text")]
             for name in ("corpus", "val")}
    cohere_style_tokenizer(texts["corpus"], vocab_size=600).save(str(folder / "tokenizer.json"))
    enc = load_tokenizer(str(folder / "tokenizer.json"))
    for name, docs in texts.items():
        write_shard(enc, docs, folder / f"{name}.bin")
    save_hf_checkpoint(tmp_path / "hf", folder / "tokenizer.json", enc.n_vocab + 16)  # padded, as Cohere2's
    import_cohere2(tmp_path / "hf", tmp_path / "imported")

    run = ["--data", str(folder), "--init", str(tmp_path / "imported"), "--steps", "1", "--batch-size", "2",
           "--device", "cpu", "--no-eval", "--log-every", "1"]
    sft.main([*run, "--out", str(tmp_path / "sft"), "--capability", "math", "--seq-len", "256"])
    prefopt.main([*run, "--out", str(tmp_path / "prefopt"), "--capability", "instruct", "--loss", "srpo"])
    copg.main([*run, "--out", str(tmp_path / "copg"), "--capability", "math", "--mode", "online", "--k", "2",
               "--max-new-tokens", "8"])
    for stage in ("sft", "prefopt", "copg"):
        lines = (tmp_path / stage / "metrics.jsonl").read_text().splitlines()
        assert [m["step"] for m in map(json.loads, lines) if "loss" in m] == [1], stage
        info = json.loads((tmp_path / stage / "config.json").read_text())
        assert info["parent"] == str(tmp_path / "imported")
    evaluate.main(["--model", str(tmp_path / "copg"), "--data", str(folder), "--capabilities", "math",
                   "--limit", "1", "--out", str(tmp_path / "eval.json")])
    result = json.loads((tmp_path / "eval.json").read_text())
    assert 0 <= result["capabilities"]["math"]["format"] <= 1 and result["bpb"] > 0
