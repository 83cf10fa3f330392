"""`loramesh demo`: the whole network on this machine, from a tiny base model to attributed, settled answers.

Read it top to bottom in run.py (`run_demo`), which calls, in order:
- stages.py: what is built before any process starts (base model, identities, trained and signed adapters);
- network.py: the real processes (a fresh devnet, published adapters, two p2p nodes, the gateway);
- checks.py: the traffic through the OpenAI client and the proof that every request was settled on chain once.
"""
