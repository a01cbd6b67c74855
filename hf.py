"""Hugging Face interop: a Cohere2 checkpoint folder (config.json, safetensors shards) and its tokenizer.json,
read into this project's model and tiktoken encoding.

- The checkpoint: `import_cohere2` writes the folder as a stage's output (OUT/model.pt, config.json,
  tokenizer.json), which every stage's --init reads. Config.from_cohere2 and model.convert_cohere2_tensors
  map the config and the weights (Cohere2's separate projections onto our fused ones); `to_cohere2_config`
  is the way back, and `build_pair` makes a transformers Cohere2ForCausalLM and our Transformer holding the
  same weights (model.py's parity tests, `python bench.py model`).
- The tokenizer: `hf_tokenizer` converts a byte-level BPE tokenizer.json such as Cohere's into a tiktoken
  Encoding with the same ids, exactly or not at all; data.load_tokenizer calls it on any tokenizer.json.

    python hf.py --from-hf DIR --out OUT    a Hugging Face Cohere2 checkpoint -> OUT/model.pt, config.json,
                                            tokenizer.json: a stage's --out, for the next one's --init

transformers (build_pair) and safetensors (import_cohere2) are imported by the one function that needs them.
"""

import argparse
import json
import os
import shutil
import unicodedata
from dataclasses import asdict, replace
from pathlib import Path

import regex
import tiktoken
import torch

from model import Config, Transformer, convert_cohere2_state_dict, convert_cohere2_tensors


# -----------------------------------------------------------------------------
# Hugging Face Cohere2: our config in its terms, a pair of models with the same weights (parity tests,
# bench.py), and the import of a checkpoint folder


