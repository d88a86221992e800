// loralab ui: the browser side. Plain ES2020, no framework; talks to the JSON API of docs/ui.md.
// Every text from the server goes into the DOM through textContent; only `report_html` (Markdown
// rendered by the server with raw HTML disabled) is inserted as HTML.
"use strict";

const TABS = ["runs", "launch", "compare", "playground", "data"];
const POLL_MS = 2000;
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d", "#475569"];

const state = {
  runs: [], studies: [],
  run: null,            // the open run's detail
  jobStatus: null,      // job id -> "status|run_id", to notice changes between polls
  jobs: [], job: null,  // the job whose log is shown
  form: null,
  pgLoaded: [],
  sampleRuns: null,     // runs that have before/after answers (Playground examples), null = not looked up yet
  charts: {},           // canvas id -> Chart instance
};

// ---------- helpers ----------

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

/** Fetch a same-origin JSON route; a non-ok answer throws an Error carrying the body's one-line `error`. */
async function api(path, options = {}) {
  const opts = { credentials: "same-origin", ...options, headers: { Accept: "application/json", ...(options.headers || {}) } };
  if (opts.body !== undefined && typeof opts.body !== "string") {
    opts.body = JSON.stringify(opts.body);
    opts.headers["Content-Type"] = "application/json";
  }
  const res = await fetch(path, opts);
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!res.ok) throw new Error(errorMessage(data, `${res.status} ${res.statusText}`));
  return data;
}

/** The one-line message of an error body: {"error": "..."} or OpenAI's {"error": {"message": ...}}. */
function errorMessage(body, fallback) {
  let msg = body && body.error;
  if (msg && typeof msg === "object") msg = msg.message;
  return String(msg || fallback).split("\n")[0];
}

/** Create an element: el("td", {className: "x", dataset: {a: 1}}, "text", child, ...). Strings become text nodes. */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null) continue;
    if (k === "dataset") Object.assign(node.dataset, v);
    else if (k === "attrs") for (const [a, av] of Object.entries(v)) node.setAttribute(a, av);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node[k] = v;
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

function showError(id, err) {
  const node = document.getElementById(id);
  if (!node) return;
  node.textContent = err ? String(err.message || err).split("\n")[0] : "";
  node.hidden = !err;
}

