"""`loramesh gateway ...`: run the gateway, manage its API keys and its disputed nodes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from common.help_text import plain_help
from gateway.settings import GatewaySettings
from ledger.db import DEFAULT_DB_URL

log = logging.getLogger("gateway.cli")  # not __name__: it is __main__ under python -m
_GW = GatewaySettings.model_construct()  # the defaults `gateway run --help` shows (no environment read)
console = Console(soft_wrap=True, emoji=False)  # ":100:" in a name stays as written

gateway_app = typer.Typer(
    help="The OpenAI-compatible gateway: run it, manage its API keys and its disputed nodes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="API keys of the gateway (stored hashed; a key is shown once).", no_args_is_help=True)
gateway_app.add_typer(keys_app, name="keys")
disputes_app = typer.Typer(
    help="Nodes kept out of routing for a disputed record (a receipt or text that belied what was relayed), "
    "and readmitting one.",
    no_args_is_help=True,
)
gateway_app.add_typer(disputes_app, name="disputes")


def _max_price_option(left_out: str):
    """--max-price-per-1k-tokens, whose help says what leaving it out means (create: the gateway's default;
    update: the key's stays)."""
    return Annotated[
        int | None,
        typer.Option(
            "--max-price-per-1k-tokens",
            min=0,
            help="The dearest adapter (or base model) this key may use, in wei per 1,000 tokens; a dearer one is "
            f"refused with 403 price_exceeds_key_limit ({left_out}).",
        ),
    ]


MaxPriceOpt = _max_price_option("default: the gateway's LORAMESH_GATEWAY_DEFAULT_MAX_PRICE_PER_1K_TOKENS")
NewMaxPriceOpt = _max_price_option("left out: the key's stays; see --default-max-price")
DbOpt = Annotated[
    str | None, typer.Option("--db", help=f"Database URL (default $LORAMESH_GATEWAY_DB_URL or {DEFAULT_DB_URL}).")
]


def _engine(db: str | None, *, create: bool = False):
    """The gateway's database; only create=True (a new key) makes it when it is not there."""
    import gateway.tables  # noqa: F401 - registers the gateway's tables
    from gateway.storage import tighten_sqlite_file
    from ledger.db import init_db, make_engine

    # a bad or misspelt LORAMESH_GATEWAY_* variable named in one line, as `gateway run` names it
    url = db or gateway_settings().db_url
    tighten_sqlite_file(url)  # 0600: it holds the keys' hashes
    engine = make_engine(url, create=create)
    init_db(engine)  # creates and migrates every registered table, the gateway's included
    return engine


@gateway_app.command("run")
def run(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="TOML file of gateway settings (the names of LORAMESH_GATEWAY_*, lower case: db_url, key_file, "
            "rpc_url, bases and owners_k for --db, --key, --rpc, --base and --owners; settle = false for "
            "--no-settle); flags and the environment win over it.",
        ),
    ] = None,
    rpc: Annotated[str | None, typer.Option("--rpc", help="Chain JSON-RPC URL (default: the deployment's).")] = None,
    deployment: Annotated[
        Path | None,
        typer.Option("--deployment", help="Deployment file (addresses). Default: none (no chain: no settling)."),
    ] = None,
    key: Annotated[
        Path | None,
        typer.Option(
            "--key", help="Identity or hex key file of the settler account (password from LORAMESH_KEY_PASSWORD)."
        ),
    ] = None,
    db: DbOpt = None,
    port: Annotated[
        int | None, typer.Option("--port", min=0, max=65535, help=f"HTTP port (default {_GW.port}).")
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help=f"Address to bind (default {_GW.host}).")] = None,
    base: Annotated[
        list[Path] | None,
        typer.Option("--base", help="Base model folder whose tokenizer renders chat prompts (repeatable)."),
    ] = None,
    k: Annotated[
        int | None,
        typer.Option("--owners", min=1, help=f"Owners per adapter (rendezvous top-k; default {_GW.owners_k})."),
    ] = None,
    no_settle: Annotated[bool, typer.Option("--no-settle", help="Do not run the settler in this process.")] = False,
    max_price: Annotated[
        int | None,
        typer.Option(
            "--default-max-price-per-1k-tokens",
            min=0,
            help="The dearest model (wei per 1,000 tokens) a key without a limit of its own may use (default 10^16).",
        ),
    ] = None,
    gateway_key_file: Annotated[
        Path | None,
        typer.Option(
            "--gateway-key-file",
            help="Ed25519 key that signs the "
            "gateway's calls to nodes (created 0600 when missing; default: a new key per "
            "start).",
        ),
    ] = None,
) -> None:
    """Serve the OpenAI-compatible API (and settle usage on chain when --key is given) until SIGINT or SIGTERM.

    Each setting comes from its flag, else LORAMESH_GATEWAY_<NAME>, else the --config file, else its default."""
    from common.serving import listening_socket, serve
    from gateway.main import create_app
    from ledger.db import redact_url

    settings = gateway_settings(
        config,
        rpc_url=rpc,
        deployment=deployment,
        key_file=key,
        db_url=db,
        port=port,
        host=host,
        owners_k=k,
        bases=base or None,
        default_max_price_per_1k_tokens=max_price,
        gateway_key_file=gateway_key_file,
        settle=False if no_settle else None,
    )
    chain_client = None
    if settings.deployment is not None:
        from ledger.chain import ChainClient

        chain_client = ChainClient.from_deployment(settings.deployment, rpc_url=settings.rpc_url, check=True)
    elif settings.key_file is not None and settings.settle:
        raise typer.BadParameter("settling needs the chain: give --deployment too (or --no-settle)", param_hint="--key")
    # bound before the app is built and before it is said: on a busy port, "gateway on ..." came before "did not
    # start"; on --port 0, the port the system picked is the one named
    sock = listening_socket(settings.host, settings.port, "gateway")
    port = sock.getsockname()[1]
    try:
        app = create_app(settings, chain_client=chain_client)
    except BaseException:
        sock.close()
        raise
    log.info("gateway on http://%s:%d (db %s)", settings.host, port, redact_url(settings.db_url))
    serve(app, host=settings.host, port=port, name="gateway", sock=sock)


