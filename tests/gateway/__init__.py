# The name of the session's tiny base (tests/conftest.py: make_base(..., seed=0)), as its folder records it: the
# name a gateway configured with it (--base) serves it under; a node's heartbeat names no base
# (tests/gateway/test_resolve.py checks this constant against the folder).
TINY = "tiny-llama-h128-l2-s0"
