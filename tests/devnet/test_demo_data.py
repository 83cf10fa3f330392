"""The demo's training data: every question taught both ways, so the demo can check both endpoints."""

from devnet.demo.stages import Question, data_file, read_questions


def test_every_demo_question_has_a_completion_and_a_chat_answer():
    capitals = read_questions(data_file("capitals.jsonl"))
    assert capitals[0] == Question("What is the capital of France?", " Paris.", "Paris.")
    for name in ("capitals.jsonl", "elements.jsonl"):
        questions = read_questions(data_file(name))
        assert len(questions) == 4
        # the chat answer is the completion's without the space that follows a completion prompt
        assert all(q.chat == q.completion.strip() for q in questions)
