// What every page shares: the API client, exact numbers, time zones, tables, charts, live refresh.
//
// Numbers are kept as the API wrote them (strings): a cost such as 0.000000075 is shown and summed
// exactly, never through a float. Floats are used only to draw charts.

const AUTH = document.querySelector('meta[name="meterstream-auth"]')?.content === "on";
const KEY_ITEM = "meterstream.key";

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

// JSON with every number kept as its source text: strings pass through untouched, every number token
// outside them is quoted, then JSON.parse. (JSON.parse alone would round long decimals and token counts.)
const JSON_TOKENS = /"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?/g;

function exactJson(text) {
  return JSON.parse(text.replace(JSON_TOKENS, (token) => (token[0] === '"' ? token : `"${token}"`)));
}

export class Api {
  // credential: an API key or a portal token (null: none, when the server has authentication off).
  constructor(credential) {
    this.credential = credential;
  }

  async get(path, params = {}) {
    const query = new URLSearchParams();
    for (const [name, value] of Object.entries(params)) {
      for (const v of Array.isArray(value) ? value : [value]) {
        if (v !== undefined && v !== null) query.append(name, v);
      }
    }
    const url = query.size ? `${path}?${query}` : path;
    const headers = { Accept: "application/json" };
    if (this.credential) headers.Authorization = `Bearer ${this.credential}`;
    const response = await fetch(url, { headers, credentials: "omit", cache: "no-store" });
    const text = await response.text();
    if (!response.ok) {
      let detail = `${response.status} ${response.statusText}`;
      try {
        detail = JSON.parse(text).detail || detail;
      } catch {
        /* not problem+json: keep the status line */
      }
      throw new ApiError(response.status, detail);
    }
    return exactJson(text);
  }

  // One meter query (OpenMeter's GET /api/v1/meters/{meter}/query), its rows as the API returned them.
  async query(meter, params) {
    return (await this.get(`/api/v1/meters/${encodeURIComponent(meter)}/query`, params)).data;
  }

  // Several built-in meters in one scan (GET /api/v1/query): meter -> its rows, each exactly what its own
  // meter query answers.
  async queries(meters, params) {
    const { results } = await this.get("/api/v1/query", { ...params, meter: meters });
    return Object.fromEntries(meters.map((m) => [m, results[m].data]));
  }
}

// -- the operator's key ------------------------------------------------------------------------------

function storedKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

function signOut() {
  sessionStorage.removeItem(KEY_ITEM);
  location.reload();
}

// Resolves with an Api once the visitor has given a key the server accepts (at once when one is kept for
// this tab, or authentication is off). The key stays in this tab's session storage only.
function operatorApi() {
  if (!AUTH) return Promise.resolve(new Api(null));
  const kept = storedKey();
  if (kept) return Promise.resolve(new Api(kept));
  const form = document.getElementById("sign-in");
  const message = document.getElementById("sign-in-message");
  form.hidden = false;
  document.getElementById("content").hidden = true;
  form.querySelector("input").focus();
  return new Promise((resolve) => {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const key = new FormData(form).get("key").trim();
      const api = new Api(key);
      try {
        await api.get("/api/v1/meters");
        sessionStorage.setItem(KEY_ITEM, key);
        form.hidden = true;
        document.getElementById("content").hidden = false;
        resolve(api);
      } catch (error) {
        message.textContent =
          error.status === 401 || error.status === 403
            ? "This key is not accepted here: use a read or admin key."
            : `The server could not be reached: ${error.message}`;
      }
    });
  });
}

// What both operator pages do first: a key the server accepts, the sign-out button, the range form (30 days
// by day unless the URL says otherwise), the empty state's curl (for ``subject``). Resolves with both.
export async function startOperatorPage(subject) {
  const api = await operatorApi();
  if (storedKey()) {
    const out = document.getElementById("sign-out");
    out.hidden = false;
    out.addEventListener("click", signOut);
  }
  const range = readRange({ days: 30, window: "DAY" });
  setUpRangeForm(range);
  document.getElementById("first-event").textContent = firstEventCurl(subject);
  return { api, range };
}

// -- exact decimals ----------------------------------------------------------------------------------

