// One subject: its usage over a range, its entitlements now, its alerts, its recent events.
import {
  ApiError,
  el,
  fmtNumber,
  fmtTime,
  fmtUsd,
  markReady,
  refreshEvery,
  refreshSeconds,
  renderTable,
  rfc3339,
  showError,
  startOperatorPage,
} from "./common.js";
import { showUsage } from "./usage.js";

const REFRESH_S = 30;
const ALERT_KINDS = {
  "entitlements.balance.threshold": "threshold crossed",
  "entitlements.balance.threshold.resolved": "threshold resolved",
  "entitlements.reset": "usage reset",
};

// The answer of a control-plane endpoint, or null with ``what`` explained in ``container`` when this server
// has no PostgreSQL (those routes are then absent: the API's "no such endpoint").
async function ifConfigured(request, container, what) {
  try {
    return await request;
  } catch (error) {
    if (error instanceof ApiError && error.status === 404 && error.message === "no such endpoint") {
      const text = `${what} need PostgreSQL (POSTGRES__DSN); this server has none.`;
      container.replaceChildren(el("p", { class: "empty", text }));
      return null;
    }
    throw error;
  }
}

async function entitlements(api, subject, range) {
  const base = `/api/v1/subjects/${encodeURIComponent(subject)}/entitlements`;
  const list = await ifConfigured(api.get(base), document.getElementById("entitlements-table"), "Limits");
  if (list === null) return;
  const rows = await Promise.all(
    (Array.isArray(list) ? list : list.items).map(async (e) => {
      const value = await api.get(`${base}/${encodeURIComponent(e.id)}/value`);
      const period = e.currentUsagePeriod;
      return {
        feature: e.featureKey,
        type: e.type,
        usage: value.usage ?? null,
        balance: value.balance ?? null,
        reserved: value.reserved ?? null,
        overage: value.overage ?? null,
        hasAccess: value.hasAccess === "true" || value.hasAccess === true ? "yes" : "no",
        limit: e.type !== "metered" ? "-" : e.isUnlimited === true ? "unlimited" : e.isSoftLimit ? "soft" : "hard",
        periodFrom: period ? period.from : null,
        periodTo: period ? period.to : null,
      };
    }),
  );
  renderTable(document.getElementById("entitlements-table"), {
    id: "entitlements",
    caption: `Entitlements of ${subject}, now`,
    file: `entitlements-${subject}.csv`,
    empty: "No entitlements: POST /api/v1/subjects/{subject}/entitlements (or a plan) gives this subject limits.",
    columns: [
      { key: "feature", label: "Feature" },
      { key: "type", label: "Type" },
      { key: "limit", label: "Limit" },
      { key: "usage", label: "Usage", numeric: true, format: fmtNumber },
      { key: "balance", label: "Balance", numeric: true, format: fmtNumber },
      { key: "reserved", label: "Holds in flight", numeric: true, format: fmtNumber },
      { key: "overage", label: "Overage", numeric: true, format: fmtNumber },
      { key: "hasAccess", label: "Has access" },
      { key: "periodFrom", label: "Period from", format: (v) => fmtTime(v, range.zone) },
      { key: "periodTo", label: "Period to", format: (v) => fmtTime(v, range.zone) },
    ],
    rows,
  });
}

async function alerts(api, subject, range) {
  const container = document.getElementById("alerts-table");
  const page = await ifConfigured(
    api.get("/api/v1/notification/events", {
      subject,
      from: rfc3339(range.start),
      to: rfc3339(range.end),
      pageSize: "50",
    }),
    container,
    "Alerts",
  );
  if (page === null) return;
  const rows = page.items.map((event) => {
    const data = event.payload.data || {};
    const delivery = event.deliveryStatus[0];
    return {
      createdAt: event.createdAt,
      kind: ALERT_KINDS[event.type] || event.type,
      rule: event.rule.name,
      feature: data.feature ? data.feature.key : null,
      threshold: data.threshold ? `${data.threshold.value} (${data.threshold.type})` : null,
      usage: data.value ? (data.value.usage ?? null) : null,
      balance: data.value ? (data.value.balance ?? null) : null,
      delivery: delivery ? delivery.state : null,
      id: event.id,
    };
  });
  renderTable(container, {
    id: "alerts",
    caption: page.totalCount > rows.length ? `Newest ${rows.length} of ${page.totalCount}` : "Notifications sent",
    file: `alerts-${subject}.csv`,
    empty: "No notifications for this subject in this range.",
    columns: [
      { key: "createdAt", label: "Time", format: (v) => fmtTime(v, range.zone) },
      { key: "kind", label: "Event" },
      { key: "rule", label: "Rule" },
      { key: "feature", label: "Feature" },
      { key: "threshold", label: "Threshold" },
      { key: "usage", label: "Usage", numeric: true, format: fmtNumber },
      { key: "balance", label: "Balance", numeric: true, format: fmtNumber },
      { key: "delivery", label: "Delivery" },
      { key: "id", label: "Id" },
    ],
    rows,
  });
}

async function events(api, subject, range) {
  const list = await api.get("/api/v1/events", {
    subject,
    from: rfc3339(range.start),
    to: rfc3339(range.end),
    limit: "100",
  });
  const rows = list.map((item) => {
    const m = item.meterstream;
    return {
      time: item.event.time,
      id: item.event.id,
      source: item.event.source,
      provider: m.provider,
      model: m.model,
      input_tokens: m.usage ? (m.usage.input_tokens ?? null) : null,
      output_tokens: m.usage ? (m.usage.output_tokens ?? null) : null,
      costUsd: m.costUsd,
      priceSource: m.priceSource || (m.costUsd === null ? "unpriced" : null),
      status: m.status,
    };
  });
  renderTable(document.getElementById("events-table"), {
    id: "events",
    caption: `Newest events of ${subject}`,
    file: `events-${subject}.csv`,
    empty: "No events for this subject in this range.",
    columns: [
      { key: "time", label: "Time", format: (v) => fmtTime(v, range.zone) },
      { key: "id", label: "Event id" },
      { key: "provider", label: "Provider" },
      { key: "model", label: "Model" },
      { key: "input_tokens", label: "Input", numeric: true, format: fmtNumber },
      { key: "output_tokens", label: "Output", numeric: true, format: fmtNumber },
      { key: "costUsd", label: "Cost (USD)", numeric: true, format: fmtUsd },
      { key: "priceSource", label: "Price source" },
      { key: "status", label: "Status" },
    ],
    rows,
  });
  for (const cell of document.querySelectorAll('#events td[data-key="priceSource"]')) {
    if (cell.dataset.value === "unpriced") cell.parentElement.classList.add("warn");
  }
}

async function load(api, subject, range) {
  await Promise.all([
    showUsage(api, range, { subject }),
    entitlements(api, subject, range),
    alerts(api, subject, range),
    events(api, subject, range),
  ]);
  markReady(range.zone);
}

async function main() {
  const subject = new URLSearchParams(location.search).get("subject");
  if (!subject) {
    location.replace("/ui/");
    return;
  }
  document.getElementById("subject-name").textContent = subject;
  document.getElementById("subject-field").value = subject;
  document.getElementById("find-subject-input").value = subject;
  document.title = `${subject} · Meterstream`;
  const { api, range } = await startOperatorPage(subject);
  await refreshEvery(refreshSeconds(REFRESH_S), () => load(api, subject, range).catch(showError));
}

main();
