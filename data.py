"""Data plumbing shared by every stage: tokenizer, chat format, JSONL records, token shards, packed batches.

Report §2.3 (a BPE tokenizer with special tokens for chat turns and tool calls) and §3.2.1 (SFT data are
prompts and completions; the loss is taken on completion tokens only).

    python data.py tokenizer --data data/tiny --vocab-size 4096 # corpus.jsonl -> data/tiny/tokenizer.json
    python data.py shards --data data/tiny                      # X.jsonl -> X.bin + X.bin.json, per text file

Conventions every stage relies on:
- Tokenizer: byte-level BPE with the GPT-4 (cl100k) split pattern, as a `tiktoken.Encoding` whose 16 special
  tokens (SPECIAL_TOKENS, in that order) follow the mergeable ranks. `load_tokenizer` takes the saved file or
  a tiktoken encoding name (e.g. "cl100k_base": its ranks, our special tokens; needs the network once), or a
  Hugging Face tokenizer.json of a byte-level BPE such as Cohere's: its ids, its special tokens where the file
  puts them (SPECIAL_TOKENS are Cohere's names), NFC and its pre-tokenizer as one split pattern
  (`hf.hf_tokenizer`).
- Text from data (system/user messages, documents, tool results, the chatbot's own words, pretraining text)
  is always encoded with `encode_ordinary`, so it can never produce a special token: a user who types
  "<|END_OF_TURN_TOKEN|>" gets those characters, not the end of their turn.
- Chat (`render`): <BOS_TOKEN> once, then <|START_OF_TURN_TOKEN|> role-token body <|END_OF_TURN_TOKEN|> per
  message. No <EOS_TOKEN> in chat: a reply ends at END_OF_TURN, and generation stops there
  (`chat_stop_tokens`).
- Pretraining shards: every document is <BOS_TOKEN> text <EOS_TOKEN>, back to back in one flat array of
  uint16 (vocab <= 65536) or uint32; a sidecar X.bin.json names dtype, vocab size and tokenizer.
- Batches are dicts of LongTensors [rows, seq_len]: `tokens`; `targets`, the token to predict after each one,
  or IGNORE (-100, torch's default ignore_index) where no loss is taken (prompts, padding, the start of the
  next document); `doc_ids`, equal within a document and different between documents of a row (attention stays
  inside a document); `positions`, restarting at 0 for each document. Feed them to
  `model(tokens, doc_ids=..., positions=...)` and `cross_entropy(..., targets)`.
"""
import argparse
import base64
import hashlib
import heapq
import json
import os
import time
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import regex  # tiktoken's own dependency: Python's `re` has no \p{L} nor possessive quantifiers
import tiktoken
import torch

from hf import hf_tokenizer
from records import read_jsonl

SPECIAL_TOKENS = [
    "<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>",
    "<|CHATBOT_TOKEN|>", "<|START_RESPONSE|>", "<|END_RESPONSE|>", "<|START_THINKING|>", "<|END_THINKING|>",
    "<|START_ACTION|>", "<|END_ACTION|>", "<|START_TOOL_RESULT|>", "<|END_TOOL_RESULT|>", "<EOS_TOKEN>",
    "<PAD>",
]
(BOS, START_OF_TURN, END_OF_TURN, SYSTEM, USER, CHATBOT, START_RESPONSE, END_RESPONSE, START_THINKING,
 END_THINKING, START_ACTION, END_ACTION, START_TOOL_RESULT, END_TOOL_RESULT, EOS, PAD) = SPECIAL_TOKENS
