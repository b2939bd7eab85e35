// The operator console: every action is one call to the documented admin API
// (/admin/v1/openapi.json), sent with the admin token from this tab's sessionStorage.

import {
  Api, ApiError, amountCell, badge, clear, compact, count, download, el, errorBox, formValues, lastDays, query,
  signInCard, table, usd, usdExact, when, whenLong,
} from "./ui.js";
import { dailyChart, dayPoints, modelChart, modelRows } from "./charts.js";

const api = new Api("metering-proxy.admin-token");
const app = document.getElementById("app");
const LEDGER_PAGE = 25;
const USAGE_DAYS = 30;
const LIVE_GRANT = new Set(["pending", "active", "expiring"]);

// -- frame and sign-in -----------------------------------------------------------------

function chrome(signedIn) {
  for (const id of ["nav", "who", "signout"]) document.getElementById(id).hidden = !signedIn;
}

document.getElementById("signout").addEventListener("click", () => signOut("Signed out."));
window.addEventListener("hashchange", route);

function signOut(message) {
  api.token = null;
  showSignIn(message);
}

/** Shows an API error in `box`; a refused token (401) goes back to sign-in instead. */
function failed(err, box) {
  if (err instanceof ApiError && err.status === 401) {
    signOut("The admin token was refused (401): sign in again.");
    return;
  }
  if (!(err instanceof ApiError)) console.error(err); // a bug of ours: shown, and loud in the console
  clear(box, errorBox(err));
}

function showSignIn(message) {
  chrome(false);
  const signIn = signInCard({
    title: "Sign in to the console",
    intro: "Accounts, credits, keys, usage and webhooks of this proxy.",
    label: "Admin token",
    field: "token",
    placeholder: "server.admin_token",
    submit: "Sign in",
    fine: "The token stays in this tab's session storage and is sent only as a bearer header to this admin listener.",
    message,
    async check(token) {
      await api.call("GET", "/admin/v1/accounts?limit=1", undefined, token);
      api.token = token;
      route();
    },
  });
  clear(app, signIn.card);
  signIn.focus();
}

function route() {
  if (!api.token) {
    showSignIn();
    return;
  }
  const match = /^#\/accounts\/(.+)$/.exec(location.hash);
  if (match) showAccount(decodeURIComponent(match[1]));
  else showAccounts();
}

// -- the accounts list -------------------------------------------------------------------

function accountLink(id) {
  return el("a", { href: `#/accounts/${encodeURIComponent(id)}` }, id);
}

function showAccounts() {
  chrome(true);
  const search = el("input", {
    id: "account-search", type: "search", name: "query", placeholder: "Search account ids", autocomplete: "off",
  });
  const list = el("div", { id: "accounts" });
  const status = el("div");
  const more = el("button", { type: "button", hidden: true, on: { click: () => load(false) } }, "Load more");
  let rows = [];
  let cursor = null;
  let generation = 0;

  async function load(reset) {
    const mine = ++generation; // a slower, older search must not overwrite a newer one
    try {
      const page = await api.get(`/admin/v1/accounts${query({ query: search.value.trim(), limit: 50, cursor: reset ? null : cursor })}`);
      if (mine !== generation) return;
      rows = reset ? page.data : rows.concat(page.data);
      cursor = page.next_cursor;
      more.hidden = !cursor;
      clear(status);
      clear(list, accountsTable(rows));
    } catch (err) {
      failed(err, status);
    }
  }
  let typing = null;
  search.addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => load(true), 250);
  });
  const searchForm = el(
    "form",
    { class: "form-row", on: { submit: (e) => { e.preventDefault(); clearTimeout(typing); load(true); } } },
    el("label", { class: "field grow" }, el("span", {}, "Search"), search),
    el("button", { type: "submit" }, "Search"),
  );
  clear(
    app,
    el("div", { class: "page-head" }, el("h1", {}, "Accounts"), el("span", { class: "spacer" })),
    el(
      "section",
      { class: "card" },
      searchForm,
      el("div", { class: "subform" }, list, status, more),
    ),
    newAccountCard(),
  );
  load(true);
}

