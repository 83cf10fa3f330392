// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AdapterRegistry} from "./AdapterRegistry.sol";
import {PriceGrace} from "./PriceGrace.sol";

/// @title AttributionLedger
/// @notice Settles batches of inference records in the native coin. A settler (a gateway, granted by
/// the admin) prepays a deposit; each batch pulls its records' fees from that deposit and accrues
/// them to node operators, adapter owners and dataset payees, who withdraw what accrued.
/// A record whose adapter is the zero id is an inference of the bare base model: its fee is
/// basePricePer1kTokens per 1,000 tokens and all of it accrues to the serving node's operator.
///
/// Exactly once. Every settler numbers its records in one gapless sequence 0, 1, 2, ...: a batch names
/// the sequence number of its first record (firstSequence) and is accepted only when that is exactly
/// where the settler's last settled batch ended (nextSequence(settler); SequenceMismatch otherwise), so
/// the chain holds, at O(1) storage per settler and per batch:
///  - each (settler, sequence number) is settled at most once, and the settled numbers of a settler are
///    exactly 0 .. nextSequence(settler) - 1, every one in exactly one batch;
///  - every record's Merkle leaf binds its request id to its sequence number (leafOf), and the batch
///    stores its settler and first number, so `verifyRecord` proves which (settler, sequence) paid it;
///  - a batch id is accepted once (BatchAlreadySettled), and names what it settles and at what prices: its
///    first 28 bytes are those of keccak256(abi.encode(adapterIds, nodeIds, records, maxPrices)), its last 4
///    the settler's own salt (BatchIdMismatch otherwise). Two settlers sending one batch (one took over the
///    other's) send one id, settled once; a settler that takes another's id from the mempool can only settle
///    those very records at those very prices, paying them in full, not freeze the batch with junk (or
///    with its records charged lower) under its id.
/// A settler that writes a batch's numbers durably before sending it (ledger/settler.py) resends it after a
/// crash with the same numbers: a record sent twice at its number is refused the second time, whatever
/// batch carries it (SequenceMismatch), so at most one of the sends is paid. What the chain does NOT refuse
/// is a dishonest settler giving one request id two sequence numbers (in its own batches, or under two
/// settler addresses): refusing that would need a storage slot per request id (22,100 gas, more than a
/// whole record costs here). It costs that settler its own deposit and is visible to anyone from the chain
/// alone: every record is in the RecordsSettled log of its batch (settler, first sequence number,
/// id tables, prices, packed records), and the logs of one settler, ordered by firstSequence, must cover
/// 0 .. nextSequence(settler) - 1 without gap or overlap (they do, by the rule above) and name no request
/// id twice across all settlers. Two leaves with one request id, each proven with verifyRecord, are the
/// evidence against the settler (the admin revokes it).
///
/// Records are packed calldata, RECORD_BYTES (42) each: requestId (32 bytes), adapter index (1), node
/// index (1) into the batch's adapterIds / nodeIds tables, promptTokens (uint32, 4), completionTokens
/// (uint32, 4), big-endian. The node table is strictly increasing (a node appears once). The adapter table is
/// strictly increasing in (adapter id, maxPrices entry): an adapter appears once for each price its records are
/// charged in the batch (records admitted at an older price during a raise's grace, PriceGrace), so a settler
/// never needs a batch per price. Each entry's accruals are split once, as a batch of its own records would be.
/// The tables hold at most MAX_ADAPTERS_PER_BATCH entries / MAX_NODES_PER_BATCH ids. The records are re-emitted in one RecordsSettled log
/// per batch rather than left in calldata only: a log is readable with eth_getLogs by anyone, whoever
/// called settleBatch (a multisig or a contract settler leaves no top-level calldata to read), in bulk,
/// and costs about 340 gas a record (8 gas a byte); one log per record cost ten times that.
/// @dev Money invariant: totalDeposited == totalAccrued + sum(deposits left) + totalReclaimed and
/// totalAccrued == sum(rewards available) + totalWithdrawn; the balance equals deposits left plus
/// rewards available. An account's accrued total is not stored: it is what is available plus what was withdrawn
/// (each accrual adds to the first, each withdrawal moves from the first to the second), so an accrual writes one
/// storage slot, not two (5,000 gas an account of a batch, 20,000 for an account paid for the first time).
contract AttributionLedger {
    uint16 public constant MAX_BPS = 10_000;
    /// @notice Bytes of one packed record in settleBatch's `records`.
    uint256 public constant RECORD_BYTES = 42;
    /// @notice Most adapter entries (an adapter once per price it is charged; the base model counts) in one batch.
    uint256 public constant MAX_ADAPTERS_PER_BATCH = 32;
    /// @notice Most distinct nodes in one batch.
    uint256 public constant MAX_NODES_PER_BATCH = 64;
    /// @notice Highest base price, as AdapterRegistry.MAX_PRICE_PER_1K_TOKENS bounds adapter prices: with
    /// uint32 token counts no fee, and no sum of fees of a batch, can overflow.
    uint256 public constant MAX_BASE_PRICE = type(uint128).max;

    struct Batch {
        bytes32 merkleRoot;
        address settler;
        uint64 settledBlock;
        uint32 recordCount;
        uint192 totalFees;
        uint64 firstSequence;
    }

    enum Role {
        Node,
        AdapterOwner,
        Dataset
    }

    /// @dev How one adapter of a batch is paid (adapterId zero: the base model, no owner, no datasets).
    struct AdapterSplit {
        address owner;
        bytes32[] datasetIds;
        address[] payees;
        uint16[] sharesBps;
    }

    /// @dev Working state of one settleBatch call, flat arrays the record loop indexes directly.
    struct BatchWork {
        uint256[] prices; // per adapter entry: fee per 1,000 tokens
        uint256[] nodeBps; // per adapter entry: the node's share (MAX_BPS for the base model)
        uint256[] rests; // per adapter entry: sum over its records of fee - node cut
        uint256[] nodeSums; // per (adapter, node) entry, index a * nodes + n: sum of node cuts
        address[] operators; // per node entry
        AdapterSplit[] splits; // per adapter entry
        // where the id tables are in calldata and how long (read by the record loop in assembly, which has
        // no stack slots left for them): word 6 adapterIds.offset, 7 its length, 8 nodes' length, 9 offset
        uint256 adapterIdsOffset;
        uint256 adapterCount;
        uint256 nodeCount;
        uint256 nodeIdsOffset;
        uint256 total; // word 10: sum of the fees
        bytes32[] leaves; // word 11
    }

    AdapterRegistry public immutable registry;
    address public admin;
    uint16 public nodeShareBps;
    /// @notice Fee per 1,000 tokens of a base-model record (adapterId zero), in wei; set by the admin.
    uint256 public basePricePer1kTokens;
    /// @notice The registry's priceGraceSeconds, which the base price follows too.
    uint256 public immutable priceGraceSeconds;
    PriceGrace.Floor private _baseFloor;

    uint256 public totalDeposited;
    uint256 public totalAccrued;
    uint256 public totalWithdrawn;
    uint256 public totalReclaimed;

    mapping(address => bool) private _settlers;
    mapping(address => uint256) private _deposits;
    mapping(address => uint256) private _available;
    mapping(address => uint256) private _withdrawn;
    mapping(bytes32 => Batch) private _batches;
    mapping(address => uint64) private _nextSequence;

    error ZeroId();
    error ZeroAddress();
    error ZeroAmount();
    error NotAdmin(address caller);
    error NotSettler(address caller);
    error InvalidShare(uint256 bps);
    error EmptyBatch();
    error BatchAlreadySettled(bytes32 batchId);
    error BatchIdMismatch(bytes32 batchId, bytes28 content);
    error MerkleRootMismatch(bytes32 given, bytes32 computed);
    error InsufficientDeposit(address settler, uint256 needed, uint256 available);
    error PriceAboveQuote(bytes32 adapterId, uint256 price, uint256 maxPrice);
    error MaxPricesMismatch(uint256 adapters, uint256 maxPrices);
    error InsufficientRewards(address account, uint256 requested, uint256 available);
    error NothingToWithdraw(address account);
    error TransferFailed(address to, uint256 amount);
    error SequenceMismatch(address settler, uint64 expected, uint64 given);
    error MalformedRecords(uint256 length);
    error TooManyAdapters(uint256 count, uint256 max);
    error TooManyNodes(uint256 count, uint256 max);
    error TableNotIncreasing(uint256 index);
    error RecordIndexOutOfRange(uint256 record);
    error InvalidPrice(uint256 price);

    event AdminTransferred(address indexed previousAdmin, address indexed newAdmin);
    event SettlerGranted(address indexed settler);
    event SettlerRevoked(address indexed settler);
    event NodeShareChanged(uint16 nodeShareBps);
    event BasePriceChanged(uint256 basePricePer1kTokens);
    event Deposited(address indexed settler, address indexed from, uint256 amount);
    event DepositReclaimed(address indexed settler, uint256 amount);
    /// @notice Every record of a batch, in leaf order: record i has sequence number firstSequence + i and
    /// is the i-th RECORD_BYTES of `records` (see the contract's notice); its fee is
    /// prices[adapter index] * (promptTokens + completionTokens) / 1000, rounded down.
    event RecordsSettled(
        bytes32 indexed batchId,
        address indexed settler,
        uint64 firstSequence,
        bytes32[] adapterIds,
        bytes32[] nodeIds,
        uint256[] prices,
        bytes records
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

    /// @param basePrice the first basePricePer1kTokens: set here, not by a change after deployment, whose grace
    /// would let base records of the first priceGraceSeconds be charged down to 0.
    constructor(AdapterRegistry registry_, address admin_, uint16 nodeShareBps_, uint256 basePrice) {
        if (address(registry_) == address(0) || admin_ == address(0)) revert ZeroAddress();
        if (nodeShareBps_ > MAX_BPS) revert InvalidShare(nodeShareBps_);
        if (basePrice > MAX_BASE_PRICE) revert InvalidPrice(basePrice);
        registry = registry_;
        priceGraceSeconds = registry_.priceGraceSeconds();
        admin = admin_;
        nodeShareBps = nodeShareBps_;
        basePricePer1kTokens = basePrice;
        emit AdminTransferred(address(0), admin_);
        emit NodeShareChanged(nodeShareBps_);
        emit BasePriceChanged(basePrice);
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
    /// For priceGraceSeconds after it, base records admitted before may still be charged down to the price
    /// before (basePriceFloor).
    function setBasePricePer1kTokens(uint256 price) external onlyAdmin {
        if (price > MAX_BASE_PRICE) revert InvalidPrice(price);
        PriceGrace.onChange(_baseFloor, basePricePer1kTokens, priceGraceSeconds);
        basePricePer1kTokens = price;
        emit BasePriceChanged(price);
    }

    /// @notice The base prices replaced whose grace may still run, as AdapterRegistry.priceFloor says of an
    /// adapter's: base records may be charged from floor until graceEnds, from olderFloor until olderGraceEnds.
    function basePriceFloor()
        external
        view
        returns (uint256 floor, uint256 graceEnds, uint256 olderFloor, uint256 olderGraceEnds)
    {
        PriceGrace.Floor storage f = _baseFloor;
        return (f.newest.price, f.newest.ends, f.older.price, f.older.ends);
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

    /// @notice Settle a batch: check that it starts at the caller's next sequence number, recompute its
    /// Merkle root from the records, pull its fees from the caller's deposit and accrue them.
    /// `records` is packed (RECORD_BYTES each, see the contract's notice), indexing `adapterIds` (strictly
    /// increasing in (id, maxPrices entry): an adapter once per price) and the strictly increasing `nodeIds`.
    /// Reverts with SequenceMismatch unless firstSequence == nextSequence(caller), BatchAlreadySettled when this batch id was settled before, BatchIdMismatch
    /// unless the id's first 28 bytes are those of keccak256(abi.encode(adapterIds, nodeIds, records,
    /// maxPrices)), and PriceAboveQuote when an adapter entry's price is above maxPrices[i], the price the
    /// settler priced its records at (one bound per entry of `adapterIds`, in its order; the base model's
    /// entry bounds the base price), unless the price changed less than priceGraceSeconds ago and maxPrices[i]
    /// is at least its floor (PriceGrace): then the entry is charged maxPrices[i]. So an adapter owner who
    /// raises the price after requests were admitted (or after the batch was priced, front-running it) gets
    /// them charged at the price they were shown while the grace lasts, and refused and re-priced after it,
    /// never charged at a price the settler did not see; and a settler cannot charge below a price that held.
    /// Each price is bounded on its own: a bound on the batch's total would let an owner raise one adapter's
    /// price while cutting another's in the same batch, and charge the first one's requests above the price
    /// they were shown.
    function settleBatch(
        bytes32 batchId,
        bytes32 merkleRoot,
        uint64 firstSequence,
        bytes32[] calldata adapterIds,
        bytes32[] calldata nodeIds,
        bytes calldata records,
        uint256[] calldata maxPrices
    ) external {
        if (!_settlers[msg.sender]) revert NotSettler(msg.sender);
        if (batchId == bytes32(0)) revert ZeroId();
        if (records.length == 0) revert EmptyBatch();
        if (_batches[batchId].settledBlock != 0) revert BatchAlreadySettled(batchId);
        uint256 n = records.length / RECORD_BYTES;
        if (n * RECORD_BYTES != records.length || n > type(uint32).max) revert MalformedRecords(records.length);
        if (firstSequence != _nextSequence[msg.sender]) {
            revert SequenceMismatch(msg.sender, _nextSequence[msg.sender], firstSequence);
        }

        BatchWork memory w = _prepare(adapterIds, nodeIds, maxPrices);
        _applyQuotes(w.prices, adapterIds, maxPrices);
        _scan(w, firstSequence, records);
        bytes32 computed = _merkleRoot(w.leaves);
        if (computed != merkleRoot) revert MerkleRootMismatch(merkleRoot, computed);
        _checkBatchId(batchId, adapterIds, nodeIds, records, maxPrices);
        _charge(batchId, merkleRoot, firstSequence, n, w.total);
        _payOutBatch(batchId, w, adapterIds, nodeIds);
        emit RecordsSettled(batchId, msg.sender, firstSequence, adapterIds, nodeIds, w.prices, records);
        emit BatchSettled(batchId, msg.sender, merkleRoot, uint32(n), w.total);
    }

    /// @dev Refuse a batch id that does not name the batch's content and prices (its first 28 bytes).
    function _checkBatchId(
        bytes32 batchId,
        bytes32[] calldata adapterIds,
        bytes32[] calldata nodeIds,
        bytes calldata records,
        uint256[] calldata maxPrices
    ) private pure {
        bytes28 content = bytes28(keccak256(abi.encode(adapterIds, nodeIds, records, maxPrices)));
        if (bytes28(batchId) != content) revert BatchIdMismatch(batchId, content);
    }

    /// @dev Charge each adapter entry the lower of its price and what the settler priced it at, where the
    /// grace allows that (PriceGrace); refuse the batch where it does not. The floor is read only for an
    /// entry priced below its price: a batch priced at the prices costs no more gas than before.
    function _applyQuotes(uint256[] memory prices, bytes32[] calldata adapterIds, uint256[] calldata maxPrices)
        private
        view
    {
        PriceGrace.Floor memory f;
        bytes32 floorOf; // the entry whose floor `f` holds (entries of one adapter are adjacent: read it once)
        bool read;
        for (uint256 a; a < prices.length; ++a) {
            if (prices[a] <= maxPrices[a]) continue;
            bytes32 id = adapterIds[a];
            if (!read || id != floorOf) {
                if (id == bytes32(0)) {
                    f = _baseFloor;
                } else {
                    (uint256 p1, uint256 e1, uint256 p2, uint256 e2) = registry.priceFloor(id);
                    f = PriceGrace.Floor(
                        PriceGrace.Slot(uint128(p1), uint64(e1)), PriceGrace.Slot(uint128(p2), uint64(e2))
                    );
                }
                (floorOf, read) = (id, true);
            }
            if (!PriceGrace.allows(f, maxPrices[a])) revert PriceAboveQuote(id, prices[a], maxPrices[a]);
            prices[a] = maxPrices[a];
        }
    }

    /// @dev Take the batch's fees from the caller's deposit, advance its sequence and store the batch.
    function _charge(bytes32 batchId, bytes32 merkleRoot, uint64 firstSequence, uint256 n, uint256 total) private {
        uint256 available = _deposits[msg.sender];
        if (total > available) revert InsufficientDeposit(msg.sender, total, available);
        _deposits[msg.sender] = available - total;
        totalAccrued += total;
        _nextSequence[msg.sender] = firstSequence + uint64(n);
        _batches[batchId] = Batch({
            merkleRoot: merkleRoot,
            settler: msg.sender,
            settledBlock: uint64(block.number),
            recordCount: uint32(n),
            totalFees: uint192(total), // total <= the deposit, itself a sum of msg.values
            firstSequence: firstSequence
        });
    }

    /// @notice The sequence number the settler's next batch must start at: how many records it settled.
    function nextSequence(address settler) external view returns (uint64) {
        return _nextSequence[settler];
    }

    /// @notice Whether a batch id has been settled.
    function isSettled(bytes32 batchId) external view returns (bool) {
        return _batches[batchId].settledBlock != 0;
    }

    /// @notice A settled batch (all zero when unknown).
    function getBatch(bytes32 batchId) external view returns (Batch memory) {
        return _batches[batchId];
    }

    /// @notice The Merkle leaf of the record with this sequence number, as settlement computes it:
    /// keccak256(abi.encode(sequence, requestId, adapterId, nodeId, promptTokens, completionTokens)).
    function leafOf(
        uint64 sequence,
        bytes32 requestId,
        bytes32 adapterId,
        bytes32 nodeId,
        uint32 promptTokens,
        uint32 completionTokens
    ) public pure returns (bytes32) {
        return keccak256(abi.encode(sequence, requestId, adapterId, nodeId, promptTokens, completionTokens));
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
        (available, withdrawn) = (_available[account], _withdrawn[account]);
        accrued = available + withdrawn;
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
        emit RewardAccrued(batchId, account, adapterId, role, subject, amount);
    }

    /// @dev Check the id tables and read, once per adapter and node, what the record loop and the payout
    /// need: each adapter's price and split (the base model: the base price, all to the node), shared by
    /// its entries, and each node's operator (an unknown adapter or node reverts in the registry).
    function _prepare(bytes32[] calldata adapterIds, bytes32[] calldata nodeIds, uint256[] calldata maxPrices)
        private
        view
        returns (BatchWork memory w)
    {
        uint256 nA = adapterIds.length;
        uint256 nN = nodeIds.length;
        if (maxPrices.length != nA) revert MaxPricesMismatch(nA, maxPrices.length);
        if (nA > MAX_ADAPTERS_PER_BATCH) revert TooManyAdapters(nA, MAX_ADAPTERS_PER_BATCH);
        if (nN > MAX_NODES_PER_BATCH) revert TooManyNodes(nN, MAX_NODES_PER_BATCH);
        w.prices = new uint256[](nA);
        w.nodeBps = new uint256[](nA);
        w.rests = new uint256[](nA);
        w.nodeSums = new uint256[](nA * nN);
        w.operators = new address[](nN);
        w.splits = new AdapterSplit[](nA);
        w.adapterCount = nA;
        w.nodeCount = nN;
        uint256 aOff;
        uint256 nOff;
        assembly {
            aOff := adapterIds.offset
            nOff := nodeIds.offset
        }
        w.adapterIdsOffset = aOff;
        w.nodeIdsOffset = nOff;
        uint16 share = nodeShareBps;
        for (uint256 a; a < nA; ++a) {
            bytes32 id = adapterIds[a];
            if (a > 0) {
                bytes32 prev = adapterIds[a - 1];
                if (id < prev || (id == prev && maxPrices[a] <= maxPrices[a - 1])) revert TableNotIncreasing(a);
                if (id == prev) {
                    // the same adapter at another price: what was read for its entry before
                    (w.prices[a], w.nodeBps[a], w.splits[a]) = (w.prices[a - 1], w.nodeBps[a - 1], w.splits[a - 1]);
                    continue;
                }
            }
            if (id == bytes32(0)) {
                w.prices[a] = basePricePer1kTokens;
                w.nodeBps[a] = MAX_BPS;
                continue;
            }
            AdapterSplit memory sp = w.splits[a];
            (sp.owner, w.prices[a], sp.datasetIds, sp.payees, sp.sharesBps) = registry.adapterSplit(id);
            w.nodeBps[a] = share;
        }
        for (uint256 k; k < nN; ++k) {
            bytes32 id = nodeIds[k];
            if (k > 0 && id <= nodeIds[k - 1]) revert TableNotIncreasing(MAX_ADAPTERS_PER_BATCH + k);
            w.operators[k] = registry.nodeOperator(id);
        }
    }

    /// @dev The record loop: decode each packed record, hash its leaf into `leaves` and add its fee to
    /// its (adapter, node) sums; then the root over the leaves. Per record: fee = price * tokens / 1000
    /// and node cut = fee * bps / MAX_BPS, both rounded down, exactly as when records were settled one
    /// by one. Written in assembly because it runs once per record: the leaf preimage is six words of
    /// scratch memory reused by every record (abi.encode would allocate 192 fresh bytes each time, and
    /// memory costs grow quadratically), and no bounds checks run but the index checks below.
    /// Unchecked arithmetic is safe by bounds: price <= 2**128 - 1 (registry and MAX_BASE_PRICE),
    /// tokens < 2**33, bps <= 10,000, fewer than 2**32 records, so every product and sum stays below
    /// 2**210.
    function _scan(BatchWork memory w, uint256 seq, bytes calldata records) private pure {
        w.leaves = new bytes32[](records.length / RECORD_BYTES);
        assembly ("memory-safe") {
            let pre := mload(0x40) // scratch past the free pointer: nothing is allocated while the loop runs
            let dst := add(mload(add(w, 0x160)), 0x20) // w.leaves, written from its first entry
            let end := add(records.offset, records.length)
            for { let src := records.offset } lt(src, end) { src := add(src, 42) } {
                // word 2 of a record: adapter index, node index, prompt and completion tokens, then the next
                // record's bytes (or zeros past the end of calldata), masked off
                let w1 := calldataload(add(src, 32))
                let a := byte(0, w1)
                let k := byte(1, w1)
                if iszero(and(lt(a, mload(add(w, 0xe0))), lt(k, mload(add(w, 0x100))))) {
                    mstore(0x00, shl(224, 0x9419b0f7)) // RecordIndexOutOfRange(uint256 record)
                    mstore(0x04, shr(5, sub(dst, add(mload(add(w, 0x160)), 0x20))))
                    revert(0x00, 0x24)
                }
                mstore(pre, seq)
                mstore(add(pre, 0x20), calldataload(src))
                mstore(add(pre, 0x40), calldataload(add(mload(add(w, 0xc0)), shl(5, a)))) // adapterIds[a]
                mstore(add(pre, 0x60), calldataload(add(mload(add(w, 0x120)), shl(5, k)))) // nodeIds[k]
                let t := and(shr(208, w1), 0xffffffff) // promptTokens
                mstore(add(pre, 0x80), t)
                w1 := and(shr(176, w1), 0xffffffff) // completionTokens
                mstore(add(pre, 0xa0), w1)
                mstore(dst, keccak256(pre, 0xc0))
                dst := add(dst, 0x20)
                seq := add(seq, 1)
                // k: the (adapter, node) sum's slot in nodeSums; a: entry a's offset in a memory uint256[]
                k := add(mload(add(w, 0x60)), shl(5, add(add(mul(a, mload(add(w, 0x100))), k), 1)))
                a := shl(5, add(a, 1))
                t := div(mul(mload(add(mload(w), a)), add(t, w1)), 1000) // fee
                w1 := div(mul(t, mload(add(mload(add(w, 0x20)), a))), 10000) // node cut
                mstore(k, add(mload(k), w1))
                k := add(mload(add(w, 0x40)), a) // rests[a]
                mstore(k, add(mload(k), sub(t, w1)))
                mstore(add(w, 0x140), add(mload(add(w, 0x140)), t)) // w.total
            }
        }
    }

    /// @dev Accrue a batch: each node's operator its cuts (one balance update per node, one
    /// RewardAccrued per (adapter, node)), then each adapter's datasets and owner the rest.
    function _payOutBatch(bytes32 batchId, BatchWork memory w, bytes32[] calldata adapterIds, bytes32[] calldata nodeIds)
        private
    {
        uint256 nA = adapterIds.length;
        uint256 nN = nodeIds.length;
        for (uint256 k; k < nN; ++k) {
            uint256 sum;
            for (uint256 a; a < nA; ++a) {
                uint256 cut = w.nodeSums[a * nN + k];
                if (cut == 0) continue;
                sum += cut;
                emit RewardAccrued(batchId, w.operators[k], adapterIds[a], Role.Node, nodeIds[k], cut);
            }
            _credit(w.operators[k], sum);
        }
        for (uint256 a; a < nA; ++a) {
            if (adapterIds[a] != bytes32(0)) _splitAdapter(batchId, adapterIds[a], w.splits[a], w.rests[a]);
        }
    }

    /// @dev Dataset payees get their shares of the non-node part; the owner gets the rest, dust included.
    function _splitAdapter(bytes32 batchId, bytes32 adapterId, AdapterSplit memory sp, uint256 rest) private {
        uint256 paid;
        for (uint256 j; j < sp.payees.length; ++j) {
            uint256 cut = rest * sp.sharesBps[j] / MAX_BPS;
            paid += cut;
            _accrue(batchId, sp.payees[j], adapterId, Role.Dataset, sp.datasetIds[j], cut);
        }
        _accrue(batchId, sp.owner, adapterId, Role.AdapterOwner, adapterId, rest - paid);
    }

    function _credit(address account, uint256 amount) private {
        if (amount == 0) return;
        _available[account] += amount;
    }

    /// @dev Sorted-pair Merkle root over `level`, hashed in place; an odd node at the end of a level
    /// moves up unchanged. Assembly: one keccak per pair in scratch space, no bounds checks.
    function _merkleRoot(bytes32[] memory level) private pure returns (bytes32 root) {
        assembly ("memory-safe") {
            let base := add(level, 0x20)
            let n := mload(level)
            for {} gt(n, 1) {} {
                let m := 0
                let i := 0
                for {} lt(add(i, 1), n) { i := add(i, 2) } {
                    let x := mload(add(base, shl(5, i)))
                    let y := mload(add(base, shl(5, add(i, 1))))
                    switch lt(x, y)
                    case 1 {
                        mstore(0x00, x)
                        mstore(0x20, y)
                    }
                    default {
                        mstore(0x00, y)
                        mstore(0x20, x)
                    }
                    mstore(add(base, shl(5, m)), keccak256(0x00, 0x40))
                    m := add(m, 1)
                }
                if lt(i, n) {
                    mstore(add(base, shl(5, m)), mload(add(base, shl(5, i))))
                    m := add(m, 1)
                }
                n := m
            }
            root := mload(base)
        }
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
