// Two small charts drawn as inline SVG: spend per UTC day (columns) and spend per model
// (bars). Geometry uses numbers; every figure shown is the API's own decimal string.

import { el, svg, usd, usdNumber } from "./ui.js";

function niceCeiling(value) {
  if (value <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (step * power >= value) return step * power;
  }
  return 10 * power;
}

function axisLabel(value) {
  if (value === 0) return "$0";
  if (value >= 1) return `$${Number(value.toPrecision(3))}`;
  return `$${Number(value.toPrecision(2))}`;
}

function chartRoot(kind, width, height, title) {
  const root = svg("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title, "data-chart": kind });
  root.append(svg("title", {}, title));
  return root;
}

/**
 * Spend per day. points: [{day: "YYYY-MM-DD", cost_usd: "1.23", requests: 4}], one per day,
 * oldest first (days without usage included, at zero).
 */
export function dailyChart(points, { title = "Spend per day (UTC)" } = {}) {
  const width = 620;
  const height = 230;
  const left = 58;
  const right = 8;
  const top = 12;
  const bottom = 28;
  const plotW = width - left - right;
  const plotH = height - top - bottom;
  const max = niceCeiling(Math.max(0, ...points.map((p) => usdNumber(p.cost_usd))));
  const chart = chartRoot("daily", width, height, title);
  for (let tick = 0; tick <= 4; tick++) {
    const value = (max * tick) / 4;
    const y = top + plotH - (plotH * tick) / 4;
    chart.append(svg("line", { class: "grid", x1: left, x2: width - right, y1: y, y2: y }));
    chart.append(svg("text", { class: "axis", x: left - 8, y: y + 4, "text-anchor": "end" }, axisLabel(value)));
  }
  const slot = plotW / Math.max(points.length, 1);
  const barW = Math.max(2, Math.min(28, slot * 0.7));
  points.forEach((point, index) => {
    const value = usdNumber(point.cost_usd);
    const h = value > 0 ? Math.max(2, (plotH * value) / max) : 2;
    const x = left + slot * index + (slot - barW) / 2;
    const bar = svg("rect", {
      class: value > 0 ? "bar" : "bar zero",
      x: x.toFixed(1),
      y: (top + plotH - h).toFixed(1),
      width: barW.toFixed(1),
      height: h.toFixed(1),
      rx: 2,
      "data-day": point.day,
      "data-cost": point.cost_usd,
    });
    bar.append(svg("title", {}, `${point.day}: ${usd(point.cost_usd)}, ${point.requests} requests`));
    chart.append(bar);
    const every = Math.ceil(points.length / 8);
    if ((points.length - 1 - index) % every === 0) {
      chart.append(
        svg("text", { class: "axis", x: (x + barW / 2).toFixed(1), y: height - 8, "text-anchor": "middle" },
          point.day.slice(5)),
      );
    }
  });
  return chart;
}

/** Spend per model. rows: [{model, cost_usd, requests}], dearest first. */
export function modelChart(rows, { title = "Spend by model" } = {}) {
  if (!rows.length) return el("div", { class: "chart-empty" }, "No usage in this period.");
  const width = 460;
  const rowH = 34;
  const labelW = 140;
  const figureW = 150;
  const height = rows.length * rowH + 6;
  const plotW = width - labelW - figureW;
  const max = Math.max(...rows.map((r) => usdNumber(r.cost_usd)), 0) || 1;
  const chart = chartRoot("models", width, height, title);
  rows.forEach((row, index) => {
    const y = index * rowH + 4;
    const value = usdNumber(row.cost_usd);
    const w = value > 0 ? Math.max(2, (plotW * value) / max) : 0;
    const name = row.model || "(none)";
    chart.append(svg("text", { class: "label", x: 0, y: y + 17 }, name.length > 21 ? `${name.slice(0, 20)}…` : name));
    chart.append(svg("rect", { class: "track", x: labelW, y: y + 4, width: plotW, height: 16, rx: 3 }));
    const bar = svg("rect", {
      class: "bar",
      x: labelW,
      y: y + 4,
      width: w.toFixed(1),
      height: 16,
      rx: 3,
      "data-model": name,
      "data-cost": row.cost_usd,
    });
    bar.append(svg("title", {}, `${name}: ${usd(row.cost_usd)}, ${row.requests} requests`));
    chart.append(bar);
    chart.append(
      svg("text", { class: "figure", x: width, y: y + 17, "text-anchor": "end" },
        `${usd(row.cost_usd)} · ${row.requests} req`),
    );
  });
  return chart;
}

/** A usage response grouped by day -> one point per day of `days` (zeros filled in). */
export function dayPoints(groups, days) {
  const byDay = new Map(groups.map((g) => [g.day, g]));
  return days.map((day) => {
    const group = byDay.get(day);
    return { day, cost_usd: group ? group.cost_usd : "0", requests: group ? group.requests : 0 };
  });
}

/** A usage response grouped by model, dearest first. */
export function modelRows(groups) {
  return [...groups].sort((a, b) => usdNumber(b.cost_usd) - usdNumber(a.cost_usd) || b.requests - a.requests);
}
