"""Typed errors of the ledger: chain reachability, deployment mismatch, and decoded contract reverts."""

from __future__ import annotations

from common.wire import hex0x


class LedgerError(RuntimeError):
    """Base of every error the ledger raises at a trust boundary."""


class ChainUnavailable(LedgerError):
    """The JSON-RPC endpoint did not answer (chain down, wrong URL, timeout)."""


class DeploymentMismatch(LedgerError):
    """The deployment file does not describe the chain at its RPC URL."""


class TransactionFailed(LedgerError):
    """A transaction was mined with status 0 and no decodable reason, never got a receipt, or was refused."""


class InsufficientFunds(TransactionFailed):
    """The chain's node refused a transaction: the sending account cannot pay for its gas."""


class ContractError(LedgerError):
    """A contract reverted with a custom error; `.name` and `.args_by_name` hold the decoded error."""

    name: str = ""

    def __init__(self, name: str, args_by_name: dict[str, object], message: str | None = None) -> None:
        self.name = name
        self.args_by_name = args_by_name
        shown = ", ".join(f"{k}={_show(v)}" for k, v in args_by_name.items())
        super().__init__(message or f"contract reverted: {name}({shown})")


def _show(v: object) -> str:
    if isinstance(v, (bytes, bytearray)):
        return hex0x(v)
    return str(v)


class UnknownRevert(ContractError):
    """A revert whose data matches no error in our ABIs (or a plain require/panic)."""


# One class per custom error in contracts/src, so callers catch exactly what they handle.
class ZeroId(ContractError): ...


class ZeroAddress(ContractError): ...


class ZeroAmount(ContractError): ...


class DatasetAlreadyRegistered(ContractError): ...


class UnknownDataset(ContractError): ...


class NotDatasetPayee(ContractError): ...


class AdapterAlreadyRegistered(ContractError): ...


class UnknownAdapter(ContractError): ...


class UnknownPredecessor(ContractError): ...


class NotAdapterOwner(ContractError): ...


class LengthMismatch(ContractError): ...


class DuplicateDataset(ContractError): ...


class SharesExceedTotal(ContractError): ...


class NodeAlreadyRegistered(ContractError): ...


class UnknownNode(ContractError): ...


class NotNodeOperator(ContractError): ...


class EmptyName(ContractError): ...


class NotNameOwner(ContractError): ...


class PredecessorRequired(ContractError): ...


class PredecessorNameMismatch(ContractError): ...


class InvalidSignature(ContractError): ...


class SignatureMismatch(ContractError): ...


class NodeKeyMismatch(ContractError): ...


class InvalidNodeProof(ContractError): ...


class InvalidName(ContractError): ...


class InvalidVersion(ContractError): ...


class InvalidNodeAddress(ContractError): ...


class PriceTooHigh(ContractError): ...


class TooManyDatasets(ContractError): ...


class NotCommitted(ContractError): ...


class CommitTooRecent(ContractError): ...


class NotAdmin(ContractError): ...


class NotSettler(ContractError): ...


class InvalidShare(ContractError): ...


class EmptyBatch(ContractError): ...


class BatchAlreadySettled(ContractError): ...


class BatchIdMismatch(ContractError): ...


class MerkleRootMismatch(ContractError): ...


class InsufficientDeposit(ContractError): ...


class PriceAboveQuote(ContractError): ...


class MaxPricesMismatch(ContractError): ...


class InsufficientRewards(ContractError): ...


class NothingToWithdraw(ContractError): ...


class TransferFailed(ContractError): ...


class SequenceMismatch(ContractError):
    """settleBatch's firstSequence is not the settler's nextSequence: a batch before it is not settled
    yet, or this range was settled by another batch."""


class MalformedRecords(ContractError): ...


class TooManyAdapters(ContractError): ...


class TooManyNodes(ContractError): ...


class TableNotIncreasing(ContractError): ...


class RecordIndexOutOfRange(ContractError): ...


class InvalidPrice(ContractError): ...


class GraceTooLong(ContractError):
    """A deployment's price grace above PriceGrace.MAX_GRACE (30 days)."""


ERROR_CLASSES: dict[str, type[ContractError]] = {
    cls.__name__: cls for cls in ContractError.__subclasses__() if cls is not UnknownRevert
}
