// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title PriceGrace
/// @notice How long a price raise waits before it binds records admitted at the price before it. A gateway
/// quotes a request at the price it knows and settles it later; a raise in between used to leave the record
/// unpayable (the settler never pays above the quote) until the price came back down, and with it the
/// node's and the datasets' shares. So for `grace` seconds after a change, settlement may charge any price
/// between the floor (the lowest price in effect during that time) and the new price: the settler's quote,
/// which the ledger caps there. A settler's quote is its own word, so the floor bounds what it can claim:
/// never below a price that held, never after the grace.
library PriceGrace {
    /// @notice The most a deployment may set `grace` to (a month): a longer one lets a settler pay an old
    /// price for that long.
    uint256 internal constant MAX_GRACE = 30 days;

    /// @dev One price's floor: the lowest price in effect since graceEnds - grace (a timestamp).
    struct Floor {
        uint128 floor;
        uint64 graceEnds;
    }

    error GraceTooLong(uint256 grace, uint256 maxGrace);

    function checkGrace(uint256 grace) internal pure {
        if (grace > MAX_GRACE) revert GraceTooLong(grace, MAX_GRACE);
    }

    /// @dev Record a change away from `oldPrice`, made now: the floor of the grace that starts is the old
    /// price, or a lower floor still in its own grace (two raises within one grace keep the lower floor, so a
    /// record admitted before the first is still payable at its quote).
    function onChange(Floor storage f, uint256 oldPrice, uint256 grace) internal {
        uint256 floor = block.timestamp < f.graceEnds && f.floor < oldPrice ? f.floor : oldPrice;
        f.floor = uint128(floor); // oldPrice <= 2**128 - 1: both prices are bounded there
        f.graceEnds = uint64(block.timestamp + grace);
    }

    /// @dev Whether a price `charged` below the current one may be charged now.
    function allows(Floor memory f, uint256 charged) internal view returns (bool) {
        return block.timestamp < f.graceEnds && charged >= f.floor;
    }
}
