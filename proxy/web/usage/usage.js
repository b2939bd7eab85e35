// The customer usage page: what one API key's account has and spends, read from the
// client API with that key (kept in this tab's sessionStorage). A section whose endpoint
// this proxy does not serve (404 without a `not_found` code) says so and the rest works.

import {
  Api, ApiError, badge, clear, compact, count, el, errorBox, lastDays, query, signInCard, table, usd, usdExact, when,
  whenLong,
} from "./ui.js";
import { dailyChart, dayPoints, modelChart, modelRows } from "./charts.js";

const api = new Api("metering-proxy.api-key");
const app = document.getElementById("app");
const USAGE_DAYS = 30;
const RECENT = 20;

document.getElementById("signout").addEventListener("click", () => signOut("Signed out."));

function signOut(message) {
  api.token = null;
  showSignIn(message);
}

function unavailable(err) {
  return err instanceof ApiError && err.status === 404 && err.code !== "not_found";
}

/** Shows what went wrong in `box`: a refused key signs out, a missing endpoint is "unavailable". */
function failed(err, box, what) {
  if (err instanceof ApiError && err.status === 401) {
    signOut(`${err.message} (401)`);
    return;
  }
  if (unavailable(err)) {
    clear(box, el("div", { class: "unavailable", "data-unavailable": what }, `${what}: not available on this proxy.`));
    return;
  }
  if (!(err instanceof ApiError)) console.error(err); // a bug of ours: shown, and loud in the console
  clear(box, errorBox(err));
}

function showSignIn(message) {
  document.getElementById("signout").hidden = true;
  document.getElementById("who").hidden = true;
  const signIn = signInCard({
    title: "Your usage and credits",
    intro: "Paste your API key to see your balance, your key's limit and spend, and your recent requests.",
    label: "API key",
    field: "api-key",
    placeholder: "sk-mp-…",
    submit: "Show my usage",
    fine: "The key stays in this tab's session storage and is sent only to this proxy, as a bearer header.",
    message,
    async check(key) {
      const credits = await api.call("GET", "/v1/credits", undefined, key);
      api.token = key;
      showUsage(credits);
    },
  });
  clear(app, signIn.card);
  signIn.focus();
}

function section(id, title) {
  const body = el("div", { class: "body" });
  const note = el("span", { class: "note" });
  const node = el("section", { class: "card", id }, el("header", {}, el("h2", {}, title), el("span", { class: "spacer" }), note), body);
  return { node, body, note };
}

function stat(label, value, hint, primary = false) {
  return el("div", { class: ["stat", primary && "primary"] }, el("div", { class: "label" }, label),
    el("div", { class: "value" }, value), hint ? el("div", { class: "hint" }, hint) : null);
}

function showUsage(initial) {
  const who = document.getElementById("who");
  document.getElementById("signout").hidden = false;
  const stats = el("div", { class: "stats", id: "stats" });
  const grants = section("grants", "Credit grants");
  const key = section("key", "This API key");
  const usage = section("usage", `Usage, last ${USAGE_DAYS} days`);
  const requests = section("requests", "Recent requests");
  const lookup = lookupCard();
  const status = el("div");
  const refresh = el("button", { type: "button", id: "refresh", on: { click: () => load() } }, "Refresh");
  clear(
    app,
    el("div", { class: "page-head" }, el("h1", { id: "account-title" }, "Usage and credits"), el("span", { class: "sub", id: "account-id" }),
      el("span", { class: "spacer" }), refresh),
    status,
    stats,
    el("div", { class: "grid-2" }, key.node, grants.node),
    el("div", { class: "stack" }, usage.node, requests.node, lookup),
  );

  function showCredits(credits) {
    who.hidden = false;
    clear(who, `account ${credits.account_id}`);
    clear(app.querySelector("#account-id"), `account ${credits.account_id}`);
    const limits = credits.rate_limits || {};
    clear(
      stats,
      stat("Balance", el("span", { id: "balance" }, usd(credits.balance_usd)), "prepaid credit left", true),
      stat("Available now", credits.available_usd === null ? "unlimited" : usd(credits.available_usd), "balance − requests in flight"),
      stat("In flight", usd(credits.reserved_usd), "reserved for running requests"),
      stat("Rate tier", credits.tier ?? "—", `${compact(limits.rpm)} requests · ${compact(limits.tpm)} tokens a minute`),
      stat("Plan", credits.plan ?? "none", credits.lifetime_paid_usd ? `${usd(credits.lifetime_paid_usd)} paid to date` : null),
    );
    clear(grants.body, grantsTable(credits.grants || []));
  }

  async function loadCredits() {
    try {
      showCredits(await api.get("/v1/credits"));
      clear(status);
    } catch (err) {
      failed(err, status, "Your balance");
    }
  }

  async function loadKey() {
    try {
      clear(key.body, keyView(await api.get("/v1/key")));
    } catch (err) {
      failed(err, key.body, "Key details");
    }
  }

  async function loadUsage() {
    const days = lastDays(USAGE_DAYS);
    const range = { from: `${days[0]}T00:00:00Z` };
    try {
      const [byModel, byDay] = await Promise.all([
        api.get(`/v1/usage${query({ ...range, group_by: "model" })}`),
        api.get(`/v1/usage${query({ ...range, group_by: "day" })}`),
      ]);
      const models = modelRows(byModel.groups);
      clear(usage.note, `${count(models.reduce((sum, g) => sum + g.requests, 0))} requests`);
      clear(
        usage.body,
        el("div", { class: "charts" },
          el("div", {}, el("h3", { class: "legend" }, "Spend per day (UTC)"), dailyChart(dayPoints(byDay.groups, days))),
          el("div", {}, el("h3", { class: "legend" }, "Spend by model"), modelChart(models))),
      );
    } catch (err) {
      failed(err, usage.body, "Usage by model and day");
    }
  }

  async function loadRequests() {
    try {
      const page = await api.get(`/v1/generations${query({ limit: RECENT })}`);
      clear(requests.body, requestsTable(page.data));
    } catch (err) {
      failed(err, requests.body, "The list of recent requests");
    }
  }

  function load() {
    loadCredits();
    loadKey();
    loadUsage();
    loadRequests();
  }
  showCredits(initial);
  loadKey();
  loadUsage();
  loadRequests();
}

