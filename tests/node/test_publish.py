"""Publishing against a real anvil: signed for the chain, register once, no-op on repeat, versions name
predecessors, names belong to their first publisher, dataset shares go to their contributors."""

import json

import pytest

from common.wire import ZERO_ID
from node.adapters import make_dataset_share, pack_adapter, verify_package
from node.adapters.signing import read_signature
from node.publish import PublishError, publish
from tests.utils.factories import make_peft_adapter


@pytest.fixture(scope="module")
def peft(tiny_base, tmp_path_factory):
    return make_peft_adapter(tiny_base, tmp_path_factory.mktemp("peft") / "a", rank=2)


def test_publish_registers_datasets_and_adapter_once(anvil_chain, tiny_base, peft, tmp_path):
    owner, contributor = anvil_chain.users[2], anvil_chain.new_account()
    # another's dataset: theirs to register
    anvil_chain.client(contributor).register_dataset("pub-data", "0x" + "cd" * 32)
    theirs = make_dataset_share("pub-data", contributor.address, 3000)
    mine = make_dataset_share("pub-own", owner.address, 1000)
    pkg = pack_adapter(
        peft,
        tmp_path / "v1",
        name="pub/one",
        account=owner,
        base_dir=tiny_base,
        datasets=[theirs, mine],
        price_per_1k_tokens=7,
    )
    assert pkg.domain is None  # packed offline: publish signs it for the chain
    client = anvil_chain.client(owner)
    first = publish(pkg.path, client, dataset_hashes={"pub-own": "0x" + "ab" * 32})
    assert first.registered and first.signed and first.datasets_registered == ["pub-own"]
    signed = verify_package(pkg.path, domain=client.domain)
    assert signed.adapter_id == pkg.adapter_id and signed.signer == owner.address
    assert read_signature(pkg.path)["chain_id"] == anvil_chain.deployment.chain_id
    info = client.get_adapter(pkg.adapter_id)
    assert (info.owner, info.publisher, info.name, info.price_per_1k_tokens) == (
        owner.address,
        owner.address,
        "pub/one",
        7,
    )
    assert info.base_model == pkg.manifest.base_model.id and info.predecessor == ZERO_ID
    assert info.dataset_ids == (theirs.id, mine.id) and info.shares_bps == (3000, 1000)
    assert (client.get_dataset(theirs.id).payee, client.get_dataset(mine.id).payee) == (
        contributor.address,
        owner.address,
    )
    assert client.get_dataset(mine.id).content_hash == "0x" + "ab" * 32

    again = publish(pkg.path, client)
    assert not again.registered and not again.signed and again.datasets_registered == []

    v2 = pack_adapter(
        peft,
        tmp_path / "v2",
        name="pub/one",
        account=owner,
        base_dir=tiny_base,
        datasets=[theirs],
        price_per_1k_tokens=9,
        version="2",
        predecessor=pkg.adapter_id,
        domain=client.domain,
    )
    result = publish(v2.path, client)
    assert result.registered and not result.signed  # packed for this deployment already
    assert client.get_adapter(v2.adapter_id).predecessor == pkg.adapter_id

    v3 = pack_adapter(peft, tmp_path / "v3", name="pub/one", account=owner, base_dir=tiny_base, version="3")
    with pytest.raises(PublishError, match="name 'pub/one' already has versions: a new one names its predecessor"):
        publish(v3.path, client)


def test_publish_accepts_a_dataset_whose_contributor_moved_its_payee(anvil_chain, tiny_base, peft, tmp_path):
    """L4: a contributor who moved payouts with setDatasetPayee (its right) must not block publishing: the
    dataset id is bound to its contributor, and that is what the manifest names; settlement pays the payee."""
    owner, contributor, heir = anvil_chain.users[3], anvil_chain.new_account(), anvil_chain.new_account()
    c = anvil_chain.client(contributor)
    c.register_dataset("moved-data")
    c.set_dataset_payee(c.dataset_id("moved-data"), heir.address)
    share = make_dataset_share("moved-data", contributor.address, 2000)
    pkg = pack_adapter(peft, tmp_path / "p", name="pub/moved", account=owner, base_dir=tiny_base, datasets=[share])
    result = publish(pkg.path, anvil_chain.client(owner))
    assert result.registered and result.datasets_registered == []
    split = anvil_chain.client().registry.functions.adapterSplit(bytes.fromhex(pkg.adapter_id[2:])).call()
    assert split[3] == [heir.address]