# cl100k_base's pre-tokenisation: letters, 1-3 digit numbers, punctuation runs and whitespace become separate
# chunks, and merges never cross a chunk boundary.
GPT4_SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"""
                      r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
IGNORE = -100


# ----------------------------------------------------------------------------------------------------------
# Tokenizer

def train_bpe(texts, vocab_size: int = 4096, pat_str: str = GPT4_SPLIT_PATTERN) -> dict[bytes, int]:
    """Mergeable ranks (token bytes -> id) of a byte-level BPE whose vocabulary, with the special tokens, has
    `vocab_size` tokens (fewer if the texts run out of pairs).

    Each distinct pre-tokenised chunk is counted once (a corpus has far fewer distinct chunks than chunks);
    then the most frequent adjacent pair is merged again and again, and pair counts are updated only in the
    chunks that contained it. A heap with lazy deletion finds the most frequent pair; ties go to the smallest
    pair of ids, so training is deterministic.
    """
    n_ranks = vocab_size - len(SPECIAL_TOKENS)
    if n_ranks < 256:
        raise ValueError(f"vocab size {vocab_size} is below 256 bytes + {len(SPECIAL_TOKENS)} special tokens")
    split = regex.compile(pat_str)
    chunk_counts = Counter(chunk for text in texts for chunk in split.findall(text))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    counts = list(chunk_counts.values())
    pair_counts = Counter()
    words_with = defaultdict(set)  # pair -> indices of the words containing it
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += counts[i]
            words_with[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    vocab = [bytes([b]) for b in range(256)]  # id -> bytes; a byte's id is its value
    ranks = {token: i for i, token in enumerate(vocab)}
    while len(vocab) < n_ranks and heap:
        negative_count, pair = heapq.heappop(heap)
        if pair_counts[pair] != -negative_count:  # stale entry: the count changed after it was pushed
            continue
        merged = vocab[pair[0]] + vocab[pair[1]]
        if merged not in ranks:  # two different pairs can spell the same bytes; they share one id
            ranks[merged] = len(vocab)
            vocab.append(merged)
        new_id = ranks[merged]
        deltas = Counter()
        for i in words_with.pop(pair):
            word, new_word = words[i], _merge(words[i], pair, new_id)
            old_pairs, new_pairs = list(zip(word, word[1:])), list(zip(new_word, new_word[1:]))
            for p in old_pairs:
                deltas[p] -= counts[i]
            for p in new_pairs:
                deltas[p] += counts[i]
            for p in set(old_pairs) - set(new_pairs):
                words_with[p].discard(i)
            for p in new_pairs:
                words_with[p].add(i)
            words[i] = new_word
        for p, delta in deltas.items():
            if delta:
                pair_counts[p] += delta
                if pair_counts[p] > 0:
                    heapq.heappush(heap, (-pair_counts[p], p))
    return ranks


def _merge(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each occurrence of `pair` in `word`, left to right (as tiktoken's encoder does), by
    `new_id`."""
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(new_id)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


def build_encoding(name: str, pat_str: str, ranks: dict[bytes, int]) -> tiktoken.Encoding:
    """A tiktoken.Encoding of `ranks` with SPECIAL_TOKENS appended, in order, after the largest rank."""
    first_special = max(ranks.values()) + 1
    special_tokens = {token: first_special + i for i, token in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special_tokens)


def save_tokenizer(path, ranks: dict[bytes, int], pat_str: str = GPT4_SPLIT_PATTERN):
    """Write the tokenizer as JSON: the split pattern, token bytes (base64) in rank order, the special
    tokens."""
    tokens = sorted(ranks, key=ranks.get)
    assert [ranks[t] for t in tokens] == list(range(len(tokens))), "ranks must be 0..n-1"
    saved = {"pat_str": pat_str, "mergeable_ranks": [base64.b64encode(t).decode("ascii") for t in tokens],
             "special_tokens": SPECIAL_TOKENS}
    Path(path).write_text(json.dumps(saved, indent=0) + "\n")


def load_tokenizer(spec: str) -> tiktoken.Encoding:
    """The tokenizer saved at path `spec` (by save_tokenizer, or a Hugging Face tokenizer.json), or the
    tiktoken encoding named `spec` plus our special tokens.

    A saved tokenizer is named after a hash of its file, so a shard can tell which tokenizer wrote it.
    """
    if spec in tiktoken.list_encoding_names():
        # downloads its ranks at first use (tiktoken's README way to extend)
        base = tiktoken.get_encoding(spec)
        return build_encoding(spec, base._pat_str, base._mergeable_ranks)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {spec}: no such file, nor a tiktoken encoding name "
                                f"({', '.join(tiktoken.list_encoding_names())}); "
                                f"train one with: python data.py tokenizer --data DIR")
    content = path.read_bytes()
    saved = json.loads(content)
    if "model" in saved:  # Hugging Face's format names its tokenizer model ({"type": "BPE", ...})
        return hf_tokenizer(path, saved, "hf-" + hashlib.sha256(content).hexdigest()[:12], SPECIAL_TOKENS)
    if saved["special_tokens"] != SPECIAL_TOKENS:
        raise ValueError(f"{path}: its special tokens differ from data.SPECIAL_TOKENS; retrain the tokenizer")
    ranks = {base64.b64decode(token): rank for rank, token in enumerate(saved["mergeable_ranks"])}
    return build_encoding("bpe-" + hashlib.sha256(content).hexdigest()[:12], saved["pat_str"], ranks)