function grantsTable(grants) {
  return table(
    [
      { head: "Kind", cell: (g) => el("td", { "data-grant-id": g.id }, g.kind) },
      { head: "Amount", num: true, cell: (g) => usd(g.amount_usd) },
      { head: "Left", num: true, cell: (g) => usd(g.remaining_usd) },
      { head: "Status", cell: (g) => badge(g.status) },
      { head: "Expires", cell: (g) => (g.expires_at ? when(g.expires_at) : el("span", { class: "dim" }, "never")), cls: "nowrap" },
    ],
    grants,
    "No credit grants.",
  );
}

function row(label, value) {
  return el("tr", {}, el("th", {}, label), el("td", {}, value));
}

function keyView(k) {
  const spent = k.usage_usd || {};
  const period = { daily: "day", weekly: "week", monthly: "month" }[k.limit_reset];
  const limit = k.limit_usd === null || k.limit_usd === undefined ? "no limit" : `${usd(k.limit_usd)}${period ? ` per ${period}` : ""}`;
  const limits = k.rate_limits || {};
  return el("div", { class: "table-wrap" },
    el("table", { class: "kv" },
      el("tbody", {},
        row("Key", el("span", { class: "mono" }, `${k.name ? `${k.name} · ` : ""}${k.id}`)),
        row("Spend limit", el("span", { id: "key-limit" }, limit)),
        row("Left in this period", k.limit_remaining_usd === null || k.limit_remaining_usd === undefined ? "—" : usd(k.limit_remaining_usd)),
        row("Spent today", usd(spent.daily)),
        row("Spent this week", usd(spent.weekly)),
        row("Spent this month", usd(spent.monthly)),
        row("Spent in total", el("span", { id: "key-total" }, usd(spent.total))),
        row("Expires", k.expires_at ? when(k.expires_at) : "never"),
        row("Models", k.allowed_models ? k.allowed_models.join(", ") : "all"),
        row("Rate limits", limits.rpm || limits.tpm ? `${compact(limits.rpm)} rpm · ${compact(limits.tpm)} tpm` : "the account's"))));
}

function tokens(usage) {
  if (!usage) return "";
  const cached = usage.cached_input_tokens ? ` (${count(usage.cached_input_tokens)} cached)` : "";
  return `${count(usage.input_tokens)} in${cached} · ${count(usage.output_tokens)} out`;
}

function requestsTable(generations) {
  return table(
    [
      { head: "Time", cell: (g) => whenLong(g.created_at), cls: "nowrap" },
      { head: "Request", cell: (g) => el("td", { class: "mono", "data-request-id": g.id }, g.id) },
      { head: "Key", cell: (g) => el("td", { class: "mono dim", "data-key-id": g.key_id ?? null }, g.key_id ?? "") },
      { head: "Model", cell: (g) => g.model ?? "", cls: "nowrap" },
      { head: "Tokens", cell: (g) => tokens(g.usage), cls: "nowrap" },
      { head: "Cost", num: true, cell: (g) => el("td", { class: "num", "data-cost": g.cost_usd },
        usdExact(g.cost_usd), g.estimated ? el("span", { class: "badge warn" }, " estimated") : null) },
    ],
    generations,
    "No requests yet.",
  );
}

function lookupCard() {
  const input = el("input", { id: "lookup-id", name: "id", placeholder: "req_… (the x-request-id header)", autocomplete: "off", required: true });
  const result = el("div", { id: "lookup-result" });
  async function look(event) {
    event.preventDefault();
    const id = input.value.trim();
    if (!id) return;
    try {
      const generation = await api.get(`/v1/generation${query({ id })}`);
      clear(result, requestsTable([generation]));
    } catch (err) {
      failed(err, result, "Looking up one request");
    }
  }
  return el("section", { class: "card", id: "lookup" },
    el("header", {}, el("h2", {}, "Look up a request")),
    el("form", { class: "form-row", on: { submit: look } },
      el("label", { class: "field grow" }, el("span", {}, "Request id"), input),
      el("button", { type: "submit" }, "Look up")),
    result);
}

if (api.token) {
  api.get("/v1/credits").then(showUsage, (err) => (err instanceof ApiError && err.status !== 401 ? showSignIn(err.message) : signOut(err.message)));
} else {
  showSignIn();
}
