// Shared by the console and the usage page: building the DOM without markup (every
// string goes through textContent, so nothing from the API can become HTML), formatting
// money and times, and calling the JSON APIs with a bearer token.

const SVG = "http://www.w3.org/2000/svg";

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function build(node, props) {
  for (const [name, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "on") {
      for (const [event, handler] of Object.entries(value)) node.addEventListener(event, handler);
    } else if (name === "text") {
      node.textContent = String(value);
    } else if (name === "value") {
      node.value = String(value);
    } else if (name === "class") {
      node.setAttribute("class", Array.isArray(value) ? value.filter(Boolean).join(" ") : value);
    } else if (name.startsWith("on") || name === "style" || name === "srcdoc") {
      throw new Error(`refused attribute ${name}`); // handlers go in `on`; no inline style
    } else {
      node.setAttribute(name, value === true ? "" : String(value));
    }
  }
  return node;
}

/** el("td", {class: "num"}, "text", childNode, [more]) */
export function el(tag, props, ...children) {
  return append(build(document.createElement(tag), props), children);
}

export function svg(tag, attrs, ...children) {
  return append(build(document.createElementNS(SVG, tag), attrs), children);
}

export function clear(node, ...children) {
  node.replaceChildren();
  return append(node, children);
}

// -- formatting ----------------------------------------------------------------------

function groupThousands(digits) {
  return digits.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
}

/** "12.500000" -> "$12.50"; "0.000150" -> "$0.00015"; "-3.1" -> "−$3.10". Strings only: no float. */
export function usd(amount) {
  if (amount === null || amount === undefined || amount === "") return "—";
  const text = String(amount).trim();
  const match = /^(-?)(\d+)(?:\.(\d+))?$/.exec(text);
  if (!match) return text;
  const [, sign, whole, fraction = ""] = match;
  let decimals = fraction.replace(/0+$/, "");
  if (decimals.length < 2) decimals = decimals.padEnd(2, "0");
  const negative = sign === "-" && /[1-9]/.test(whole + fraction);
  return `${negative ? "−" : ""}$${groupThousands(String(BigInt(whole)))}.${decimals}`;
}

/** Every decimal the API gives (six): for columns of charges, so they line up. */
export function usdExact(amount) {
  if (amount === null || amount === undefined || amount === "") return "—";
  const match = /^(-?)(\d+)\.(\d+)$/.exec(String(amount).trim());
  if (!match) return usd(amount);
  const [, sign, whole, fraction] = match;
  const negative = sign === "-" && /[1-9]/.test(whole + fraction);
  return `${negative ? "−" : ""}$${groupThousands(String(BigInt(whole)))}.${fraction}`;
}

/** Amount as a number, for chart geometry only (never for arithmetic on money). */
export function usdNumber(amount) {
  const value = Number.parseFloat(amount);
  return Number.isFinite(value) ? value : 0;
}

export function count(value) {
  if (value === null || value === undefined) return "—";
  return groupThousands(String(value));
}

/** 20000000 -> "20M", 150000 -> "150k", 40000 -> "40k", 1234000 -> "1,234,000": for limits,
 * shortened from 10,000 up, and only where one decimal of the unit says the number exactly. */
export function compact(value) {
  if (value === null || value === undefined) return "—";
  const [size, unit] = value >= 1e9 ? [1e9, "B"] : value >= 1e6 ? [1e6, "M"] : value >= 1e4 ? [1e3, "k"] : [0, ""];
  return size && value % (size / 10) === 0 ? `${value / size}${unit}` : count(value);
}

/** RFC 3339 UTC -> "2025-11-26 08:25 UTC" (the API's own clock, no locale guessing). */
export function when(iso) {
  if (!iso) return "—";
  const match = /^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2})(:\d{2})?/.exec(iso);
  return match ? `${match[1]} ${match[2]} UTC` : String(iso);
}

export function whenLong(iso) {
  if (!iso) return "—";
  const match = /^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}:\d{2})/.exec(iso);
  return match ? `${match[1]} ${match[2]} UTC` : String(iso);
}

/** The UTC days from `days - 1` days ago to today, as "YYYY-MM-DD". */
export function lastDays(days) {
  const today = new Date();
  const out = [];
  for (let back = days - 1; back >= 0; back--) {
    const day = new Date(Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), today.getUTCDate() - back));
    out.push(day.toISOString().slice(0, 10));
  }
  return out;
}

const STATUS_TONES = {
  active: "good", delivered: "good", settled: "good", ok: "good",
  pending: "accent", expiring: "warn", failed: "warn", waiting: "warn",
  expired: "", depleted: "", voided: "bad", revoked: "bad", suspended: "bad", dead: "bad",
};

