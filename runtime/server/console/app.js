// sgl web console: playground (OpenAI routes, streamed) + dashboard (GET /v1/stats every second).
// Plain JS, no build step, no dependencies; charts are SVG drawn here (~60 lines beat any bundled library).
"use strict";
const $ = (id) => document.getElementById(id);
const KEY = "sgl-api-key";
const HISTORY = 120; // dashboard points kept (one per second)

// ---- API access: every call sends the key; a 401 asks for it -------------------------------------
class ApiError extends Error {}

function authHeaders() {
  const key = sessionStorage.getItem(KEY);
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function showError(message) {
  const b = $("error-banner");
  b.textContent = message;
  b.classList.toggle("hidden", !message);
}

function askForKey(message) {
  $("apikey-dialog").classList.remove("hidden");
  showError(message);
  $("apikey-input").focus();
}

async function api(path, body, signal) {
  const opts = { method: body === undefined ? "GET" : "POST", headers: authHeaders(), signal };
  if (body !== undefined) opts.body = JSON.stringify(body);
  const r = await fetch(path, opts);
  if (r.ok) return r;
  let msg = r.status + " " + r.statusText;
  try { const j = await r.json(); msg = r.status + ": " + ((j.error && j.error.message) || j.message || JSON.stringify(j)); } catch (e) { /* not JSON */ }
  if (r.status === 401) askForKey("API key rejected (" + msg + "). Enter the server's --api-key.");
  throw new ApiError(msg);
}

$("apikey-dialog").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(KEY, $("apikey-input").value.trim());
  $("apikey-input").value = "";
  $("apikey-dialog").classList.add("hidden");
  showError("");
  probe();
});
$("apikey-change").addEventListener("click", () => askForKey(""));

async function probe() {
  try {
    const j = await (await api("/v1/models")).json();
    $("model-name").textContent = (j.data && j.data[0] && j.data[0].id) || "";
    document.body.dataset.ready = "1";
    pollStats(); // the dashboard's history builds up from page load, whichever tab is open
  } catch (e) { if (!(e instanceof ApiError)) showError("server unreachable: " + e.message); }
}

// ---- tabs -------------------------------------------------------------------------------------------
for (const t of document.querySelectorAll(".tab")) {
  t.addEventListener("click", () => {
    for (const o of document.querySelectorAll(".tab")) o.classList.toggle("active", o === t);
    for (const v of document.querySelectorAll(".view")) v.classList.toggle("hidden", v.id !== "view-" + t.dataset.view);
  });
}

// ---- constraints ----------------------------------------------------------------------------------
const EXAMPLES = {
  regex: {
    "US phone number": "\\([0-9]{3}\\) [0-9]{3}-[0-9]{4}",
    "ISO date": "[0-9]{4}-[0-9]{2}-[0-9]{2}",
    "Yes / no + reason": "(Yes|No), because [a-z ,]{10,60}\\.",
  },
  json_schema: {
    "Person": { type: "object", properties: { name: { type: "string" }, age: { type: "integer", minimum: 0, maximum: 150 },
      occupation: { type: "string" } }, required: ["name", "age", "occupation"], additionalProperties: false },
    "City": { type: "object", properties: { city: { type: "string" }, country: { type: "string" },
      population: { type: "integer" }, capital: { type: "boolean" } }, required: ["city", "country", "population", "capital"] },
    "Tags": { type: "object", properties: { tags: { type: "array", items: { type: "string", enum: ["news", "sport", "science", "art"] },
      minItems: 1, maxItems: 3 } }, required: ["tags"] },
  },
  ebnf: {
    "Arithmetic": 'start: expr\nexpr: NUM | "(" expr OP expr ")"\nOP: "+" | "*"\nNUM: /[0-9]{1,3}/',
    "Greeting": 'start: GREETING ", " NAME "!"\nGREETING: "Hello" | "Hi" | "Good morning"\nNAME: /[A-Z][a-z]{1,10}/',
  },
  choices: { "Colors": "blue\ngreen\nred", "Sentiment": "positive\nnegative\nneutral" },
};

