// The operators' overview: everyone's usage over a range, by model and by subject.
import {
  decAdd,
  fmtNumber,
  fmtShare,
  fmtUsd,
  isZero,
  markReady,
  queryParams,
  refreshEvery,
  refreshSeconds,
  renderTable,
  showError,
  startOperatorPage,
} from "./common.js";
import { showUsage } from "./usage.js";

const TOP = 20;
const REFRESH_S = 30;

// Largest first. Floats order two decimals rightly whenever they differ as floats (rounding keeps order);
// only a tie there is settled exactly (b - a through decAdd).
function compareDecimals(a, b) {
  const rough = Number(b) - Number(a);
  if (rough !== 0) return Math.sign(rough);
  const difference = decAdd(b, a.startsWith("-") ? a.slice(1) : `-${a}`);
  return isZero(difference) ? 0 : difference.startsWith("-") ? -1 : 1;
}

// Rows of grouped, unwindowed queries joined by their group: [{<group keys>, <meter>: value}].
function byGroup(answers, keyOf) {
  const rows = new Map();
  for (const [meter, data] of Object.entries(answers)) {
    for (const row of data) {
      const key = keyOf(row);
      if (!rows.has(key)) rows.set(key, { subject: row.subject, ...row.groupBy });
      rows.get(key)[meter] = row.value;
    }
  }
  const out = [...rows.values()];
  for (const row of out) for (const meter of Object.keys(answers)) row[meter] ??= "0";
  return out;
}

async function grouped(api, range, meters, groupBy, extra = {}) {
  const params = queryParams(range, { groupBy, ...extra });
  delete params.windowSize; // one row per group over the whole range
  return api.queries(meters, params);
}

const SUBJECT_METERS = ["cost_usd", "tokens_total", "requests"];

function subjectLink(range, subject) {
  const q = new URLSearchParams({ subject, from: range.from, to: range.to, window: range.windowSize, tz: range.zone });
  return `/ui/subject?${q}`;
}

async function load(api, range) {
  // Every subject's cost (to rank them) in one scan; tokens and requests for the top ones only (ranking
  // ten thousand subjects needs one meter, not three).
  const [, models, costs] = await Promise.all([
    showUsage(api, range),
    grouped(api, range, ["requests", "tokens_total", "cost_usd", "unpriced_requests"], ["provider", "model"]),
    grouped(api, range, ["cost_usd"], ["subject"]),
  ]);

  const modelRows = byGroup(models, (r) => `${r.groupBy.provider}\u0000${r.groupBy.model}`).sort(
    (a, b) => compareDecimals(a.cost_usd, b.cost_usd) || compareDecimals(a.tokens_total, b.tokens_total),
  );
  for (const row of modelRows) row.priced = isZero(row.unpriced_requests) ? "yes" : "no: not in the cost";
  renderTable(document.getElementById("models-table"), {
    id: "models",
    caption: `By provider and model (${range.from} to ${range.to})`,
    file: "usage-by-model.csv",
    empty: "No usage in this range.",
    columns: [
      { key: "provider", label: "Provider" },
      { key: "model", label: "Model" },
      { key: "requests", label: "Requests", numeric: true, format: fmtNumber },
      { key: "tokens_total", label: "Tokens", numeric: true, format: fmtNumber },
      { key: "cost_usd", label: "Cost (USD)", numeric: true, format: fmtUsd },
      { key: "unpriced_requests", label: "Unpriced requests", numeric: true, format: fmtNumber },
      { key: "priced", label: "Priced" },
    ],
    rows: modelRows,
  });
  for (const cell of document.querySelectorAll('#models td[data-key="priced"]')) {
    if (cell.dataset.value !== "yes") cell.parentElement.classList.add("warn");
  }

  const ranked = byGroup(costs, (r) => r.subject).sort((a, b) => compareDecimals(a.cost_usd, b.cost_usd));
  const totalCost = ranked.reduce((t, r) => decAdd(t, r.cost_usd), "0");
  const top = ranked.slice(0, TOP);
  const details = top.length
    ? byGroup(
        await grouped(api, range, ["tokens_total", "requests"], ["subject"], { subject: top.map((r) => r.subject) }),
        (r) => r.subject,
      )
    : [];
  const bySubject = new Map(details.map((r) => [r.subject, r]));
  const complete = (rows, extra) =>
    rows.map((row, i) => ({
      ...extra.get(row.subject), // tokens and requests; the cost stays the one the subjects were ranked by
      ...row,
      rank: String(i + 1),
      share: fmtShare(row.cost_usd, totalCost),
    }));
  const subjectRows = complete(top, bySubject);
  const columns = [
    { key: "rank", label: "#", numeric: true },
    { key: "subject", label: "Subject", href: (row) => subjectLink(range, row.subject) },
    { key: "cost_usd", label: "Cost (USD)", numeric: true, format: fmtUsd },
    { key: "share", label: "Share of cost", numeric: true },
    { key: "tokens_total", label: "Tokens", numeric: true, format: fmtNumber },
    { key: "requests", label: "Requests", numeric: true, format: fmtNumber },
  ];
  renderTable(document.getElementById("subjects-table"), {
    id: "subjects",
    caption:
      ranked.length > TOP
        ? `Top ${TOP} of ${ranked.length} subjects (the CSV has all)`
        : `${ranked.length} subject${ranked.length === 1 ? "" : "s"}`,
    file: "usage-by-subject.csv",
    empty: "No usage in this range.",
    columns,
    rows: subjectRows,
    // Every subject's tokens and requests, asked for when the CSV is.
    csvRows: async () => {
      const all = byGroup(await grouped(api, range, SUBJECT_METERS, ["subject"]), (r) => r.subject);
      return complete(ranked, new Map(all.map((r) => [r.subject, r])));
    },
  });
  markReady(range.zone);
}

async function main() {
  const { api, range } = await startOperatorPage();
  await refreshEvery(refreshSeconds(REFRESH_S), () => load(api, range).catch(showError));
}

main();