def gateway_settings(config: Path | None = None, **flags):
    """The gateway's settings (flags that are None are not given), or a one-line command-line error naming
    what is wrong: an unknown name in the config file, a value out of range, a config file that is not there."""
    from common.settings import SettingsError

    try:
        return GatewaySettings.load(config, **flags)
    except SettingsError as e:
        raise typer.BadParameter(str(e), param_hint="gateway settings") from None


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="A label for the key.")] = "",
    rpm: Annotated[int | None, typer.Option("--rpm", min=1, help="Requests per minute (default unlimited).")] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", min=1, help="Tokens per minute (default unlimited).")] = None,
    adapters: Annotated[
        str,
        typer.Option(
            "--adapters",
            help="Private adapter names listed to this key, "
            "comma-separated (an adapter granted to any key is private).",
        ),
    ] = "",
    max_price: MaxPriceOpt = None,
    db: DbOpt = None,
) -> None:
    """Create a key and print it once: it is stored only as a hash."""
    from gateway.keys import create_key

    secret, info = create_key(
        _engine(db, create=True),
        name=name,
        rpm=rpm,
        tpm=tpm,
        adapters=adapters.split(","),
        max_price_per_1k_tokens=max_price,
    )
    console.print(f"key {info.id} ({escape(info.name or 'unnamed')}) created; it is shown only this once:")
    print(secret)


@keys_app.command("list")
def keys_list(db: DbOpt = None) -> None:
    """List keys (prefix, limits, private adapters, revoked or not)."""
    from gateway.keys import list_keys

    headers = ("id", "name", "prefix", "rpm", "tpm", "max wei/1k", "adapters", "revoked")
    table = Table(*(Column(h, overflow="fold") for h in headers))  # a narrow terminal folds a value, never cuts it
    for k in list_keys(_engine(db)):
        price = "default" if k.max_price_per_1k_tokens is None else str(k.max_price_per_1k_tokens)
        table.add_row(
            str(k.id),
            escape(k.name),  # an operator's text, never read as markup
            k.prefix + "…",
            str(k.requests_per_minute or "-"),
            str(k.tokens_per_minute or "-"),
            price,
            escape(",".join(sorted(k.adapters))) or "-",
            "yes" if k.revoked else "",
        )
    console.print(table)