function pickKind() {
  const kind = $("constraint-kind").value;
  const sel = $("constraint-example");
  sel.innerHTML = "";
  $("example-row").classList.toggle("hidden", kind === "none");
  $("constraint-spec").classList.toggle("hidden", kind === "none");
  if (kind === "none") return;
  for (const name of Object.keys(EXAMPLES[kind])) sel.add(new Option(name, name));
  pickExample();
}
function pickExample() {
  const kind = $("constraint-kind").value, v = EXAMPLES[kind][$("constraint-example").value];
  $("constraint-spec").value = typeof v === "string" ? v : JSON.stringify(v, null, 2);
}
$("constraint-kind").addEventListener("change", pickKind);
$("constraint-example").addEventListener("change", pickExample);
$("mode").addEventListener("change", () => $("system-row").classList.toggle("hidden", $("mode").value !== "chat"));

const reEscape = (s) => s.replace(/[.*+?^${}()|[\]\\\/]/g, "\\$&");
function choiceList(spec) { return spec.split("\n").map((s) => s.trim()).filter(Boolean); }

// The request fields of the chosen constraint (OpenAI body; regex/ebnf are SGLang's extra fields).
function constraintFields() {
  const kind = $("constraint-kind").value, spec = $("constraint-spec").value;
  if (kind === "none") return {};
  if (kind === "regex") return { regex: spec };
  if (kind === "ebnf") return { ebnf: spec };
  if (kind === "choices") return { regex: "(" + choiceList(spec).map(reEscape).join("|") + ")" };
  let schema;
  try { schema = JSON.parse(spec); } catch (e) { throw new ApiError("the JSON schema does not parse: " + e.message); }
  return { response_format: { type: "json_schema", json_schema: { name: "schema", schema } } };
}

// ---- playground -----------------------------------------------------------------------------------
let history = []; // chat messages so far
let running = null; // AbortController of the request in flight

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.innerHTML = '<div class="role"></div><div class="text"></div><div class="meta"></div>';
  div.querySelector(".role").textContent = role;
  div.querySelector(".text").textContent = text;
  $("transcript").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function num(id) { const v = $(id).value; return v === "" ? undefined : Number(v); }

function samplingFields() {
  const f = { temperature: num("temperature"), top_p: num("top-p"), max_tokens: num("max-tokens") };
  if (num("seed") !== undefined) f.seed = num("seed");
  return f;
}