function accountsTable(rows) {
  return table(
    [
      { head: "Account", cell: (a) => el("td", { "data-account-id": a.id }, accountLink(a.id)) },
      { head: "Status", cell: (a) => badge(a.status) },
      { head: "Plan", cell: (a) => a.plan ?? el("span", { class: "dim" }, "none") },
      { head: "Tier", cell: (a) => a.tier ?? "—" },
      { head: "Balance", num: true, cell: (a) => usd(a.balance_usd) },
      { head: "Available", num: true, cell: (a) => (a.available_usd === null ? "unlimited" : usd(a.available_usd)) },
      { head: "Reserved", num: true, cell: (a) => usd(a.reserved_usd) },
      { head: "Lifetime paid", num: true, cell: (a) => usd(a.lifetime_paid_usd) },
      { head: "Created", cell: (a) => when(a.created_at), cls: "nowrap" },
    ],
    rows,
    "No accounts match.",
  );
}

function newAccountCard() {
  const status = el("div");
  const form = el(
    "form",
    { id: "new-account", class: "form-row", on: { submit: create } },
    el("label", { class: "field grow" }, el("span", {}, "Account id"),
      el("input", { name: "id", required: true, placeholder: "acme", autocomplete: "off" })),
    el("label", { class: "field" }, el("span", {}, "Plan (optional)"),
      el("input", { name: "plan", placeholder: "default plan", autocomplete: "off" })),
    el("button", { type: "submit", class: "primary" }, "Create account"),
  );
  async function create(event) {
    event.preventDefault();
    const values = formValues(form);
    try {
      const account = await api.call("POST", "/admin/v1/accounts", values);
      location.hash = `#/accounts/${encodeURIComponent(account.id)}`;
    } catch (err) {
      failed(err, status);
    }
  }
  return el("section", { class: "card" }, el("header", {}, el("h2", {}, "New account")), form, status);
}

// -- one account ----------------------------------------------------------------------------

function card(id, title, ...extra) {
  const body = el("div", { class: "body" });
  const status = el("div", { class: "status" });
  const head = el("header", {}, el("h2", {}, title), el("span", { class: "spacer" }), ...extra);
  return { node: el("section", { class: "card", id }, head, body, status), body, status, head };
}

function showAccount(id) {
  chrome(true);
  const base = `/admin/v1/accounts/${encodeURIComponent(id)}`;
  const badges = el("span", { class: "badges" });
  const stats = el("div", { class: "stats", id: "stats" });
  const headStatus = el("div");
  const sections = {
    overview: () => loadOverview(base, badges, stats, headStatus),
    usage: null,
    grants: null,
    keys: null,
    ledger: null,
    webhooks: null,
  };
  const usage = usageCard(base);
  const grants = grantsCard(base, () => refresh("overview", "grants", "ledger"));
  const keys = keysCard(base);
  const ledger = ledgerCard(base, id);
  const hooks = webhooksCard(base, id);
  Object.assign(sections, { usage: usage.load, grants: grants.load, keys: keys.load, ledger: ledger.load, webhooks: hooks.load });

  function refresh(...names) {
    for (const name of names.length ? names : Object.keys(sections)) sections[name]();
  }
  const refreshButton = el("button", { id: "refresh", type: "button", on: { click: () => refresh() } }, "Refresh");
  clear(
    app,
    el(
      "div",
      { class: "page-head" },
      el("div", {}, el("div", { class: "sub" }, el("a", { href: "#/accounts" }, "Accounts"), " / "),
        el("h1", { id: "account-title" }, id)),
      badges,
      el("span", { class: "spacer" }),
      refreshButton,
    ),
    headStatus,
    stats,
    usage.node,
    grants.node,
    keys.node,
    ledger.node,
    hooks.node,
  );
  refresh();
}

