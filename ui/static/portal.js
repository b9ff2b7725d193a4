// An end user's own usage and what is left of each feature, read with a portal token only: the token
// decides the subject (GET /api/v1/portal/me), so nothing here can show anyone else. The page and the
// embeddable widget (no chart) share this script.
import {
  Api,
  addDays,
  browserZone,
  drawChart,
  el,
  fmtNumber,
  fmtTime,
  fmtWindow,
  markReady,
  noChart,
  parseDate,
  refreshEvery,
  renderTable,
  rfc3339,
  setStatus,
  showError,
  todayIn,
  zonedMidnight,
} from "./common.js";

const TOKEN_ITEM = "meterstream.portal";
const REFRESH_S = 60;
const DAYS = 30;
const WIDGET = document.body.classList.contains("widget");

function portalToken() {
  const fromUrl = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromUrl && !WIDGET) {
    // Kept for this tab, and out of the address bar (and of anything copied from it).
    sessionStorage.setItem(TOKEN_ITEM, fromUrl);
    history.replaceState(null, "", location.pathname + location.search);
  }
  return fromUrl || (WIDGET ? null : sessionStorage.getItem(TOKEN_ITEM));
}

function quota(e, value, zone) {
  const item = el("div", { class: "quota", "data-feature": e.featureKey });
  item.append(el("h3", { text: e.featureKey }));
  if (e.type !== "metered") {
    const has = value.hasAccess === "true" || value.hasAccess === true;
    item.append(el("p", { class: "figure", text: has ? "Included" : "Not included" }));
    return item;
  }
  const usage = value.usage ?? "0";
  const balance = value.balance ?? "0";
  if (e.isUnlimited === true) {
    item.append(el("p", { "data-usage": usage, text: `${fmtNumber(usage)} used · unlimited` }));
    return item;
  }
  const total = Number(usage) + Math.max(0, Number(balance));
  const bar = el("progress", { max: String(total || 1), value: String(Math.min(Number(usage), total || 1)) });
  bar.setAttribute("aria-label", `${e.featureKey}: ${fmtNumber(usage)} used, ${fmtNumber(balance)} left`);
  item.append(
    el("p", { class: "figure", "data-balance": balance, text: `${fmtNumber(balance)} left` }),
    bar,
    el("p", { class: "small", "data-usage": usage, text: `${fmtNumber(usage)} used this period` }),
  );
  if (e.currentUsagePeriod) {
    item.append(el("p", { class: "small", text: `Renews ${fmtTime(e.currentUsagePeriod.to, zone)} (${zone})` }));
  }
  if (value.hasAccess === "false" || value.hasAccess === false) item.classList.add("warn");
  return item;
}

async function load(api, me, zone) {
  const base = `/api/v1/subjects/${encodeURIComponent(me.subject)}/entitlements`;
  const list = await api.get(base);
  const items = await Promise.all(
    list.map(async (e) => quota(e, await api.get(`${base}/${encodeURIComponent(e.id)}/value`), zone)),
  );
  document
    .getElementById("quotas")
    .replaceChildren(...(items.length ? items : [el("p", { class: "empty", text: "No limits apply to you." })]));

  const chart = document.getElementById("tokens-chart");
  const allowed = me.allowedMeterSlugs === null || me.allowedMeterSlugs.includes("tokens_total");
  if (chart && !allowed) document.getElementById("usage-section").hidden = true;
  if (chart && allowed) {
    const today = todayIn(zone);
    const first = parseDate(addDays(today, -(DAYS - 1)));
    const after = parseDate(addDays(today, 1));
    const span = [zonedMidnight(first.y, first.m, first.d, zone), zonedMidnight(after.y, after.m, after.d, zone)];
    const rows = (
      await api.get("/api/v1/portal/meters/tokens_total/query", {
        from: rfc3339(span[0]),
        to: rfc3339(span[1]),
        windowSize: "DAY",
        windowTimeZone: zone,
      })
    ).data.sort((a, b) => Date.parse(a.windowStart) - Date.parse(b.windowStart));
    if (rows.length) {
      drawChart(chart, {
        xs: rows.map((r) => r.windowStart),
        zone,
        span,
        bars: true,
        series: [{ label: "Tokens", values: rows.map((r) => r.value) }],
      });
    } else {
      noChart(chart, "No usage in the last 30 days.");
    }
    renderTable(document.getElementById("days-table"), {
      id: "days",
      caption: `Tokens per day (${zone})`,
      file: "my-usage.csv",
      columns: [
        { key: "windowStart", label: "Day", format: (v) => fmtWindow(v, zone, "DAY") },
        { key: "value", label: "Tokens", numeric: true, format: fmtNumber },
      ],
      rows,
    });
  }
  markReady(zone);
}

async function main() {
  const token = portalToken();
  if (!token) {
    setStatus("This page needs a portal token: open it as /ui/portal#token=<token> (POST /api/v1/portal/tokens makes one).", true);
    document.body.dataset.state = "no-token";
    return;
  }
  const api = new Api(token);
  const zone = browserZone();
  for (const node of document.querySelectorAll("[data-zone]")) node.textContent = zone;
  let me;
  try {
    me = await api.get("/api/v1/portal/me");
  } catch (error) {
    showError(error);
    return;
  }
  await refreshEvery(REFRESH_S, () => load(api, me, zone).catch(showError));
}

main();
