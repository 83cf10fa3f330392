"""The gateway's routes: the OpenAI API (openai.py) and the gateway's own (internal.py)."""
