// Usage over a range, as the overview and the subject page show it: totals, two charts, a table per window.
import {
  decSum,
  drawChart,
  el,
  fmtNumber,
  fmtUsd,
  fmtWindow,
  isZero,
  noChart,
  queryParams,
  renderTable,
} from "./common.js";

// The built-in meters shown per window, in the table's order. input_tokens includes cache reads and writes,
// output_tokens includes reasoning: the columns say so rather than subtracting.
export const WINDOW_METERS = [
  { key: "requests", label: "Requests" },
  { key: "tokens_total", label: "Tokens" },
  { key: "input_tokens", label: "Input (incl. cache)" },
  { key: "cache_read_tokens", label: "Cache read" },
  { key: "cache_write_tokens", label: "Cache write" },
  { key: "output_tokens", label: "Output (incl. reasoning)" },
  { key: "reasoning_tokens", label: "Reasoning" },
  { key: "cost_usd", label: "Cost (USD)", money: true },
  { key: "unpriced_requests", label: "Unpriced requests" },
];
const TOKEN_KINDS = ["input_tokens", "cache_read_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens"];

// Rows of several meter queries joined by window: [{windowStart, windowEnd, <meter>: value}], oldest first.
// A window one meter has no row for counts 0 there (the query API leaves empty windows out).
export function byWindow(answers) {
  const rows = new Map();
  for (const [meter, data] of Object.entries(answers)) {
    for (const row of data) {
      const at = Date.parse(row.windowStart);
      if (!rows.has(at)) rows.set(at, { windowStart: row.windowStart, windowEnd: row.windowEnd });
      rows.get(at)[meter] = row.value;
    }
  }
  const out = [...rows.entries()].sort((a, b) => a[0] - b[0]).map(([, row]) => row);
  for (const row of out) for (const meter of Object.keys(answers)) row[meter] ??= "0";
  return out;
}

// Asks every meter of WINDOW_METERS for the range (``filter``: extra query parameters such as
// filterSubject) at once, and draws the cards, charts and table. Resolves with the totals.
export async function showUsage(api, range, filter = {}) {
  const params = queryParams(range, filter);
  const answers = await api.queries(
    WINDOW_METERS.map((m) => m.key),
    params,
  );
  const rows = byWindow(answers);
  const totals = Object.fromEntries(WINDOW_METERS.map((m) => [m.key, decSum(rows.map((r) => r[m.key]))]));

  const cards = document.getElementById("cards");
  const card = (key, label, shown, note, warn = false) =>
    el(
      "div",
      { class: warn ? "card warn" : "card", "data-total": key, "data-value": totals[key] },
      el("span", { class: "label", text: label }),
      el("span", { class: "figure", text: shown }),
      note ? el("span", { class: "note", text: note }) : null,
    );
  const unpriced = !isZero(totals.unpriced_requests);
  cards.replaceChildren(
    card("requests", "Requests", fmtNumber(totals.requests)),
    card("tokens_total", "Tokens", fmtNumber(totals.tokens_total)),
    card("cost_usd", "Cost", fmtUsd(totals.cost_usd), unpriced ? "priced calls only" : null),
    card(
      "unpriced_requests",
      "Unpriced requests",
      fmtNumber(totals.unpriced_requests),
      unpriced ? "Calls whose model has no known price: not in the cost. Add a price override." : "Every call is priced",
      unpriced,
    ),
  );

  const xs = rows.map((r) => r.windowStart);
  const label = (key) => WINDOW_METERS.find((m) => m.key === key).label;
  if (rows.length) {
    drawChart(document.getElementById("tokens-chart"), {
      xs,
      zone: range.zone,
      windowSize: range.windowSize,
      span: [range.start, range.end],
      series: TOKEN_KINDS.map((key) => ({ label: label(key), values: rows.map((r) => r[key]) })),
    });
    drawChart(document.getElementById("cost-chart"), {
      xs,
      zone: range.zone,
      windowSize: range.windowSize,
      span: [range.start, range.end],
      bars: true,
      money: true,
      series: [{ label: "Cost (USD)", values: rows.map((r) => r.cost_usd) }],
    });
  } else {
    for (const id of ["tokens-chart", "cost-chart"]) noChart(document.getElementById(id), "No usage in this range.");
  }
  renderTable(document.getElementById("windows-table"), {
    id: "windows",
    caption: `Per ${range.windowSize.toLowerCase()} (${range.zone})`,
    file: "usage-per-window.csv",
    empty: "No usage in this range.",
    columns: [
      { key: "windowStart", label: "Window", format: (v) => fmtWindow(v, range.zone, range.windowSize) },
      ...WINDOW_METERS.map((m) => ({
        key: m.key,
        label: m.label,
        numeric: true,
        format: m.money ? fmtUsd : fmtNumber,
      })),
    ],
    rows,
  });
  document.getElementById("empty").hidden = !isZero(totals.requests);
  return totals;
}