def test_publish_refuses_a_dataset_of_another_contributor(anvil_chain, tiny_base, peft, tmp_path, monkeypatch):
    """The chain's contributor of the dataset id must be the manifest's: refused in one line, nothing registered.
    (A valid manifest cannot get there, its ids are bound to its contributors: the chain's answer is forged.)"""
    import dataclasses

    owner, contributor, other = anvil_chain.users[3], anvil_chain.new_account(), anvil_chain.new_account()
    c = anvil_chain.client(contributor)
    c.register_dataset("other-data")
    share = make_dataset_share("other-data", contributor.address, 2000)
    pkg = pack_adapter(peft, tmp_path / "p", name="pub/other", account=owner, base_dir=tiny_base, datasets=[share])
    client = anvil_chain.client(owner)
    real = client.get_dataset
    monkeypatch.setattr(client, "get_dataset", lambda d: dataclasses.replace(real(d), contributor=other.address))
    with pytest.raises(PublishError) as err:
        publish(pkg.path, client)
    message = str(err.value)
    assert "\n" not in message
    assert message == (
        f"dataset 'other-data' ({share.id}) belongs to contributor {other.address} on chain, but the "
        f"manifest names {contributor.address}: refusing to publish"
    )
    assert anvil_chain.client().name_owner("pub/other") is None


def test_publish_refuses_another_contributors_unregistered_dataset(anvil_chain, tiny_base, peft, tmp_path):
    owner, contributor = anvil_chain.users[3], anvil_chain.new_account()
    share = make_dataset_share("not-yet", contributor.address, 2000)
    pkg = pack_adapter(peft, tmp_path / "p", name="pub/early", account=owner, base_dir=tiny_base, datasets=[share])
    with pytest.raises(PublishError, match=f"dataset 'not-yet' of contributor {contributor.address} is not on chain"):
        publish(pkg.path, anvil_chain.client(owner))


def test_publish_refuses_a_name_someone_else_owns(anvil_chain, tiny_base, peft, tmp_path):
    alice, mallory = anvil_chain.users[4], anvil_chain.new_account()
    v1 = pack_adapter(peft, tmp_path / "a", name="pub/geo", account=alice, base_dir=tiny_base, price_per_1k_tokens=1)
    publish(v1.path, anvil_chain.client(alice))
    squat = pack_adapter(
        peft,
        tmp_path / "m",
        name="pub/geo",
        account=mallory,
        base_dir=tiny_base,
        version="2",
        predecessor=v1.adapter_id,
        price_per_1k_tokens=1000,
    )
    with pytest.raises(PublishError, match=f"name 'pub/geo' belongs to {alice.address}: only its owner publishes"):
        publish(squat.path, anvil_chain.client(mallory))


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


def test_publish_signs_an_old_format_package_again(anvil_chain, tiny_base, peft, tmp_path):
    """A package signed before signatures named their chain is signed again by its publisher."""
    owner = anvil_chain.users[5]
    pkg = pack_adapter(peft, tmp_path / "p", name="pub/old", account=owner, base_dir=tiny_base)
    doc = json.loads((pkg.path / "signature.json").read_text())
    del doc["chain_id"], doc["registry"]
    (pkg.path / "signature.json").write_text(json.dumps(doc))
    result = publish(pkg.path, anvil_chain.client(owner))
    assert result.registered and result.signed
    assert verify_package(pkg.path, domain=anvil_chain.client().domain).signer == owner.address


def test_the_operator_token_comes_from_the_file_the_env_or_the_local_nodes_data_folder(tmp_path, monkeypatch):
    from node.operator_token import TOKEN_ENV, ensure_operator_token, token_path
    from node.publish import operator_token_for

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # the default data folder (.loramesh/node) is relative
    with pytest.raises(PublishError, match="needs its operator token: give --operator-token-file"):
        operator_token_for("http://127.0.0.1:8101")
    token, path = ensure_operator_token()  # what `loramesh node run` makes on first start
    assert path == token_path() and path.stat().st_mode & 0o777 == 0o600
    assert ensure_operator_token() == (token, path)  # made once, then read
    assert operator_token_for("http://127.0.0.1:8101") == operator_token_for("http://localhost:1") == token
    with pytest.raises(PublishError, match="needs its operator token"):
        operator_token_for("http://node.example.org:8101")  # a local file is never sent to another machine
    other = tmp_path / "other.token"
    other.write_text("  from-file\n")
    assert operator_token_for("http://node.example.org:8101", other) == "from-file"
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert operator_token_for("http://node.example.org:8101") == "from-env"
    other.write_text("")
    with pytest.raises(PublishError, match="operator token file other.token is empty"):
        operator_token_for("http://127.0.0.1:8101", other)


def test_publish_to_a_node_without_a_token_registers_nothing(anvil_chain, tiny_base, peft, tmp_path, monkeypatch):
    from node.operator_token import TOKEN_ENV

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    owner = anvil_chain.users[4]
    pkg = pack_adapter(peft, tmp_path / "p", name="pub/tokenless", account=owner, base_dir=tiny_base)
    with pytest.raises(PublishError, match="needs its operator token"):
        publish(pkg.path, anvil_chain.client(owner), node_url="http://127.0.0.1:9")
    assert anvil_chain.client().name_owner("pub/tokenless") is None
