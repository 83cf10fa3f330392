// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title RejectingPayee
/// @notice Test-only: an account that refuses the native coin, to exercise TransferFailed paths.
contract RejectingPayee {
    /// @notice Forward a call (e.g. withdraw()) to `target` as this contract.
    function callAs(address target, bytes calldata data) external payable returns (bytes memory) {
        (bool ok, bytes memory ret) = target.call{value: msg.value}(data);
        if (!ok) {
            assembly {
                revert(add(ret, 0x20), mload(ret))
            }
        }
        return ret;
    }
}
