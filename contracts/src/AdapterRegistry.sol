// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title AdapterRegistry
/// @notice Public registry of datasets, LoRA adapters and serving nodes. Anyone registers; only a
/// dataset's payee, an adapter's owner or a node's operator changes what it registered.
/// @dev Ids are bytes32: dataset id = keccak256(name), adapter id = sha256(canonical manifest),
/// node id = sha256(raw Ed25519 public key). The registry never deletes: a settled record must
/// always resolve its adapter and node.
contract AdapterRegistry {
    uint16 public constant MAX_BPS = 10_000;

    struct Dataset {
        bytes32 contentHash;
        address payee;
        bool exists;
    }

    struct Adapter {
        address owner;
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

    struct Node {
        address operator;
        bool active;
        bytes32 baseModel;
        string peerId;
        string apiUrl;
        string[] multiaddrs;
    }

    mapping(bytes32 => Dataset) private _datasets;
    mapping(bytes32 => Adapter) private _adapters;
    mapping(bytes32 => Node) private _nodes;

    error ZeroId();
    error ZeroAddress();
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

    event DatasetRegistered(bytes32 indexed datasetId, address indexed payee, bytes32 contentHash);
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
        string[] multiaddrs
    );
    event NodeUpdated(bytes32 indexed nodeId, bytes32 indexed baseModel, string peerId, string apiUrl, string[] multiaddrs);
    event NodeActiveChanged(bytes32 indexed nodeId, bool active);

    // ------------------------------------------------------------------ datasets

    /// @notice Register a dataset with the hash of its content and the address paid for its use.
    function registerDataset(bytes32 datasetId, bytes32 contentHash, address payee) external {
        if (datasetId == bytes32(0)) revert ZeroId();
        if (payee == address(0)) revert ZeroAddress();
        if (_datasets[datasetId].exists) revert DatasetAlreadyRegistered(datasetId);
        _datasets[datasetId] = Dataset({contentHash: contentHash, payee: payee, exists: true});
        emit DatasetRegistered(datasetId, payee, contentHash);
    }

    /// @notice Move a dataset's future rewards to a new payee; only the current payee may.
    function setDatasetPayee(bytes32 datasetId, address payee) external {
        Dataset storage d = _datasetOrRevert(datasetId);
        if (d.payee != msg.sender) revert NotDatasetPayee(datasetId, msg.sender);
        if (payee == address(0)) revert ZeroAddress();
        d.payee = payee;
        emit DatasetPayeeChanged(datasetId, payee);
    }

    /// @notice A dataset's content hash and payee; reverts for an unknown id.
    function getDataset(bytes32 datasetId) external view returns (bytes32 contentHash, address payee) {
        Dataset storage d = _datasetOrRevert(datasetId);
        return (d.contentHash, d.payee);
    }

    // ------------------------------------------------------------------ adapters

    /// @notice Register an adapter owned by the caller. Dataset shares (basis points of the
    /// non-node part of each fee) must name registered datasets, once each, summing to <= 10,000.
    function registerAdapter(bytes32 adapterId, AdapterSpec calldata spec) external {
        if (adapterId == bytes32(0) || spec.baseModel == bytes32(0)) revert ZeroId();
        if (_adapters[adapterId].owner != address(0)) revert AdapterAlreadyRegistered(adapterId);
        if (spec.predecessor != bytes32(0) && _adapters[spec.predecessor].owner == address(0)) {
            revert UnknownPredecessor(spec.predecessor);
        }
        _checkShares(spec.datasetIds, spec.sharesBps);

        Adapter storage a = _adapters[adapterId];
        a.owner = msg.sender;
        a.predecessor = spec.predecessor;
        a.baseModel = spec.baseModel;
        a.pricePer1kTokens = spec.pricePer1kTokens;
        a.name = spec.name;
        a.version = spec.version;
        a.datasetIds = spec.datasetIds;
        a.sharesBps = spec.sharesBps;
        emit AdapterRegistered(adapterId, msg.sender, spec.baseModel, spec);
    }

    /// @notice Change the price per 1,000 tokens of future settlements; only the owner may.
    function setAdapterPrice(bytes32 adapterId, uint256 pricePer1kTokens) external {
        Adapter storage a = _ownedAdapter(adapterId);
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

    // ------------------------------------------------------------------ nodes

    /// @notice Register a serving node operated by the caller (active from the start).
    function registerNode(
        bytes32 nodeId,
        string calldata peerId,
        string[] calldata multiaddrs,
        string calldata apiUrl,
        bytes32 baseModel
    ) external {
        if (nodeId == bytes32(0) || baseModel == bytes32(0)) revert ZeroId();
        if (_nodes[nodeId].operator != address(0)) revert NodeAlreadyRegistered(nodeId);
        Node storage n = _nodes[nodeId];
        n.operator = msg.sender;
        n.active = true;
        n.baseModel = baseModel;
        n.peerId = peerId;
        n.apiUrl = apiUrl;
        _setMultiaddrs(n, multiaddrs);
        emit NodeRegistered(nodeId, msg.sender, baseModel, peerId, apiUrl, multiaddrs);
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

    function _checkShares(bytes32[] calldata datasetIds, uint16[] calldata sharesBps) private view {
        if (datasetIds.length != sharesBps.length) revert LengthMismatch(datasetIds.length, sharesBps.length);
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