/** Numbers to 4 significant digits (integers as they are); other values as text. */
function fmt(v) {
  if (v === null || v === undefined) return "-";
  if (typeof v === "number") {
    if (!Number.isFinite(v)) return String(v);
    return Number.isInteger(v) ? String(v) : String(Number(v.toPrecision(4)));
  }
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

const fmtLoss = (v) => (typeof v === "number" && Number.isFinite(v) ? v.toFixed(4) : "-");

/** Seconds as m:ss (h:mm:ss past an hour). */
function fmtDuration(s) {
  s = Math.max(0, Math.round(Number(s)));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = String(s % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${sec}` : `${m}:${sec}`;
}

/** `updated` may be an ISO string or epoch seconds (or milliseconds); shown in local time. */
function fmtTime(v) {
  if (v === null || v === undefined || v === "") return "-";
  const d = typeof v === "number" ? new Date(v < 1e12 ? v * 1000 : v) : new Date(v);
  return Number.isNaN(d.getTime()) ? String(v) : d.toLocaleString();
}

function statusBadge(status) {
  return el("span", { className: `badge status-${status}` }, status ?? "-");
}

/** Answers to the last call of `key` win: an older, slower response is dropped. */
const latestCall = {};
function ticket(key) { latestCall[key] = (latestCall[key] || 0) + 1; return latestCall[key]; }
const isLatest = (key, t) => latestCall[key] === t;

function setOptions(select, items, placeholder) {
  const keep = select.value;
  select.replaceChildren();
  if (placeholder) select.append(el("option", { value: "" }, placeholder));
  for (const [value, label] of items) select.append(el("option", { value }, label));
  if (items.some(([v]) => v === keep)) select.value = keep;
}

// ---------- charts ----------

/** (Re)build the chart on a canvas, destroying the previous instance first. */
function drawChart(canvasId, config) {
  if (state.charts[canvasId]) { state.charts[canvasId].destroy(); delete state.charts[canvasId]; }
  if (!window.Chart || !config) return null;
  config.options = { responsive: true, maintainAspectRatio: false, animation: false, ...(config.options || {}) };
  state.charts[canvasId] = new window.Chart(document.getElementById(canvasId), config);
  return state.charts[canvasId];
}

// Draws ±error (a standard deviation) as a vertical line with caps over each bar whose dataset has `errors`.
const errorBarsPlugin = {
  id: "errorBars",
  afterDatasetsDraw(chart) {
    const { ctx } = chart, y = chart.scales.y;
    chart.data.datasets.forEach((ds, i) => {
      if (!Array.isArray(ds.errors) || !chart.isDatasetVisible(i)) return;
      chart.getDatasetMeta(i).data.forEach((bar, j) => {
        const v = ds.data[j], e = ds.errors[j];
        if (typeof v !== "number" || typeof e !== "number" || !(e > 0)) return;
        const top = y.getPixelForValue(v + e), bottom = y.getPixelForValue(v - e);
        const cap = Math.min(6, (bar.width || 12) / 4);
        ctx.save();
        ctx.strokeStyle = "#111827";
        ctx.lineWidth = 1.5;
        ctx.beginPath();
        ctx.moveTo(bar.x, top); ctx.lineTo(bar.x, bottom);
        ctx.moveTo(bar.x - cap, top); ctx.lineTo(bar.x + cap, top);
        ctx.moveTo(bar.x - cap, bottom); ctx.lineTo(bar.x + cap, bottom);
        ctx.stroke();
        ctx.restore();
      });
    });
  },
};

const lineOptions = (xTitle, yTitle) => ({
  interaction: { mode: "nearest", intersect: false },
  scales: {
    x: { type: "linear", title: { display: true, text: xTitle } },
    y: { title: { display: true, text: yTitle } },
  },
});

// ---------- tabs ----------

function showTab(name) {
  if (!TABS.includes(name)) return;
  for (const b of $$("button[data-tab]")) b.classList.toggle("active", b.dataset.tab === name);
  for (const t of TABS) document.getElementById(`tab-${t}`).hidden = t !== name;
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  if (name === "playground") { loadPlaygroundModels(); loadExampleRuns(); }
}

// ---------- Runs tab ----------

async function loadRuns() {
  try {
    const data = await api("/api/runs");
    state.runs = data.runs || [];
    state.studies = data.studies || [];
    state.sampleRuns = null;  // looked up again the next time the Playground tab opens
    renderRunsTable();
    renderStudies();
    showError("runs-error", null);
    if (!$("#tab-playground").hidden) loadExampleRuns();
  } catch (err) { showError("runs-error", err); }
}

function renderRunsTable() {
  const tbody = $("#runs-table tbody");
  const checked = new Set($$("input.overlay:checked").map((c) => c.value));  // survive the re-render
  tbody.replaceChildren(...state.runs.map((run) => el("tr",
    { dataset: { runId: run.id }, className: state.run && state.run.id === run.id ? "selected" : "", onclick: (ev) => {
      if (ev.target.closest("input.overlay, label")) return;  // the checkbox only toggles the overlay
      openRun(run.id);
    } },
    el("td", {}, el("input", { type: "checkbox", className: "overlay", value: run.id, checked: checked.has(run.id), title: "overlay in Compare" })),
    el("td", { className: "name", title: run.path || "" }, run.name ?? run.id),
    el("td", { className: "status" }, statusBadge(run.status)),
    el("td", {}, run.method ?? "-"),
    el("td", {}, run.r ?? "-"),
    el("td", {}, run.learning_rate ?? "-"),
    el("td", {}, `${run.steps ?? "-"}/${run.total_steps ?? "-"}`),
    el("td", {}, fmtLoss(run.final_eval_loss)),
    el("td", {}, fmtTime(run.updated)),
  )));
  if (!state.runs.length) tbody.append(el("tr", {}, el("td", { colSpan: 9, className: "muted" }, "no runs yet")));
}

function renderStudies() {
  $("#studies-list").replaceChildren(...state.studies.map((s) => el("li",
    { dataset: { studyId: s.id }, title: s.path || "", onclick: () => { showTab("compare"); loadStudy(s.id); } },
    el("span", { className: "kind" }, s.kind ?? ""), " ", studyTitle(s))));
  if (!state.studies.length) $("#studies-list").append(el("li", { className: "muted" }, "no studies yet"));
  setOptions($("#study-select"), state.studies.map((s) => [s.id, `${s.kind}: ${studyTitle(s)}`]), "— choose a study —");
}

/** The study's title without a leading "<kind>: " (the kind is shown beside it). */
function studyTitle(s) {
  const title = String(s.title ?? s.id);
  return s.kind && title.startsWith(`${s.kind}: `) ? title.slice(s.kind.length + 2) : title;
}

function progressText(p, withSpeed) {
  const parts = [withSpeed ? `step ${p.step} / ${p.total_steps}` : `step ${p.step}/${p.total_steps}`];
  if (withSpeed && p.tokens_per_s !== null && p.tokens_per_s !== undefined) parts.push(`${Math.round(p.tokens_per_s)} tok/s`);
  if (p.eta_s !== null && p.eta_s !== undefined) parts.push(`ETA ${fmtDuration(p.eta_s)}`);
  return parts.join(" · ");
}

async function openRun(id, { quiet = false } = {}) {
  const t = ticket("run");
  try {
    const run = await api(`/api/runs/detail?id=${encodeURIComponent(id)}`);
    if (!isLatest("run", t)) return;
    const first = !state.run || state.run.id !== run.id;
    state.run = run;
    renderRunDetail(run);
    for (const tr of $$("#runs-table tr[data-run-id]")) tr.classList.toggle("selected", tr.dataset.runId === run.id);
    // Instant, not smooth: a scroll still animating would move rows under a following click.
    if (first && !quiet) $("#run-detail").scrollIntoView({ block: "start" });
    showError("run-error", null);
  } catch (err) {
    $("#run-detail").hidden = false;
    showError("run-error", err);
  }
}

function renderRunDetail(run) {
  const box = $("#run-detail");
  box.hidden = false;
  $("h2", box).textContent = run.name ?? run.id;
  $("#run-progress").replaceChildren(run.progress ? progressText(run.progress, true) : statusBadge(run.status));
  drawRunCurve(run.curve || []);
  renderMetrics($("#run-metrics tbody"), run.eval);
  $("#run-config pre").textContent = JSON.stringify(run.config ?? null, null, 2);
  $("#run-report").innerHTML = run.report_html || "";  // server-rendered Markdown, raw HTML disabled there
  renderSamples($("#run-samples"), run.samples);
}

function drawRunCurve(curve) {
  const train = curve.filter((p) => p.loss !== null && p.loss !== undefined).map((p) => ({ x: p.step, y: p.loss }));
  // Eval loss exists only at some steps: nulls elsewhere, joined by spanGaps.
  const evals = curve.map((p) => ({ x: p.step, y: p.eval_loss ?? null }));
  drawChart("run-curve", {
    type: "line",
    data: { datasets: [
      { label: "train loss", data: train, borderColor: COLORS[0], backgroundColor: COLORS[0], pointRadius: 0, borderWidth: 1.5 },
      { label: "eval loss", data: evals, borderColor: COLORS[1], backgroundColor: COLORS[1], pointRadius: 3, spanGaps: true },
    ] },
    options: lineOptions("step", "loss"),
  });
}

/** Every key/value pair of the metrics object; nested objects are flattened as "a.b". */
function renderMetrics(tbody, metrics) {
  const rows = [];
  const walk = (obj, prefix) => {
    for (const [k, v] of Object.entries(obj)) {
      const key = prefix ? `${prefix}.${k}` : k;
      if (v && typeof v === "object" && !Array.isArray(v)) walk(v, key);
      else rows.push(el("tr", {}, el("th", {}, key), el("td", {}, fmt(v))));
    }
  };
  if (metrics && typeof metrics === "object") walk(metrics, "");
  if (!rows.length) rows.push(el("tr", {}, el("td", { className: "muted" }, "no evaluation results")));
  tbody.replaceChildren(...rows);
}

/** Before/after answers: task, question, reference, base, fine_tuned (shared by Runs and Playground). */
function renderSamples(container, samples) {
  const cols = ["task", "question", "reference", "base", "fine_tuned"];
  const rows = (samples || []).map((s) => el("tr", {}, cols.map((c) => el("td", { className: c }, s[c] ?? ""))));
  const table = el("table", { className: "samples" },
    el("thead", {}, el("tr", {}, cols.map((c) => el("th", {}, c)))),
    el("tbody", {}, rows));
  container.replaceChildren(table);
  if (!rows.length) container.append(el("p", { className: "muted" }, "no before/after answers"));
}

// ---------- Launch tab ----------

const fieldId = (key) => `field-${key.replace(/\./g, "-")}`;

async function loadForm() {
  try {
    state.form = await api("/api/form");
    renderForm(state.form);
  } catch (err) { showError("launch-error", err); }
}

function renderForm(form) {
  setOptions($("#verb"), (form.verbs || []).map((v) => [v, v]));
  const fields = form.fields || [];
  $("#primary-fields").replaceChildren(...fields.filter((f) => f.primary).map(fieldInput));
  // The other fields, grouped by section in the order the server lists them.
  const sections = new Map();
  for (const f of fields.filter((f) => !f.primary)) {
    const name = f.section || "other";
    if (!sections.has(name)) sections.set(name, []);
    sections.get(name).push(f);
  }
  $("#advanced-fields").replaceChildren(...Array.from(sections, ([name, fs]) =>
    el("div", { className: "section" }, el("h4", {}, name), el("div", { className: "fields" }, fs.map(fieldInput)))));
}

/** The default in force: the quick preset's value while #quick is ticked, else the config's. */
function activeDefault(f, quick = $("#quick").checked) {
  return quick && "quick_default" in f ? f.quick_default : f.default;
}

/** How a field's default is spelled in its input (null → empty). */
function defaultRaw(f, quick = $("#quick").checked) {
  const d = activeDefault(f, quick);
  if (d === null || d === undefined) return "";
  return typeof d === "object" ? JSON.stringify(d) : String(d);
}

function fieldInput(f) {
  const id = fieldId(f.key);
  const common = { id, name: f.key, title: f.help ? `${f.key}: ${f.help}` : f.key };
  const raw = defaultRaw(f);
  let input;
  if (f.type === "choice") {
    input = el("select", common);
    const choices = (f.choices || []).map(String);
    if (!choices.includes(raw)) choices.unshift(raw);  // a null (or unlisted) default stays selectable
    for (const c of choices) input.append(el("option", { value: c }, c));
    input.value = raw;
  } else if (f.type === "bool") {
    input = el("input", { ...common, type: "checkbox", checked: Boolean(activeDefault(f)) });
    return el("div", { className: "field check" }, el("label", { htmlFor: id }, input, " ", fieldLabel(f)));
  } else if (f.type === "int" || f.type === "float") {
    input = el("input", { ...common, type: "number", step: f.type === "float" ? "any" : "1", value: raw });
  } else {
    input = el("input", { ...common, type: "text", value: raw });
  }
  return el("div", { className: "field" }, el("label", { htmlFor: id }, fieldLabel(f)), input);
}

/** The primary fields by their full key (as `--set` spells it); advanced ones by name under their section. */
function fieldLabel(f) {
  return f.primary ? f.key : (f.name || f.key);
}

/** Ticking or unticking the quick preset moves every field still at the old default to the new one. */
function toggleQuick() {
  const quick = $("#quick").checked;
  for (const f of (state.form && state.form.fields) || []) {
    const input = document.getElementById(fieldId(f.key));
    if (!input) continue;
    if (f.type === "bool") {
      if (input.checked === Boolean(activeDefault(f, !quick))) input.checked = Boolean(activeDefault(f, quick));
    } else if (input.value === defaultRaw(f, !quick)) {
      input.value = defaultRaw(f, quick);
    }
  }
}

/** The value a field's input holds, typed like its default (numbers, bools; empty → null). */
function fieldValue(f) {
  const input = document.getElementById(fieldId(f.key));
  if (f.type === "bool") return input.checked;
  const raw = input.value;
  if (raw === "") return null;
  if (f.type === "int" || f.type === "float") { const n = Number(raw); return Number.isFinite(n) ? n : raw; }
  if (f.type === "choice") { const c = (f.choices || []).find((x) => String(x) === raw); return c === undefined ? raw : c; }
  return raw;
}

/** Only the settings whose input differs from its default: numbers compared as numbers ("0.00020"
 *  over a default of 0.0002 is unchanged), the rest as the inputs spell them. */
function changedSettings() {
  const settings = {};
  for (const f of (state.form && state.form.fields) || []) {
    const input = document.getElementById(fieldId(f.key));
    if (!input) continue;
    let changed;
    const d = activeDefault(f);
    if (f.type === "bool") changed = input.checked !== Boolean(d);
    else if ((f.type === "int" || f.type === "float") && input.value !== "" && typeof d === "number") changed = Number(input.value) !== d;
    else changed = input.value !== defaultRaw(f);
    if (changed) settings[f.key] = fieldValue(f);
  }
  return settings;
}

async function submitLaunch(ev) {
  ev.preventDefault();
  const button = $("#launch-submit");
  button.disabled = true;
  try {
    const job = await api("/api/jobs", { method: "POST", body: { verb: $("#verb").value, quick: $("#quick").checked, settings: changedSettings() } });
    showError("launch-error", null);
    $("#launch-result").textContent = `job ${job.id}: ${job.verb} ${job.status}`;
    await pollJobs();
    showJob(job.id);
  } catch (err) {
    $("#launch-result").textContent = "";
    showError("launch-error", err);
  } finally { button.disabled = false; }
}

function renderJobs() {
  const tbody = $("#jobs-table tbody");
  tbody.replaceChildren(...state.jobs.map(jobRow));
  if (!state.jobs.length) tbody.append(el("tr", {}, el("td", { colSpan: 5, className: "muted" }, "no jobs yet")));
}

function jobRow(job) {
  const actions = el("td", { className: "actions" });
  const act = (cls, label, verb) => el("button", { type: "button", className: cls, onclick: (ev) => { ev.stopPropagation(); jobAction(job.id, verb); } }, label);
  if (job.status === "queued" || job.status === "running") actions.append(act("cancel", "Cancel", "cancel"));
  if ((job.status === "cancelled" || job.status === "failed") && (job.verb === "train" || job.verb === "run")) actions.append(act("resume", "Resume", "resume"));
  if (job.run_id !== null && job.run_id !== undefined) {
    actions.append(el("a", { className: "open-run", href: "#runs", onclick: (ev) => {
      ev.preventDefault(); ev.stopPropagation(); showTab("runs"); openRun(job.run_id);
    } }, "open run"));
  }
  return el("tr", { dataset: { jobId: job.id }, className: state.job === job.id ? "selected" : "", onclick: () => showJob(job.id) },
    el("td", {}, job.id),
    el("td", {}, job.verb),
    el("td", { className: "status", title: job.error || "" }, statusBadge(job.status)),
    el("td", { className: "progress" }, job.progress ? progressText(job.progress, false) : ""),
    actions);
}

async function jobAction(id, verb) {
  try {
    await api(`/api/jobs/${encodeURIComponent(id)}/${verb}`, { method: "POST" });
    showError("jobs-error", null);
    await pollJobs();
  } catch (err) { showError("jobs-error", err); }
}

async function showJob(id) {
  if (state.job !== id) state.jobShownStatus = null;
  state.job = id;
  for (const tr of $$("#jobs-table tr[data-job-id]")) tr.classList.toggle("selected", tr.dataset.jobId === String(id));
  const t = ticket("job");
  try {
    const job = await api(`/api/jobs/${encodeURIComponent(id)}`);
    if (!isLatest("job", t)) return;
    $("#job-log-title").textContent = `Job ${job.id} (${job.verb}): ${job.status}${job.error ? " · " + job.error : ""}`;
    const log = job.log_tail || "";
    const pre = $("#job-log");
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = log || "(no output yet)";
    if (atBottom) pre.scrollTop = pre.scrollHeight;  // follow the tail unless the user scrolled up
    showError("jobs-error", null);
  } catch (err) { showError("jobs-error", err); }
}

// ---------- polling ----------

/** GET /api/jobs and re-render them; a job that changed status (or got its run) refreshes the runs
 *  list first, so a job shown "done" already has its run listed as done. */
async function pollJobs() {
  const data = await api("/api/jobs");
  state.jobs = data;
  const now = new Map(state.jobs.map((j) => [String(j.id), `${j.status}|${j.run_id}`]));
  const changed = state.jobStatus !== null &&
    (now.size !== state.jobStatus.size || Array.from(now).some(([id, s]) => state.jobStatus.get(id) !== s));
  state.jobStatus = now;
  if (changed) await loadRuns();
  renderJobs();
}

let polling = false;
async function tick() {
  if (polling) return;  // a slow server: never stack requests
  polling = true;
  try {
    await pollJobs();
    if (state.pollFailed) { state.pollFailed = false; showError("jobs-error", null); }
    // The shown job's log follows it while it runs, and once more when its status changes.
    const job = state.jobs.find((j) => String(j.id) === String(state.job));
    if (job && (job.status === "running" || job.status === "queued" || job.status !== state.jobShownStatus)) {
      state.jobShownStatus = job.status;
      await showJob(job.id);
    }
    if (state.run && (state.run.status === "running" || state.run.status === "queued")) await openRun(state.run.id, { quiet: true });
  } catch (err) {
    state.pollFailed = true;  // cleared by the next good poll (an action's error stays until the next action)
    showError("jobs-error", err);
  } finally { polling = false; }
}

// ---------- Compare tab ----------

async function loadStudy(id) {
  const select = $("#study-select");
  if (id && !Array.from(select.options).some((o) => o.value === id)) select.append(el("option", { value: id }, id));
  select.value = id || "";
  const t = ticket("study");
  if (!id) { clearStudy(); return; }
  try {
    const study = await api(`/api/studies/detail?id=${encodeURIComponent(id)}`);
    if (!isLatest("study", t)) return;
    renderStudyTable(study.table);
    drawStudyChart(study.chart);
    $("#study-report").innerHTML = study.report_html || "";  // server-rendered Markdown
    showError("study-error", null);
  } catch (err) {
    if (isLatest("study", t)) { clearStudy(); showError("study-error", err); }
  }
}

function clearStudy() {
  $("#study-table").replaceChildren();
  drawChart("study-chart", null);
  $("#study-chart-box").hidden = true;
  $("#study-report").replaceChildren();
}

function renderStudyTable(table) {
  const node = $("#study-table");
  node.replaceChildren();
  if (!table) return;
  const best = table.best;
  const hasBest = best !== null && best !== undefined;
  if (hasBest) node.append(el("caption", {}, "★ chosen on the eval split"));
  node.append(el("thead", {}, el("tr", {}, (table.columns || []).map((c) => el("th", {}, c)))));
  node.append(el("tbody", {}, (table.rows || []).map((row, i) => {
    const isBest = hasBest && i === best;
    return el("tr", { className: isBest ? "best" : "" },
      row.map((cell, j) => el("td", {}, isBest && j === 0 ? `★ ${fmt(cell)}` : fmt(cell))));
  })));
}

function drawStudyChart(chart) {
  const box = $("#study-chart-box");
  if (!chart || !chart.labels || !chart.series || !chart.series.length) { drawChart("study-chart", null); box.hidden = true; return; }
  box.hidden = false;
  let top = -Infinity;
  const datasets = chart.series.map((s, i) => {
    (s.values || []).forEach((v, j) => { const e = (s.errors || [])[j]; if (typeof v === "number") top = Math.max(top, v + (typeof e === "number" ? e : 0)); });
    return { label: s.name, data: s.values || [], errors: s.errors || null, backgroundColor: COLORS[i % COLORS.length] + "cc", borderColor: COLORS[i % COLORS.length], borderWidth: 1 };
  });
  drawChart("study-chart", {
    type: "bar",
    data: { labels: chart.labels, datasets },
    plugins: [errorBarsPlugin],
    options: {
      plugins: {
        title: { display: Boolean(chart.title), text: chart.title || "" },
        tooltip: { callbacks: { label: (c) => {
          const e = (c.dataset.errors || [])[c.dataIndex];
          return `${c.dataset.label}: ${fmt(c.parsed.y)}${typeof e === "number" ? ` ± ${fmt(e)}` : ""}`;
        } } },
      },
      scales: { y: Number.isFinite(top) && top > 0 ? { suggestedMax: top * 1.05 } : {} },  // room for the error bars
    },
  });
}

async function drawOverlay() {
  const ids = $$("input.overlay:checked").map((c) => c.value);
  if (!ids.length) { showError("overlay-error", "tick runs in the Runs tab first"); drawChart("overlay-chart", null); return; }
  try {
    const runs = await Promise.all(ids.map((id) => api(`/api/runs/detail?id=${encodeURIComponent(id)}`)));
    const datasets = runs.map((run, i) => {
      const curve = run.curve || [];
      let points = curve.filter((p) => p.eval_loss !== null && p.eval_loss !== undefined).map((p) => ({ x: p.step, y: p.eval_loss }));
      let label = run.name ?? run.id;
      if (!points.length) {  // no eval loss: fall back to the train loss
        points = curve.filter((p) => p.loss !== null && p.loss !== undefined).map((p) => ({ x: p.step, y: p.loss }));
        label += " (train loss)";
      }
      const color = COLORS[i % COLORS.length];
      return { label, data: points, borderColor: color, backgroundColor: color, pointRadius: 2, spanGaps: true };
    });
    drawChart("overlay-chart", { type: "line", data: { datasets }, options: lineOptions("step", "loss") });
    showError("overlay-error", null);
  } catch (err) { showError("overlay-error", err); }
}

// ---------- Playground tab ----------

async function loadPlaygroundModels() {
  try {
    const data = await api("/api/playground/models");
    const checked = new Set($$("input.pg-adapter:checked").map((c) => c.value));
    const loaded = new Set(data.loaded || []);  // model ids: an adapter's `name`, not its run id
    $("#pg-adapters").replaceChildren(...(data.available || []).map((a) => el("label", { className: "check" },
      el("input", { type: "checkbox", className: "pg-adapter", value: a.id, checked: checked.has(a.id) || loaded.has(a.name ?? a.id) }),
      " ", a.path ?? a.id)));
    if (!(data.available || []).length) $("#pg-adapters").append(el("p", { className: "muted" }, "no adapters found: the base model only"));
    if (!$("#pg-load").disabled) setLoaded(data.loaded || []);
    showError("pg-error", null);
  } catch (err) { showError("pg-error", err); }
}

function setLoaded(ids) {
  state.pgLoaded = ids;
  $("#pg-loaded").textContent = ids.length ? `loaded: ${ids.join(", ")}` : "nothing loaded yet";
}

async function loadPlayground() {
  const button = $("#pg-load");
  const adapters = $$("input.pg-adapter:checked").map((c) => c.value);
  button.disabled = true;
  $("#pg-loaded").textContent = "loading…";
  try {
    const data = await api("/api/playground/load", { method: "POST", body: { adapters } });
    setLoaded(data.loaded || []);
    showError("pg-error", null);
  } catch (err) {
    setLoaded(state.pgLoaded);
    showError("pg-error", err);
  } finally { button.disabled = false; }
}

function sendPrompt() {
  const prompt = $("#pg-prompt").value;
  const maxTokens = parseInt($("#pg-max-tokens").value, 10) || 64;
  if (!state.pgLoaded.length) { showError("pg-error", "load the models first"); return; }
  if (!prompt.trim()) { showError("pg-error", "write a prompt first"); return; }
  showError("pg-error", null);
  const boxes = state.pgLoaded.map((id) => {
    const box = el("div", { className: "answer", dataset: { model: id } }, el("h3", {}, id), el("div", { className: "text" }), el("div", { className: "meta" }, "…"));
    streamAnswer(id, prompt, maxTokens, box);  // all models in parallel
    return box;
  });
  $("#pg-answers").replaceChildren(...boxes);
}

/** One model's streamed answer: server-sent events, `data: <json>` per event, `data: [DONE]` at the end. */
async function streamAnswer(model, prompt, maxTokens, box) {
  const text = $(".text", box), meta = $(".meta", box);
  const started = performance.now();
  let chunks = 0, tokens = null, error = null;
  try {
    const res = await fetch("/playground/v1/chat/completions", {
      method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, messages: [{ role: "user", content: prompt }], stream: true, max_tokens: maxTokens, temperature: 0 }),
    });
    if (!res.ok) {
      let body = null;
      try { body = await res.json(); } catch (_) { body = null; }
      throw new Error(errorMessage(body, `${res.status} ${res.statusText}`));
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", done = false;
    while (!done) {
      const { value, done: ended } = await reader.read();
      if (ended) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      const events = buffer.split("\n\n");
      buffer = events.pop();  // the last piece may be an incomplete event
      for (const event of events) {
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const payload = line.slice(5).trim();
          if (payload === "[DONE]") { done = true; break; }
          const msg = JSON.parse(payload);
          if (msg.error) { error = errorMessage(msg, "stream error"); continue; }
          const content = msg.choices && msg.choices[0] && msg.choices[0].delta && msg.choices[0].delta.content;
          if (content) { text.append(content); chunks += 1; }
          if (msg.usage && typeof msg.usage.completion_tokens === "number") tokens = msg.usage.completion_tokens;
        }
        if (done) break;
      }
    }
    if (done) reader.cancel().catch(() => {});
  } catch (err) { error = String(err.message || err).split("\n")[0]; }
  const seconds = (performance.now() - started) / 1000;
  const n = tokens ?? chunks;  // the usage of the last chunk, else one token per chunk
  meta.textContent = error ? `error: ${error}` : `${n} tokens · ${(n / Math.max(seconds, 1e-3)).toFixed(1)} tokens/s · ${seconds.toFixed(1)} s`;
  meta.classList.toggle("error", Boolean(error));
  box.classList.add("done");
}

/** The runs that have before/after answers (each Run says so in `has_samples`); their answers are
 *  fetched when one is chosen. */
function loadExampleRuns() {
  if (state.sampleRuns) return;
  state.sampleRuns = state.runs.filter((r) => r.has_samples).map((r) => ({ id: r.id, samples: null, run: r }));
  setOptions($("#pg-example-run"), state.sampleRuns.map((s) => [s.id, s.run.name]), "— choose a run —");
}

async function showExample() {
  const id = $("#pg-example-run").value;
  const out = $("#pg-example-samples");
  if (!id) { out.replaceChildren(); return; }
  const t = ticket("example");
  try {
    const known = (state.sampleRuns || []).find((s) => s.id === id);
    const samples = known && known.samples ? known.samples : (await api(`/api/runs/detail?id=${encodeURIComponent(id)}`)).samples;
    if (!isLatest("example", t)) return;
    renderSamples(out, samples);
    showError("pg-example-error", null);
  } catch (err) { showError("pg-example-error", err); }
}

// ---------- Data tab ----------

async function loadDataDirs(select) {
  try {
    const { dirs } = await api("/api/data/dirs");
    const node = $("#data-dir");
    setOptions(node, dirs.map((d) => [d, d]));
    if (select && dirs.includes(select)) node.value = select;
    if (node.value) await loadData(node.value);
    showError("data-error", null);
  } catch (err) { showError("data-error", err); }
}

async function loadData(dir) {
  const t = ticket("data");
  try {
    const data = await api(`/api/data?dir=${encodeURIComponent(dir)}`);
    if (!isLatest("data", t)) return;
    renderCounts(countsOf(data));
    renderDropped(data);
    renderDataSamples(data.samples);
    showError("data-error", null);
  } catch (err) {
    if (!isLatest("data", t)) return;
    for (const id of ["data-counts", "data-dropped", "data-samples"]) document.getElementById(id).replaceChildren();
    showError("data-error", err);
  }
}

/** The card's `splits` (rows per split) and `tasks` (rows per split and task) as
 *  {split: {total, tasks: {task: n}}}. */
function countsOf(data) {
  return Object.fromEntries(Object.entries(data.splits).map(([s, total]) => [s, { total, tasks: data.tasks[s] || {} }]));
}

function renderCounts(counts) {
  const splits = Object.keys(counts);
  const tasks = Array.from(new Set(splits.flatMap((s) => Object.keys(counts[s].tasks)))).sort();
  $("#data-counts").replaceChildren(
    el("thead", {}, el("tr", {}, el("th", {}, "split"), el("th", {}, "total"), tasks.map((t) => el("th", {}, t)))),
    el("tbody", {}, splits.map((s) => el("tr", { dataset: { split: s } },
      el("th", {}, s), el("td", {}, fmt(counts[s].total)), tasks.map((t) => el("td", {}, fmt(counts[s].tasks[t] ?? 0)))))));
}

/** What prepare dropped: `cleaning` (key → count) and `skipped` (data.skip_invalid's
 *  {count, first: [reasons]}, or null). */
function renderDropped(data) {
  const items = Object.entries(data.cleaning).map(([k, v]) => el("li", {}, `${k} → ${fmt(v)}`));
  if (data.skipped) {
    items.push(el("li", {}, `skipped invalid rows → ${fmt(data.skipped.count)}`,
      el("ul", {}, data.skipped.first.map((r) => el("li", {}, r)))));
  }
  $("#data-dropped").replaceChildren(items.length ? el("ul", {}, items) : el("p", { className: "muted" }, "nothing dropped"));
}

/** One table per split of `samples` ({split: [rows]}). */
function renderDataSamples(samples) {
  const cols = ["task", "question", "answer"];
  const table = (rows) => el("table", { className: "samples" },
    el("thead", {}, el("tr", {}, cols.map((c) => el("th", {}, c)))),
    el("tbody", {}, rows.map((r) => el("tr", {}, cols.map((c) => el("td", { className: c }, fmt(r[c] ?? "")))))));
  $("#data-samples").replaceChildren(...Object.entries(samples).map(([split, rows]) =>
    el("div", { className: "split-samples", dataset: { split } }, el("h4", {}, split), table(rows))));
}

async function uploadDataset() {
  const out = $("#upload-result");
  const file = $("#upload-file").files[0];
  const fail = (msg) => { out.textContent = msg; out.classList.add("error"); };
  if (!file) { fail("choose a file first"); return; }
  const button = $("#upload-submit");
  button.disabled = true;
  out.classList.remove("error");
  out.textContent = "preparing…";
  try {
    const content = await file.text();
    const body = { filename: file.name, content, format: $("#upload-format").value,
                   skip_invalid: $("#upload-skip-invalid").checked };
    for (const key of ["question_field", "answer_field", "task_field"]) {
      const value = $(`#upload-${key.replace("_", "-")}`).value.trim();
      if (value) body[key] = value;
    }
    const prepared = await api("/api/datasets", { method: "POST", body });  // {out_dir, card}
    out.textContent = `prepared into ${prepared.out_dir}: ${prepared.card.processed_records} records`;
    await loadDataDirs(prepared.out_dir);
  } catch (err) { fail(String(err.message || err).split("\n")[0]); } finally { button.disabled = false; }
}

// ---------- start ----------

function init() {
  for (const b of $$("button[data-tab]")) b.addEventListener("click", () => showTab(b.dataset.tab));
  window.addEventListener("hashchange", () => showTab(location.hash.slice(1)));
  $("#launch-form").addEventListener("submit", submitLaunch);
  $("#quick").addEventListener("change", toggleQuick);
  $("#study-select").addEventListener("change", (ev) => loadStudy(ev.target.value));
  $("#overlay-draw").addEventListener("click", drawOverlay);
  $("#pg-load").addEventListener("click", loadPlayground);
  $("#pg-send").addEventListener("click", sendPrompt);
  $("#pg-example-run").addEventListener("change", showExample);
  $("#data-dir").addEventListener("change", (ev) => loadData(ev.target.value));
  $("#upload-submit").addEventListener("click", uploadDataset);

  const hashTab = location.hash.slice(1);
  showTab(TABS.includes(hashTab) ? hashTab : "runs");
  loadRuns();
  loadForm();
  loadDataDirs();
  loadPlaygroundModels();
  tick();
  setInterval(tick, POLL_MS);
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
else init();
