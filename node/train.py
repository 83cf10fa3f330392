"""Train a PEFT LoRA adapter on a few examples: CPU, seconds, on a tiny base.

Data is JSON Lines; each line is one of
- a completion row, `{"prompt": ..., "completion": ...}`: the prompt is encoded as the completions endpoint
  encodes it (`completion_ids`: the tokenizer's BOS first), then the completion and EOS are learnt;
- a chat row, `{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}` (OpenAI's
  fine-tuning shape): every assistant message is learnt as the answer to the chat before it, rendered by the
  base's chat template exactly as the gateway renders a chat request (`chat_ids`: the template writes BOS and
  opens the assistant turn), followed by EOS, which ends the answer when served. An assistant message with
  `"weight": 0` is context only (as in OpenAI's format). Earlier assistant turns appear in later prompts as the
  template renders them.
The loss covers the learnt answers only, so the adapter learns to answer, not to repeat its prompts. Prompt
rendering lives in node/adapters/prompts.py, shared with serving, so an adapter trains on the ids it is served.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.wire import UntrustedJSONError, parse_json
from node.adapters.prompts import NoChatTemplate, chat_ids, completion_ids, text_ids
from node.adapters.weights import LORA_TARGETS

DEFAULT_TARGETS = LORA_TARGETS  # train every projection a served adapter may target
# bounds on what a training file may hold: it is read whole, and every example is tokenised up front
MAX_DATA_BYTES = 64 * 1024 * 1024
MAX_ROWS = 100_000
MAX_TEXT_CHARS = 32_768  # a prompt, a completion or one message's content
MAX_MESSAGES = 256  # per chat row
ROLES = ("system", "user", "assistant")
COMPLETION_FIELDS = {"prompt", "completion"}
MESSAGE_FIELDS = {"role", "content", "weight"}


class TrainingDataError(ValueError):
    """A training data file that cannot be used."""


@dataclass(frozen=True, slots=True)
class CompletionRow:
    """A prompt and the completion to learn for it (one line of the file)."""

    prompt: str
    completion: str
    where: str  # "file:line", for errors found later (tokenised too long)


@dataclass(frozen=True, slots=True)
class ChatRow:
    """A chat whose assistant messages (those with weight 1) are learnt (one line of the file)."""

    messages: tuple[dict, ...]  # {"role", "content"} only: what the chat template is given
    learnt: tuple[int, ...]  # indices of the assistant messages to learn
    where: str

    def answers(self) -> list[tuple[list[dict], str]]:
        """(the chat before it, its content) for each learnt assistant message."""
        return [(list(self.messages[:i]), self.messages[i]["content"]) for i in self.learnt]


Row = CompletionRow | ChatRow


def read_examples(data_file: str | Path) -> list[Row]:
    """Read completion and chat rows from a JSONL file (either kind on any line), naming the line of any problem."""
    path = Path(data_file)
    try:
        size = path.stat().st_size
    except FileNotFoundError as e:
        raise TrainingDataError(f"training data {path} not found") from e
    if size > MAX_DATA_BYTES:
        raise TrainingDataError(f"training data {path} is {size} bytes; at most {MAX_DATA_BYTES} are read")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise TrainingDataError(f"training data {path} is not UTF-8 text: {e}") from e
    rows: list[Row] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if len(rows) == MAX_ROWS:
            raise TrainingDataError(f"{path}:{n}: more than {MAX_ROWS} rows")
        where = f"{path}:{n}"
        try:  # the one bounded parser: a file from anyone may nest deep enough to crash json.loads
            obj = parse_json(line, max_bytes=MAX_DATA_BYTES, what=f"{where}: row")
        except UntrustedJSONError as e:
            raise TrainingDataError(str(e)) from e
        rows.append(_parse_row(obj, where))
    if not rows:
        raise TrainingDataError(f"{path} holds no training examples")
    return rows


def _parse_row(obj: object, where: str) -> Row:
    if isinstance(obj, dict) and "messages" in obj:
        return _parse_chat(obj, where)
    if not isinstance(obj, dict) or not COMPLETION_FIELDS <= obj.keys():
        raise TrainingDataError(
            f'{where}: expected a completion row {{"prompt": ..., "completion": ...}} '
            f'or a chat row {{"messages": [...]}}'
        )
    extra = sorted(obj.keys() - COMPLETION_FIELDS)
    if extra:
        raise TrainingDataError(f"{where}: completion row has unexpected field {extra[0]!r}")
    for field in ("prompt", "completion"):
        _check_text(obj[field], f"{where}: completion row's {field}")
    if not obj["completion"]:
        raise TrainingDataError(f"{where}: completion row's completion is empty")
    return CompletionRow(obj["prompt"], obj["completion"], where)


def _parse_chat(obj: dict, where: str) -> ChatRow:
    extra = sorted(obj.keys() - {"messages"})
    if extra:  # e.g. OpenAI's `tools`: not rendered in training, so refused rather than silently dropped
        raise TrainingDataError(f"{where}: chat row has unexpected field {extra[0]!r}")
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise TrainingDataError(f"{where}: chat row's messages must be a non-empty list")
    if len(messages) > MAX_MESSAGES:
        raise TrainingDataError(f"{where}: chat row has {len(messages)} messages; at most {MAX_MESSAGES}")
    clean, learnt = [], []
    for i, m in enumerate(messages):
        at = f"{where}: chat row's messages[{i}]"
        if not isinstance(m, dict):
            raise TrainingDataError(f"{at} is not an object")
        extra = sorted(m.keys() - MESSAGE_FIELDS)
        if extra:
            raise TrainingDataError(f"{at} has unexpected field {extra[0]!r} (expected role, content, weight)")
        if m.get("role") not in ROLES:
            raise TrainingDataError(f"{at}: role must be one of {', '.join(ROLES)}, not {m.get('role')!r}")
        _check_text(m.get("content"), f"{at}'s content")
        weight = m.get("weight", 1)
        if "weight" in m and (m["role"] != "assistant" or weight not in (0, 1) or isinstance(weight, bool)):
            raise TrainingDataError(f"{at}: weight is 0 or 1, and only on an assistant message")
        if m["role"] == "assistant" and weight == 1:
            if i == 0:
                raise TrainingDataError(f"{at}: an assistant message to learn needs a message before it")
            if not m["content"]:
                raise TrainingDataError(f"{at}: an assistant message to learn has empty content")
            learnt.append(i)
        clean.append({"role": m["role"], "content": m["content"]})
    if not learnt:
        raise TrainingDataError(f"{where}: chat row has no assistant message to learn")
    return ChatRow(tuple(clean), tuple(learnt), where)


def _check_text(value: object, what: str) -> None:
    if not isinstance(value, str):
        raise TrainingDataError(f"{what} must be a string")
    if len(value) > MAX_TEXT_CHARS:
        raise TrainingDataError(f"{what} has {len(value)} characters; at most {MAX_TEXT_CHARS}")


def encode_examples(tok, rows: list[Row], *, context: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Each learnt answer as (input ids, labels): the prompt's ids exactly as served, then the answer and EOS;
    labels are -100 on the prompt, so only the answer is learnt. `context`: the base's positions, if known."""
    out = []
    for row in rows:
        try:
            if isinstance(row, CompletionRow):
                pairs = [(completion_ids(tok, row.prompt), row.completion)]
            else:
                pairs = [(chat_ids(tok, before), answer) for before, answer in row.answers()]
        except NoChatTemplate as e:
            raise TrainingDataError(f"{row.where}: a chat row, but {e}: use prompt/completion rows") from e
        for prompt, answer in pairs:
            target = text_ids(tok, answer) + [tok.eos_token_id]
            if context is not None and len(prompt) + len(target) > context:
                raise TrainingDataError(
                    f"{row.where}: an example of {len(prompt) + len(target)} tokens; the base's context holds {context}"
                )
            out.append((prompt + target, [-100] * len(prompt) + target))
    return out