@keys_app.command("update")
def keys_update(
    ident: Annotated[str, typer.Argument(help="Key id or shown prefix.")],
    rpm: Annotated[int | None, typer.Option("--rpm", min=1, help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", min=1, help="Tokens per minute.")] = None,
    max_price: NewMaxPriceOpt = None,
    unlimited_rpm: Annotated[
        bool, typer.Option("--unlimited-rpm", help="Drop the key's requests per minute limit.")
    ] = False,
    unlimited_tpm: Annotated[
        bool, typer.Option("--unlimited-tpm", help="Drop the key's tokens per minute limit.")
    ] = False,
    default_max_price: Annotated[
        bool,
        typer.Option("--default-max-price", help="Drop the key's own max price: the gateway's default applies again."),
    ] = False,
    db: DbOpt = None,
) -> None:
    """Change a key's limits; what is not given stays (a running gateway sees it within key_cache_ttl_s)."""
    from gateway.keys import ApiKeyError, update_key

    changes = {}
    # each limit: a new value, or dropped (None: unlimited rates, the gateway's default price), not both
    for field, flag, value, drop, drop_flag in (
        ("rpm", "--rpm", rpm, unlimited_rpm, "--unlimited-rpm"),
        ("tpm", "--tpm", tpm, unlimited_tpm, "--unlimited-tpm"),
        ("max_price_per_1k_tokens", "--max-price-per-1k-tokens", max_price, default_max_price, "--default-max-price"),
    ):
        if drop and value is not None:
            raise typer.BadParameter(f"give {flag} or {drop_flag}, not both")
        if drop or value is not None:
            changes[field] = None if drop else value
    try:
        info = update_key(_engine(db), ident, **changes)
    except ApiKeyError as e:
        raise typer.BadParameter(str(e), param_hint="IDENT") from e
    price = "the gateway default" if info.max_price_per_1k_tokens is None else f"{info.max_price_per_1k_tokens} wei"
    console.print(
        f"key {info.id} ({info.prefix}…): rpm {info.requests_per_minute or '-'}, "
        f"tpm {info.tokens_per_minute or '-'}, max price per 1k tokens {price}"
    )


@keys_app.command("revoke")
def keys_revoke(ident: Annotated[str, typer.Argument(help="Key id or shown prefix.")], db: DbOpt = None) -> None:
    """Revoke a key: it gets 401 from then on, and its requests running end at their next token (a streamed one
    billed for what it got, a whole answer refused and not billed), on a running gateway within key_cache_ttl_s
    (2 s by default)."""
    from gateway.keys import revoke_key

    info = revoke_key(_engine(db), ident)
    console.print(f"key {info.id} ({info.prefix}…) revoked")


@disputes_app.command("list")
def disputes_list(
    include_readmitted: Annotated[
        bool, typer.Option("--all", help="Also the nodes readmitted since their last dispute.")
    ] = False,
    db: DbOpt = None,
) -> None:
    """List the disputed nodes, latest dispute first: records disputed (those keeping the node out, and all),
    the reason of the latest, when, and the last readmission."""
    from gateway.disputes import node_disputes

    rows = node_disputes(_engine(db), include_readmitted=include_readmitted)
    if not rows:
        console.print("no node is kept out" + ("" if include_readmitted else " (--all: also those readmitted)"))
    for d in rows:  # a block per node: a 66-character id and a long reason do not fit a table's columns
        state = f"kept out by {d.open} of its" if d.open else "readmitted since its"
        console.print(f"[bold]{d.node_id}[/bold]  {state} {d.records} disputed record(s)", highlight=False)
        # a reason quotes the node's receipt: its text is printed as it is, never read as markup
        console.print(
            f"  latest {d.last_at:%Y-%m-%d %H:%M:%S} UTC: {d.last_reason[:500]}", highlight=False, markup=False
        )
        if d.readmitted_at is not None:
            note = f": {d.note}" if d.note else ""
            console.print(f"  readmitted {d.readmitted_at:%Y-%m-%d %H:%M:%S} UTC{note}", highlight=False, markup=False)


@disputes_app.command("readmit")
def disputes_readmit(
    node: Annotated[str, typer.Argument(help="The node's id, or its first hex digits (at least 6).")],
    note: Annotated[str, typer.Option("--note", help="Why it is readmitted (kept with the readmission).")] = "",
    db: DbOpt = None,
) -> None:
    """Route to a disputed node again: its disputes so far stop keeping it out (they stay unpaid); a later
    one keeps it out again. Running gateways follow within registry_sync_s (2 s by default)."""
    from gateway.disputes import DisputeError, readmit

    try:
        d = readmit(_engine(db), node, note=note)
    except DisputeError as e:
        raise typer.BadParameter(str(e), param_hint="NODE") from e
    console.print(
        f"node {d.node_id} readmitted: its {d.open} disputed record(s) since the last readmission no longer "
        "keep it out (they stay disputed, never settled)"
    )


if __name__ == "__main__":
    from common.logs import configure_logging

    configure_logging()
    plain_help(gateway_app)()