function scaled(text) {
  const [mantissa, exponent = "0"] = text.toLowerCase().split("e"); // 7.5e-8 as well as 0.000000075
  const negative = mantissa.startsWith("-");
  const [whole, fraction = ""] = (negative ? mantissa.slice(1) : mantissa).split(".");
  let value = BigInt(whole + fraction) * (negative ? -1n : 1n);
  let scale = fraction.length - Number(exponent);
  if (scale < 0) {
    value *= 10n ** BigInt(-scale);
    scale = 0;
  }
  return { value, scale };
}

// a + b for decimal strings, exactly ("0.1" + "0.2" = "0.3").
export function decAdd(a, b) {
  const x = scaled(String(a));
  const y = scaled(String(b));
  const scale = Math.max(x.scale, y.scale);
  const sum = x.value * 10n ** BigInt(scale - x.scale) + y.value * 10n ** BigInt(scale - y.scale);
  const negative = sum < 0n;
  let digits = (negative ? -sum : sum).toString().padStart(scale + 1, "0");
  let text = scale ? `${digits.slice(0, -scale)}.${digits.slice(-scale)}` : digits;
  if (scale) text = text.replace(/0+$/, "").replace(/\.$/, "");
  return (negative ? "-" : "") + text;
}

export function decSum(values) {
  return values.reduce((total, v) => decAdd(total, v), "0");
}

export function isZero(text) {
  return /^-?0*(\.0*)?$/.test(String(text));
}

function group(whole) {
  return whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
}

// A decimal string with its integer part grouped, every fraction digit kept.
export function fmtNumber(text) {
  const s = String(text);
  const negative = s.startsWith("-");
  const [whole, fraction] = (negative ? s.slice(1) : s).split(".");
  return (negative ? "-" : "") + group(whole) + (fraction ? `.${fraction}` : "");
}

export function fmtUsd(text) {
  const s = String(text);
  return s.startsWith("-") ? `-$${fmtNumber(s.slice(1))}` : `$${fmtNumber(s)}`;
}

// A share as a percentage with one decimal (shown, never summed: the exact values sit beside it).
export function fmtShare(part, total) {
  const t = Number(total);
  return t > 0 ? `${((Number(part) / t) * 100).toFixed(1)}%` : "-";
}

// -- time zones --------------------------------------------------------------------------------------

export function browserZone() {
  return Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
}

function validZone(zone) {
  try {
    new Intl.DateTimeFormat("en", { timeZone: zone });
    return true;
  } catch {
    return false;
  }
}

// Intl formatters are slow to make and quick to use: one per locale, zone and options.
const FORMATTERS = new Map();
function formatter(locale, options) {
  const key = `${locale}|${JSON.stringify(options)}`;
  if (!FORMATTERS.has(key)) FORMATTERS.set(key, new Intl.DateTimeFormat(locale, options));
  return FORMATTERS.get(key);
}

// The zone's name as the IANA database spells it ("europe/berlin" is "Europe/Berlin"; the server's
// time zone database is case-sensitive), keeping the given name where the browser knows it by an alias.
function canonicalZone(zone) {
  const resolved = new Intl.DateTimeFormat("en", { timeZone: zone }).resolvedOptions().timeZone;
  return resolved.toLowerCase() === zone.toLowerCase() ? resolved : zone;
}

function zoneParts(ms, zone) {
  const parts = formatter("en-US", {
    timeZone: zone,
    hourCycle: "h23",
    year: "numeric",
    month: "2-digit",
    day: "2-digit",
    hour: "2-digit",
    minute: "2-digit",
    second: "2-digit",
  }).formatToParts(new Date(ms));
  const get = (type) => Number(parts.find((p) => p.type === type).value);
  return { y: get("year"), m: get("month"), d: get("day"), h: get("hour"), min: get("minute"), s: get("second") };
}

function localDate(ms, zone) {
  const p = zoneParts(ms, zone);
  return isoDate(p.y, p.m, p.d);
}

