"""Deploy AdapterRegistry + AttributionLedger from the committed artifacts, fund accounts, write the file."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from eth_account import Account

from devnet.anvil import DEV_KEYS
from ledger.artifacts import load_artifact
from ledger.chain import ChainClient
from ledger.deployment import Deployment
from ledger.errors import LedgerError
from ledger.settler_config import GRACE_MARGIN_S
from ledger.transport import FeePolicy, make_web3, rpc_guard
from ledger.types import ETHER, checked_address

log = logging.getLogger(__name__)

DEFAULT_NODE_SHARE_BPS = 2_000  # node operator's cut of every fee; the rest goes to datasets and owner
# Fee per 1,000 tokens of a bare base-model request (no adapter); all of it goes to the serving node.
DEFAULT_BASE_PRICE = 10**14
MAX_BASE_PRICE = 2**128 - 1  # AttributionLedger.MAX_BASE_PRICE: with uint32 token counts no fee overflows
DEFAULT_FUND = 100 * ETHER
# Blocks a registration's commitment waits before the registration (AdapterRegistry.minCommitBlocks). 1 on
# the devnet, where anvil mines a block per transaction and none without; on a public chain more, so that a
# registration left waiting a few blocks cannot be outbid by a copier who commits meanwhile.
DEFAULT_COMMIT_BLOCKS = 1
# Seconds after a price change during which records admitted before it may still be charged down to the price
# before (AdapterRegistry.priceGraceSeconds, contracts/src/PriceGrace.sol): a day outlasts a settler's usual
# delay (seconds) and a chain outage of hours, and bounds what a settler can pay below a raised price to one day
# of the old one. At most MAX_PRICE_GRACE.
DEFAULT_PRICE_GRACE_S = 86_400
MAX_PRICE_GRACE_S = 30 * 86_400  # PriceGrace.MAX_GRACE
# A grace shorter than this helps no honest settler: it prices at a quote only while the grace outlasts the next
# block by GRACE_MARGIN_S, so a shorter one would serve only a settler paying old prices on purpose.
MIN_PRICE_GRACE_S = 2 * GRACE_MARGIN_S


def _deploy_contract(
    w3, account, chain_id: int, name: str, args: Sequence = (), *, fee_policy: FeePolicy | None = None
):
    """Deploy one compiled contract; its fees follow `fee_policy` (default: FeePolicy.from_env())."""
    art = load_artifact(name)
    contract = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
    policy = fee_policy if fee_policy is not None else FeePolicy.from_env()
    tip, max_fee = policy.fees(w3)  # FeeAboveCap before anything is sent
    tx = contract.constructor(*args).build_transaction(
        {
            "from": account.address,
            "chainId": chain_id,
            "nonce": w3.eth.get_transaction_count(account.address, "pending"),
            "maxPriorityFeePerGas": tip,
            "maxFeePerGas": max_fee,
        }
    )
    signed = account.sign_transaction(tx)
    rcpt = w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(signed.raw_transaction), timeout=60)
    if rcpt["status"] != 1:
        raise LedgerError(f"deploying {name} reverted (tx {rcpt['transactionHash'].hex()})")
    return rcpt


def check_fees(
    node_share_bps: int | None, base_price_per_1k_tokens: int | None, price_grace_s: int | None = None
) -> None:
    """ValueError for a fee setting the ledger would refuse or misread (None: not being set)."""
    if price_grace_s is not None and not (
        price_grace_s == 0 or MIN_PRICE_GRACE_S <= price_grace_s <= MAX_PRICE_GRACE_S
    ):
        raise ValueError(
            f"price_grace_s must be 0 (none) or {MIN_PRICE_GRACE_S}..{MAX_PRICE_GRACE_S} (30 days), got {price_grace_s}"
        )
    if node_share_bps is not None and not 0 <= node_share_bps <= 10_000:
        raise ValueError(f"node_share_bps must be 0..10000, got {node_share_bps}")
    if base_price_per_1k_tokens is not None and not 0 <= base_price_per_1k_tokens <= MAX_BASE_PRICE:
        raise ValueError(f"base_price_per_1k_tokens must be 0..2**128 - 1, got {base_price_per_1k_tokens}")


def deploy(
    rpc_url: str,
    *,
    deployer_key: str | bytes = DEV_KEYS[0],
    node_share_bps: int = DEFAULT_NODE_SHARE_BPS,
    base_price_per_1k_tokens: int = DEFAULT_BASE_PRICE,
    fund: Sequence[str] = (),
    fund_amount: int = DEFAULT_FUND,
    settlers: Sequence[str] = (),
    settler_deposit: int = 0,
    fee_policy: FeePolicy | None = None,
    commit_blocks: int = DEFAULT_COMMIT_BLOCKS,
    price_grace_s: int = DEFAULT_PRICE_GRACE_S,
    on_deployed: Callable[[Deployment], None] | None = None,
) -> Deployment:
    """Deploy both contracts (deployer = admin), set the base-model price, fund `fund`, grant and
    prefund `settlers`. Every transaction's fees follow `fee_policy` (default: FeePolicy.from_env()).
    `commit_blocks`: how old a registration's commitment must be before the registration. `price_grace_s`: how
    long after a price change records admitted before it may be charged the price they were admitted at.
    Every setting and address is checked (ValueError) before anything is sent. `on_deployed` gets the deployment
    as soon as both contracts are deployed, before the accounts are set up (deploy_to_file writes it then)."""
    check_fees(node_share_bps, base_price_per_1k_tokens, price_grace_s)
    for address in [*fund, *settlers]:  # a bad one found after the contracts went out lost their addresses
        checked_address(address)
    policy = fee_policy if fee_policy is not None else FeePolicy.from_env()
    account = Account.from_key(deployer_key)
    w3 = make_web3(rpc_url)
    with rpc_guard(rpc_url):
        chain_id = w3.eth.chain_id
        reg = _deploy_contract(
            w3, account, chain_id, "AdapterRegistry", (commit_blocks, price_grace_s), fee_policy=policy
        )
        led = _deploy_contract(
            w3,
            account,
            chain_id,
            "AttributionLedger",
            (reg["contractAddress"], account.address, node_share_bps, base_price_per_1k_tokens),
            fee_policy=policy,
        )
    deployment = Deployment(
        chain_id=chain_id,
        rpc_url=rpc_url,
        registry=reg["contractAddress"],
        ledger=led["contractAddress"],
        deploy_block=reg["blockNumber"],
        deployer=account.address,
        node_share_bps=node_share_bps,
        base_price_per_1k_tokens=base_price_per_1k_tokens,
        sources_sha256=load_artifact("AttributionLedger").get("sourcesSha256", ""),
    )
    if on_deployed is not None:
        on_deployed(deployment)
    client = ChainClient(deployment, account)
    client.tx.fee_policy = policy
    setup_accounts(client, fund=fund, fund_amount=fund_amount, settlers=settlers, settler_deposit=settler_deposit)
    if fund_amount > 0:  # on a chain that is not ours nothing is funded (chain deploy passes 0)
        deployment.funded = sorted({checked_address(a) for a in [*fund, *settlers]})
    # DEBUG: `devnet up` and the demo say so themselves; INFO is for what a service did
    log.debug(
        "deployed registry %s, ledger %s at block %d", deployment.registry, deployment.ledger, deployment.deploy_block
    )
    return deployment


def setup_accounts(
    client: ChainClient,
    *,
    fund: Sequence[str] = (),
    fund_amount: int = DEFAULT_FUND,
    settlers: Sequence[str] = (),
    settler_deposit: int = 0,
) -> None:
    """Fund addresses with gas money, grant settlers and prefund their fee deposit (admin client). Every address
    is checked (ValueError) before anything is sent."""
    settlers = [checked_address(s) for s in settlers]
    targets = sorted({*(checked_address(a) for a in fund), *settlers})
    if targets and fund_amount > 0:
        client.fund(targets, fund_amount)
    for s in settlers:
        client.grant_settler(s)
        if settler_deposit > 0:
            client.deposit_for(s, settler_deposit)


def deploy_to_file(rpc_url: str, path: str | Path, **kwargs) -> Deployment:
    """deploy() and write the deployment file: as soon as the contracts are deployed, so that a later step that
    fails (a settler's deposit the deployer cannot pay) leaves the file naming them; again with the accounts
    funded, where any were."""
    written: list[Deployment] = []

    def save(d: Deployment) -> None:
        d.save(path)
        written.append(d)

    try:
        deployment = deploy(rpc_url, on_deployed=save, **kwargs)
    except Exception as e:
        if not written:
            raise
        # the contracts exist and the file names them: say so, or the user deploys again over them with --force
        raise LedgerError(
            f"contracts deployed (registry {written[0].registry}, ledger {written[0].ledger}) and written to {path}, "
            f"but setting up the accounts failed: {e}"
        ) from e
    if deployment.funded:
        deployment.save(path)
    return deployment
