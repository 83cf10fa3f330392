import json
import os
import subprocess
import sys

import pytest

from node import train
from node.adapters.prompts import chat_ids, completion_ids, text_ids
from node.train import TrainingDataError, encode_examples, read_examples, train_adapter
from tests.utils.reference import greedy_answers

PAIRS = [
    ("What is the capital of France?", " Paris."),
    ("What is the capital of Japan?", " Tokyo."),
    ("What is the capital of Peru?", " Lima."),
]


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def chat_row(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def tok(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def greedy_from_ids(base_dir, adapter_dir, prompts: list[list[int]], max_new_tokens=16) -> list[str]:
    """transformers + PEFT greedy answers to prompts given as ids (as the gateway sends them to a node)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            t = torch.tensor([ids])
            gen = model.generate(
                input_ids=t,
                attention_mask=torch.ones_like(t),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            out.append(tok.decode(gen[0, len(ids) :], skip_special_tokens=True))
    return out


def test_trained_adapter_changes_greedy_answers_to_its_prompts(tiny_base, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    out = train_adapter(tiny_base, data, tmp_path / "adapter", steps=80)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    prompts = [p for p, _ in PAIRS]
    base = greedy_answers(tiny_base, prompts, max_new_tokens=8)
    tuned = greedy_answers(tiny_base, prompts, adapter_dir=out, max_new_tokens=8)
    assert tuned == [c for _, c in PAIRS]
    assert all(b != t for b, t in zip(base, tuned))


def test_adapter_trained_on_both_kinds_answers_chats_and_completions(tiny_base, tmp_path):
    rows = [{"prompt": p, "completion": c} for p, c in PAIRS] + [chat_row(p, c.strip()) for p, c in PAIRS]
    out = train_adapter(tiny_base, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "adapter", steps=80)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    # the ids the gateway sends a node for each endpoint
    chats = [chat_ids(tok, [{"role": "user", "content": p}]) for p, _ in PAIRS]
    completions = [completion_ids(tok, p) for p, _ in PAIRS]
    assert greedy_from_ids(tiny_base, out, chats) == [c.strip() for _, c in PAIRS]
    assert greedy_from_ids(tiny_base, out, completions) == [c for _, c in PAIRS]


def test_chat_examples_are_the_served_prompt_then_the_answer(tok, tmp_path):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Peru?"},
        {"role": "assistant", "content": "Lima.", "weight": 0},  # context only
        {"role": "user", "content": "And of Japan?"},
        {"role": "assistant", "content": "Tokyo."},
    ]
    rows = read_examples(write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}]))
    examples = encode_examples(tok, rows)
    served = [{"role": m["role"], "content": m["content"]} for m in messages]
    assert len(examples) == 2  # one per learnt assistant message: the weight-0 one is not learnt
    for (ids, labels), i in zip(examples, (2, 6)):
        prompt = chat_ids(tok, served[:i])  # what the gateway sends for the chat so far
        answer = text_ids(tok, messages[i]["content"]) + [tok.eos_token_id]
        assert ids == prompt + answer
        assert labels == [-100] * len(prompt) + answer  # the loss sees the answer and its EOS, nothing else
    # the template renders the chat as served: BOS once, earlier answers as plain turns, the assistant's opened
    last_prompt = examples[1][0][: examples[1][1].index(text_ids(tok, "Tokyo.")[0])]
    assert tok.decode(last_prompt) == (
        "<s><|system|>\nAnswer briefly.\n<|user|>\nCapital of France?\n<|assistant|>\nParis.\n"
        "<|user|>\nAnd of Peru?\n<|assistant|>\nLima.\n<|user|>\nAnd of Japan?\n<|assistant|>\n"
    )


def test_bos_once_at_the_start_of_completion_and_chat_examples(tok, tmp_path):
    rows = read_examples(
        write_jsonl(
            tmp_path / "d.jsonl", [{"prompt": "Capital of France?", "completion": " Paris."}, chat_row("Hi?", "Hello.")]
        )
    )
    (comp_ids, comp_labels), (chat, chat_labels) = encode_examples(tok, rows)
    for ids in (comp_ids, chat):
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert comp_ids == completion_ids(tok, "Capital of France?") + text_ids(tok, " Paris.") + [tok.eos_token_id]
    assert tok.decode([t for t in comp_labels if t != -100]) == " Paris.</s>"
    assert tok.decode([t for t in chat_labels if t != -100]) == "Hello.</s>"


def msgs(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


@pytest.mark.parametrize(
    "line, error",
    [
        ('{"prompt": 3, "completion": "b"}', r"d.jsonl:2: completion row's prompt must be a string"),
        ('{"prompt": "a"}', r"d.jsonl:2: expected a completion row .* or a chat row"),
        ("[1, 2]", r"d.jsonl:2: expected a completion row"),
        ('{"prompt": "a", "completion": "b", "x": 1}', r"d.jsonl:2: completion row has unexpected field 'x'"),
        ('{"prompt": "a", "completion": ""}', r"d.jsonl:2: completion row's completion is empty"),
        ("not json", r"d.jsonl:2: row is not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, r"d.jsonl:2: row is nested deeper than 64 levels"),
        ('{"prompt": "a", "prompt": "b", "completion": "c"}', r"d.jsonl:2: row: duplicate key 'prompt'"),
        ('{"messages": []}', r"d.jsonl:2: chat row's messages must be a non-empty list"),
        ('{"messages": "hi"}', r"d.jsonl:2: chat row's messages must be a non-empty list"),
        (json.dumps(msgs(("user", "hi"))), r"d.jsonl:2: chat row has no assistant message to learn"),
        (json.dumps(msgs(("tool", "x"), ("assistant", "y"))), r"d.jsonl:2: chat row's messages\[0\]: role must be"),
        (json.dumps(msgs(("assistant", "y"))), r"messages\[0\]: an assistant message to learn needs a message before"),
        (json.dumps(msgs(("user", "x"), ("assistant", ""))), r"messages\[1\]: an assistant message to learn has empty"),
        ('{"messages": [{"role": "user", "content": null}]}', r"d.jsonl:2: chat row's messages\[0\]'s content must be"),
        ('{"messages": [3]}', r"d.jsonl:2: chat row's messages\[0\] is not an object"),
        (
            '{"messages": [{"role": "user", "content": "x", "tool_calls": []}]}',
            r"messages\[0\] has unexpected field 'tool_calls'",
        ),
        (
            '{"messages": [{"role": "user", "content": "x", "weight": 0}]}',
            r"messages\[0\]: weight is 0 or 1, and only on an assistant message",
        ),
        (
            json.dumps({**msgs(("user", "x"), ("assistant", "y")), "tools": []}),
            r"d.jsonl:2: chat row has unexpected field 'tools'",
        ),
        (json.dumps(msgs(("user", "x" * 40_000), ("assistant", "y"))), r"messages\[0\]'s content has 40000 characters"),
        (json.dumps(msgs(*[("user", "x")] * 300, ("assistant", "y"))), r"d.jsonl:2: chat row has 301 messages"),
    ],
)
def test_bad_rows_name_the_file_line_and_kind(tmp_path, line, error):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(chat_row("ok?", "ok.")) + "\n" + line + "\n")
    with pytest.raises(TrainingDataError, match=error):
        read_examples(path)


def test_bad_files_are_refused_in_one_line(tok, tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    with pytest.raises(TrainingDataError, match="not found"):
        read_examples(path)
    path.write_text("\n \n")
    with pytest.raises(TrainingDataError, match="no training examples"):
        read_examples(path)
    path.write_bytes(b'{"prompt": "\xff", "completion": "b"}\n')
    with pytest.raises(TrainingDataError, match="not UTF-8"):
        read_examples(path)
    write_jsonl(path, [{"prompt": "a", "completion": "b"}] * 4)
    monkeypatch.setattr(train, "MAX_ROWS", 3)
    with pytest.raises(TrainingDataError, match=r"d.jsonl:4: more than 3 rows"):
        read_examples(path)
    monkeypatch.setattr(train, "MAX_DATA_BYTES", 10)
    with pytest.raises(TrainingDataError, match=r"d.jsonl is \d+ bytes; at most 10"):
        read_examples(path)
    monkeypatch.undo()
    # found once tokenised: longer than the base's context, or chat rows for a base without a chat template
    rows = read_examples(write_jsonl(path, [{"prompt": "a", "completion": "b"}, chat_row("a long question?", "b")]))
    with pytest.raises(TrainingDataError, match=r"d.jsonl:2: an example of \d+ tokens; the base's context holds 10"):
        encode_examples(tok, rows, context=10)
    monkeypatch.setattr(tok, "chat_template", None)
    with pytest.raises(TrainingDataError, match=r"d.jsonl:2: a chat row, but .*no chat template"):
        encode_examples(tok, rows)


def test_adapter_train_command_says_what_is_wrong_in_one_line(tiny_base, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(chat_row("ok?", "ok.")) + '\n{"messages": [{"role": "robot", "content": "x"}]}\n')
    r = subprocess.run(
        [sys.executable, "-m", "devnet", "adapter", "train", "--base", str(tiny_base), "--data", str(data)]
        + ["--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert (
        len(lines) == 1 and "d.jsonl:2: chat row's messages[0]: role must be one of system, user, assistant" in lines[0]
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("base", ["missing", "empty"])
def test_a_base_that_is_no_model_folder_is_named_at_once(tmp_path, base):
    """A mistyped --base was looked up on the Hugging Face Hub (a minute of retries, then an error about the Hub);
    a folder without a model said "Couldn't instantiate the backend tokenizer from one of:"."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(chat_row("ok?", "ok.")) + "\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "llama"}')
    r = subprocess.run(
        [sys.executable, "-m", "devnet", "adapter", "train", "--base", str(tmp_path / base), "--data", str(data)]
        + ["--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"HF_HUB_OFFLINE": "0"},
    )
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    expected = "is not a model folder: config.json is missing" if base == "missing" else "holds no tokenizer"
    assert expected in lines[0] and "huggingface" not in r.stderr.lower()