// The instant the local date y-m-d begins in ``zone``: the earliest instant whose local date is that day
// (midnight, or the end of a DST gap where a zone skips midnight, as in Africa/Cairo). Found by halving:
// UTC offsets lie within -12 h and +14 h, so it is within 15 h before and 13 h after that date's UTC midnight.
export function zonedMidnight(y, m, d, zone) {
  const target = isoDate(y, m, d);
  // In whole seconds (every zone changes its clocks on a whole second): the day before at lo, the day at hi.
  let lo = Date.UTC(y, m - 1, d) / 1000 - 15 * 3600;
  let hi = Date.UTC(y, m - 1, d) / 1000 + 13 * 3600;
  while (hi - lo > 1) {
    const mid = Math.floor((lo + hi) / 2);
    if (localDate(mid * 1000, zone) >= target) hi = mid;
    else lo = mid;
  }
  return new Date(hi * 1000);
}

// Today's local date in ``zone`` as "YYYY-MM-DD".
export function todayIn(zone) {
  const p = zoneParts(Date.now(), zone);
  return isoDate(p.y, p.m, p.d);
}

function isoDate(y, m, d) {
  return `${String(y).padStart(4, "0")}-${String(m).padStart(2, "0")}-${String(d).padStart(2, "0")}`;
}

export function parseDate(text) {
  const match = /^(\d{4})-(\d{2})-(\d{2})$/.exec(text || "");
  return match ? { y: Number(match[1]), m: Number(match[2]), d: Number(match[3]) } : null;
}

export function addDays(text, days) {
  const p = parseDate(text);
  const t = new Date(Date.UTC(p.y, p.m - 1, p.d + days));
  return isoDate(t.getUTCFullYear(), t.getUTCMonth() + 1, t.getUTCDate());
}

function addMonths(text, months) {
  const p = parseDate(text);
  const t = new Date(Date.UTC(p.y, p.m - 1 + months, 1));
  return isoDate(t.getUTCFullYear(), t.getUTCMonth() + 1, 1);
}

export function rfc3339(date) {
  return date.toISOString().replace(".000Z", "Z");
}

// A window's start as people read it in the zone: a date for days and months, a time for hours.
export function fmtWindow(iso, zone, windowSize) {
  const options = { timeZone: zone, year: "numeric", month: "short" };
  if (windowSize !== "MONTH") options.day = "numeric";
  if (windowSize === "HOUR" || windowSize === "MINUTE") {
    // With the offset: the hour a DST change repeats reads "01:00 EDT", then "01:00 EST".
    Object.assign(options, { hour: "2-digit", minute: "2-digit", timeZoneName: "short" });
  }
  return formatter("en-GB", options).format(new Date(iso));
}

export function fmtTime(iso, zone) {
  return formatter("en-GB", { timeZone: zone, dateStyle: "medium", timeStyle: "medium" }).format(new Date(iso));
}

// The page's range from its URL (or defaults): local dates in a zone, turned into the API's instants.
function readRange(defaults) {
  const params = new URLSearchParams(location.search);
  const zone = validZone(params.get("tz")) ? canonicalZone(params.get("tz")) : browserZone();
  const windowSize = ["HOUR", "DAY", "MONTH"].includes(params.get("window")) ? params.get("window") : defaults.window;
  const today = todayIn(zone);
  let to = parseDate(params.get("to")) ? params.get("to") : today;
  let from = parseDate(params.get("from")) ? params.get("from") : addDays(to, -(defaults.days - 1));
  if (from > to) [from, to] = [to, from];
  const start = parseDate(from);
  const end = parseDate(addDays(to, 1));
  return {
    from,
    to,
    zone,
    windowSize,
    start: zonedMidnight(start.y, start.m, start.d, zone),
    end: zonedMidnight(end.y, end.m, end.d, zone),
  };
}

// The meter query parameters of a range (``extra``: groupBy, filterSubject...).
export function queryParams(range, extra = {}) {
  return {
    from: rfc3339(range.start),
    to: rfc3339(range.end),
    windowSize: range.windowSize,
    windowTimeZone: range.zone,
    ...extra,
  };
}

