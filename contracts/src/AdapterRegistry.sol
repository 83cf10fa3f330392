// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Ed25519} from "./Ed25519.sol";
import {PriceGrace} from "./PriceGrace.sol";

/// @title AdapterRegistry
/// @notice Public registry of datasets, LoRA adapters and serving nodes. Anyone registers; only a
/// dataset's payee, an adapter's owner or a node's operator changes what it registered.
/// Adapter names belong to their first registrant (who may transfer them); only a name's owner
/// registers versions of it, each naming its predecessor of the same name. Every registration reveals a
/// commitment to its adapter id and name (commitRegistration) made at least `minCommitBlocks` blocks before,
/// so a registration seen waiting to be mined cannot be copied and outbid, for its name nor for its id (an
/// id taken first under another name could never be registered by its publisher). A registration carries
/// the publisher's EIP-712 signature over what it registers, bound to this chain and this contract.
/// A node's registration proves its Ed25519 key: the key signs (this chain, this registry, the
/// operator, the node's registration nonce), checked here, so nobody registers a node id without
/// holding its key, and no proof works twice (a former operator cannot replay its old one).
/// Names are 1..64 bytes of [a-z0-9._/-], start with [a-z0-9] and never with "0x" (so no name looks
/// like an id); versions are 1..32 bytes of [0-9A-Za-z.+-]. Prices are at most 2**128 - 1 wei per
/// 1,000 tokens and an adapter names at most 16 datasets, so settling a batch neither overflows nor
/// grows without bound.
/// @dev Ids are bytes32: dataset id = keccak256(abi.encode(contributor, keccak256(name))) computed
/// here from the caller (so nobody registers another's dataset first), adapter id = sha256(canonical
/// manifest), node id = sha256(raw Ed25519 public key). The registry never deletes: a settled record
/// must always resolve its adapter and node.
contract AdapterRegistry {
    uint16 public constant MAX_BPS = 10_000;
    /// @notice The highest price per 1,000 tokens an adapter may ask: price * tokens (tokens < 2**64 each
    /// way) then stays far below 2**256 in settlement.
    uint256 public constant MAX_PRICE_PER_1K_TOKENS = type(uint128).max;
    /// @notice The most datasets one adapter pays: each is a payee credited in every batch it appears in.
    uint256 public constant MAX_DATASETS = 16;
    /// @notice Adapter and dataset names are 1..MAX_NAME_BYTES bytes, versions 1..MAX_VERSION_BYTES.
    uint256 public constant MAX_NAME_BYTES = 64;
    uint256 public constant MAX_VERSION_BYTES = 32;
    /// @notice A node's strings, which every gateway, node and explorer reads: a peer id of at most
    /// MAX_PEER_ID_BYTES, an API URL and at most MAX_MULTIADDRS multiaddrs of at most MAX_NODE_URL_BYTES each.
    uint256 public constant MAX_PEER_ID_BYTES = 128;
    uint256 public constant MAX_NODE_URL_BYTES = 256;
    uint256 public constant MAX_MULTIADDRS = 8;

    /// @dev EIP-712: the domain binds every adapter signature to this chain and this registry.
    bytes32 private constant DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    bytes32 private constant DOMAIN_NAME_HASH = keccak256("loramesh");
    bytes32 private constant DOMAIN_VERSION_HASH = keccak256("2");
    bytes32 public constant ADAPTER_TYPEHASH = keccak256(
        "AdapterRegistration(bytes32 adapterId,string name,string version,bytes32 predecessor,bytes32 baseModel,"
        "uint256 pricePer1kTokens,bytes32[] datasetIds,uint16[] sharesBps)"
    );
    /// @dev secp256k1n / 2: a signature with a larger s is the malleated twin of a valid one.
    uint256 private constant HALF_N = 0x7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0;

    struct Dataset {
        bytes32 contentHash;
        address payee;
        address contributor;
        bool exists;
        string name;
    }

    struct Adapter {
        address owner;
        address publisher;
        bytes32 predecessor;
        bytes32 baseModel;
        uint256 pricePer1kTokens;
        string name;
        string version;
        bytes32[] datasetIds;
        uint16[] sharesBps;
    }

    /// @notice What a publisher declares when registering an adapter.
    struct AdapterSpec {
        string name;
        string version;
        bytes32 predecessor;
        bytes32 baseModel;
        uint256 pricePer1kTokens;
        bytes32[] datasetIds;
        uint16[] sharesBps;
    }

    /// @notice A node key's proof for one operator: the raw Ed25519 public key and its signature
    /// (r || s, 64 bytes as RFC 8032 encodes it) of nodeProofMessage(operator, nodeNonce(nodeId)).
    struct NodeKeyProof {
        bytes32 publicKey;
        bytes32 r;
        bytes32 s;
    }

    struct Node {
        address operator;
        bool active;
        bytes32 publicKey;
        bytes32 baseModel;
        string peerId;
        string apiUrl;
        string[] multiaddrs;
    }

    mapping(bytes32 => Dataset) private _datasets;
    mapping(bytes32 => Adapter) private _adapters;
    mapping(bytes32 => Node) private _nodes;
    mapping(bytes32 => address) private _nameOwners; // keccak256(bytes(name)) => owner
    mapping(bytes32 => uint256) private _nodeNonces; // node id => successful registerNode calls so far
    mapping(bytes32 => uint256) private _commits; // registrationCommitment(...) => the block it was made in
    mapping(bytes32 => PriceGrace.Floor) private _priceFloors; // adapter id => the prices it replaced, in grace

    /// @notice Blocks a commitment must be old before the registration it commits to reveals it.
    uint256 public immutable minCommitBlocks;
    /// @notice Seconds after an adapter's price changes during which settlement may still charge its records
    /// down to the price before (PriceGrace; priceFloor). 0: every record is charged the price of the moment.
    uint256 public immutable priceGraceSeconds;

    error ZeroId();
    error ZeroAddress();
    error EmptyName();
    error NotNameOwner(string name, address owner, address caller);
    error PredecessorRequired(string name);
    error PredecessorNameMismatch(bytes32 predecessorId, string name);
    error InvalidSignature();
    error SignatureMismatch(address signer, address caller);
    error DatasetAlreadyRegistered(bytes32 datasetId);
    error UnknownDataset(bytes32 datasetId);
    error NotDatasetPayee(bytes32 datasetId, address caller);
    error AdapterAlreadyRegistered(bytes32 adapterId);
    error UnknownAdapter(bytes32 adapterId);
    error UnknownPredecessor(bytes32 predecessorId);
    error NotAdapterOwner(bytes32 adapterId, address caller);
    error LengthMismatch(uint256 datasets, uint256 shares);
    error DuplicateDataset(bytes32 datasetId);
    error SharesExceedTotal(uint256 totalBps);
    error NodeAlreadyRegistered(bytes32 nodeId);
    error UnknownNode(bytes32 nodeId);
    error NotNodeOperator(bytes32 nodeId, address caller);
    error NodeKeyMismatch(bytes32 nodeId, bytes32 publicKey);
    error InvalidNodeProof(bytes32 nodeId, address operator);
    error InvalidName(string name);
    error InvalidVersion(string version);
    /// @dev `field` is "peerId", "apiUrl" or "multiaddrs"; the value itself is not echoed (it may be long).
    error InvalidNodeAddress(string field);
    error PriceTooHigh(uint256 pricePer1kTokens, uint256 maxPricePer1kTokens);
    error TooManyDatasets(uint256 datasets, uint256 maxDatasets);
    error NotCommitted(bytes32 adapterId, string name);
    error CommitTooRecent(bytes32 adapterId, uint256 committedAt, uint256 usableAt);

    event DatasetRegistered(bytes32 indexed datasetId, address indexed payee, bytes32 contentHash, string name);
    event NameRegistered(bytes32 indexed nameHash, address indexed owner, string name);
    event NameTransferred(bytes32 indexed nameHash, address indexed previousOwner, address indexed newOwner, string name);
    event DatasetPayeeChanged(bytes32 indexed datasetId, address indexed payee);
    event AdapterRegistered(
        bytes32 indexed adapterId, address indexed owner, bytes32 indexed baseModel, AdapterSpec spec
    );
    event AdapterPriceChanged(bytes32 indexed adapterId, uint256 pricePer1kTokens);
    event AdapterOwnershipTransferred(bytes32 indexed adapterId, address indexed previousOwner, address indexed newOwner);
    event NodeRegistered(
        bytes32 indexed nodeId,
        address indexed operator,
        bytes32 indexed baseModel,
        string peerId,
        string apiUrl,
        string[] multiaddrs,
        bytes32 publicKey
    );
    event NodeOperatorChanged(bytes32 indexed nodeId, address indexed previousOperator, address indexed newOperator);
    event NodeUpdated(bytes32 indexed nodeId, bytes32 indexed baseModel, string peerId, string apiUrl, string[] multiaddrs);
    event NodeActiveChanged(bytes32 indexed nodeId, bool active);

    /// @param commitBlocks how many blocks a commitment waits before it can be revealed (at least 1: a
    /// commitment made in the block of the registration that copies another is never old enough).
    /// @param priceGrace priceGraceSeconds, at most PriceGrace.MAX_GRACE.
    constructor(uint256 commitBlocks, uint256 priceGrace) {
        PriceGrace.checkGrace(priceGrace);
        minCommitBlocks = commitBlocks == 0 ? 1 : commitBlocks;
        priceGraceSeconds = priceGrace;
    }

    // ------------------------------------------------------------------ datasets

    /// @notice Register the caller's dataset `name` with the hash of its content; the caller is its
    /// contributor and first payee. Its id is bound to the caller (datasetIdOf), so nobody else can
    /// register it, first or later.
    function registerDataset(string calldata name, bytes32 contentHash) external returns (bytes32 datasetId) {
        if (bytes(name).length == 0) revert EmptyName();
        _checkName(name);
        datasetId = datasetIdOf(msg.sender, name);
        if (_datasets[datasetId].exists) revert DatasetAlreadyRegistered(datasetId);
        _datasets[datasetId] =
            Dataset({contentHash: contentHash, payee: msg.sender, contributor: msg.sender, exists: true, name: name});
        emit DatasetRegistered(datasetId, msg.sender, contentHash, name);
    }

    /// @notice The id of `contributor`'s dataset called `name`.
    function datasetIdOf(address contributor, string calldata name) public pure returns (bytes32) {
        return keccak256(abi.encode(contributor, keccak256(bytes(name))));
    }

    /// @notice Move a dataset's future rewards to a new payee; only the current payee may.
    function setDatasetPayee(bytes32 datasetId, address payee) external {
        Dataset storage d = _datasetOrRevert(datasetId);
        if (d.payee != msg.sender) revert NotDatasetPayee(datasetId, msg.sender);
        if (payee == address(0)) revert ZeroAddress();
        d.payee = payee;
        emit DatasetPayeeChanged(datasetId, payee);
    }

    /// @notice A dataset's content hash, payee, contributor and name; reverts for an unknown id.
    function getDataset(bytes32 datasetId)
        external
        view
        returns (bytes32 contentHash, address payee, address contributor, string memory name)
    {
        Dataset storage d = _datasetOrRevert(datasetId);
        return (d.contentHash, d.payee, d.contributor, d.name);
    }

    // ------------------------------------------------------------------ names

    /// @notice The owner of an adapter name (zero when nobody registered it yet).
    function nameOwner(string calldata name) external view returns (address) {
        return _nameOwners[keccak256(bytes(name))];
    }

    /// @notice Commit to a registration without saying what it registers: `commitment` is
    /// registrationCommitment(adapterId, name, caller, salt) for a secret salt. A commitment is made once.
    function commitRegistration(bytes32 commitment) external {
        if (_commits[commitment] == 0) _commits[commitment] = block.number;
    }

    /// @notice The commitment the registration of `adapterId` under `name` by `registrant` with `salt` reveals.
    function registrationCommitment(bytes32 adapterId, string calldata name, address registrant, bytes32 salt)
        public
        pure
        returns (bytes32)
    {
        return keccak256(abi.encode(adapterId, keccak256(bytes(name)), registrant, salt));
    }

    /// @notice The block a commitment was made in (0: never).
    function commitBlock(bytes32 commitment) external view returns (uint256) {
        return _commits[commitment];
    }

    /// @notice Hand a name to another address; only its owner may. From then on only the new owner
    /// registers versions of it (already registered versions keep their publisher and owner).
    function transferName(string calldata name, address newOwner) external {
        if (newOwner == address(0)) revert ZeroAddress();
        bytes32 h = keccak256(bytes(name));
        address owner = _nameOwners[h];
        if (owner != msg.sender) revert NotNameOwner(name, owner, msg.sender);
        _nameOwners[h] = newOwner;
        emit NameTransferred(h, msg.sender, newOwner, name);
    }

    // ------------------------------------------------------------------ adapters

    /// @notice Register an adapter published and owned by the caller. Dataset shares (basis points of
    /// the non-node part of each fee) must name registered datasets, once each, summing to <= 10,000.
    /// Every registration reveals the caller's commitment to its id and name (commitRegistration with `salt`,
    /// at least minCommitBlocks old). The first registration of a name makes the caller its owner; later ones
    /// must come from the name's owner and name a registered predecessor of the same name.
    /// `signature` is the caller's EIP-712 signature (65 bytes, r || s || v) of AdapterRegistration(adapterId,
    /// spec) under this contract's domain: a spec that differs from what was signed recovers another address
    /// and reverts.
    function registerAdapter(bytes32 adapterId, AdapterSpec calldata spec, bytes calldata signature, bytes32 salt)
        external
    {
        if (adapterId == bytes32(0) || spec.baseModel == bytes32(0)) revert ZeroId();
        if (bytes(spec.name).length == 0) revert EmptyName();
        _checkName(spec.name);
        _checkVersion(spec.version);
        _checkPrice(spec.pricePer1kTokens);
        if (_adapters[adapterId].owner != address(0)) revert AdapterAlreadyRegistered(adapterId);
        address signer = _recover(adapterDigest(adapterId, spec), signature);
        if (signer != msg.sender) revert SignatureMismatch(signer, msg.sender);
        _reveal(adapterId, spec.name, salt);
        _claimName(spec.name, spec.predecessor);
        _checkShares(spec.datasetIds, spec.sharesBps);

        Adapter storage a = _adapters[adapterId];
        a.owner = msg.sender;
        a.publisher = msg.sender;
        a.predecessor = spec.predecessor;
        a.baseModel = spec.baseModel;
        a.pricePer1kTokens = spec.pricePer1kTokens;
        a.name = spec.name;
        a.version = spec.version;
        a.datasetIds = spec.datasetIds;
        a.sharesBps = spec.sharesBps;
        emit AdapterRegistered(adapterId, msg.sender, spec.baseModel, spec);
    }

    /// @notice This contract's EIP-712 domain separator (name "loramesh", version "2", this chain, this contract).
    function domainSeparator() public view returns (bytes32) {
        return keccak256(abi.encode(DOMAIN_TYPEHASH, DOMAIN_NAME_HASH, DOMAIN_VERSION_HASH, block.chainid, address(this)));
    }

    /// @notice The EIP-712 digest a publisher signs to register `adapterId` with `spec`.
    function adapterDigest(bytes32 adapterId, AdapterSpec calldata spec) public view returns (bytes32) {
        // abi.encode(typehash, adapterId, name, version, predecessor, baseModel, price, datasetIds,
        // sharesBps) with dynamic members hashed as EIP-712 says, in two halves to keep the stack shallow
        bytes memory words = bytes.concat(
            abi.encode(ADAPTER_TYPEHASH, adapterId, keccak256(bytes(spec.name)), keccak256(bytes(spec.version))),
            abi.encode(
                spec.predecessor,
                spec.baseModel,
                spec.pricePer1kTokens,
                keccak256(abi.encodePacked(spec.datasetIds)),
                keccak256(abi.encodePacked(spec.sharesBps))
            )
        );
        return keccak256(abi.encodePacked("\x19\x01", domainSeparator(), keccak256(words)));
    }

    /// @notice Change the price per 1,000 tokens of future settlements (at most MAX_PRICE_PER_1K_TOKENS);
    /// only the owner may. For priceGraceSeconds after it, records admitted before may still be charged
    /// down to the price before (priceFloor).
    function setAdapterPrice(bytes32 adapterId, uint256 pricePer1kTokens) external {
        Adapter storage a = _ownedAdapter(adapterId);
        _checkPrice(pricePer1kTokens);
        PriceGrace.onChange(_priceFloors[adapterId], a.pricePer1kTokens, priceGraceSeconds);
        a.pricePer1kTokens = pricePer1kTokens;
        emit AdapterPriceChanged(adapterId, pricePer1kTokens);
    }

    /// @notice Hand an adapter (and its future owner rewards) to another address; only the owner may.
    function transferAdapter(bytes32 adapterId, address newOwner) external {
        if (newOwner == address(0)) revert ZeroAddress();
        Adapter storage a = _ownedAdapter(adapterId);
        a.owner = newOwner;
        emit AdapterOwnershipTransferred(adapterId, msg.sender, newOwner);
    }

    /// @notice Everything registered about an adapter; reverts for an unknown id.
    function getAdapter(bytes32 adapterId) external view returns (Adapter memory) {
        return _adapterOrRevert(adapterId);
    }

    /// @notice What settlement needs to split a fee: owner, price, and each dataset's id, payee and share.
    function adapterSplit(bytes32 adapterId)
        external
        view
        returns (
            address owner,
            uint256 pricePer1kTokens,
            bytes32[] memory datasetIds,
            address[] memory payees,
            uint16[] memory sharesBps
        )
    {
        Adapter storage a = _adapterOrRevert(adapterId);
        uint256 n = a.datasetIds.length;
        payees = new address[](n);
        for (uint256 i; i < n; ++i) {
            payees[i] = _datasets[a.datasetIds[i]].payee;
        }
        return (a.owner, a.pricePer1kTokens, a.datasetIds, payees, a.sharesBps);
    }

    /// @notice The prices this adapter replaced whose grace still may run (PriceGrace): until graceEnds (a
    /// timestamp) settlement may charge its records any price from floor up to its price (the settler's quote),
    /// and until olderGraceEnds from olderFloor. A past end allows nothing. Reverts for an unknown id.
    function priceFloor(bytes32 adapterId)
        external
        view
        returns (uint256 floor, uint256 graceEnds, uint256 olderFloor, uint256 olderGraceEnds)
    {
        _adapterOrRevert(adapterId);
        PriceGrace.Floor storage f = _priceFloors[adapterId];
        return (f.newest.price, f.newest.ends, f.older.price, f.older.ends);
    }

    // ------------------------------------------------------------------ nodes

    /// @notice Register a serving node operated by the caller (active from the start). `proof` shows the
    /// caller holds the node's key: nodeId must be sha256(publicKey) and the key must have signed
    /// nodeProofMessage(caller, nodeNonce(nodeId)), so a stranger can neither register a node id first
    /// nor replay the node's proof for another operator. Every registration increments the nonce, so a
    /// proof is good once: a former operator cannot take the node back with the proof it registered
    /// with. A node already registered to another operator moves to the caller (the key holder decides
    /// who operates it); its own operator uses updateNode instead.
    function registerNode(
        bytes32 nodeId,
        NodeKeyProof calldata proof,
        string calldata peerId,
        string[] calldata multiaddrs,
        string calldata apiUrl,
        bytes32 baseModel
    ) external {
        if (nodeId == bytes32(0) || baseModel == bytes32(0)) revert ZeroId();
        _checkNodeAddress(peerId, multiaddrs, apiUrl);
        _checkNodeProof(nodeId, proof);
        Node storage n = _nodes[nodeId];
        address previous = n.operator;
        if (previous == msg.sender) revert NodeAlreadyRegistered(nodeId);
        ++_nodeNonces[nodeId];
        n.operator = msg.sender;
        n.active = true;
        n.publicKey = proof.publicKey;
        n.baseModel = baseModel;
        n.peerId = peerId;
        n.apiUrl = apiUrl;
        _setMultiaddrs(n, multiaddrs);
        if (previous != address(0)) emit NodeOperatorChanged(nodeId, previous, msg.sender);
        _emitNodeRegistered(nodeId, n);
    }

    /// @notice What a node key signs to let `operator` register it here while its nonce is `nonce`:
    /// abi.encodePacked(bytes("loramesh.node.v2"), uint256 chainid, address registry, address operator,
    /// uint256 nonce), 120 bytes.
    function nodeProofMessage(address operator, uint256 nonce) public view returns (bytes memory) {
        return abi.encodePacked(bytes("loramesh.node.v2"), block.chainid, address(this), operator, nonce);
    }

    /// @notice How many times `nodeId` was registered (0 for a new node): the nonce its next proof names.
    function nodeNonce(bytes32 nodeId) external view returns (uint256) {
        return _nodeNonces[nodeId];
    }

    /// @notice Replace a node's addresses and base model; only its operator may.
    function updateNode(
        bytes32 nodeId,
        string calldata peerId,
        string[] calldata multiaddrs,
        string calldata apiUrl,
        bytes32 baseModel
    ) external {
        if (baseModel == bytes32(0)) revert ZeroId();
        Node storage n = _operatedNode(nodeId);
        _checkNodeAddress(peerId, multiaddrs, apiUrl);
        n.peerId = peerId;
        n.apiUrl = apiUrl;
        _setMultiaddrs(n, multiaddrs);
        n.baseModel = baseModel;
        emit NodeUpdated(nodeId, baseModel, peerId, apiUrl, multiaddrs);
    }

    /// @notice Take a node out of (or back into) routing; only its operator may.
    function setNodeActive(bytes32 nodeId, bool active) external {
        Node storage n = _operatedNode(nodeId);
        n.active = active;
        emit NodeActiveChanged(nodeId, active);
    }

    /// @notice Everything registered about a node; reverts for an unknown id.
    function getNode(bytes32 nodeId) external view returns (Node memory) {
        return _nodeOrRevert(nodeId);
    }

    /// @notice The address paid for a node's share; reverts for an unknown id.
    function nodeOperator(bytes32 nodeId) external view returns (address) {
        return _nodeOrRevert(nodeId).operator;
    }

    // ------------------------------------------------------------------ internal

    /// @dev The caller committed to registering `adapterId` under `name` at least minCommitBlocks ago; the
    /// commitment is spent.
    function _reveal(bytes32 adapterId, string calldata name, bytes32 salt) private {
        bytes32 c = registrationCommitment(adapterId, name, msg.sender, salt);
        uint256 committed = _commits[c];
        if (committed == 0) revert NotCommitted(adapterId, name);
        if (block.number < committed + minCommitBlocks) {
            revert CommitTooRecent(adapterId, committed, committed + minCommitBlocks);
        }
        delete _commits[c];
    }

    /// @dev The name's owner is the caller (a new name becomes the caller's); a first version has no
    /// predecessor, a later one names a registered version of the same name.
    function _claimName(string calldata name, bytes32 predecessor) private {
        bytes32 h = keccak256(bytes(name));
        address owner = _nameOwners[h];
        if (owner == address(0)) {
            if (predecessor != bytes32(0)) {
                if (_adapters[predecessor].owner == address(0)) revert UnknownPredecessor(predecessor);
                revert PredecessorNameMismatch(predecessor, name);
            }
            _nameOwners[h] = msg.sender;
            emit NameRegistered(h, msg.sender, name);
            return;
        }
        if (owner != msg.sender) revert NotNameOwner(name, owner, msg.sender);
        if (predecessor == bytes32(0)) revert PredecessorRequired(name);
        Adapter storage p = _adapters[predecessor];
        if (p.owner == address(0)) revert UnknownPredecessor(predecessor);
        if (keccak256(bytes(p.name)) != h) revert PredecessorNameMismatch(predecessor, name);
    }

    /// @dev ecrecover of a 65-byte r || s || v signature; malformed or malleable ones revert.
    function _recover(bytes32 digest, bytes calldata signature) private pure returns (address signer) {
        if (signature.length != 65) revert InvalidSignature();
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        if (v < 27) v += 27;
        if ((v != 27 && v != 28) || uint256(s) > HALF_N) revert InvalidSignature();
        signer = ecrecover(digest, v, r, s);
        if (signer == address(0)) revert InvalidSignature();
    }

    function _checkShares(bytes32[] calldata datasetIds, uint16[] calldata sharesBps) private view {
        if (datasetIds.length != sharesBps.length) revert LengthMismatch(datasetIds.length, sharesBps.length);
        if (datasetIds.length > MAX_DATASETS) revert TooManyDatasets(datasetIds.length, MAX_DATASETS);
        uint256 total;
        for (uint256 i; i < datasetIds.length; ++i) {
            if (!_datasets[datasetIds[i]].exists) revert UnknownDataset(datasetIds[i]);
            for (uint256 j; j < i; ++j) {
                if (datasetIds[j] == datasetIds[i]) revert DuplicateDataset(datasetIds[i]);
            }
            total += sharesBps[i];
        }
        if (total > MAX_BPS) revert SharesExceedTotal(total);
    }

    function _checkPrice(uint256 pricePer1kTokens) private pure {
        if (pricePer1kTokens > MAX_PRICE_PER_1K_TOKENS) revert PriceTooHigh(pricePer1kTokens, MAX_PRICE_PER_1K_TOKENS);
    }

    /// @dev 1..64 bytes of [a-z0-9._/-], the first [a-z0-9], not starting with "0x". (Empty names revert
    /// EmptyName before this.)
    function _checkName(string calldata name) private pure {
        bytes calldata b = bytes(name);
        if (b.length > MAX_NAME_BYTES) revert InvalidName(name);
        if (b.length >= 2 && b[0] == "0" && b[1] == "x") revert InvalidName(name);
        for (uint256 i; i < b.length; ++i) {
            bytes1 c = b[i];
            bool alnum = (c >= "a" && c <= "z") || (c >= "0" && c <= "9");
            if (!alnum && (i == 0 || (c != "." && c != "_" && c != "/" && c != "-"))) revert InvalidName(name);
        }
    }

    /// @dev 1..32 bytes of [0-9A-Za-z.+-].
    function _checkVersion(string calldata version) private pure {
        bytes calldata b = bytes(version);
        if (b.length == 0 || b.length > MAX_VERSION_BYTES) revert InvalidVersion(version);
        for (uint256 i; i < b.length; ++i) {
            bytes1 c = b[i];
            bool ok = (c >= "a" && c <= "z") || (c >= "A" && c <= "Z") || (c >= "0" && c <= "9") || c == "."
                || c == "+" || c == "-";
            if (!ok) revert InvalidVersion(version);
        }
    }

    /// @dev peerId: 0..MAX_PEER_ID_BYTES of [0-9A-Za-z] (empty for a node without a p2p host); apiUrl:
    /// "http://" or "https://" then printable ASCII with no space and no "?", "#" or at sign (gateways append
    /// their paths to it: a query or fragment would cut them off, credentials would be sent on), at most
    /// MAX_NODE_URL_BYTES; multiaddrs: at most MAX_MULTIADDRS, each "/" then printable ASCII with no space,
    /// MAX_NODE_URL_BYTES at most.
    function _checkNodeAddress(string calldata peerId, string[] calldata multiaddrs, string calldata apiUrl)
        private
        pure
    {
        bytes calldata p = bytes(peerId);
        if (p.length > MAX_PEER_ID_BYTES) revert InvalidNodeAddress("peerId");
        for (uint256 i; i < p.length; ++i) {
            bytes1 c = p[i];
            if (!((c >= "a" && c <= "z") || (c >= "A" && c <= "Z") || (c >= "0" && c <= "9"))) {
                revert InvalidNodeAddress("peerId");
            }
        }
        bytes calldata u = bytes(apiUrl);
        bool http = _startsWith(u, "http://") || _startsWith(u, "https://");
        if (!http || u.length > MAX_NODE_URL_BYTES || !_printable(u)) revert InvalidNodeAddress("apiUrl");
        for (uint256 i; i < u.length; ++i) {
            if (u[i] == "?" || u[i] == "#" || u[i] == "@") revert InvalidNodeAddress("apiUrl");
        }
        if (multiaddrs.length > MAX_MULTIADDRS) revert InvalidNodeAddress("multiaddrs");
        for (uint256 i; i < multiaddrs.length; ++i) {
            bytes calldata a = bytes(multiaddrs[i]);
            if (a.length == 0 || a.length > MAX_NODE_URL_BYTES || a[0] != "/" || !_printable(a)) {
                revert InvalidNodeAddress("multiaddrs");
            }
        }
    }

    function _startsWith(bytes calldata b, bytes memory prefix) private pure returns (bool) {
        if (b.length < prefix.length) return false;
        for (uint256 i; i < prefix.length; ++i) {
            if (b[i] != prefix[i]) return false;
        }
        return true;
    }

    /// @dev Every byte is printable ASCII other than the space (0x21..0x7e).
    function _printable(bytes calldata b) private pure returns (bool) {
        for (uint256 i; i < b.length; ++i) {
            if (b[i] < 0x21 || b[i] > 0x7e) return false;
        }
        return true;
    }

    /// @dev nodeId = sha256(publicKey), and the key signed nodeProofMessage(caller, the node's nonce).
    function _checkNodeProof(bytes32 nodeId, NodeKeyProof calldata proof) private view {
        if (sha256(abi.encodePacked(proof.publicKey)) != nodeId) revert NodeKeyMismatch(nodeId, proof.publicKey);
        if (!Ed25519.verify(proof.publicKey, proof.r, proof.s, nodeProofMessage(msg.sender, _nodeNonces[nodeId]))) {
            revert InvalidNodeProof(nodeId, msg.sender);
        }
    }

    /// @dev Emitted from storage: with every calldata argument on the stack the legacy generator runs out of it.
    function _emitNodeRegistered(bytes32 nodeId, Node storage n) private {
        emit NodeRegistered(nodeId, n.operator, n.baseModel, n.peerId, n.apiUrl, n.multiaddrs, n.publicKey);
    }

    /// @dev The legacy code generator cannot copy string[] calldata to storage in one assignment.
    function _setMultiaddrs(Node storage n, string[] calldata multiaddrs) private {
        delete n.multiaddrs;
        for (uint256 i; i < multiaddrs.length; ++i) {
            n.multiaddrs.push(multiaddrs[i]);
        }
    }

    function _datasetOrRevert(bytes32 id) private view returns (Dataset storage d) {
        d = _datasets[id];
        if (!d.exists) revert UnknownDataset(id);
    }

    function _adapterOrRevert(bytes32 id) private view returns (Adapter storage a) {
        a = _adapters[id];
        if (a.owner == address(0)) revert UnknownAdapter(id);
    }

    function _ownedAdapter(bytes32 id) private view returns (Adapter storage a) {
        a = _adapterOrRevert(id);
        if (a.owner != msg.sender) revert NotAdapterOwner(id, msg.sender);
    }

    function _nodeOrRevert(bytes32 id) private view returns (Node storage n) {
        n = _nodes[id];
        if (n.operator == address(0)) revert UnknownNode(id);
    }

    function _operatedNode(bytes32 id) private view returns (Node storage n) {
        n = _nodeOrRevert(id);
        if (n.operator != msg.sender) revert NotNodeOperator(id, msg.sender);
    }
}