def to_cohere2_config(config: Config) -> dict:
    """The Hugging Face Cohere2 config dict of one of our Configs (inverse of Config.from_cohere2)."""
    return dict(model_type="cohere2", vocab_size=config.vocab_size, hidden_size=config.dim,
                intermediate_size=config.ffn_dim, num_hidden_layers=config.n_layers,
                num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
                sliding_window=config.window, sliding_window_pattern=config.full_every,
                max_position_embeddings=config.max_seq_len, logit_scale=config.logit_scale,
                layer_norm_eps=config.norm_eps,
                rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
                tie_word_embeddings=True, attention_bias=False,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build_pair(config: Config, seed: int = 0):
    """A random transformers Cohere2ForCausalLM and our Transformer holding the same weights."""
    from transformers import Cohere2Config, Cohere2ForCausalLM

    torch.manual_seed(seed)
    hf = Cohere2ForCausalLM(Cohere2Config(**to_cohere2_config(config))).eval()
    ours = Transformer(config).eval()
    ours.load_state_dict(convert_cohere2_state_dict(hf.state_dict()))
    return hf, ours


def tokenizer_size(path) -> int:
    """The number of ids of a Hugging Face tokenizer.json: one past the largest id of its vocabulary and its
    added (special) tokens."""
    saved = json.loads(Path(path).read_text())
    ids = [*saved["model"]["vocab"].values(), *(added["id"] for added in saved.get("added_tokens", []))]
    return 1 + max(ids)


def import_cohere2(hf_dir, out):
    """Write a Hugging Face Cohere2 folder (config.json, model.safetensors or its shards with their index,
    tokenizer.json) as a stage's output, which --init and common.load_model read: OUT/model.pt (fp32, as every
    stage's), OUT/config.json and OUT/tokenizer.json (the file itself: data.load_tokenizer converts it, or
    says why it cannot). Shards are read one at a time and each block is fused as soon as its tensors are in,
    so the peak memory is about one copy of the model (`python bench.py import` measures it)."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise ImportError("reading a Hugging Face checkpoint needs the safetensors package: "
                          "pip install safetensors") from None
    hf_dir, out = Path(hf_dir), Path(out)
    index = hf_dir / "model.safetensors.index.json"
    shards = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
              else ["model.safetensors"])
    for name in ("config.json", "tokenizer.json", *shards):
        if not (hf_dir / name).is_file():
            raise FileNotFoundError(f"{hf_dir / name}: no such file; --from-hf takes a Hugging Face Cohere2 "
                                    f"folder (config.json, tokenizer.json, model.safetensors or shards)")
    config = Config.from_cohere2(json.loads((hf_dir / "config.json").read_text()))
    n_tokens = tokenizer_size(hf_dir / "tokenizer.json")
    if n_tokens > config.vocab_size:
        raise ValueError(f"{hf_dir / 'tokenizer.json'} has ids up to {n_tokens - 1}, past the model's "
                         f"vocab_size {config.vocab_size}: a tokenizer of another model?")

    state_dict, pending = {}, {}
    for shard in shards:
        with safe_open(hf_dir / shard, framework="pt") as file:
            for name in file.keys():
                pending[name.removeprefix("model.")] = file.get_tensor(name).float()
        convert_cohere2_tensors(pending, state_dict)
    if pending:
        raise ValueError(f"{hf_dir}: tensors of no Cohere2 block, or of a block missing some: "
                         f"{sorted(pending)[:5]}")
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(state_dict, assign=True)  # every key and shape against config.json, no copy
    # A checkpoint may pad its embedding past the tokenizer's last id (Cohere2's config says 256,000 rows,
    # the report's vocabulary is 255k). No text maps to those rows and no text can be decoded from them, so
    # they go: the embedding is the tokenizer's size, which every stage checks, and sampling can never pick
    # a padding id. The logits of real tokens are unchanged.
    if n_tokens < config.vocab_size:
        state_dict["embed.weight"] = state_dict["embed.weight"][:n_tokens].clone()
        config = replace(config, vocab_size=n_tokens)

    # the files of a stage's --out as common.py writes them (this module sits below it), each under a
    # temporary name, then renamed; config.json last
    info = {"stage": "import", "preset": "cohere2", "model": asdict(config),
            "args": {"from_hf": str(hf_dir), "out": str(out)}, "tokenizer": str(out / "tokenizer.json"),
            "parent": str(hf_dir)}
    out.mkdir(parents=True, exist_ok=True)
    for name, write in (("tokenizer.json", lambda path: shutil.copyfile(hf_dir / "tokenizer.json", path)),
                        ("model.pt", lambda path: torch.save(state_dict, path)),
                        ("config.json", lambda path: path.write_text(json.dumps(info, indent=1) + "\n"))):
        write(out / f"{name}.tmp")
        os.replace(out / f"{name}.tmp", out / name)
    print(f"imported {hf_dir}: {config.num_params() / 1e6:.2f}M parameters; wrote {out}/model.pt, "
          f"config.json, tokenizer.json")


# -----------------------------------------------------------------------------
# A Hugging Face tokenizer.json (a byte-level BPE such as Cohere's) as a tiktoken Encoding with the same ids

# The split of the ByteLevel pre-tokenizer (GPT-2's) in tiktoken's syntax: possessive quantifiers as in
# tiktoken's own r50k_base, and GPT-2's `\s+(?!\S)|\s+` as `\s+(?!\S)|\s` (its second branch only ever takes
# one character).
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s+(?!\S)|\s"""
# Cohere's pre-tokenizer, Digits(individual_digits) then ByteLevel, as one pattern. Digits cuts the text
# before and after every digit and the GPT-2 split runs on the stretches in between, so: a digit is a chunk
# of its own (no other branch takes one, and " ?\p{N}" loses its space), and a whitespace run before a digit
# ends its stretch, where `(?!\S)` held: the lookahead becomes "not before a non-space that is no digit".
DIGITS_GPT2_SPLIT_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++|\p{N}| ?[^\s\p{L}\p{N}]++"""
                             r"""|\s+(?![^\s\p{N}])|\s""")


class NFCEncoding(tiktoken.Encoding):
    """A tiktoken Encoding that puts text in Unicode normal form C first, as a tokenizer.json's NFC normalizer
    does ("e" + U+0301 and "é" give the same tokens). `encode` finds special tokens in the raw text and
    normalises the text between them, as Hugging Face does with its added tokens. (The batch methods call
    these two.)"""

    def encode_ordinary(self, text: str) -> list[int]:
        return super().encode_ordinary(unicodedata.normalize("NFC", text))

    def encode(self, text: str, *, allowed_special=frozenset(), disallowed_special="all") -> list[int]:
        allowed = sorted(self.special_tokens_set if allowed_special == "all" else allowed_special,
                         key=len, reverse=True)  # the longest first, as HF matches them
        pieces = regex.split("(" + "|".join(map(regex.escape, allowed)) + ")", text) if allowed else [text]
        ids = []
        for i, piece in enumerate(pieces):  # odd i: a special token, kept by the split
            normalized = unicodedata.normalize("NFC", piece)
            ids += ([self.encode_single_token(piece)] if i % 2
                    else super().encode(normalized, disallowed_special=disallowed_special))
        return ids


def byte_level_alphabet() -> dict[str, int]:
    """The character that stands for each byte in a byte-level BPE's vocabulary, mapped back to the byte
    (GPT-2's bytes_to_unicode): printable Latin-1 bytes stand for themselves, the other 68 for chr(256 + k) in
    byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(others)}


def bpe_parts(ranks: dict[bytes, int], token: bytes, below: int) -> list[bytes]:
    """tiktoken's BPE of `token` with only the tokens ranked below `below`: join the adjacent pair whose
    join ranks lowest (the leftmost on a tie) until no pair joins."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_rank, best = below, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], below)
            if rank < best_rank:
                best_rank, best = rank, i
        if best is None:
            return parts
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def is_byte_level(pre_tokenizer: dict) -> bool:
    """Whether a tokenizer.json pre-tokenizer is ByteLevel with GPT-2's split and no prefix space (the
    defaults, where a key is absent, are use_regex true and add_prefix_space true)."""
    return (pre_tokenizer.get("type") == "ByteLevel" and pre_tokenizer.get("use_regex", True)
            and pre_tokenizer.get("add_prefix_space", True) is False)


def hf_tokenizer(path: Path, saved: dict, name: str, chat_tokens: list[str]) -> tiktoken.Encoding:
    r"""The byte-level BPE of a Hugging Face tokenizer.json as a tiktoken Encoding with the same ids: by
    encode_ordinary on any text free of special-token strings (as HF's encode, add_special_tokens=False), by
    encode(text, allowed_special="all") on any text. Every added token becomes a special token at its id;
    `chat_tokens` (data.SPECIAL_TOKENS) must be among them.

    Converted: an NFC normalizer or none; the ByteLevel pre-tokenizer, alone or after
    Digits(individual_digits) (Cohere's); a BPE model. HF joins the listed merge of lowest index, tiktoken the
    adjacent pair whose join is the lowest-ranked token. They agree when ids rise with merge index and
    tiktoken's BPE of each token, with the tokens ranked below it, ends at the two halves of its merge: we
    check both, so the conversion is exact, and refuse anything else, naming it. One caveat: Digits' digits
    are Rust's char::is_numeric, whose Unicode tables can be newer than tiktoken's \p{N} (13 code points of
    Unicode 16-17 with tokenizers 0.23 and tiktoken 0.14), and the same holds for NFC and Python's
    unicodedata.
    """
    def refuse(what: str):
        raise ValueError(f"{path}: {what}; load_tokenizer converts only a byte-level BPE such as Cohere's "
                         f"exactly")

    model, pre_tokenizer = saved["model"], saved.get("pre_tokenizer") or {}
    if saved.get("normalizer") not in (None, {"type": "NFC"}):
        refuse(f"normalizer {saved['normalizer']} is not NFC")
    if is_byte_level(pre_tokenizer):
        pat_str = GPT2_SPLIT_PATTERN
    elif (pre_tokenizer.get("type") == "Sequence" and len(pre_tokenizer["pretokenizers"]) == 2
          and pre_tokenizer["pretokenizers"][0] == {"type": "Digits", "individual_digits": True}
          and is_byte_level(pre_tokenizer["pretokenizers"][1])):
        pat_str = DIGITS_GPT2_SPLIT_PATTERN
    else:
        refuse(f"pre_tokenizer {pre_tokenizer} is not ByteLevel, alone or after Digits(individual_digits), "
               f"without prefix space")
    if (model["type"] != "BPE" or model.get("byte_fallback") or model.get("dropout")
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")):
        refuse(f"its {model['type']} model is no plain BPE (byte_fallback, dropout or affixes)")

    special_tokens = {}
    for added in saved.get("added_tokens", []):
        token = added["content"]
        if any(added.get(flag) for flag in ("single_word", "lstrip", "rstrip", "normalized")):
            refuse(f"added token {token!r} sets single_word, lstrip, rstrip or normalized")
        if model["vocab"].get(token, added["id"]) != added["id"]:
            refuse(f"added token {token!r} has id {added['id']}, {model['vocab'][token]} in the vocabulary")
        special_tokens[token] = added["id"]
    missing = [token for token in chat_tokens if token not in special_tokens]
    if missing:
        refuse(f"its added tokens lack {missing}, which the chat format needs")

    alphabet = byte_level_alphabet()
    to_bytes = lambda token: bytes(alphabet[char] for char in token)  # noqa: E731
    ranks = {}
    for token, id_ in model["vocab"].items():
        if token not in special_tokens:
            if any(char not in alphabet for char in token):
                refuse(f"vocabulary token {token!r} (id {id_}) is not in the byte-level alphabet")
            ranks[to_bytes(token)] = id_
    ids = sorted([*ranks.values(), *special_tokens.values()])
    if ids != list(range(len(ids))):
        refuse("its ids (vocabulary and added tokens) are not 0, 1, ..., n - 1 once each")
    if any(bytes([b]) not in ranks for b in range(256)):
        refuse("its vocabulary lacks some of the 256 single bytes")
    last_id = -1
    for merge in model["merges"]:
        a, b = map(to_bytes, merge.split(" ") if isinstance(merge, str) else merge)
        if ranks.get(a + b, -1) <= last_id:
            refuse(f"merge {merge} makes no token, or one of a lower id than the merge before it")
        last_id = ranks[a + b]
        if bpe_parts(ranks, a + b, last_id) != [a, b]:
            refuse(f"tiktoken would build the token of merge {merge} from other halves")
    if len(model["merges"]) != len(ranks) - 256:
        refuse(f"{len(ranks) - 256 - len(model['merges'])} multi-byte vocabulary tokens come from no merge")
    encoding = NFCEncoding if saved.get("normalizer") else tiktoken.Encoding
    return encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special_tokens)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Import a Hugging Face Cohere2 checkpoint (weights and "
                                                 "tokenizer) as a stage's --out, for another's --init.")
    parser.add_argument("--from-hf", required=True, metavar="DIR",
                        help="Hugging Face folder: config.json, *.safetensors (+ index), tokenizer.json")
    parser.add_argument("--out", required=True, help="folder to write model.pt, config.json, tokenizer.json")
    args = parser.parse_args(argv)
    import_cohere2(args.from_hf, args.out)


if __name__ == "__main__":
    main()
