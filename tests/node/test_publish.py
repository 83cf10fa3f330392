"""Publishing against a real anvil: register once, no-op on repeat, versions name predecessors."""

import pytest

from ledger.types import ZERO_ID
from node.adapters import make_dataset_share, pack_adapter
from node.publish import PublishError, publish
from tests.utils.factories import make_peft_adapter


@pytest.fixture(scope="module")
def peft(tiny_base, tmp_path_factory):
    return make_peft_adapter(tiny_base, tmp_path_factory.mktemp("peft") / "a", rank=2)


def test_publish_registers_datasets_and_adapter_once(anvil_chain, tiny_base, peft, tmp_path):
    owner, contributor = anvil_chain.users[2], anvil_chain.new_account()
    share = make_dataset_share("pub-data", contributor.address, 3000)
    pkg = pack_adapter(peft, tmp_path / "v1", name="pub/one", account=owner, base_dir=tiny_base, datasets=[share],
                       price_per_1k_tokens=7)
    client = anvil_chain.client(owner)
    first = publish(pkg.path, client, dataset_hashes={"pub-data": "0x" + "ab" * 32})
    assert first.registered and first.datasets_registered == ["pub-data"]
    info = client.get_adapter(pkg.adapter_id)
    assert (info.owner, info.name, info.price_per_1k_tokens) == (owner.address, "pub/one", 7)
    assert info.base_model == pkg.manifest.base_model.id and info.predecessor == ZERO_ID
    assert info.dataset_ids == (share.id,) and info.shares_bps == (3000,)
    ds = client.get_dataset(share.id)
    assert (ds.payee, ds.content_hash) == (contributor.address, "0x" + "ab" * 32)

    again = publish(pkg.path, client)
    assert not again.registered and again.datasets_registered == []

    v2 = pack_adapter(peft, tmp_path / "v2", name="pub/one", account=owner, base_dir=tiny_base, datasets=[share],
                      price_per_1k_tokens=9, version="2", predecessor=pkg.adapter_id)
    assert publish(v2.path, client).registered
    assert client.get_adapter(v2.adapter_id).predecessor == pkg.adapter_id


def test_publish_refuses_a_key_that_did_not_sign(anvil_chain, tiny_base, peft, tmp_path):
    pkg = pack_adapter(peft, tmp_path / "p", name="pub/two", account=anvil_chain.users[3], base_dir=tiny_base)
    with pytest.raises(PublishError, match="package is signed by 0x[0-9a-fA-F]+, but the key given is"):
        publish(pkg.path, anvil_chain.client(anvil_chain.users[4]))


def test_publish_refuses_a_tampered_package(anvil_chain, tiny_base, peft, tmp_path):
    pkg = pack_adapter(peft, tmp_path / "p", name="pub/three", account=anvil_chain.users[3], base_dir=tiny_base)
    (pkg.path / "README.md").chmod(0o644)
    (pkg.path / "README.md").write_text("changed")
    with pytest.raises(PublishError, match="package refused before publishing: file 'README.md' is 7 bytes"):
        publish(pkg.path, anvil_chain.client(anvil_chain.users[3]))
