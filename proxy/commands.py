"""The CLI's admin commands (`metering-proxy accounts|keys|credits|ledger|usage|generations|
reconcile|webhooks ...`): each one call to the service layer the admin API uses, its answer printed
by `output.emit` (a table, or the API's JSON with `--json`)."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from . import keyspace, output
from .output import emit
from .schemas import loads
from .service import Service

ACCOUNT_COLUMNS = ("id", "status", "plan", "tier", "balance_usd", "available_usd", "reserved_usd", "overage_usd")
ENTRY_COLUMNS = ("id", "created_at", "type", "amount_usd", "balance_usd", "model", "request_id", "key_id", "grant_id")
KEY_COLUMNS = ("id", "name", "status", "limit_usd", "limit_reset", "limit_remaining_usd", "usage_usd.total",
               "reserved_usd", "expires_at", "allowed_models", "rate_limits")  # fmt: skip
DEAD_COLUMNS = ("account_id", "id", "type", "tries", "error", "dead_at")


def account_body(args: Any) -> dict[str, Any]:
    """The PATCH body the flags describe (the same fields as the admin API)."""
    body = loads(args.body) if args.body else {}
    body.update(dict.fromkeys(args.clear or (), None))
    flags = {"plan": args.plan, "overage_limit_usd": args.overage_limit, "status": args.status}
    body.update({name: value for name, value in flags.items() if value is not None})
    limits = {name: value for name, value in (("rpm", args.rpm), ("tpm", args.tpm)) if value is not None}
    if limits:
        body["rate_limits"] = limits
    topup = (
        ("threshold_usd", args.auto_topup_threshold),
        ("amount_usd", args.auto_topup_amount),
        ("target_usd", args.auto_topup_target),
    )
    if any(value is not None for _, value in topup):
        body["auto_topup"] = {name: value for name, value in topup if value is not None}
    if args.metadata is not None:
        body["metadata"] = loads(args.metadata)
    if args.low_balance_thresholds is not None:
        body["low_balance_thresholds_usd"] = [t.strip() for t in args.low_balance_thresholds.split(",") if t.strip()]
    return body


async def accounts_create(svc: Service, args: Any) -> int:
    return emit(await svc.create_account({"id": args.account, **account_body(args)}))


async def accounts_get(svc: Service, args: Any) -> int:
    return emit(await svc.get_account(args.account))


async def accounts_update(svc: Service, args: Any) -> int:
    return emit(await svc.update_account(args.account, account_body(args)))


async def accounts_list(svc: Service, args: Any) -> int:
    """Every account with its balance, a page of summaries at a time (lazy expiry and allocations apply)."""
    listed: list[dict[str, Any]] = []
    query: dict[str, Any] = {"limit": 200}
    while True:  # every page: the CLI lists them all
        page = await svc.list_accounts(query)
        listed += page["data"]
        if page["next_cursor"] is None:
            return emit({"object": "list", "data": listed}, ACCOUNT_COLUMNS)
        query["cursor"] = page["next_cursor"]


def key_body(args: Any) -> dict[str, Any]:
    """The key settings the flags describe (the same fields as the admin API)."""
    body = loads(args.body) if args.body else {}
    body.update(dict.fromkeys(getattr(args, "clear", None) or (), None))
    flags = {"name": args.name, "limit_usd": args.limit, "limit_reset": args.limit_reset, "expires_at": args.expires_at}
    body.update({name: value for name, value in flags.items() if value is not None})
    if args.allowed_models is not None:
        body["allowed_models"] = [m.strip() for m in args.allowed_models.split(",") if m.strip()]
    limits = {name: value for name, value in (("rpm", args.rpm), ("tpm", args.tpm)) if value is not None}
    if limits:
        body["rate_limits"] = limits
    return body


async def keys_create(svc: Service, args: Any) -> int:
    created = await svc.create_key(args.account, key_body(args))
    if not output.JSON.get():
        print("note: the key is shown this once (only its hash is stored): keep it now", file=sys.stderr)
    return emit(created)


async def keys_update(svc: Service, args: Any) -> int:
    return emit(await svc.update_key(args.key_id, key_body(args)))


async def keys_show(svc: Service, args: Any) -> int:
    return emit(await svc.get_key(args.key_id))


async def keys_revoke(svc: Service, args: Any) -> int:
    return emit(await svc.revoke_key(args.key_id))


async def keys_list(svc: Service, args: Any) -> int:
    return emit(await svc.list_keys(args.account), KEY_COLUMNS)


async def credits_grant(svc: Service, args: Any) -> int:
    names = ("kind", "priority", "effective_at", "expires_at", "description", "idempotency_key")
    body = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.cost_basis is not None:
        body["per_unit_cost_basis"] = args.cost_basis
    created, grant = await svc.grant(args.account, {"amount_usd": args.amount, **body})
    if not created:
        print("note: idempotency key already used; this is the existing grant", file=sys.stderr)
    return emit(grant)


async def credits_adjust(svc: Service, args: Any) -> int:
    body = {"amount_usd": args.amount, "description": args.description}
    if args.idempotency_key:
        body["idempotency_key"] = args.idempotency_key
    _, entry = await svc.adjust(args.account, body)
    return emit(entry)


async def credits_void(svc: Service, args: Any) -> int:
    return emit(await svc.void(args.account, args.grant_id, {"reason": args.reason}))


async def show_balance(svc: Service, args: Any) -> int:
    return emit(await svc.balance(args.account))


async def ledger_list(svc: Service, args: Any) -> int:
    query = {"limit": args.limit, "order": args.order, **({"cursor": args.cursor} if args.cursor else {})}
    return emit(await svc.ledger_page(args.account, query), ENTRY_COLUMNS)


async def ledger_export(svc: Service, args: Any) -> int:
    _, chunks = await svc.export_ledger(args.account, {"format": args.format})
    try:
        # newline="": CSV rows carry their own \r\n (RFC 4180). Blocking is fine: the CLI's
        # loop runs nothing else
        out = open(args.output, "w", newline="", encoding="utf-8") if args.output else sys.stdout  # noqa: ASYNC230
    except OSError as exc:
        print(f"error: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
        return 1
    total = int(await svc.redis.xlen(keyspace.account(args.account, "ledger")))
    try:
        with output.progress("export", total) as bar:
            async for chunk in chunks:
                output.write(chunk, out)
                bar.advance(chunk.count("\n"))  # entries (a multi-line CSV field overcounts: a bar)
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


async def show_usage(svc: Service, args: Any) -> int:
    query = {"from": args.from_, "to": args.to, "group_by": args.group_by}
    return emit(await svc.usage(args.account, {k: v for k, v in query.items() if v is not None}))


async def generations_show(svc: Service, args: Any) -> int:
    return emit(await svc.generation(args.account, {"id": args.request_id}))


async def run_reconcile(svc: Service, args: Any) -> int:
    from .reconcile import reconcile

    ids = await svc.ledger.account_ids()
    with output.progress("reconcile", len(ids)) as bar:
        drifts = await reconcile(svc.redis, svc.config, ids, checked=bar.advance)
    bad = sorted({d.account_id for d in drifts})
    if output.JSON.get():
        result = {"ok": not drifts, "accounts": len(ids), "drifting": bad}
        emit({**result, "drifts": [dataclasses.asdict(d) for d in drifts]})
    elif not drifts:
        print(f"ok: {len(ids)} accounts")
    else:
        print("".join(f"drift: {drift}\n" for drift in drifts), end="")
        print(f"error: {len(bad)} of {len(ids)} accounts drift: {', '.join(bad)}", file=sys.stderr)
    return 1 if drifts else 0


async def dead_list(svc: Service, args: Any) -> int:
    from .webhooks import list_dead

    return emit({"object": "list", "data": await list_dead(svc.redis, args.account)}, DEAD_COLUMNS)


async def dead_replay(svc: Service, args: Any) -> int:
    from .webhooks import replay_dead

    moved = await replay_dead(svc.ledger, args.account)
    if output.JSON.get():
        return emit({"replayed": moved})
    print(f"replayed {moved} event{'' if moved == 1 else 's'}")
    return 0
