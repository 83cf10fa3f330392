// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AdapterRegistry} from "./AdapterRegistry.sol";

/// @title AttributionLedger
/// @notice Settles batches of inference records in the native coin. A settler (a gateway, granted by
/// the admin) prepays a deposit; each batch pulls its records' fees from that deposit and accrues
/// them to node operators, adapter owners and dataset payees, who withdraw what accrued.
/// A record whose adapterId is zero is an inference of the bare base model: its fee is
/// basePricePer1kTokens per 1,000 tokens and all of it accrues to the serving node's operator.
/// @dev Money invariant: totalDeposited == totalAccrued + sum(deposits left) + totalReclaimed and
/// totalAccrued == sum(rewards available) + totalWithdrawn; the balance equals deposits left plus
/// rewards available. A batch id is accepted once (BatchAlreadySettled), so retries are idempotent.
contract AttributionLedger {
    uint16 public constant MAX_BPS = 10_000;

    /// @notice One inference. leaf = keccak256(abi.encode(requestId, adapterId, nodeId, promptTokens, completionTokens)).
    /// adapterId == bytes32(0): the bare base model (no adapter, no owner, no datasets).
    struct Record {
        bytes32 requestId;
        bytes32 adapterId;
        bytes32 nodeId;
        uint64 promptTokens;
        uint64 completionTokens;
    }

    struct Batch {
        bytes32 merkleRoot;
        address settler;
        uint64 settledBlock;
        uint32 recordCount;
        uint256 totalFees;
    }

    enum Role {
        Node,
        AdapterOwner,
        Dataset
    }

    /// @dev Fees of one adapter within a batch, split once at the end of the batch.
    struct AdapterGroup {
        bytes32 adapterId;
        address owner;
        uint256 price;
        bytes32[] datasetIds;
        address[] payees;
        uint16[] sharesBps;
        uint256 rest;
    }

    /// @dev A node's cut of one adapter's records within a batch (adapterId zero: its base-model fees).
    struct NodeGroup {
        bytes32 adapterId;
        bytes32 nodeId;
        address operator;
        uint256 amount;
    }

    /// @dev Working state of one settleBatch call (kept in memory to stay within the stack limit).
    struct BatchWork {
        bytes32 batchId;
        uint16 nodeShareBps;
        uint256 basePrice;
        AdapterGroup[] groups;
        uint256 nGroups;
        NodeGroup[] nodeGroups;
        uint256 nNodeGroups;
        uint256 total;
    }

    AdapterRegistry public immutable registry;
    address public admin;
    uint16 public nodeShareBps;
    /// @notice Fee per 1,000 tokens of a base-model record (adapterId zero), in wei; set by the admin.
    uint256 public basePricePer1kTokens;

    uint256 public totalDeposited;
    uint256 public totalAccrued;
    uint256 public totalWithdrawn;
    uint256 public totalReclaimed;

    mapping(address => bool) private _settlers;
    mapping(address => uint256) private _deposits;
    mapping(address => uint256) private _available;
    mapping(address => uint256) private _accrued;
    mapping(address => uint256) private _withdrawn;
    mapping(bytes32 => Batch) private _batches;

    error ZeroId();
    error ZeroAddress();
    error ZeroAmount();
    error NotAdmin(address caller);
    error NotSettler(address caller);
    error InvalidShare(uint256 bps);
    error EmptyBatch();
    error BatchAlreadySettled(bytes32 batchId);
    error MerkleRootMismatch(bytes32 given, bytes32 computed);
    error InsufficientDeposit(address settler, uint256 needed, uint256 available);
    error FeesAboveQuote(uint256 fees, uint256 maxFees);
    error InsufficientRewards(address account, uint256 requested, uint256 available);
    error NothingToWithdraw(address account);
    error TransferFailed(address to, uint256 amount);

    event AdminTransferred(address indexed previousAdmin, address indexed newAdmin);
    event SettlerGranted(address indexed settler);
    event SettlerRevoked(address indexed settler);
    event NodeShareChanged(uint16 nodeShareBps);
    event BasePriceChanged(uint256 basePricePer1kTokens);
    event Deposited(address indexed settler, address indexed from, uint256 amount);
    event DepositReclaimed(address indexed settler, uint256 amount);
    event RecordSettled(
        bytes32 indexed batchId,
        bytes32 indexed requestId,
        bytes32 indexed adapterId,
        bytes32 nodeId,
        uint64 promptTokens,
        uint64 completionTokens,
        uint256 fee
    );
    event RewardAccrued(
        bytes32 indexed batchId,
        address indexed account,
        bytes32 indexed adapterId,
        Role role,
        bytes32 subjectId,
        uint256 amount
    );
    event BatchSettled(
        bytes32 indexed batchId, address indexed settler, bytes32 merkleRoot, uint32 recordCount, uint256 totalFees
    );
    event RewardWithdrawn(address indexed account, uint256 amount);

    modifier onlyAdmin() {
        if (msg.sender != admin) revert NotAdmin(msg.sender);
        _;
    }

    constructor(AdapterRegistry registry_, address admin_, uint16 nodeShareBps_) {
        if (address(registry_) == address(0) || admin_ == address(0)) revert ZeroAddress();
        if (nodeShareBps_ > MAX_BPS) revert InvalidShare(nodeShareBps_);
        registry = registry_;
        admin = admin_;
        nodeShareBps = nodeShareBps_;
        emit AdminTransferred(address(0), admin_);
        emit NodeShareChanged(nodeShareBps_);
    }

    // ------------------------------------------------------------------ admin

    /// @notice Hand the admin role to another address.
    function transferAdmin(address newAdmin) external onlyAdmin {
        if (newAdmin == address(0)) revert ZeroAddress();
        emit AdminTransferred(admin, newAdmin);
        admin = newAdmin;
    }

    /// @notice Allow an address (a gateway) to settle batches.
    function grantSettler(address settler) external onlyAdmin {
        if (settler == address(0)) revert ZeroAddress();
        _settlers[settler] = true;
        emit SettlerGranted(settler);
    }

    /// @notice Stop an address from settling batches (its deposit stays reclaimable).
    function revokeSettler(address settler) external onlyAdmin {
        _settlers[settler] = false;
        emit SettlerRevoked(settler);
    }

    /// @notice Set the node operator's share of every fee, in basis points, for future batches.
    function setNodeShareBps(uint16 bps) external onlyAdmin {
        if (bps > MAX_BPS) revert InvalidShare(bps);
        nodeShareBps = bps;
        emit NodeShareChanged(bps);
    }

    /// @notice Set the fee per 1,000 tokens of base-model records (adapterId zero), for future batches.
    function setBasePricePer1kTokens(uint256 price) external onlyAdmin {
        basePricePer1kTokens = price;
        emit BasePriceChanged(price);
    }

    /// @notice Whether an address may settle batches.
    function isSettler(address account) external view returns (bool) {
        return _settlers[account];
    }

    // ------------------------------------------------------------------ deposits

    /// @notice Prepay fees for a settler; anyone may fund any settler.
    function depositFor(address settler) external payable {
        if (settler == address(0)) revert ZeroAddress();
        if (msg.value == 0) revert ZeroAmount();
        _deposits[settler] += msg.value;
        totalDeposited += msg.value;
        emit Deposited(settler, msg.sender, msg.value);
    }

    /// @notice Take back part of the caller's unused deposit.
    function reclaimDeposit(uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        uint256 available = _deposits[msg.sender];
        if (amount > available) revert InsufficientDeposit(msg.sender, amount, available);
        _deposits[msg.sender] = available - amount;
        totalReclaimed += amount;
        emit DepositReclaimed(msg.sender, amount);
        _send(msg.sender, amount);
    }

    /// @notice A settler's unused deposit.
    function depositOf(address settler) external view returns (uint256) {
        return _deposits[settler];
    }

    // ------------------------------------------------------------------ settlement

    /// @notice Settle a batch: check its Merkle root, pull its fees from the caller's deposit and
    /// accrue them. Reverts with BatchAlreadySettled when this batch id was settled before, and with
    /// FeesAboveQuote when the records cost more than `maxFees`, the total the settler priced them at:
    /// an adapter owner who raises the price after the batch was priced (e.g. front-running it) gets
    /// the batch refused and re-priced, never charged at a price the settler did not see.
    function settleBatch(bytes32 batchId, bytes32 merkleRoot, Record[] calldata records, uint256 maxFees) external {
        if (!_settlers[msg.sender]) revert NotSettler(msg.sender);
        if (batchId == bytes32(0)) revert ZeroId();
        if (records.length == 0) revert EmptyBatch();
        if (_batches[batchId].settledBlock != 0) revert BatchAlreadySettled(batchId);

        uint256 n = records.length;
        bytes32[] memory leaves = new bytes32[](n);
        BatchWork memory w = BatchWork({
            batchId: batchId,
            nodeShareBps: nodeShareBps,
            basePrice: basePricePer1kTokens,
            groups: new AdapterGroup[](n),
            nGroups: 0,
            nodeGroups: new NodeGroup[](n),
            nNodeGroups: 0,
            total: 0
        });
        for (uint256 i; i < n; ++i) {
            leaves[i] = leafOf(records[i]);
            _addRecord(w, records[i]);
        }
        uint256 total = w.total;

        bytes32 computed = _merkleRoot(leaves);
        if (computed != merkleRoot) revert MerkleRootMismatch(merkleRoot, computed);
        if (total > maxFees) revert FeesAboveQuote(total, maxFees);
        uint256 available = _deposits[msg.sender];
        if (total > available) revert InsufficientDeposit(msg.sender, total, available);
        _deposits[msg.sender] = available - total;
        totalAccrued += total;
        _batches[batchId] = Batch({
            merkleRoot: merkleRoot,
            settler: msg.sender,
            settledBlock: uint64(block.number),
            recordCount: uint32(n),
            totalFees: total
        });

        for (uint256 k; k < w.nNodeGroups; ++k) {
            NodeGroup memory ng = w.nodeGroups[k];
            _accrue(batchId, ng.operator, ng.adapterId, Role.Node, ng.nodeId, ng.amount);
        }
        for (uint256 g; g < w.nGroups; ++g) {
            _splitAdapter(batchId, w.groups[g]);
        }
        emit BatchSettled(batchId, msg.sender, merkleRoot, uint32(n), total);
    }

    /// @notice Whether a batch id has been settled.
    function isSettled(bytes32 batchId) external view returns (bool) {
        return _batches[batchId].settledBlock != 0;
    }

    /// @notice A settled batch (all zero when unknown).
    function getBatch(bytes32 batchId) external view returns (Batch memory) {
        return _batches[batchId];
    }

    /// @notice The Merkle leaf of a record, as settlement computes it.
    function leafOf(Record calldata r) public pure returns (bytes32) {
        return keccak256(abi.encode(r.requestId, r.adapterId, r.nodeId, r.promptTokens, r.completionTokens));
    }

    /// @notice Whether `leaf` is in the settled batch's tree (sorted-pair hashing). Compute the leaf
    /// from the record itself (leafOf): an inner node of the tree would also verify.
    function verifyRecord(bytes32 batchId, bytes32 leaf, bytes32[] calldata proof) external view returns (bool) {
        Batch storage b = _batches[batchId];
        if (b.settledBlock == 0) return false;
        bytes32 h = leaf;
        for (uint256 i; i < proof.length; ++i) {
            h = _hashPair(h, proof[i]);
        }
        return h == b.merkleRoot;
    }

    // ------------------------------------------------------------------ rewards

    /// @notice Withdraw everything accrued to the caller and not yet withdrawn.
    function withdraw() external {
        uint256 amount = _available[msg.sender];
        if (amount == 0) revert NothingToWithdraw(msg.sender);
        _payOut(amount);
    }

    /// @notice Withdraw part of what accrued to the caller.
    function withdrawAmount(uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        uint256 available = _available[msg.sender];
        if (amount > available) revert InsufficientRewards(msg.sender, amount, available);
        _payOut(amount);
    }

    /// @notice An account's rewards: withdrawable now, accrued in total, withdrawn in total.
    function rewardsOf(address account) external view returns (uint256 available, uint256 accrued, uint256 withdrawn) {
        return (_available[account], _accrued[account], _withdrawn[account]);
    }

    // ------------------------------------------------------------------ internal

    function _payOut(uint256 amount) private {
        _available[msg.sender] -= amount;
        _withdrawn[msg.sender] += amount;
        totalWithdrawn += amount;
        emit RewardWithdrawn(msg.sender, amount);
        _send(msg.sender, amount);
    }

    function _send(address to, uint256 amount) private {
        (bool ok,) = to.call{value: amount}("");
        if (!ok) revert TransferFailed(to, amount);
    }

    function _accrue(bytes32 batchId, address account, bytes32 adapterId, Role role, bytes32 subject, uint256 amount)
        private
    {
        if (amount == 0) return;
        _available[account] += amount;
        _accrued[account] += amount;
        emit RewardAccrued(batchId, account, adapterId, role, subject, amount);
    }

    /// @dev Dataset payees get their shares of the non-node part; the owner gets the rest, dust included.
    function _splitAdapter(bytes32 batchId, AdapterGroup memory ag) private {
        uint256 paid;
        for (uint256 j; j < ag.payees.length; ++j) {
            uint256 cut = ag.rest * ag.sharesBps[j] / MAX_BPS;
            paid += cut;
            _accrue(batchId, ag.payees[j], ag.adapterId, Role.Dataset, ag.datasetIds[j], cut);
        }
        _accrue(batchId, ag.owner, ag.adapterId, Role.AdapterOwner, ag.adapterId, ag.rest - paid);
    }

    /// @dev Price one record, add its node cut and the rest to their groups, emit its event.
    /// A base-model record (adapterId zero) has no adapter group: its whole fee is the node's.
    function _addRecord(BatchWork memory w, Record calldata r) private {
        if (r.adapterId == bytes32(0)) {
            NodeGroup memory bg = w.nodeGroups[_nodeGroup(w, bytes32(0), r.nodeId)];
            uint256 baseFee = w.basePrice * (uint256(r.promptTokens) + r.completionTokens) / 1000;
            bg.amount += baseFee;
            w.total += baseFee;
            emit RecordSettled(w.batchId, r.requestId, r.adapterId, r.nodeId, r.promptTokens, r.completionTokens, baseFee);
            return;
        }
        AdapterGroup memory ag = w.groups[_adapterGroup(w, r.adapterId)];
        NodeGroup memory ng = w.nodeGroups[_nodeGroup(w, r.adapterId, r.nodeId)];
        uint256 fee = ag.price * (uint256(r.promptTokens) + r.completionTokens) / 1000;
        uint256 nodeCut = fee * w.nodeShareBps / MAX_BPS;
        ng.amount += nodeCut;
        ag.rest += fee - nodeCut;
        w.total += fee;
        emit RecordSettled(w.batchId, r.requestId, r.adapterId, r.nodeId, r.promptTokens, r.completionTokens, fee);
    }

    /// @dev Index of the adapter's group in this batch, created (one registry call) on first use.
    /// Transient storage maps key -> index+1 so lookups stay O(1) in large batches.
    function _adapterGroup(BatchWork memory w, bytes32 adapterId) private returns (uint256) {
        bytes32 key = keccak256(abi.encode(w.batchId, uint256(1), adapterId));
        uint256 found = _tload(key);
        if (found != 0) return found - 1;
        (address owner, uint256 price, bytes32[] memory datasetIds, address[] memory payees, uint16[] memory shares) =
            registry.adapterSplit(adapterId);
        uint256 index = w.nGroups++;
        w.groups[index] = AdapterGroup(adapterId, owner, price, datasetIds, payees, shares, 0);
        _tstore(key, index + 1);
        return index;
    }

    /// @dev Index of the (adapter, node) group in this batch, created on first use.
    function _nodeGroup(BatchWork memory w, bytes32 adapterId, bytes32 nodeId) private returns (uint256) {
        bytes32 key = keccak256(abi.encode(w.batchId, uint256(2), adapterId, nodeId));
        uint256 found = _tload(key);
        if (found != 0) return found - 1;
        uint256 index = w.nNodeGroups++;
        w.nodeGroups[index] = NodeGroup(adapterId, nodeId, registry.nodeOperator(nodeId), 0);
        _tstore(key, index + 1);
        return index;
    }

    function _tload(bytes32 key) private view returns (uint256 v) {
        assembly {
            v := tload(key)
        }
    }

    function _tstore(bytes32 key, uint256 v) private {
        assembly {
            tstore(key, v)
        }
    }

    /// @dev Sorted-pair Merkle root; an odd node at the end of a level moves up unchanged.
    function _merkleRoot(bytes32[] memory level) private pure returns (bytes32) {
        uint256 n = level.length;
        while (n > 1) {
            uint256 m;
            for (uint256 i; i < n; i += 2) {
                level[m++] = i + 1 < n ? _hashPair(level[i], level[i + 1]) : level[i];
            }
            n = m;
        }
        return level[0];
    }

    function _hashPair(bytes32 a, bytes32 b) private pure returns (bytes32 h) {
        (bytes32 lo, bytes32 hi) = a < b ? (a, b) : (b, a);
        assembly {
            mstore(0x00, lo)
            mstore(0x20, hi)
            h := keccak256(0x00, 0x40)
        }
    }
}