export function badge(status) {
  const tone = STATUS_TONES[status] ?? "";
  return el("span", { class: ["badge", tone] }, status ?? "—");
}

export function amountCell(amount) {
  const negative = String(amount).startsWith("-");
  return el("td", { class: ["num", negative ? "neg" : "pos"], "data-amount": amount }, usdExact(amount));
}

// -- tables --------------------------------------------------------------------------

/**
 * columns: [{head, cell: row => node | string, num?: bool, cls?: string}]
 * A cell that returns a <td> is used as it is.
 */
export function table(columns, rows, empty = "Nothing yet.") {
  const head = el("tr", {}, columns.map((c) => el("th", { class: c.num ? "num" : null }, c.head)));
  const body = el("tbody");
  for (const row of rows) {
    body.append(
      el(
        "tr",
        {},
        columns.map((c) => {
          const value = c.cell(row);
          if (value instanceof HTMLTableCellElement) return value;
          return el("td", { class: [c.num ? "num" : null, c.cls] }, value);
        }),
      ),
    );
  }
  if (!rows.length) body.append(el("tr", {}, el("td", { class: "empty", colspan: columns.length }, empty)));
  return el("div", { class: "table-wrap" }, el("table", {}, el("thead", {}, head), body));
}

// -- the API -------------------------------------------------------------------------

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** A JSON API client whose bearer token lives in sessionStorage under `storageKey`. */
export class Api {
  constructor(storageKey) {
    this.storageKey = storageKey;
  }

  get token() {
    return sessionStorage.getItem(this.storageKey);
  }

  set token(value) {
    if (value) sessionStorage.setItem(this.storageKey, value);
    else sessionStorage.removeItem(this.storageKey);
  }

  async call(method, path, body, token = this.token, raw = false) {
    const headers = { Authorization: `Bearer ${token}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
        credentials: "omit",
        redirect: "error",
      });
    } catch (err) {
      throw new ApiError(0, `The proxy did not answer (${err.message}).`, "network");
    }
    const text = await response.text();
    if (raw && response.ok) return text;
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!response.ok) {
      const error = data && data.error;
      const message = error && error.message ? error.message : `${response.status} ${response.statusText}`;
      throw new ApiError(response.status, message, error ? error.code : null);
    }
    return data;
  }

  get(path) {
    return this.call("GET", path);
  }

  /** The body as text (e.g. the ledger's CSV export), errors as for JSON calls. */
  getText(path) {
    return this.call("GET", path, undefined, this.token, true);
  }
}

/** "?a=1&b=2" from an object, leaving out empty values. */
export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") search.set(name, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

export function errorBox(err) {
  const status = err instanceof ApiError && err.status ? ` (${err.status}${err.code ? ` ${err.code}` : ""})` : "";
  return el("div", { class: "error", role: "alert" }, `${err.message}${status}`);
}

/** Download `text` as a file, made here in the browser. */
export function download(name, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const link = el("a", { href: url, download: name, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

/** Name/value pairs of a form's fields, trimmed, empty ones left out. */
export function formValues(form) {
  const out = {};
  for (const [name, value] of new FormData(form).entries()) {
    const text = String(value).trim();
    if (text) out[name] = text;
  }
  return out;
}

/**
 * The sign-in card both pages open with: one secret field, checked by `check(secret)`
 * (which throws an ApiError to refuse it) before anything is stored.
 */
export function signInCard({ title, intro, label, field, placeholder, submit, fine, message, check }) {
  const input = el("input", {
    id: field, type: "password", name: field, autocomplete: "off", spellcheck: "false", required: true, placeholder,
  });
  const button = el("button", { type: "submit", class: "primary" }, submit);
  const status = el("div", { id: "signin-status" }, message ? el("div", { class: "notice" }, message) : null);
  async function signIn(event) {
    event.preventDefault();
    const secret = input.value.trim();
    if (!secret) return;
    button.disabled = true;
    try {
      await check(secret);
    } catch (err) {
      clear(status, errorBox(err));
    } finally {
      button.disabled = false;
    }
  }
  const card = el("div", { class: "signin" },
    el("div", { class: "card" },
      el("h1", {}, title),
      el("p", {}, intro),
      el("form", { id: "signin", on: { submit: signIn } }, el("label", { class: "field" }, el("span", {}, label), input), button),
      status,
      el("p", { class: "fine" }, fine)));
  return { card, focus: () => input.focus() };
}
