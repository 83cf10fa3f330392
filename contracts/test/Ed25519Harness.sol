// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Ed25519} from "../src/Ed25519.sol";

/// @title Ed25519Harness
/// @notice Test-only: exposes the Ed25519 library to tests/contracts/test_ed25519.py.
contract Ed25519Harness {
    function verify(bytes32 publicKey, bytes32 r, bytes32 s, bytes calldata message) external view returns (bool) {
        return Ed25519.verify(publicKey, r, s, message);
    }

    /// The verdict and the gas the library call alone used (no transaction or calldata overhead).
    function verifyGas(bytes32 publicKey, bytes32 r, bytes32 s, bytes calldata message)
        external
        view
        returns (bool ok, uint256 gasUsed)
    {
        uint256 before = gasleft();
        ok = Ed25519.verify(publicKey, r, s, message);
        gasUsed = before - gasleft();
    }

    /// A node-key proof as the registry checks it: the key signs
    /// abi.encodePacked(bytes("loramesh.node.v2"), chainid, registry, operator, nonce), with this contract
    /// in the registry's place; pins the byte layout the Python signer must produce.
    function verifyNodeProof(bytes32 publicKey, bytes32 r, bytes32 s, address operator, uint256 nonce)
        external
        view
        returns (bool)
    {
        bytes memory message =
            abi.encodePacked(bytes("loramesh.node.v2"), block.chainid, address(this), operator, nonce);
        return Ed25519.verify(publicKey, r, s, message);
    }
}