function stat(label, value, hint, primary = false) {
  return el("div", { class: ["stat", primary && "primary"] }, el("div", { class: "label" }, label),
    el("div", { class: "value" }, value), hint ? el("div", { class: "hint" }, hint) : null);
}

async function loadOverview(base, badges, stats, status) {
  try {
    const a = await api.get(base);
    clear(badges, badge(a.status), " ", el("span", { class: "badge accent" }, `plan: ${a.plan ?? "none"}`));
    const limits = a.rate_limits || {};
    const overage = a.overage_limit_usd || a.overage_usd !== "0.000000";
    clear(
      stats,
      stat("Balance", el("span", { id: "balance" }, usd(a.balance_usd)), "the sum of the ledger", true),
      stat("Available", a.available_usd === null ? "unlimited" : usd(a.available_usd), "for new requests"),
      stat("Reserved", usd(a.reserved_usd), "held by requests in flight"),
      overage ? stat("Overage", usd(a.overage_usd), a.overage_limit_usd === "unlimited" ? "no limit" : `limit ${usd(a.overage_limit_usd)}`) : null,
      stat("Lifetime paid", usd(a.lifetime_paid_usd), a.first_payment_at ? `first paid ${a.first_payment_at.slice(0, 10)}` : "no payment yet"),
      stat("Lifetime used", usd(a.lifetime_consumed_usd), "charged for requests"),
      stat("Rate tier", a.tier ?? "—", `${compact(limits.rpm)} rpm · ${compact(limits.tpm)} tpm${limits.override ? " (override)" : ""}`),
    );
    clear(status);
  } catch (err) {
    failed(err, status);
  }
}

// -- usage -------------------------------------------------------------------------------------

function usageCard(base) {
  const c = card("usage", `Usage, last ${USAGE_DAYS} days`);
  const total = el("span", { class: "note", id: "usage-total" });
  c.head.append(total);
  async function load() {
    const days = lastDays(USAGE_DAYS);
    const range = { from: `${days[0]}T00:00:00Z` };
    try {
      const [byModel, byDay] = await Promise.all([
        api.get(`${base}/usage${query({ ...range, group_by: "model" })}`),
        api.get(`${base}/usage${query({ ...range, group_by: "day" })}`),
      ]);
      const models = modelRows(byModel.groups);
      const requests = models.reduce((sum, g) => sum + g.requests, 0);
      clear(total, `${count(requests)} requests`);
      clear(
        c.body,
        el("div", { class: "charts" },
          el("div", {}, el("h3", { class: "legend" }, "Spend per day (UTC)"), dailyChart(dayPoints(byDay.groups, days))),
          el("div", {}, el("h3", { class: "legend" }, "Spend by model"), modelChart(models))),
        el("div", { class: "subform" }, usageTable(models)),
      );
      clear(c.status);
    } catch (err) {
      failed(err, c.status);
    }
  }
  return { node: c.node, load };
}

function usageTable(models) {
  return table(
    [
      { head: "Model", cell: (g) => el("td", { "data-model": g.model }, g.model) },
      { head: "Requests", num: true, cell: (g) => count(g.requests) },
      { head: "Input", num: true, cell: (g) => count(g.input_tokens) },
      { head: "Cached", num: true, cell: (g) => count(g.cached_input_tokens) },
      { head: "Output", num: true, cell: (g) => count(g.output_tokens) },
      { head: "Reasoning", num: true, cell: (g) => count(g.reasoning_tokens) },
      { head: "Cost", num: true, cell: (g) => el("td", { class: "num", "data-cost": g.cost_usd }, usdExact(g.cost_usd)) },
    ],
    models,
    "No usage in this period.",
  );
}

// -- grants --------------------------------------------------------------------------------------

