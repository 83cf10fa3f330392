"""Headless Chromium against the explorer: overview -> adapters -> an adapter -> one of its records
(real clicks), where the Merkle proof shows verified. Screenshots land in test-artifacts/."""

from pathlib import Path

import pytest

from tests.utils.browser import Browser, browser_missing

pytestmark = [pytest.mark.browser, pytest.mark.integration]

ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts"


@pytest.fixture(scope="module")
def browser():
    reason = browser_missing()
    if reason:  # `make test` installs both; a missing browser is a broken set-up, not a reason to skip
        pytest.fail(reason)
    with Browser.start(width=1280, height=1500) as b:
        yield b


def test_follow_adapter_to_record_and_see_proof_verified(browser, explorer_url, world):
    b = browser
    b.get(explorer_url + "/")
    assert b.find("#stat-records").text == str(len(world.settled) + 1)  # + one settled elsewhere
    assert len(b.find_all("svg.plot")) == 2
    # the page's inline style sheet applies under its Content-Security-Policy (the header is a flex row)
    assert b.execute("return getComputedStyle(document.querySelector('header')).display") == "flex"
    b.screenshot(ARTIFACTS / "explorer-overview.png")

    b.find('header nav a[href="/adapters"]').click()
    b.wait_for("table#adapters")
    bob = world.adapters["bob/elements 1.0.0"]
    b.find(f'table#adapters a[href="/adapters/{bob}"]').click()
    b.wait_for("table#adapter-records")
    assert b.url.endswith(f"/adapters/{bob}")

    link = b.find("table#adapter-records tbody tr:last-child a.record-link")  # the oldest: a 3-record batch
    request_id = link.attribute("title")
    assert request_id in world.settled
    link.click()
    status = b.wait_for("#proof-status")
    assert b.url.endswith(f"/records/{request_id}")
    assert status.text == "verified"
    assert "verified" in status.attribute("class").split()
    assert b.find("#signature-status").text in ("verified", "not checkable")
    shot = b.screenshot(ARTIFACTS / "explorer-record.png")
    assert shot.stat().st_size > 10_000
