"""Attribution records, the outbox, the chain client, settlement and rewards.

Import the module you need (ledger.types, ledger.chain, ledger.settler, ...): this package re-exports
nothing, so that `import ledger.types` (plain values) does not load web3 and SQLAlchemy with the chain
client and the settler.
"""