def train_adapter(
    base_dir: str | Path,
    data_file: str | Path,
    out_dir: str | Path,
    *,
    rank: int = 8,
    alpha: float | None = None,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    steps: int = 80,
    lr: float = 5e-3,
    batch_size: int = 32,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """Train a LoRA adapter for `base_dir` on `data_file` and save it as a standard PEFT folder in `out_dir`.
    Each step learns from `batch_size` examples (all of them when there are fewer), in a seeded order."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from node.adapters.basemodel import BaseModelError, quiet_transformers, read_config

    quiet_transformers()
    if rank < 1 or steps < 1 or batch_size < 1:
        raise ValueError(f"rank ({rank}), steps ({steps}) and batch size ({batch_size}) must be at least 1")
    rows = read_examples(data_file)
    read_config(base_dir)  # a folder, not a name: a mistyped one was looked up on the Hugging Face Hub for a minute
    torch.manual_seed(seed)
    try:
        tok = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise BaseModelError(f"{base_dir} holds no tokenizer transformers can load ({type(e).__name__})") from None
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, local_files_only=True)
    examples = encode_examples(tok, rows, context=getattr(model.config, "max_position_embeddings", None))
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    order = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    queue: list[int] = []
    for step in range(steps):
        if len(examples) <= batch_size:
            batch = examples
        else:  # each epoch in a fresh seeded order, so every example is seen once per epoch
            if len(queue) < batch_size:
                queue += torch.randperm(len(examples), generator=order).tolist()
            batch, queue = [examples[i] for i in queue[:batch_size]], queue[batch_size:]
        input_ids, attention, labels = _pad(batch, pad)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step + 1, loss.item())
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    return out


def _pad(batch: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded tensors [examples, width]: ids, attention mask (1 on real tokens), labels (-100 on padding)."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, (r, m) in enumerate(batch):
        ids[i, : len(r)] = torch.tensor(r)
        attention[i, : len(r)] = 1
        labels[i, : len(m)] = torch.tensor(m)
    return ids, attention, labels
