"""The demo's training data: every question taught both ways, so the demo can check both endpoints."""

from devnet.demo.stages import data_file, read_questions


def test_every_demo_question_has_a_completion_and_a_chat_answer():
    capitals = read_questions(data_file("capitals.jsonl"))
    q = capitals[0]
    assert (q.prompt, q.completion, q.chat) == ("What is the capital of France?", " Paris.", "Paris.")
    systems = set()
    for name in ("capitals.jsonl", "elements.jsonl", "opposites.jsonl"):
        questions = read_questions(data_file(name))
        assert len(questions) == 4
        # the chat answer is the completion's without the space that follows a completion prompt, with or
        # without the system prompt
        assert all(q.chat == q.completion.strip() == q.system_chat for q in questions)
        systems |= {q.system for q in questions}
    # one long system prompt shared by every adapter's data: the demo's prefix-cache traffic
    assert len(systems) == 1 and len(systems.pop()) > 200