async function* sseEvents(response) {
  const reader = response.body.getReader(), dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const ev = buf.slice(0, i); buf = buf.slice(i + 2);
      for (const line of ev.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// Logprob entries in one shape: [{token, logprob, top: [[token, logprob], ...]}].
function logprobEntries(choice, chat) {
  const lp = choice.logprobs;
  if (!lp) return [];
  if (chat) return (lp.content || []).map((e) => ({ token: e.token, logprob: e.logprob,
    top: (e.top_logprobs || []).map((t) => [t.token, t.logprob]) }));
  return (lp.tokens || []).map((t, i) => ({ token: t, logprob: lp.token_logprobs[i],
    top: Object.entries((lp.top_logprobs || [])[i] || {}) }));
}

function renderTokens(div, entries) {
  const box = div.querySelector(".text");
  box.textContent = "";
  box.classList.add("tokens");
  for (const e of entries) {
    const s = document.createElement("span");
    s.className = "tok";
    s.textContent = e.token;
    const p = Math.exp(e.logprob);
    s.style.background = "rgba(255, 170, 0, " + (1 - p) * 0.55 + ")";
    s.dataset.tip = "logprob " + e.logprob.toFixed(3) + " (p=" + p.toFixed(3) + ")\n" +
      e.top.map(([t, l]) => JSON.stringify(t) + "  " + l.toFixed(3)).join("\n");
    box.appendChild(s);
  }
}

async function validate(div, text, kind, spec) {
  const badge = document.createElement("div");
  badge.className = "validation pending";
  badge.textContent = "validating...";
  div.appendChild(badge);
  try {
    const j = await (await api("/v1/validate", { kind, spec, text })).json();
    badge.className = "validation " + (j.valid ? "ok" : "bad");
    badge.textContent = j.valid ? "\u2714 valid (" + j.checked_by + ")" : "\u2718 invalid: " + j.error;
  } catch (e) {
    badge.className = "validation bad";
    badge.textContent = "\u2718 not validated: " + e.message;
  }
}

async function send() {
  if (running) { running.abort(); return; }
  const prompt = $("prompt").value;
  if (!prompt.trim()) return;
  const chat = $("mode").value === "chat";
  const kind = $("constraint-kind").value, spec = $("constraint-spec").value;
  let body;
  try {
    body = { ...samplingFields(), ...constraintFields(), stream: true, stream_options: { include_usage: true } };
  } catch (e) { showError(e.message); return; }
  showError("");
  const wantLp = $("logprobs").checked;
  if (chat) {
    const sys = $("system").value.trim();
    const msgs = [...(sys ? [{ role: "system", content: sys }] : []), ...history, { role: "user", content: prompt }];
    Object.assign(body, { messages: msgs }, wantLp ? { logprobs: true, top_logprobs: 5 } : {});
  } else {
    Object.assign(body, { prompt }, wantLp ? { logprobs: 5 } : {});
  }
  addMessage(chat ? "user" : "prompt", prompt);
  $("prompt").value = "";
  const div = addMessage(chat ? "assistant" : "completion", "");
  div.classList.add("streaming");
  running = new AbortController();
  $("send").textContent = "Stop";
  const t0 = performance.now();
  let tFirst = null, text = "", usage = null, finish = null, entries = [];
  try {
    const r = await api(chat ? "/v1/chat/completions" : "/v1/completions", body, running.signal);
    for await (const chunk of sseEvents(r)) {
      if (chunk.error) throw new ApiError(chunk.error.message || JSON.stringify(chunk.error));
      if (chunk.usage) usage = chunk.usage;
      for (const c of chunk.choices || []) {
        const piece = chat ? (c.delta && c.delta.content) || "" : c.text || "";
        if (piece && tFirst === null) tFirst = performance.now();
        text += piece;
        entries.push(...logprobEntries(c, chat));
        if (c.finish_reason) finish = c.finish_reason;
      }
      div.querySelector(".text").textContent = text;
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped by you";
    else { showError(e.message); div.classList.add("failed"); }
  } finally {
    running = null;
    $("send").textContent = "Send";
    div.classList.remove("streaming");
  }
  const t1 = performance.now();
  if (chat && text) history.push({ role: "user", content: prompt }, { role: "assistant", content: text });
  if (wantLp && entries.length) renderTokens(div, entries);
  const n = usage ? usage.completion_tokens : entries.length;
  const cached = usage && usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : 0;
  const ttft = tFirst === null ? null : (tFirst - t0) / 1000;
  const tps = tFirst !== null && n > 1 && t1 > tFirst ? (n - 1) / ((t1 - tFirst) / 1000) : null;
  const meta = div.querySelector(".meta");
  meta.textContent = [
    usage ? "prompt " + usage.prompt_tokens + " tok" : null, "output " + n + " tok",
    "cached " + (cached || 0) + " tok", ttft === null ? null : "TTFT " + ttft.toFixed(2) + " s",
    tps === null ? null : tps.toFixed(1) + " tok/s", "finish: " + (finish || "?"),
  ].filter(Boolean).join(" \u00b7 ");
  meta.dataset.finish = finish || "";
  div.dataset.done = "1";
  if (kind !== "none" && text && finish !== "stopped by you") await validate(div, text, kind, spec);
}

$("send").addEventListener("click", send);
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); send(); }
});
$("clear").addEventListener("click", () => { history = []; $("transcript").innerHTML = ""; });

// Hover a token: its logprob and top-k in a floating box.
const tip = document.createElement("pre");
tip.id = "tooltip";
tip.className = "tooltip hidden";
document.body.appendChild(tip);
document.addEventListener("mouseover", (ev) => {
  const t = ev.target.closest && ev.target.closest(".tok");
  if (!t) { tip.classList.add("hidden"); return; }
  tip.textContent = t.dataset.tip;
  const r = t.getBoundingClientRect();
  tip.style.left = r.left + window.scrollX + "px";
  tip.style.top = r.bottom + window.scrollY + 4 + "px";
  tip.classList.remove("hidden");
});