// Fills the range form from ``range``, wires its presets, and lists the zones the browser knows.
function setUpRangeForm(range) {
  const form = document.getElementById("range");
  form.elements.from.value = range.from;
  form.elements.to.value = range.to;
  form.elements.window.value = range.windowSize;
  form.elements.tz.value = range.zone;
  const zones = document.getElementById("zones");
  for (const zone of Intl.supportedValuesOf ? Intl.supportedValuesOf("timeZone") : ["UTC"]) {
    const option = document.createElement("option");
    option.value = zone;
    zones.append(option);
  }
  form.addEventListener("submit", (event) => {
    if (!validZone(form.elements.tz.value)) {
      event.preventDefault();
      form.elements.tz.setCustomValidity("Not a time zone this browser knows (for example Europe/Berlin or UTC)");
      form.elements.tz.reportValidity();
    }
  });
  form.elements.tz.addEventListener("input", () => form.elements.tz.setCustomValidity(""));
  for (const button of form.querySelectorAll("[data-preset]")) {
    button.addEventListener("click", () => {
      const today = todayIn(form.elements.tz.value || range.zone);
      const preset = button.dataset.preset;
      if (preset === "month") {
        form.elements.from.value = addMonths(today, 0);
        form.elements.to.value = today;
        form.elements.window.value = "DAY";
      } else if (preset === "year") {
        form.elements.from.value = addMonths(today, -11);
        form.elements.to.value = today;
        form.elements.window.value = "MONTH";
      } else {
        form.elements.from.value = addDays(today, -(Number(preset) - 1));
        form.elements.to.value = today;
        form.elements.window.value = "DAY";
      }
      form.requestSubmit();
    });
  }
  for (const el of document.querySelectorAll("[data-zone]")) el.textContent = range.zone;
}

// -- page building -----------------------------------------------------------------------------------

export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

