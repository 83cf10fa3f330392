"""The in-process settler's status as /metrics exports it, and its cache (ledger.settler_status itself is
tested in tests/ledger)."""

import asyncio

import pytest
from sqlalchemy.exc import OperationalError

from gateway.metrics import GatewayMetrics
from gateway.settlement import InProcessSettler


class FakeSettler:
    """Stands in for ledger's Settler only in what InProcessSettler's cache reads (status(); run() is never
    started here). The real settler behind /health and /metrics is exercised in test_rogue.py."""

    def __init__(self, results):
        self.results, self.calls = list(results), 0

    def run(self, stop):  # pragma: no cover - not started
        raise AssertionError("not started in this test")

    def status(self):
        self.calls += 1
        r = self.results.pop(0)
        if isinstance(r, Exception):
            raise r
        return r


LOW = {
    "pending": 3,
    "in_flight": 2,
    "set_aside": 4,
    "disputed": 1,
    "settled": 9,
    "deposit_left_wei": 5,
    "deposit_low": True,
    "settler": "0xabc",
}


def test_metrics_export_a_low_deposit_and_record_states():
    m = GatewayMetrics()
    m.set_settlement(LOW)
    text = m.render().decode()
    assert "loramesh_gateway_settler_deposit_low 1.0" in text
    assert "loramesh_gateway_settler_deposit_left_wei 5.0" in text
    assert 'loramesh_gateway_settlement_records{state="set_aside"} 4.0' in text
    m.set_settlement({"error": "settlement status unavailable: OperationalError"})  # keeps the last values
    assert "loramesh_gateway_settler_deposit_low 1.0" in m.render().decode()


def test_status_is_cached_and_a_database_error_is_reported_not_raised(monkeypatch):
    fake = FakeSettler([LOW, OperationalError("select", {}, Exception("database is locked"))])
    view = InProcessSettler(fake)
    assert asyncio.run(view.status()) == LOW
    assert asyncio.run(view.status()) == LOW and fake.calls == 1  # within STATUS_TTL_S: not asked again
    monkeypatch.setattr("gateway.settlement.STATUS_TTL_S", 0.0)
    assert asyncio.run(view.status()) == {"error": "settlement status unavailable: OperationalError"}


def test_a_crowd_of_callers_shares_one_refresh():
    import time as _time

    class SlowSettler(FakeSettler):
        def status(self):
            _time.sleep(0.2)  # a slow chain answer
            return super().status()

    slow = SlowSettler([LOW, LOW])
    view = InProcessSettler(slow)

    async def crowd():
        return await asyncio.gather(*(view.status() for _ in range(20)))

    assert asyncio.run(crowd()) == [LOW] * 20
    assert slow.calls == 1  # one database scan and one eth_call for the whole crowd


def test_gateway_settings_reach_the_in_process_settler(tmp_path, monkeypatch):
    """settle_confirmations / settle_replace_after_s reach the Settler's config, settle_max_fee_gwei /
    settle_max_tip_gwei its chain client's fee policy (over LORAMESH_MAX_FEE_GWEI), as `loramesh settler run`'s
    own settings do; unset, the environment's caps stand."""
    from eth_account import Account

    from gateway.main import _settler
    from gateway.settings import GatewaySettings
    from ledger.chain import ChainClient
    from ledger.deployment import Deployment
    from ledger.transport import GWEI

    monkeypatch.setenv("LORAMESH_MAX_FEE_GWEI", "7")
    deployment = Deployment.from_dict(
        {
            "chain_id": 31337,
            "rpc_url": "http://127.0.0.1:9",  # never called: building a settler sends nothing
            "deploy_block": 0,
            "contracts": {"AdapterRegistry": "0x" + "11" * 20, "AttributionLedger": "0x" + "22" * 20},
        }
    )
    client = ChainClient(deployment)
    account = Account.from_key("0x" + "33" * 32)
    db = f"sqlite:///{tmp_path / 'gw.db'}"
    s = GatewaySettings(
        db_url=db,
        settle_confirmations=6,
        settle_replace_after_s=12.5,
        settle_max_fee_gwei=42.5,
        settle_max_tip_gwei=3,
    )
    settler = _settler(s, client, account).settler
    assert (settler.config.confirmations, settler.config.replace_after) == (6, 12.5)
    assert (settler.client.tx.fee_policy.max_fee, settler.client.tx.fee_policy.max_tip) == (int(42.5 * GWEI), 3 * GWEI)
    assert settler.client.address == account.address
    plain = _settler(GatewaySettings(db_url=db), client, account).settler
    assert plain.client.tx.fee_policy.max_fee == 7 * GWEI and plain.config.confirmations == 0
    with pytest.raises(ValueError, match="settle_confirmations"):
        GatewaySettings(db_url=db, settle_confirmations=5000)
