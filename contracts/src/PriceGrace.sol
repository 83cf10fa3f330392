// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title PriceGrace
/// @notice How long a price change waits before it binds records admitted at the price before it. A gateway
/// quotes a request at the price it knows and settles it later; a raise in between used to leave the record
/// unpayable (the settler never pays above the quote) until the price came back down, and with it the
/// node's and the datasets' shares. So for `grace` seconds after a change, settlement may charge the price
/// being replaced, or anything between it and the current price: the settler's quote, which the ledger caps
/// there. A settler's quote is its own word, so what it may claim is bounded: never below a price that held
/// less than `grace` seconds ago.
/// @dev Two slots, each a replaced price and the end of its own grace: the newest, and the lowest earlier one
/// whose grace still runs. A change never extends a slot's end, so no price outlives its grace by being
/// carried from change to change. A third live price is dropped (the higher of the two earlier ones): that
/// only ever allows less, never a price that did not hold, and takes three changes within one grace.
library PriceGrace {
    /// @notice The most a deployment may set `grace` to (a month): a longer one lets a settler pay an old
    /// price for that long.
    uint256 internal constant MAX_GRACE = 30 days;

    /// @dev A price that held until `ends - grace`; chargeable until `ends` (a timestamp).
    struct Slot {
        uint128 price;
        uint64 ends;
    }

    /// @dev One price's grace: the price it replaced last, and the lowest earlier one still in its grace.
    struct Floor {
        Slot newest;
        Slot older;
    }

    error GraceTooLong(uint256 grace, uint256 maxGrace);

    function checkGrace(uint256 grace) internal pure {
        if (grace > MAX_GRACE) revert GraceTooLong(grace, MAX_GRACE);
    }

    /// @dev Record a change away from `oldPrice`, made now: it becomes the newest slot, for `grace` seconds;
    /// of the earlier slots still running, the lower price is kept, with its own end.
    function onChange(Floor storage f, uint256 oldPrice, uint256 grace) internal {
        Slot memory a = f.newest;
        Slot memory b = f.older;
        bool aLive = block.timestamp < a.ends;
        bool bLive = block.timestamp < b.ends;
        if (aLive && (!bLive || a.price <= b.price)) {
            f.older = a;
        } else if (!bLive) {
            delete f.older;
        } // else: b is live and lower (or a is gone); it stays
        // oldPrice <= 2**128 - 1: every price is bounded there (the registry's and the ledger's MAX)
        f.newest = Slot(uint128(oldPrice), uint64(block.timestamp + grace));
    }

    /// @dev Whether a price `charged` below the current one may be charged now: at least a slot's price, before
    /// that slot's end.
    function allows(Floor memory f, uint256 charged) internal view returns (bool) {
        return (block.timestamp < f.newest.ends && charged >= f.newest.price)
            || (block.timestamp < f.older.ends && charged >= f.older.price);
    }
}