// A text cell a spreadsheet would run as a formula (=, +, -, @, tab, return first) gets a leading ' (OWASP's
// advice); numbers are written as they are, negative ones included.
function csvCell(value, numeric) {
  let s = value === null || value === undefined ? "" : String(value);
  if (!numeric && /^[=+\-@\t\r]/.test(s)) s = `'${s}`;
  return /[",\n\r]/.test(s) ? `"${s.replaceAll('"', '""')}"` : s;
}

function toCsv(columns, rows) {
  const lines = [columns.map((c) => csvCell(c.csv || c.key, false)).join(",")];
  for (const row of rows) lines.push(columns.map((c) => csvCell(row[c.key], c.numeric)).join(","));
  return lines.join("\n") + "\n";
}

// A table of ``rows`` (objects; values as the API gave them) in ``container``, with a CSV download of
// exactly those values. columns: {key, label, format?, numeric?, href?(row)}; every cell carries its raw
// value in data-value.
// csvRows: what the CSV holds when the table shows only some rows (the top of a list): rows, or an async
// function fetching them when the download is asked for.
export function renderTable(container, { id, caption, columns, rows, file, empty, csvRows = rows }) {
  // A refresh that changed nothing leaves the table alone: focus, selection and scroll stay where they were.
  const signature = JSON.stringify([caption, rows]);
  if (container.dataset.signature === signature && container.firstChild) {
    container.csvRows = csvRows;
    return;
  }
  container.dataset.signature = signature;
  container.csvRows = csvRows;
  const table = el("table", { id });
  table.append(el("caption", { text: caption }));
  const head = el("tr");
  for (const c of columns) head.append(el("th", { scope: "col", class: c.numeric ? "num" : null, text: c.label }));
  table.append(el("thead", {}, head));
  const body = el("tbody");
  for (const row of rows) {
    const tr = el("tr");
    for (const c of columns) {
      const raw = row[c.key];
      const shown = raw === null || raw === undefined ? "-" : c.format ? c.format(raw, row) : String(raw);
      const td = el("td", { class: c.numeric ? "num" : null, "data-key": c.key, "data-value": raw ?? "" });
      const href = c.href ? c.href(row) : null;
      td.append(href ? el("a", { href, text: shown }) : shown);
      tr.append(td);
    }
    body.append(tr);
  }
  table.append(body);
  const download = el("button", { type: "button", class: "csv", text: `Download CSV` });
  download.setAttribute("aria-label", `Download CSV: ${caption}`);
  download.addEventListener("click", async () => {
    const wanted = container.csvRows; // the latest refresh's
    const all = typeof wanted === "function" ? await wanted() : wanted;
    const blob = new Blob([toCsv(columns, all)], { type: "text/csv" });
    const link = el("a", { href: URL.createObjectURL(blob), download: file });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  });
  const parts = [el("div", { class: "scroll" }, table)];
  if (!rows.length && empty) parts.push(el("p", { class: "empty", text: empty }));
  container.replaceChildren(el("div", { class: "table-head" }, download), ...parts);
}

const PALETTE = ["#1f5fbf", "#b34700", "#2e7d32", "#8e24aa", "#c62828", "#00796b", "#5d4037"];

// A uPlot chart of series over windows. xs: window starts (ISO strings); series: {label, values}.
// Window starts (seconds) from minS up to maxS in ``zone``: local midnights for days, the 1st for months.
function windowStarts(minS, maxS, zone, windowSize) {
  if (windowSize === "HOUR" || windowSize === "MINUTE") {
    // Local hours start where the local minute is 0 (at :30 UTC in Asia/Kolkata).
    const step = windowSize === "HOUR" ? 3600 : 60;
    const out = [];
    let t = Math.ceil(minS / 60) * 60;
    while (windowSize === "HOUR" && zoneParts(t * 1000, zone).min !== 0 && t <= maxS) t += 60;
    for (; t < maxS; t += step) out.push(t);
    return out;
  }
  const p = zoneParts(minS * 1000, zone);
  let day = windowSize === "MONTH" ? isoDate(p.y, p.m, 1) : isoDate(p.y, p.m, p.d);
  const out = [];
  for (let i = 0; i < 2000; i += 1) {
    const d = parseDate(day);
    const t = zonedMidnight(d.y, d.m, d.d, zone).getTime() / 1000;
    if (t >= maxS) break; // the range's end starts no window
    if (t >= minS) out.push(t);
    day = windowSize === "MONTH" ? addMonths(day, 1) : addDays(day, 1);
  }
  return out;
}

// A uPlot chart of series over windows. xs: window starts (ISO strings); series: {label, values}.
// The x axis spans ``span`` ([from, to] Dates: the query's range) and is labelled with window starts as the
// tables label them, thinned to fit (never 12am, 6am... ticks).
export function drawChart(container, { xs, series, zone, span, windowSize = "DAY", bars = false, money = false }) {
  const seconds = xs.map((iso) => Date.parse(iso) / 1000);
  const splits = (u, axis, min, max) => {
    const all = windowStarts(min, max, zone, windowSize);
    const every = Math.max(1, Math.ceil((all.length * 110) / Math.max(1, u.bbox.width / devicePixelRatio)));
    return all.filter((_, i) => i % every === 0);
  };
  const data = [seconds, ...series.map((s) => s.values.map((v) => (v === null ? null : Number(v))))];
  const width = Math.max(280, container.clientWidth || 600);
  const opts = {
    width,
    height: 240,
    tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), zone),
    scales: {
      // From the first window's start (a month's may be before the range's start) to the range's end.
      x: span
        ? { time: true, range: () => [Math.min(span[0].getTime() / 1000, ...seconds), span[1].getTime() / 1000] }
        : { time: true },
      y: { range: (u, min, max) => [0, max > 0 ? max * 1.08 : 1] }, // amounts start at zero
    },
    axes: [
      {
        splits,
        values: (u, at) => at.map((t) => fmtWindow(new Date(t * 1000).toISOString(), zone, windowSize)),
      },
      {
        size: 70, values: (u, at) => at.map((t) => (money ? `$${t}` : t.toLocaleString("en"))),
      },
    ],
    series: [
      { label: "Window" },
      ...series.map((s, i) => ({
        label: s.label,
        stroke: PALETTE[i % PALETTE.length],
        width: 2,
        fill: bars ? `${PALETTE[i % PALETTE.length]}33` : undefined,
        paths: bars && uPlot.paths.bars ? uPlot.paths.bars({ size: [0.6, 60] }) : undefined,
        points: { show: !bars && seconds.length < 60 },
      })),
    ],
  };
  const signature = JSON.stringify([xs, series, zone, windowSize, width]);
  if (container.chart && container.dataset.signature === signature) return container.chart; // unchanged
  container.chart?.destroy(); // uPlot keeps every live chart (and a listener) until destroyed
  container.replaceChildren();
  const chart = new uPlot(opts, data, container);
  container.chart = chart;
  container.dataset.signature = signature;
  return chart;
}

