"""The data every stage reads: JSONL records, one JSON object per line, of five kinds (extra keys such as
"capability" are allowed):
  text    {"text": str}                                           pretraining documents
  sft     {"messages": [...]}, with at least one chatbot message   the loss is on the chatbot turns
  pair    {"messages", "chosen", "rejected", "label"}              label = P(chosen preferred), in [0.5, 1]
  group   {"messages", "completions": [k >= 2], "rewards": [k]}    offline CoPG
  prompt  {"messages", "task": str, "check": {...}}                graded by verifiers.grade
A message is {"role": system|user|chatbot|tool, "content": str}; a chatbot message may add "thinking": str
and "tool_calls": [{"tool_name": str, "parameters": {...}}]. A prompt's messages end with a user or tool
message; a completion is the response text or a whole chatbot message. `read_jsonl` checks every record of a
file with its kind's checker and stops at the first bad line, naming its file, line and what is wrong;
`read_sft_data` reads one SFT set or all of them.
"""
import json
import math
from pathlib import Path

ROLES = ("system", "user", "chatbot", "tool")


def read_jsonl(path, kind: str) -> list[dict]:
    """All records of a JSONL file of `kind` ("text", "sft", "pair", "group" or "prompt"), each checked.
    Blank lines are skipped; a malformed line raises ValueError("path:line: what is wrong")."""
    check = RECORD_CHECKS[kind]
    records = []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
                check(record)
            except ValueError as error:  # json.JSONDecodeError is a ValueError too
                raise ValueError(f"{path}:{line_number}: {error}") from None
            records.append(record)
    return records


def read_sft_data(data, name: str) -> list[dict]:
    """The conversations of the SFT JSONL DATA/NAME, or, for NAME "all", of every DATA/sft/*.jsonl: a mixed
    set that keeps every capability in view while a stage trains on one (`prefopt.py --sft-data all`)."""
    paths = sorted((Path(data) / "sft").glob("*.jsonl")) if name == "all" else [Path(data) / name]
    return [record for path in paths for record in read_jsonl(path, "sft")]


def _field(obj: dict, key: str, expected_type, where: str):
    if key not in obj:
        raise ValueError(f"{where}: missing key {key!r}")
    if not isinstance(obj[key], expected_type):
        raise ValueError(f"{where}: {key!r} must be {expected_type.__name__}, got {type(obj[key]).__name__}")
    return obj[key]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_message(message, where: str):
    if not isinstance(message, dict):
        raise ValueError(f"{where}: a message must be an object, got {type(message).__name__}")
    role = _field(message, "role", str, where)
    if role not in ROLES:
        raise ValueError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    _field(message, "content", str, where)
    allowed = {"role", "content", "thinking", "tool_calls"} if role == "chatbot" else {"role", "content"}
    if set(message) - allowed:
        raise ValueError(f"{where}: unexpected key(s) {sorted(set(message) - allowed)} in a {role} message")
    if "thinking" in message:
        _field(message, "thinking", str, where)
    if "tool_calls" in message:
        for j, call in enumerate(_field(message, "tool_calls", list, where)):
            if not isinstance(call, dict) or set(call) != {"tool_name", "parameters"}:
                raise ValueError(f'{where}.tool_calls[{j}]: must be '
                                 f'{{"tool_name": ..., "parameters": {{...}}}}')
            _field(call, "tool_name", str, f"{where}.tool_calls[{j}]")
            _field(call, "parameters", dict, f"{where}.tool_calls[{j}]")


def check_messages(record: dict, is_prompt: bool):
    messages = _field(record, "messages", list, "record")
    if not messages:
        raise ValueError("'messages' is empty")
    for i, message in enumerate(messages):
        check_message(message, f"messages[{i}]")
    if is_prompt and messages[-1]["role"] not in ("user", "tool"):
        raise ValueError(f"a prompt must end with a user or tool message, not {messages[-1]['role']}")
    if not is_prompt and all(message["role"] != "chatbot" for message in messages):
        raise ValueError("no chatbot message: nothing to learn from")


def check_completion(completion, where: str):
    """A completion is the response text, or a whole chatbot message (with thinking or tool calls)."""
    if isinstance(completion, str):
        return
    if not isinstance(completion, dict) or completion.get("role") != "chatbot":
        raise ValueError(f"{where}: a completion must be a string or a chatbot message, "
                         f"got {completion!r:.60}")
    check_message(completion, where)


def check_pair(record: dict):
    check_messages(record, is_prompt=True)
    check_completion(_field(record, "chosen", object, "record"), "chosen")
    check_completion(_field(record, "rejected", object, "record"), "rejected")
    label = _field(record, "label", object, "record")
    if not _is_number(label) or not 0.5 <= label <= 1.0:
        raise ValueError(f"'label' must be a number in [0.5, 1.0] (P(chosen preferred)), got {label!r}")


def check_group(record: dict):
    check_messages(record, is_prompt=True)
    completions = _field(record, "completions", list, "record")
    rewards = _field(record, "rewards", list, "record")
    if len(completions) < 2:
        raise ValueError(f"a group needs at least 2 completions, got {len(completions)}")
    if len(completions) != len(rewards):
        raise ValueError(f"{len(completions)} completions but {len(rewards)} rewards")
    for i, (completion, reward) in enumerate(zip(completions, rewards)):
        check_completion(completion, f"completions[{i}]")
        if not _is_number(reward):
            raise ValueError(f"rewards[{i}] must be a finite number, got {reward!r}")


def check_prompt(record: dict):
    check_messages(record, is_prompt=True)
    _field(record, "task", str, "record")
    _field(record, "check", dict, "record")


RECORD_CHECKS = {"text": lambda record: _field(record, "text", str, "record"),
                 "sft": lambda record: check_messages(record, is_prompt=False),
                 "pair": check_pair, "group": check_group, "prompt": check_prompt}