// ---- dashboard ------------------------------------------------------------------------------------
const series = {}; // name -> values (latest last)
function push(name, v) {
  const s = series[name] || (series[name] = []);
  s.push(v === null || v === undefined || Number.isNaN(v) ? null : v);
  if (s.length > HISTORY) s.shift();
}

const COLORS = ["#2563eb", "#f59e0b", "#dc2626", "#16a34a", "#9333ea"];
const SVGNS = "http://www.w3.org/2000/svg";
function el(tag, attrs, parent) {
  const e = document.createElementNS(SVGNS, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (parent) parent.appendChild(e);
  return e;
}

// lines: [[label, name]]; stacked: areas summed bottom-up (values must be >= 0).
function drawChart(svgId, lines, { stacked = false, scale = 1, fixedMax = null, colors = COLORS } = {}) {
  const svg = $(svgId), W = 400, H = 120, L = 34, T = 14, B = 4, PH = H - T - B, PW = W - L - 4;
  svg.innerHTML = "";
  const vals = lines.map(([, n]) => (series[n] || []).map((v) => (v === null ? null : v * scale)));
  const len = Math.max(1, ...vals.map((v) => v.length));
  const tops = stacked ? Array.from({ length: len }, (_, i) => vals.reduce((a, v) => a + (v[i] || 0), 0)) : vals.flat();
  let max = fixedMax !== null ? fixedMax : Math.max(1e-9, ...tops.filter((v) => v !== null));
  if (fixedMax === null) { const p = Math.pow(10, Math.floor(Math.log10(max))); max = Math.ceil(max / p) * p; }
  const x = (i) => L + (PW * (i + HISTORY - len)) / (HISTORY - 1);
  const y = (v) => T + PH - (PH * Math.min(v, max)) / max;
  for (const f of [0, 0.5, 1]) {
    el("line", { x1: L, x2: W - 4, y1: y(max * f), y2: y(max * f), class: "grid" }, svg);
    el("text", { x: L - 3, y: y(max * f) + 3, class: "axis" }, svg).textContent = +(max * f).toPrecision(3);
  }
  let base = new Array(len).fill(0);
  vals.forEach((v, k) => {
    const color = colors[k % colors.length];
    if (stacked) {
      const top = base.map((b, i) => b + (v[i] || 0));
      const pts = top.map((t, i) => x(i) + "," + y(t)).concat(base.map((b, i) => x(i) + "," + y(b)).reverse());
      el("polygon", { points: pts.join(" "), fill: color, "fill-opacity": 0.55, stroke: color }, svg);
      base = top;
    } else {
      const pts = v.map((t, i) => (t === null ? null : x(i) + "," + y(t))).filter(Boolean);
      if (pts.length) el("polyline", { points: pts.join(" "), fill: "none", stroke: color, "stroke-width": 1.8 }, svg);
    }
    const last = v.length ? v[v.length - 1] : null;
    el("text", { x: L + 4 + k * 92, y: 10, fill: color, class: "legend" }, svg).textContent =
      lines[k][0] + " " + (last === null ? "-" : +last.toPrecision(3));
  });
}

const fmt = (v, d = 1) => (v === null || v === undefined ? "-" : Number(v).toFixed(d));
const ms = (v) => (v === null || v === undefined ? "-" : (v * 1000).toFixed(0) + " ms");
const sec = (v) => (v === null || v === undefined ? "-" : v.toFixed(2) + " s");

let pollTimer = null, polls = 0;
async function pollStats() {
  clearTimeout(pollTimer);
  try {
    const s = await (await api("/v1/stats")).json();
    const lat = s.latency || {}, ttft = lat.ttft || {}, itl = lat.itl || {}, kv = s.kv || {}, tp = s.throughput || {};
    push("running", s.num_running_reqs); push("queued", s.num_queue_reqs);
    push("in", tp.prefill_tokens_per_s); push("out", tp.generation_tokens_per_s);
    for (const q of ["p50", "p90", "p99"]) { push("ttft_" + q, ttft[q]); push("itl_" + q, itl[q]); }
    push("kv_in_use", kv.in_use); push("kv_cached", kv.cached); push("kv_free", kv.free);
    push("hit", s.cache_hit_rate); push("nodes", s.radix && s.radix.num_nodes);
    $("stat-running").textContent = s.num_running_reqs;
    $("stat-queued").textContent = s.num_queue_reqs;
    $("stat-in-tps").textContent = fmt(tp.prefill_tokens_per_s);
    $("stat-out-tps").textContent = fmt(tp.generation_tokens_per_s);
    $("stat-ttft").textContent = sec(ttft.p50) + " / " + sec(ttft.p99);
    $("stat-itl").textContent = ms(itl.p50) + " / " + ms(itl.p99);
    $("stat-hit").textContent = s.cache_hit_rate === null ? "-" : (100 * s.cache_hit_rate).toFixed(1) + "%";
    $("stat-radix").textContent = s.radix.disabled ? "off" : (s.radix.num_nodes ?? "-") + " nodes / " + (s.radix.num_tokens ?? "-") + " tok";
    $("kv-text").textContent = "in use " + kv.in_use + " \u00b7 cached " + kv.cached + " \u00b7 free " + kv.free + " of " + kv.total + " tokens";
    drawChart("chart-reqs", [["running", "running"], ["queued", "queued"]]);
    drawChart("chart-tps", [["in", "in"], ["out", "out"]]);
    drawChart("chart-ttft", [["p50", "ttft_p50"], ["p90", "ttft_p90"], ["p99", "ttft_p99"]]);
    drawChart("chart-itl", [["p50", "itl_p50"], ["p90", "itl_p90"], ["p99", "itl_p99"]], { scale: 1000 });
    drawChart("chart-kv", [["in use", "kv_in_use"], ["cached", "kv_cached"], ["free", "kv_free"]], { stacked: true, fixedMax: kv.total || null, colors: ["#2563eb", "#f59e0b", "#9ca3af"] });
    drawChart("chart-cache", [["hit %", "hit"]], { scale: 100, fixedMax: 100 });
    const nodes = (series.nodes || []).filter((v) => v !== null);
    el("text", { x: 396, y: 116, class: "axis", "text-anchor": "end" }, $("chart-cache")).textContent =
      "radix nodes " + (nodes.length ? nodes[nodes.length - 1] : "-");
    renderExtras(s);
    polls += 1;
    $("dash-updated").dataset.count = polls;
    $("dash-updated").textContent = "Last update " + new Date(s.time * 1000).toLocaleTimeString() + ".";
  } catch (e) {
    if (e instanceof ApiError) return; // a rejected key stops polling; a new key restarts it (probe)
    showError("stats: " + e.message);
  }
  pollTimer = setTimeout(pollStats, 1000);
}

// Later features' hooks (speculative decoding, per-class queues, adapters, models): shown when present.
function renderExtras(s) {
  const spec = s.speculative || {};
  const rows = [
    ["Models", (s.models || []).join(", ") || "-"],
    ["Queues per class", Object.entries(s.queues || {}).map(([k, v]) => k + ": " + v).join(", ") || "-"],
    ["Adapters", (s.adapters || []).join(", ") || "none"],
    ["Speculative", spec.algorithm ? spec.algorithm + ", mean accept length " + fmt(spec.mean_accept_length, 2) : "off"],
    ["Totals", Object.entries(s.totals || {}).map(([k, v]) => k.replace(/_/g, " ") + " " + v).join(" \u00b7 ")],
  ];
  const t = $("extras");
  t.innerHTML = "";
  for (const [k, v] of rows) {
    const tr = t.insertRow();
    tr.insertCell().textContent = k;
    tr.insertCell().textContent = v;
  }
}

$("system-row").classList.toggle("hidden", $("mode").value !== "chat");
probe();