def bytes_per_token(enc: tiktoken.Encoding, texts: list[str]) -> float:
    """UTF-8 bytes per token over `texts`: the tokenizer's compression (higher means shorter sequences)."""
    n_tokens = sum(len(ids) for ids in enc.encode_ordinary_batch(texts))
    return sum(len(text.encode("utf-8")) for text in texts) / max(n_tokens, 1)


# ----------------------------------------------------------------------------------------------------------
# Chat format (Command A style). A message is {"role": "system"|"user"|"chatbot"|"tool", "content": str}; a
# chatbot message may add "thinking": str and "tool_calls": [{"tool_name": str, "parameters": {...}}].

def render(enc: tiktoken.Encoding, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its loss mask: 1 on what the chatbot writes (its thinking, action and
    response with their markers, and its END_OF_TURN), 0 on everything else, its turn opener included.

    <BOS_TOKEN>
    system:  <|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>content<|END_OF_TURN_TOKEN|>
    user:    <|START_OF_TURN_TOKEN|><|USER_TOKEN|>content<|END_OF_TURN_TOKEN|>
    tool:    <|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|><|START_TOOL_RESULT|>content<|END_TOOL_RESULT|>
             <|END_OF_TURN_TOKEN|>
    chatbot: <|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>[<|START_THINKING|>thinking<|END_THINKING|>]
             [<|START_ACTION|>tool_calls as JSON<|END_ACTION|>][<|START_RESPONSE|>content<|END_RESPONSE|>]
             <|END_OF_TURN_TOKEN|>   (the response part is left out only when content is empty and there
             are tool calls)
    """
    tok, text = enc.encode_single_token, enc.encode_ordinary
    ids, mask = [tok(BOS)], [0]
    for message in messages:
        role = message["role"]
        if role == "chatbot":
            reply = _reply(enc, message)
            ids += [tok(START_OF_TURN), tok(CHATBOT)] + reply
            mask += [0, 0] + [1] * len(reply)
            continue
        if role == "tool":
            body = [tok(SYSTEM), tok(START_TOOL_RESULT), *text(message["content"]), tok(END_TOOL_RESULT)]
        else:
            body = [tok(SYSTEM if role == "system" else USER), *text(message["content"])]
        turn = [tok(START_OF_TURN), *body, tok(END_OF_TURN)]
        ids += turn
        mask += [0] * len(turn)
    return ids, mask


def _reply(enc: tiktoken.Encoding, message: dict) -> list[int]:
    """What the chatbot writes after its turn opener, through its END_OF_TURN."""
    tok, text = enc.encode_single_token, enc.encode_ordinary
    ids = []
    if message.get("thinking"):
        ids += [tok(START_THINKING), *text(message["thinking"]), tok(END_THINKING)]
    if message.get("tool_calls"):
        ids += [tok(START_ACTION), *text(json.dumps(message["tool_calls"], ensure_ascii=False)),
                tok(END_ACTION)]
    if message["content"] or not message.get("tool_calls"):
        ids += [tok(START_RESPONSE), *text(message["content"]), tok(END_RESPONSE)]
    return ids + [tok(END_OF_TURN)]


def render_prompt(enc: tiktoken.Encoding, messages: list[dict]) -> list[int]:
    """The conversation so far followed by the chatbot's turn opener: generation continues with its reply."""
    return render(enc, messages)[0] + [enc.encode_single_token(START_OF_TURN),
                                       enc.encode_single_token(CHATBOT)]


def render_completion(enc: tiktoken.Encoding, messages: list[dict],
                      completion) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) for a completion (a string, the response text, or a chatbot message) to
    the prompt `messages`. The completion ids are what a model sampling from `render_prompt` writes: the
    reply's markers and END_OF_TURN included; prompt + completion == render(messages + [reply])[0]."""
    reply = {"role": "chatbot", "content": completion} if isinstance(completion, str) else completion
    return render_prompt(enc, messages), _reply(enc, reply)


