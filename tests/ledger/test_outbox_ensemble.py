"""An ensemble request's records: ids derived as Solidity would, tokens shared by weight exactly."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from eth_utils import keccak
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.outbox import OutboxError, billed_weights, component_request_id, ensemble_usage, split_by_weight

RID = "0x" + "ab" * 32


def test_component_ids_are_keccak_of_id_and_uint256_index():
    want = "0x" + keccak(bytes.fromhex("ab" * 32) + (1).to_bytes(32, "big")).hex()
    assert component_request_id(RID, 1) == want
    assert len({component_request_id(RID, i) for i in range(4)} | {RID}) == 5
    with pytest.raises(OutboxError):
        component_request_id("0x12", 0)


def test_split_is_largest_remainder():
    assert split_by_weight(10, [0.7, 0.3]) == [7, 3]
    assert split_by_weight(9, [0.7, 0.3]) == [6, 3]  # 6.3 + 2.7: the .7 remainder gets the unit
    assert split_by_weight(3, [0.5, 0.5]) == [2, 1]  # a tie: the earlier weight
    assert split_by_weight(0, [1, 2]) == [0, 0]
    with pytest.raises(OutboxError):
        split_by_weight(5, [1, 0])


def test_weights_summing_to_less_than_one_bill_every_token():
    # at 1e-6 each the node serves the base model's answer: billed as given, both records held 0 tokens
    assert split_by_weight(5, [1e-6, 1e-6]) == [3, 2]
    assert split_by_weight(10, [0.25, 0.25]) == [5, 5]
    assert split_by_weight(12, [0.1, 0.3]) == [3, 9]
    assert sum(split_by_weight(7, [0.999, 0.0005])) == 7
    assert billed_weights([Fraction(1, 4), Fraction(1, 4)]) == [Fraction(1, 2), Fraction(1, 2)]
    assert billed_weights([Fraction(1), Fraction(2)]) == [1, 2]  # 1 or more: as given


def test_each_adapter_is_billed_at_the_weight_the_node_applies_it():
    # the node adds each adapter's change times its weight, not normalised: [1, 1] is both adapters whole,
    # and each is billed every token
    assert split_by_weight(10, [1, 1]) == [10, 10]
    assert split_by_weight(10, [2, 0.5]) == [20, 5]
    # a paid adapter at weight 1 beside free do-nothing adapters at weight 8 answers as it does alone; split
    # in proportion (normalised) it was billed 1/25 of the tokens, and 0 on a short request
    assert split_by_weight(40, [1, 8, 8, 8]) == [40, 320, 320, 320]
    assert split_by_weight(2, [1, 8, 8, 8])[0] == 2
    # each share is its own quota rounded (184 exactly here), not a share of the rounded total (185)
    assert split_by_weight(23, [0.1, 0.1, 0.3, 8.0])[3] == 184


@settings(deadline=None)  # a loaded CI box may take longer than Hypothesis's 200 ms for one example
@given(
    st.integers(0, 2**64 - 1),
    st.lists(st.floats(min_value=1e-6, max_value=8, allow_nan=False, allow_infinity=False), min_size=2, max_size=4),
)
def test_shares_are_each_quota_rounded_and_sum_to_the_weighted_total(total, weights):
    shares = split_by_weight(total, weights)
    whole = sum(Fraction(w) for w in weights)
    scale = max(1, 1 / whole)  # weights summing to less than 1 are billed as if they summed to 1
    assert sum(shares) == math.floor(total * whole * scale + Fraction(1, 2))  # the billed total to the nearest unit
    assert sum(shares) >= total  # every token served is billed
    for s, w in zip(shares, weights):
        q = total * Fraction(w) * scale
        assert q - 1 < s < q + 1


def test_ensemble_usage_splits_every_count():
    usage = dict(request_id=RID, adapter_id="0x" + "ee" * 32, prompt_tokens=11, completion_tokens=5)
    usage |= dict(node_prompt_tokens=11, node_completion_tokens=None, node_id="0x" + "01" * 32)
    a, b = "0x" + "0a" * 32, "0x" + "0b" * 32
    out = ensemble_usage(usage, [(a, 1.0), (b, 3.0)])
    assert [o["adapter_id"] for o in out] == [a, b]
    assert [o["request_id"] for o in out] == [component_request_id(RID, 0), component_request_id(RID, 1)]
    assert [o["prompt_tokens"] for o in out] == [11, 33] and [o["completion_tokens"] for o in out] == [5, 15]
    assert [o["node_prompt_tokens"] for o in out] == [11, 33]
    assert [o["node_completion_tokens"] for o in out] == [None] * 2
