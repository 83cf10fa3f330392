"""Fixtures for the p2p tests: tiny signed packages and a mesh of peer processes on 127.0.0.1."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from eth_account import Account

from node.adapters import AdapterStore, VerifiedPackage
from tests.utils.factories import make_base, make_package
from tests.utils.p2p import PeerProcess


@dataclass
class Packages:
    base: Path
    owner: str
    stranger: str
    main: VerifiedPackage  # held by A; C fetches it through B
    tampered: VerifiedPackage  # F flips a byte; A holds a good copy
    stalled: VerifiedPackage  # F goes silent mid-file; A holds a good copy
    dropped: VerifiedPackage  # F resets the stream mid-file; A holds a good copy
    oversized: VerifiedPackage  # F announces a 64 MiB frame; nobody else holds it
    foreign: VerifiedPackage  # F holds a copy signed by a stranger, not the registered owner
    late: VerifiedPackage  # F says it does not hold it, after a wait; A holds it


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> Packages:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("pkgs")
    # one layer, hidden 64: the transfer tests need real signed packages, not a big model
    base = make_base(work / "base", hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4, num_kv_heads=2)
    owner, stranger = Account.create(), Account.create()
    made = {
        name: make_package(base, work / name, account=owner, name=name, seed=i)
        for i, name in enumerate(["main", "tampered", "stalled", "dropped", "oversized", "late"])
    }
    foreign = make_package(base, work / "foreign", account=stranger, name="foreign", seed=99)
    torch.set_num_threads(threads)  # as found: later modules' engines would run on one thread otherwise
    return Packages(base=base, owner=owner.address, stranger=stranger.address, foreign=foreign, **made)


@dataclass
class Mesh:
    a: PeerProcess
    b: PeerProcess
    f: PeerProcess
    c: PeerProcess
    c_store: Path
    owners: Path


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, packages: Packages):
    """A (honest, holds packages) <- B (bootstrap relay) <- C (fetcher); F misbehaves per adapter."""
    work = tmp_path_factory.mktemp("mesh")
    p = packages
    owners = work / "owners.json"  # stand-in for the chain registry: adapter id -> owner address
    owners.write_text(
        json.dumps(
            {
                pkg.adapter_id: p.owner
                for pkg in (p.main, p.tampered, p.stalled, p.dropped, p.oversized, p.foreign, p.late)
            }
        )
    )
    faults = work / "faults.json"
    faults.write_text(
        json.dumps(
            {
                p.tampered.adapter_id: "tamper",
                p.stalled.adapter_id: "stall",
                p.dropped.adapter_id: "drop",
                p.oversized.adapter_id: "oversize",
                p.late.adapter_id: "late_not_held",
            }
        )
    )
    store_a, store_f = AdapterStore(work / "a"), AdapterStore(work / "f")
    for pkg in (p.main, p.tampered, p.stalled, p.dropped, p.late):
        store_a.install(pkg.path)
    for pkg in (p.tampered, p.stalled, p.dropped, p.oversized, p.foreign, p.late):
        store_f.install(pkg.path)
    started: list[PeerProcess] = []
    try:
        kw = dict(owners=owners, base=p.base)
        a = PeerProcess(store=work / "a", log_path=work / "a.log", **kw)
        started.append(a)
        b = PeerProcess(store=work / "b", bootstrap=a.addrs, log_path=work / "b.log", **kw)
        started.append(b)
        f = PeerProcess(store=work / "f", bootstrap=b.addrs, faults=faults, log_path=work / "f.log", **kw)
        started.append(f)
        c = PeerProcess(store=work / "c", bootstrap=b.addrs, log_path=work / "c.log", **kw)
        started.append(c)
        yield Mesh(a=a, b=b, f=f, c=c, c_store=work / "c", owners=owners)
    finally:
        for proc in reversed(started):
            proc.stop()