function randomKey(prefix) {
  const bytes = crypto.getRandomValues(new Uint8Array(12)); // randomUUID needs a secure context
  return prefix + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function grantsCard(base, changed) {
  const c = card("grants", "Grants");
  let idempotencyKey = randomKey("console_");
  const form = el(
    "form",
    { id: "grant-form", class: "form-row subform", on: { submit: grant } },
    el("label", { class: "field" }, el("span", {}, "Amount (USD)"),
      el("input", { name: "amount_usd", required: true, inputmode: "decimal", placeholder: "25.00", size: 10 })),
    el("label", { class: "field" }, el("span", {}, "Kind"),
      el("select", { name: "kind" }, el("option", { value: "paid" }, "paid"), el("option", { value: "promotional" }, "promotional"))),
    el("label", { class: "field" }, el("span", {}, "Expires (optional)"), el("input", { name: "expires_at", type: "date" })),
    el("label", { class: "field grow" }, el("span", {}, "Description"),
      el("input", { name: "description", placeholder: "Invoice 2041, Stripe pi_…", autocomplete: "off" })),
    el("button", { type: "submit", class: "primary" }, "Grant credits"),
  );
  const formStatus = el("div");
  c.node.append(form, formStatus);

  async function grant(event) {
    event.preventDefault();
    const values = formValues(form);
    if (values.expires_at) values.expires_at = `${values.expires_at}T00:00:00Z`;
    try {
      // one key per filled-in form: a double click or a retried call grants once
      await api.call("POST", `${base}/credits`, { ...values, idempotency_key: idempotencyKey });
      idempotencyKey = randomKey("console_");
      form.reset();
      clear(formStatus, el("div", { class: "notice" }, `Granted ${usd(values.amount_usd)} (${values.kind}).`));
      changed();
    } catch (err) {
      failed(err, formStatus);
    }
  }

  async function load() {
    try {
      const { grants } = await api.get(`${base}/grants`);
      clear(c.body, grantsTable([...grants].reverse(), base, changed, c.status));
      clear(c.status);
    } catch (err) {
      failed(err, c.status);
    }
  }
  return { node: c.node, load };
}

function grantsTable(grants, base, changed, status) {
  return table(
    [
      { head: "Grant", cell: (g) => el("td", { "data-grant-id": g.id }, el("div", { class: "mono" }, g.id),
        g.description ? el("div", { class: "dim" }, g.description) : null,
        g.void_reason ? el("div", { class: "dim" }, `voided: ${g.void_reason}`) : null) },
      { head: "Kind", cell: (g) => g.kind },
      { head: "Amount", num: true, cell: (g) => usd(g.amount_usd) },
      { head: "Remaining", num: true, cell: (g) => usd(g.remaining_usd) },
      { head: "Priority", num: true, cell: (g) => String(g.priority) },
      { head: "Status", cell: (g) => el("td", { class: "grant-status" }, badge(g.status)) },
      { head: "Effective", cell: (g) => when(g.effective_at), cls: "nowrap" },
      { head: "Expires", cell: (g) => (g.expires_at ? when(g.expires_at) : el("span", { class: "dim" }, "never")), cls: "nowrap" },
      { head: "", cell: (g) => voidCell(g, base, changed, status) },
    ],
    grants,
    "No grants yet.",
  );
}

function voidCell(grant, base, changed, status) {
  const cell = el("td", { class: "actions" });
  if (!LIVE_GRANT.has(grant.status)) return cell;
  const ask = () => {
    const reason = el("input", { name: "reason", placeholder: "Reason (refund, mistake…)", "aria-label": "Void reason" });
    const form = el(
      "form",
      { class: "inline-form void-form", on: { submit: confirm } },
      reason,
      el("button", { type: "submit", class: "danger small" }, "Void"),
      el("button", { type: "button", class: "small", on: { click: () => clear(cell, start) } }, "Cancel"),
    );
    async function confirm(event) {
      event.preventDefault();
      try {
        await api.call("POST", `${base}/credits/${encodeURIComponent(grant.id)}/void`, { reason: reason.value.trim() });
        changed();
      } catch (err) {
        failed(err, status);
      }
    }
    clear(cell, form);
    reason.focus();
  };
  const start = el("button", { type: "button", class: "danger small", on: { click: ask } }, "Void…");
  return clear(cell, start);
}

// -- keys ------------------------------------------------------------------------------------------

function keysCard(base) {
  const c = card("keys", "API keys");
  const secret = el("div", { id: "new-key" });
  const formStatus = el("div");
  const form = el(
    "form",
    { id: "key-form", class: "form-row subform", on: { submit: create } },
    el("label", { class: "field grow" }, el("span", {}, "Name"), el("input", { name: "name", placeholder: "production", autocomplete: "off" })),
    el("label", { class: "field grow" }, el("span", {}, "Allowed models (comma-separated; empty: all)"),
      el("input", { name: "allowed_models", placeholder: "gpt-4o-mini, gpt-4o", autocomplete: "off" })),
    el("label", { class: "field" }, el("span", {}, "Spend limit (USD)"),
      el("input", { name: "limit_usd", inputmode: "decimal", placeholder: "none", size: 8 })),
    el("label", { class: "field" }, el("span", {}, "Resets"),
      el("select", { name: "limit_reset" }, el("option", { value: "" }, "never"), el("option", { value: "daily" }, "daily"),
        el("option", { value: "weekly" }, "weekly"), el("option", { value: "monthly" }, "monthly"))),
    el("label", { class: "field" }, el("span", {}, "Expires"), el("input", { name: "expires_at", type: "date" })),
    el("button", { type: "submit", class: "primary" }, "Create key"),
  );
  c.node.append(form, formStatus, secret);

  async function create(event) {
    event.preventDefault();
    const values = formValues(form);
    const body = { name: values.name || "" };
    if (values.allowed_models) body.allowed_models = values.allowed_models.split(",").map((m) => m.trim()).filter(Boolean);
    if (values.limit_usd) body.limit_usd = values.limit_usd;
    if (values.limit_reset) body.limit_reset = values.limit_reset;
    if (values.expires_at) body.expires_at = `${values.expires_at}T00:00:00Z`;
    try {
      const created = await api.call("POST", `${base}/keys`, body);
      form.reset();
      clear(formStatus);
      showSecret(created);
      load();
    } catch (err) {
      failed(err, formStatus);
    }
  }

  function showSecret(created) {
    const code = el("code", { id: "new-key-secret" }, created.key);
    const copy = el("button", { type: "button", class: "small", on: { click: copyIt } }, "Copy");
    async function copyIt() {
      try {
        await navigator.clipboard.writeText(created.key);
        copy.textContent = "Copied";
      } catch {
        getSelection().selectAllChildren(code); // no clipboard here: select it for Ctrl+C
      }
    }
    const dismiss = el("button", { type: "button", class: "small", on: { click: () => clear(secret) } }, "Done");
    clear(
      secret,
      el("div", { class: "secret", role: "status" },
        el("strong", {}, `Key ${created.id} created. Copy it now: it is shown only once.`),
        el("div", { class: "value" }, code, copy, dismiss)),
    );
  }

  async function load() {
    try {
      const { data } = await api.get(`${base}/keys`);
      clear(c.body, keysTable(data, c.status, load));
      clear(c.status);
    } catch (err) {
      failed(err, c.status);
    }
  }
  return { node: c.node, load };
}

function limitText(key) {
  if (key.limit_usd === undefined) return el("span", { class: "dim" }, "—");
  if (key.limit_usd === null) return el("span", { class: "dim" }, "none");
  const reset = key.limit_reset ? ` / ${key.limit_reset}` : "";
  const left = key.limit_remaining_usd !== undefined && key.limit_remaining_usd !== null ? `, ${usd(key.limit_remaining_usd)} left` : "";
  return `${usd(key.limit_usd)}${reset}${left}`;
}

function spendText(key) {
  const spent = key.usage_usd;
  if (spent === undefined || spent === null) return el("span", { class: "dim" }, "—");
  if (typeof spent !== "object") return usd(spent);
  // beside the total, the period the key's limit counts (a month when it has none)
  const [field, period] = { daily: ["daily", "today"], weekly: ["weekly", "this week"] }[key.limit_reset] ?? ["monthly", "this month"];
  return `${usd(spent.total)} total · ${usd(spent[field])} ${period}`;
}

function keysTable(keys, status, changed) {
  return table(
    [
      { head: "Key", cell: (k) => el("td", { "data-key-id": k.id, class: "mono" }, k.id) },
      { head: "Name", cell: (k) => k.name || el("span", { class: "dim" }, "unnamed") },
      { head: "Status", cell: (k) => el("td", { class: "key-status" }, badge(k.status)) },
      { head: "Models", cell: (k) => (k.allowed_models ? k.allowed_models.join(", ") : el("span", { class: "dim" }, "all")) },
      { head: "Limit", cell: limitText },
      { head: "Spend", cell: spendText },
      { head: "Expires", cell: (k) => (k.expires_at ? when(k.expires_at) : el("span", { class: "dim" }, "never")), cls: "nowrap" },
      { head: "", cell: (k) => revokeCell(k, status, changed) },
    ],
    keys,
    "No keys yet.",
  );
}

function revokeCell(key, status, changed) {
  const cell = el("td", { class: "actions" });
  if (key.status !== "active") return cell;
  const ask = () => {
    clear(
      cell,
      el("span", { class: "inline-form" },
        el("button", { type: "button", class: "danger small", on: { click: revoke } }, "Revoke now"),
        el("button", { type: "button", class: "small", on: { click: () => clear(cell, start) } }, "Cancel")),
    );
  };
  async function revoke() {
    try {
      await api.call("DELETE", `/admin/v1/keys/${encodeURIComponent(key.id)}`);
      changed();
    } catch (err) {
      failed(err, status);
    }
  }
  const start = el("button", { type: "button", class: "danger small", on: { click: ask } }, "Revoke…");
  return clear(cell, start);
}

// -- ledger ----------------------------------------------------------------------------------------

function tokensText(entry) {
  const u = entry.usage;
  if (!u) return "";
  const cached = u.cached_input_tokens ? ` (${count(u.cached_input_tokens)} cached)` : "";
  return `${count(u.input_tokens)} in${cached} · ${count(u.output_tokens)} out`;
}

function ledgerCard(base, accountId) {
  const c = card("ledger", "Ledger");
  const exportStatus = el("span", { class: "note", id: "export-status" });
  const exportButton = el("button", { type: "button", id: "export-csv", on: { click: exportCsv } }, "Export CSV");
  c.head.append(exportStatus, exportButton);
  const older = el("button", { type: "button", id: "ledger-older", hidden: true, on: { click: () => page(false) } }, "Older entries");
  c.node.append(el("div", { class: "subform" }, older));
  let rows = [];
  let cursor = null;

  async function page(reset) {
    try {
      const result = await api.get(`${base}/ledger${query({ order: "desc", limit: LEDGER_PAGE, cursor: reset ? null : cursor })}`);
      rows = reset ? result.entries : rows.concat(result.entries);
      cursor = result.next_cursor;
      older.hidden = !cursor;
      clear(c.body, ledgerTable(rows));
      clear(c.status);
    } catch (err) {
      failed(err, c.status);
    }
  }

  async function exportCsv() {
    exportButton.disabled = true;
    clear(exportStatus, "Exporting…");
    try {
      // the server's own export: the same columns and figures as the CLI's and the API's
      const csv = await api.getText(`${base}/ledger/export${query({ format: "csv" })}`);
      const entries = csv.split("\r\n").length - 2; // less the header and the final line end
      download(`ledger-${accountId}.csv`, csv, "text/csv");
      clear(exportStatus, `Exported ${count(entries)} entries.`);
    } catch (err) {
      clear(exportStatus);
      failed(err, c.status);
    } finally {
      exportButton.disabled = false;
    }
  }
  return { node: c.node, load: () => page(true) };
}

function ledgerDetails(e) {
  const note = e.description ?? (e.downgraded_from ? `downgraded from ${e.downgraded_from}` : null);
  return el("td", { "data-request-id": e.request_id ?? null },
    el("span", { class: "mono" }, e.request_id ?? e.grant_id ?? ""),
    e.estimated ? [" ", el("span", { class: "badge warn" }, "estimated")] : null,
    e.key_id ? el("div", { class: "dim mono", "data-key-id": e.key_id }, e.key_id) : null,
    note ? el("div", { class: "dim" }, note) : null);
}

function ledgerTable(entries) {
  return table(
    [
      { head: "Time", cell: (e) => el("td", { class: "nowrap", "data-entry-id": e.id }, whenLong(e.created_at)) },
      { head: "Type", cell: (e) => el("span", { class: "badge" }, e.type) },
      { head: "Amount", num: true, cell: (e) => amountCell(e.amount_usd) },
      { head: "Balance after", num: true, cell: (e) => usdExact(e.balance_usd) },
      { head: "Model", cell: (e) => e.model ?? "", cls: "nowrap" },
      { head: "Tokens", cell: tokensText, cls: "nowrap" },
      { head: "Details", cell: ledgerDetails },
    ],
    entries,
    "No ledger entries yet.",
  );
}

// -- webhooks --------------------------------------------------------------------------------------

function webhooksCard(base, accountId) {
  const c = card("webhooks", "Webhooks");
  const replayStatus = el("span", { class: "note", id: "replay-status" });
  const replay = el("button", { type: "button", id: "replay-dead", on: { click: replayDead } }, "Replay dead letters");
  c.head.append(replayStatus, replay);

  async function replayDead() {
    replay.disabled = true;
    try {
      const result = await api.call("POST", "/admin/v1/webhooks/dead/replay", { account_id: accountId });
      clear(replayStatus, `${result.replayed} event${result.replayed === 1 ? "" : "s"} queued again.`);
      load();
    } catch (err) {
      failed(err, c.status);
    } finally {
      replay.disabled = false;
    }
  }

  async function load() {
    try {
      const hooks = await api.get(`${base}/webhooks`);
      replay.hidden = !hooks.dead.length;
      clear(
        c.body,
        el("div", { class: "stack" },
          el("div", { id: "webhooks-pending" }, el("h3", { class: "legend" }, `Waiting to be delivered (${hooks.pending.length})`), eventsTable(hooks.pending, "next_attempt_at", "Next attempt")),
          el("div", { id: "webhooks-attempts" }, el("h3", { class: "legend" }, "Latest delivery attempts"), attemptsTable(hooks.attempts)),
          el("div", { id: "webhooks-dead" }, el("h3", { class: "legend" }, `Dead letters (${hooks.dead.length})`), eventsTable(hooks.dead, "dead_at", "Dead since"))),
      );
      clear(c.status);
    } catch (err) {
      failed(err, c.status);
    }
  }
  return { node: c.node, load };
}

function eventsTable(events, timeField, timeHead) {
  return table(
    [
      { head: "Event", cell: (e) => el("td", { class: "mono", "data-event-id": e.id ?? null }, e.id ?? "(malformed)") },
      { head: "Type", cell: (e) => e.type ?? "" },
      { head: "Raised", cell: (e) => whenLong(e.timestamp), cls: "nowrap" },
      { head: "Tries", num: true, cell: (e) => count(e.tries ?? 0) },
      { head: timeHead, cell: (e) => whenLong(e[timeField]), cls: "nowrap" },
      { head: "Last error", cell: (e) => e.error ?? "" },
    ],
    events,
    "None.",
  );
}

function attemptsTable(attempts) {
  return table(
    [
      { head: "At", cell: (a) => whenLong(a.at), cls: "nowrap" },
      { head: "Event", cell: (a) => el("td", { class: "mono" }, a.event_id) },
      { head: "Type", cell: (a) => a.type },
      { head: "Outcome", cell: (a) => badge(a.outcome) },
      { head: "Try", num: true, cell: (a) => count(a.tries) },
      { head: "Error", cell: (a) => a.error ?? "" },
    ],
    attempts,
    "No delivery attempts yet.",
  );
}

route();
