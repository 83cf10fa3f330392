// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @notice Test-only: emits the registry's dataset events with any bytes, as a registry that does not
/// check its strings would. Tests put this code at the registry's address for one transaction
/// (anvil_setCode) to see that readers leave out a log they cannot decode and go on.
contract RegistryLogForger {
    event DatasetRegistered(bytes32 indexed datasetId, address indexed payee, bytes32 contentHash, string name);
    event DatasetPayeeChanged(bytes32 indexed datasetId, address indexed payee);

    /// @notice A dataset registered under `name`, then its payee moved to `newPayee`, in one transaction.
    function datasetThenPayee(bytes32 datasetId, bytes calldata name, address newPayee) external {
        emit DatasetRegistered(datasetId, msg.sender, bytes32(0), string(name));
        emit DatasetPayeeChanged(datasetId, newPayee);
    }
}