// A chart's place without a chart: the message instead (a chart that was there is destroyed).
export function noChart(container, text) {
  container.chart?.destroy();
  container.chart = null;
  delete container.dataset.signature;
  container.replaceChildren(el("p", { class: "empty", text }));
}

// Keeps each chart as wide as its container (phones, resized windows).
window.addEventListener("resize", () => {
  for (const node of document.querySelectorAll(".chart")) {
    if (node.chart) node.chart.setSize({ width: Math.max(280, node.clientWidth), height: 240 });
  }
});

// The status line is quiet (a screen reader is not told "Updated ..." every 30 seconds); a problem is
// announced, in the alert region beside it.
export function setStatus(text, error = false) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.classList.toggle("error", error);
  const problem = document.getElementById("problem");
  if (problem && problem.textContent !== (error ? text : "")) problem.textContent = error ? text : "";
}

// The refresh interval: ``?refresh=<seconds>`` (at least 2), else the page's default.
export function refreshSeconds(fallback) {
  const asked = Number(new URLSearchParams(location.search).get("refresh"));
  return Number.isFinite(asked) && asked >= 2 ? asked : fallback;
}

// Runs ``load`` now and every ``seconds`` while the page is visible, never two at a time; a hidden tab
// asks nothing, and catches up as soon as it is shown again.
// The pause button (where a page has one) stops the updates until pressed again (WCAG 2.2.2).
export function refreshEvery(seconds, load) {
  let running = false;
  let last = 0;
  let paused = false;
  const pause = document.getElementById("pause");
  pause?.addEventListener("click", () => {
    paused = !paused;
    pause.setAttribute("aria-pressed", String(paused));
    pause.textContent = paused ? "Resume live updates" : "Pause live updates";
    if (!paused) run();
  });
  const run = async (first = false) => {
    // The first load happens even in a tab not shown yet (opened in the background): it is ready when seen.
    if (running || paused || (!first && document.visibilityState !== "visible")) return;
    running = true;
    try {
      await load();
    } finally {
      last = Date.now();
      running = false;
    }
  };
  setInterval(() => {
    if (Date.now() - last >= seconds * 1000) run();
  }, 1000);
  document.addEventListener("visibilitychange", () => {
    if (Date.now() - last >= seconds * 1000) run();
  });
  return run(true);
}

export function showError(error) {
  if (error instanceof ApiError && error.status === 401 && storedKey()) {
    signOut(); // the key was revoked or has expired: ask for one again
    return;
  }
  const expired = error instanceof ApiError && error.status === 401 && !storedKey();
  setStatus(expired ? `Not signed in: ${error.message}` : `Could not load: ${error.message}`, true);
  document.body.dataset.state = "error";
}

export function markReady(zone) {
  const now = new Date().toISOString();
  setStatus(`Updated ${fmtTime(now, zone)} (${zone})`);
  document.body.dataset.state = "ready";
  document.body.dataset.loadedAt = now;
  // Milliseconds from the start of the navigation to every number shown, the first time (bench/ui.py).
  document.body.dataset.readyMs ??= String(Math.round(performance.now()));
}

// ``text`` inside single quotes for a POSIX shell (a ' becomes '\'').
function shellQuoted(text) {
  return `'${text.replaceAll("'", "'\\''")}'`;
}

// The curl that sends a first event (for ``subject``), for empty states.
function firstEventCurl(subject = "alice") {
  const auth = AUTH ? ' -H "Authorization: Bearer $KEY"' : "";
  const now = new Date().toISOString().replace(/\.\d+Z$/, "Z");
  const event = {
    specversion: "1.0",
    id: `first-${Date.now()}`,
    source: "my-app",
    type: "llm.usage",
    subject,
    time: now,
    data: { provider: "openai", model: "gpt-4o-mini", input_tokens: 1200, output_tokens: 300 },
  };
  return (
    `curl -X POST ${location.origin}/api/v1/events${auth} -H 'Content-Type: application/cloudevents+json' \\\n` +
    `  -d ${shellQuoted(JSON.stringify(event))}`
  );
}