def prompt_completion_sequence(prompt_ids: list[int],
                               completion_ids: list[int]) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of prompt + completion, loss on the completion only: the input of `pack`."""
    return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)


def chat_stop_tokens(enc: tiktoken.Encoding) -> list[int]:
    """Token ids that end chat generation: END_OF_TURN (and EOS, in case a base model writes one)."""
    return [enc.encode_single_token(END_OF_TURN), enc.encode_single_token(EOS)]


def parse_reply(enc: tiktoken.Encoding, completion_ids: list[int]) -> dict:
    """The sections of a generated reply: {"thinking", "action", "response": text or None when absent,
    "ended": whether END_OF_TURN was written}. Lenient with malformed output: a section runs until any other
    special token, and text outside a section is dropped (writing the format is part of what SFT teaches)."""
    tok = enc.encode_single_token
    section_of = {tok(START_THINKING): "thinking", tok(START_ACTION): "action",
                  tok(START_RESPONSE): "response"}
    special_ids, end_of_turn = {tok(token) for token in SPECIAL_TOKENS}, tok(END_OF_TURN)
    sections, current, ended = {"thinking": None, "action": None, "response": None}, None, False
    for token in completion_ids:
        if token == end_of_turn:
            ended = True
            break
        if token in section_of:
            current = section_of[token]
            sections[current] = []
        elif token in special_ids:
            current = None
        elif current:
            sections[current].append(token)
    return {name: None if ids is None else enc.decode(ids)
            for name, ids in sections.items()} | {"ended": ended}


# ----------------------------------------------------------------------------------------------------------
# Token shards for pretraining

def token_dtype(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16 if n_vocab <= 2**16 else np.uint32)


def write_shard(enc: tiktoken.Encoding, texts: list[str], path) -> int:
    """Tokenize documents into `path` (<BOS_TOKEN> text <EOS_TOKEN> each, back to back) and its sidecar
    `path`.json; both are written to a temporary file first, then renamed. Returns the number of tokens."""
    path, dtype = Path(path), token_dtype(enc.n_vocab)
    bos, eos = enc.encode_single_token(BOS), enc.encode_single_token(EOS)
    partial_bin, partial_json = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".json.tmp")
    n_tokens = 0
    with open(partial_bin, "wb") as file:
        for start in range(0, len(texts), 1024):
            documents = [[bos, *ids, eos] for ids in enc.encode_ordinary_batch(texts[start:start + 1024])]
            tokens = np.fromiter((t for document in documents for t in document), dtype=dtype)
            tokens.tofile(file)
            n_tokens += tokens.size
    sidecar = {"dtype": dtype.name, "n_vocab": enc.n_vocab, "tokenizer": enc.name, "n_tokens": n_tokens,
               "n_documents": len(texts)}
    partial_json.write_text(json.dumps(sidecar, indent=1) + "\n")
    os.replace(partial_bin, path)
    os.replace(partial_json, path.with_name(path.name + ".json"))
    return n_tokens


def open_shard(path, enc: tiktoken.Encoding) -> np.memmap:
    """The tokens of a shard, memory-mapped, after checking it was written for `enc`: right dtype for its
    vocabulary, same tokenizer, and a file size that matches the sidecar."""
    path = Path(path)
    sidecar_path = path.with_name(path.name + ".json")
    if not sidecar_path.is_file():
        raise FileNotFoundError(f"{path}: no sidecar {sidecar_path}; "
                                f"write shards with: python data.py shards")
    sidecar = json.loads(sidecar_path.read_text())
    needed = token_dtype(enc.n_vocab)
    if sidecar["dtype"] != needed.name:
        raise ValueError(f"{path}: shard of the wrong dtype: {sidecar['dtype']}, but the tokenizer "
                         f"{enc.name} ({enc.n_vocab} tokens) needs {needed.name}")
    if sidecar["tokenizer"] != enc.name:
        raise ValueError(f"{path}: written with tokenizer {sidecar['tokenizer']}, not {enc.name}; "
                         f"rewrite it with: python data.py shards")
    if sidecar["n_tokens"] == 0:
        raise ValueError(f"{path}: the shard is empty (its text file had no documents)")
    if os.path.getsize(path) != sidecar["n_tokens"] * needed.itemsize:
        raise ValueError(f"{path}: {os.path.getsize(path)} bytes, but its sidecar says {sidecar['n_tokens']} "
                         f"{needed.name} tokens; the shard is truncated or not this sidecar's")
    return np.memmap(path, dtype=needed, mode="r")


@lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The seeded order in which epoch `epoch` visits n items (shard windows, or records)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def record_indices(n: int, step: int, batch_size: int, seed: int = 0, rank: int = 0,
                   world_size: int = 1) -> list[int]:
    """Indices of the n records in batch `step` of this rank: each epoch visits them in a fresh seeded order
    and the ranks take consecutive slices. A pure function of its arguments, so resuming at a step is
    exact."""
    indices = []
    for i in range(batch_size):
        epoch, index = divmod((step * world_size + rank) * batch_size + i, n)
        indices.append(int(epoch_order(seed, epoch, n)[index]))
    return indices


def shard_batch(enc: tiktoken.Encoding, shard: np.ndarray, step: int, batch_size: int, seq_len: int,
                seed: int = 0, rank: int = 0, world_size: int = 1) -> dict:
    """Batch number `step` of this rank: `batch_size` rows of `seq_len` tokens from a seeded pass over
    `shard`.

    The shard is cut into windows of seq_len + 1 tokens overlapping by one (every token is a target once per
    epoch); each epoch visits them in a fresh seeded order, and the world's ranks take consecutive slices
    of it. A pure function of its arguments: to resume exactly, save the step (`{"step": step}`) and call
    again. Documents may straddle rows; positions restart at the row start for such a piece, which changes
    nothing, since RoPE sees only differences of positions and the full-attention layers have none.
    """
    n_windows = (len(shard) - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"shard of {len(shard)} tokens is shorter than one row of {seq_len} + 1")
    rows = []
    for row in range(batch_size):
        epoch, index = divmod((step * world_size + rank) * batch_size + row, n_windows)
        start = int(epoch_order(seed, epoch, n_windows)[index]) * seq_len
        rows.append(shard[start:start + seq_len + 1])
    window = torch.from_numpy(np.stack(rows).astype(np.int64))
    tokens, targets = window[:, :-1], window[:, 1:].clone()
    bos = enc.encode_single_token(BOS)
    targets[targets == bos] = IGNORE  # a document's first token cannot be predicted from the one before it
    starts = tokens == bos
    starts[:, 0] = True
    index = torch.arange(seq_len).expand_as(tokens)
    positions = index - torch.where(starts, index, 0).cummax(dim=1).values
    return {"tokens": tokens, "targets": targets, "doc_ids": starts.cumsum(dim=1) - 1, "positions": positions}


# ----------------------------------------------------------------------------------------------------------
# Packed batches for the chat stages

def pack(enc: tiktoken.Encoding, sequences: list[tuple[list[int], list[int]]], seq_len: int) -> dict:
    """Pack (ids, loss_mask) sequences, whole, into as many rows of `seq_len` as needed (first fit).

    doc_ids[r, t] is the index in `sequences` of the sequence at that place (-1 on padding), so per-sequence
    sums of token log-probs are `index_add_` over doc_ids; last[i] is the flat index (r * seq_len + t) of
    sequence i's last token, where the reward model reads its score. targets are IGNORE where the mask of the
    predicted token is 0, and on each sequence's last token (nothing follows it in its document).
    """
    rows, room = [], []  # rows[r]: indices of the sequences in row r; room[r]: tokens still free in it
    for i, (ids, _) in enumerate(sequences):
        if len(ids) > seq_len:
            raise ValueError(f"sequence {i} has {len(ids)} tokens, more than seq_len {seq_len}: "
                             f"raise --seq-len or leave it out")
        r = next((r for r, free in enumerate(room) if free >= len(ids)), len(rows))
        if r == len(rows):
            rows.append([])
            room.append(seq_len)
        rows[r].append(i)
        room[r] -= len(ids)
    shape = (len(rows), seq_len)
    tokens = torch.full(shape, enc.encode_single_token(PAD))
    targets, doc_ids = torch.full(shape, IGNORE), torch.full(shape, -1)
    positions, last = torch.zeros(shape, dtype=torch.long), torch.zeros(len(sequences), dtype=torch.long)
    for r, members in enumerate(rows):
        t = 0
        for i in members:
            ids, mask = torch.tensor(sequences[i][0]), torch.tensor(sequences[i][1])
            n = len(ids)
            tokens[r, t:t + n] = ids
            targets[r, t:t + n - 1] = torch.where(mask[1:] == 1, ids[1:], IGNORE)
            doc_ids[r, t:t + n] = i
            positions[r, t:t + n] = torch.arange(n)
            last[i] = r * seq_len + t + n - 1
            t += n
    return {"tokens": tokens, "targets": targets, "doc_ids": doc_ids, "positions": positions, "last": last}


def sft_batch(enc: tiktoken.Encoding, records: list[dict], seq_len: int) -> dict:
    """Conversations (sft records) packed into rows; loss on the chatbot turns only."""
    return pack(enc, [render(enc, record["messages"]) for record in records], seq_len)


def pair_batch(enc: tiktoken.Encoding, records: list[dict], seq_len: int) -> dict:
    """Preference pairs packed into rows: sequence 2i is pair i's prompt + chosen, 2i + 1 its prompt +
    rejected, loss mask on the completions; plus "labels" [n_pairs], the soft P(chosen preferred)."""
    sequences = [prompt_completion_sequence(*render_completion(enc, record["messages"], record[side]))
                 for record in records for side in ("chosen", "rejected")]
    return pack(enc, sequences, seq_len) | {"labels": torch.tensor([float(r["label"]) for r in records])}


def group_batch(enc: tiktoken.Encoding, records: list[dict], seq_len: int) -> dict:
    """Groups of k scored completions packed into rows: sequence i * k + j is prompt i + completion j; plus
    "rewards" [n_prompts, k]. Every record of one batch must have the same k."""
    k = len(records[0]["completions"])
    for i, record in enumerate(records):
        if len(record["completions"]) != k:
            raise ValueError(f"group {i} has {len(record['completions'])} completions, group 0 has {k}: "
                             f"one batch needs one k")
    sequences = [prompt_completion_sequence(*render_completion(enc, record["messages"], completion))
                 for record in records for completion in record["completions"]]
    rewards = torch.tensor([[float(r) for r in record["rewards"]] for record in records])
    return pack(enc, sequences, seq_len) | {"rewards": rewards}


# ----------------------------------------------------------------------------------------------------------
# Command line

def main():
    parser = argparse.ArgumentParser(description="Train the tokenizer, or write token shards.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", default="data/tiny",
                        help="folder of the text JSONL files; outputs go there")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("tokenizer", parents=[common], help="train a BPE: writes DATA/tokenizer.json")
    train.add_argument("--files", nargs="+", default=["corpus.jsonl"], help="text JSONL files to train on")
    train.add_argument("--vocab-size", type=int, default=4096, help="256 bytes + merges + 16 special tokens")
    shards = commands.add_parser("shards", parents=[common],
                                 help="tokenize each X.jsonl into X.bin + X.bin.json")
    shards.add_argument("--files", nargs="+", default=["corpus.jsonl", "corpus_long.jsonl", "val.jsonl"])
    shards.add_argument("--tokenizer", help="tokenizer file or tiktoken name (default: DATA/tokenizer.json)")
    args = parser.parse_args()
    data = Path(args.data)
    texts_of = {name: [record["text"] for record in read_jsonl(data / name, "text")] for name in args.files}

    if args.command == "tokenizer":
        texts = [text for name in args.files for text in texts_of[name]]
        n_bytes = sum(len(text.encode("utf-8")) for text in texts)
        started = time.perf_counter()
        ranks = train_bpe(texts, args.vocab_size)
        seconds = time.perf_counter() - started
        save_tokenizer(data / "tokenizer.json", ranks)
        enc = load_tokenizer(str(data / "tokenizer.json"))
        print(f"trained a {enc.n_vocab}-token BPE ({len(ranks) - 256} merges) on {n_bytes / 1e6:.2f} MB of "
              f"{', '.join(args.files)} in {seconds:.1f} s: {bytes_per_token(enc, texts):.2f} bytes/token; "
              f"wrote {data / 'tokenizer.json'}")
    else:
        enc = load_tokenizer(args.tokenizer or str(data / "tokenizer.json"))
        for name, texts in texts_of.items():
            path = data / (Path(name).stem + ".bin")
            n_tokens = write_shard(enc, texts, path)
            print(f"{path}: {len(texts)} documents, {n_tokens} tokens ({token_dtype(enc.n_vocab).name}), "
                  f"{bytes_per_token(enc, texts):.2f} bytes/token")


if __name__ == "__main__":
    main()
