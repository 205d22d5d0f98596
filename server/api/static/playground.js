// Switchboard playground: plain JS, no dependencies, talks only to the server that served it.
//
// The completion streams from POST /v1/completions (SSE). Each chunk carries
// choices[0].routing = {token_index, weights in force}; the last one adds routing.segments, the
// response's routing trace, which is what the page finally draws: token spans and strip columns
// carry data-index / data-top / data-weights / data-segment so a test can compare them with it.
"use strict";

const PALETTE = ["#2563eb", "#e07a1f", "#16a34a", "#c026d3", "#dc2626", "#0891b2", "#ca8a04", "#7c3aed",
                 "#db2777", "#65a30d", "#0d9488", "#9333ea"];
const BASE_COLOUR = "#9ca3af";
const SEGMENT_TOLERANCE = 0.02;  // the server's RoutingTrace merges steps that stay within this
const RATE_WINDOW_MS = 10000;    // tokens/s is measured over the last 10 s of /metrics polls
const $ = (id) => document.getElementById(id);

const state = {
  models: [],          // /v1/models data
  baseId: null,
  adapters: [],        // names, sorted
  colours: new Map(),  // adapter -> colour, stable for the page's life
  token: "",
  apiKey: "",          // the server's --api-key, for /v1/* (empty: none sent)
  controller: null,
  history: [],         // [{at, tokens}] of recent polls, for tokens/s over the last RATE_WINDOW_MS
};

// -- helpers ---------------------------------------------------------------------------------------
/** An adapter's colour follows from its name alone (FNV-1a hash), never from its position in a
 * list, so registering or removing another adapter, or reloading the page, recolours nothing. */
function colourOf(name) {
  if (name === null || name === "base") return BASE_COLOUR;
  if (!state.colours.has(name)) {
    let h = 0x811c9dc5;
    for (const ch of name) { h ^= ch.codePointAt(0); h = Math.imul(h, 0x01000193) >>> 0; }
    state.colours.set(name, PALETTE[h % PALETTE.length]);
  }
  return state.colours.get(name);
}

function rgba(hex, alpha) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${(n >> 16) & 255}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
}

/** The adapter with the largest positive weight, or null (the base model). Ties: first in name order. */
function topOf(weights) {
  let best = null, bestW = 0;
  for (const name of Object.keys(weights).sort()) {
    if (weights[name] > bestW) { best = name; bestW = weights[name]; }
  }
  return best;
}

function normalised(weights) {
  const total = Object.values(weights).reduce((a, b) => a + Math.max(b, 0), 0);
  const out = {};
  for (const [k, v] of Object.entries(weights)) if (v > 0) out[k] = total > 0 ? v / total : 0;
  return out;
}

function describeWeights(weights) {
  const entries = Object.entries(weights).sort((a, b) => b[1] - a[1]);
  return entries.length ? entries.map(([k, v]) => `${k} ${v.toFixed(3)}`).join(", ") : "base model (no adapter)";
}

function sameSegment(first, weights) {
  if (topOf(first) !== topOf(weights)) return false;
  for (const k of new Set([...Object.keys(first), ...Object.keys(weights)])) {
    if (Math.abs((first[k] || 0) - (weights[k] || 0)) > SEGMENT_TOLERANCE) return false;
  }
  return true;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

// The server's --api-key guards /v1/* (as vLLM's does); admin routes take the admin token instead.
function apiKeyHeader() {
  return state.apiKey ? {authorization: `Bearer ${state.apiKey}`} : {};
}

async function api(path, {method = "GET", body, admin = false} = {}) {
  const headers = {};
  if (body !== undefined) headers["content-type"] = "application/json";
  if (admin) headers["authorization"] = `Bearer ${state.token}`;
  else Object.assign(headers, apiKeyHeader());
  const r = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  if (!r.ok) {
    const msg = data && data.error ? data.error.message : `${r.status} ${r.statusText}`;
    const err = new Error(msg);
    err.status = r.status;
    throw err;
  }
  return data;
}

// -- models, adapters, routers ---------------------------------------------------------------------
async function loadModels() {
  try {
    const data = await api("v1/models");
    state.models = data.data;
    $("server-status").textContent = "ready";
    $("server-status").className = "pill ok";
  } catch (e) {
    $("server-status").textContent = e.status === 503 ? "loading…" : e.status === 401 ? "API key needed" : "unreachable";
    $("server-status").className = "pill bad";
    return;
  }
  const auto = state.models.find((m) => m.id === "auto");
  const base = state.models.find((m) => m.parent === null);
  state.baseId = base ? base.id : "base";
  state.adapters = state.models.filter((m) => m.parent !== null && m.id !== "auto").map((m) => m.id).sort();
  state.adapters.forEach(colourOf);
  fillModelPicker(auto);
  fillSliders();
  renderLegend();
  await renderSidePanel(auto);
  updateAutoOnly();
}

function fillModelPicker(auto) {
  const picker = $("model"), keep = picker.value;
  picker.replaceChildren();
  if (auto) picker.append(el("option", {value: "auto", text: "auto (routed)"}));
  for (const name of state.adapters) picker.append(el("option", {value: name, text: name}));
  picker.append(el("option", {value: state.baseId, text: `base (${state.baseId})`}));
  if ([...picker.options].some((o) => o.value === keep)) picker.value = keep;
  const routers = $("router"), keepRouter = routers.value;
  routers.replaceChildren();
  for (const name of (auto && auto.routers) || []) routers.append(el("option", {value: name, text: name}));
  if ([...routers.options].some((o) => o.value === keepRouter)) routers.value = keepRouter;
}

function fillSliders() {
  const box = $("sliders");
  const old = new Map([...box.querySelectorAll("input[type=range]")].map((s) => [s.dataset.adapter, s.value]));
  box.replaceChildren();
  if (!state.adapters.length) { box.append(el("span", {class: "muted", text: "no adapters loaded"})); return; }
  state.adapters.forEach((name, i) => {
    const value = old.get(name) ?? (i === 0 ? "1" : "0");
    const out = el("output", {text: Number(value).toFixed(2), "data-adapter": name});
    const slider = el("input", {type: "range", min: "0", max: "1", step: "0.05", value, "data-adapter": name,
                                id: `mix-${name}`});
    slider.addEventListener("input", () => { if (!slider.disabled) out.textContent = Number(slider.value).toFixed(2); });
    box.append(el("label", {class: "slider"}, el("span", {class: "chip", style: `background:${colourOf(name)}`}),
                  el("span", {class: "name", text: name}), slider, out));
  });
}

function renderLegend() {
  const box = $("legend");
  box.replaceChildren();
  for (const name of [...state.colours.keys()]) {
    box.append(el("span", {class: "legend-item"}, el("span", {class: "chip", style: `background:${colourOf(name)}`}),
                  document.createTextNode(name)));
  }
  box.append(el("span", {class: "legend-item"}, el("span", {class: "chip", style: `background:${BASE_COLOUR}`}),
                document.createTextNode("base")));
}

async function renderSidePanel(auto) {
  const list = $("adapters"), routers = $("routers");
  let adapters = null, routerList = null;
  if (state.token) {
    try {
      adapters = (await api("admin/adapters", {admin: true})).adapters;
      routerList = (await api("admin/routers", {admin: true})).routers;
      setAdminState(true, "Admin token accepted: the lists come from /admin/adapters and /admin/routers.");
    } catch (e) {
      setAdminState(false, `Admin token refused: ${e.message}`);
    }
  } else {
    setAdminState(false, "Without a token the lists above come from /v1/models and admin actions are off.");
  }
  list.replaceChildren();
  if (adapters) {
    for (const a of adapters) {
      const facts = [`v${a.version}`, `rank ${a.rank}`, a.resident ? "resident" : "not resident",
                     a.centroids ? `centroids ${a.centroids[0]}` : "no centroid", a.pinned ? "pinned" : null,
                     a.in_flight ? `${a.in_flight} in flight` : null].filter(Boolean).join(" · ");
      const unload = el("button", {class: "link danger admin-action", text: "unload", title: `DELETE /admin/adapters/${a.name}`,
                                   "data-unload": a.name});
      unload.addEventListener("click", () => adminUnload(a.name));
      list.append(el("li", {"data-adapter": a.name}, el("span", {class: "chip", style: `background:${colourOf(a.name)}`}),
                     el("span", {class: "name", text: a.name}), el("span", {class: "muted small", text: `${a.path} · ${facts}`}),
                     unload));
    }
  } else {
    for (const m of state.models.filter((m) => m.parent !== null && m.id !== "auto")) {
      list.append(el("li", {"data-adapter": m.id}, el("span", {class: "chip", style: `background:${colourOf(m.id)}`}),
                     el("span", {class: "name", text: m.id}),
                     el("span", {class: "muted small", text: `${m.root} · v${m.version} · rank ${m.rank}`})));
    }
  }
  if (!list.children.length) list.append(el("li", {class: "muted", text: "no adapters loaded"}));
  routers.replaceChildren();
  if (routerList) {
    for (const r of routerList) {
      routers.append(el("li", {"data-router": r.name}, el("span", {class: "name", text: r.name}),
                        el("span", {class: "muted small", text: `${r.kind} · ${r.adapters.length ? r.adapters.join(", ") : "no adapters with a centroid"}`})));
    }
  } else {
    for (const name of (auto && auto.routers) || []) routers.append(el("li", {"data-router": name}, el("span", {class: "name", text: name})));
  }
  if (!routers.children.length) routers.append(el("li", {class: "muted", text: "none"}));
}

function setAdminState(on, message) {
  $("admin-state").textContent = message;
  document.body.classList.toggle("admin-on", on);
  for (const b of document.querySelectorAll(".admin-action")) b.disabled = !on;
}

function updateAutoOnly() {
  const auto = $("model").value === "auto";
  for (const node of document.querySelectorAll(".auto-only")) node.classList.toggle("disabled", !auto);
  for (const input of document.querySelectorAll(".auto-only input, .auto-only select")) input.disabled = !auto;
  const manual = auto && $("manual-mix").checked;
  $("manual-mix").disabled = !auto;
  for (const s of document.querySelectorAll("#sliders input")) {
    s.disabled = !manual;
    // unchecked, no weight is in force: show none rather than a value the request will not send
    const out = s.parentElement.querySelector("output");
    if (out) out.textContent = manual ? Number(s.value).toFixed(2) : "—";
  }
  for (const id of ["router", "reroute-every", "route-top-k", "route-temperature"]) $(id).disabled = !auto || manual;
}

// -- admin actions ---------------------------------------------------------------------------------
function logAdmin(title, result, ok) {
  const box = $("admin-log");
  box.hidden = false;
  box.className = ok ? "log ok" : "log bad";
  box.textContent = `${title}\n${typeof result === "string" ? result : JSON.stringify(result, null, 2)}`;
  box.dataset.status = ok ? "ok" : "error";
}

async function adminAction(title, fn) {
  try {
    const result = await fn();
    logAdmin(title, result, true);
  } catch (e) {
    logAdmin(title, e.message, false);
  }
  await loadModels();
}

function adminRegister(event) {
  event.preventDefault();
  const examples = $("reg-examples").value.split("\n").map((s) => s.trim()).filter(Boolean);
  const body = {name: $("reg-name").value.trim(), path: $("reg-path").value.trim(), centroids: Number($("reg-k").value || 64),
                pinned: $("reg-pinned").checked};
  if (examples.length) body.examples = examples;
  return adminAction(`POST /admin/adapters (${body.name})`, () => api("admin/adapters", {method: "POST", body, admin: true}));
}

function adminUnload(name) {
  return adminAction(`DELETE /admin/adapters/${name}`,
                     () => api(`admin/adapters/${encodeURIComponent(name)}`, {method: "DELETE", admin: true}));
}

function adminReload() {
  return adminAction("POST /admin/reload", () => api("admin/reload", {method: "POST", admin: true}));
}

// -- the completion --------------------------------------------------------------------------------
function requestBody() {
  const model = $("model").value;
  const body = {model, prompt: $("prompt").value, max_tokens: Number($("max-tokens").value || 16),
                temperature: Number($("temperature").value || 0), stream: true, stream_options: {include_usage: true}};
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if (model === "auto") {
    const routing = {};
    if ($("manual-mix").checked) {
      routing.weights = {};
      for (const s of document.querySelectorAll("#sliders input")) {
        if (Number(s.value) > 0) routing.weights[s.dataset.adapter] = Number(s.value);
      }
    } else {
      routing.router = $("router").value || undefined;
      if ($("reroute-every").value !== "") routing.reroute_every = Number($("reroute-every").value);
      if ($("route-top-k").value !== "") routing.top_k = Number($("route-top-k").value);
      if ($("route-temperature").value !== "") routing.temperature = Number($("route-temperature").value);
    }
    body.routing = routing;
  }
  return body;
}

/** Yields each parsed `data:` payload of an SSE response ("[DONE]" ends it). */
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

class Run {
  constructor(body) {
    this.body = body;
    this.tokens = [];        // {index, text, weights}
    this.segmentFirst = null; // weights at the start of the current provisional segment
    this.segments = null;     // the server's trace, once it arrives
    this.finish = null;
    this.usage = null;
    this.firstAt = null;
    this.lastAt = null;
    const out = $("output");
    out.replaceChildren(el("span", {class: "prompt", text: body.prompt}));
    $("strip").replaceChildren();
    $("strip-marks").replaceChildren();
    $("strip-axis").replaceChildren();
    $("trace").hidden = true;
    $("run-stats").textContent = "streaming…";
    out.dataset.state = "streaming";
  }

  addToken(index, text, weights) {
    const now = performance.now();
    this.firstAt = this.firstAt ?? now;
    this.lastAt = now;
    const top = topOf(weights);
    const switched = this.segmentFirst === null || !sameSegment(this.segmentFirst, weights);
    if (switched) this.segmentFirst = weights;
    this.tokens.push({index, text, weights});
    const colour = colourOf(top);
    const share = top === null ? 1 : normalised(weights)[top];
    const span = el("span", {class: "tok", title: `token ${index} · ${top ?? "base"}\n${describeWeights(weights)}`,
                             "data-index": String(index), "data-top": top ?? "base",
                             "data-weights": JSON.stringify(weights), "data-text": text});
    span.textContent = text === "" ? "∅" : text.replace(/\n/g, "↵\n");
    if (text === "") span.classList.add("empty");
    span.style.background = rgba(colour, 0.12 + 0.3 * share);
    span.style.borderBottomColor = colour;
    if (switched) span.classList.add("seg-start");
    $("output").append(span);
    this.addColumn(index, weights, switched);
  }

  addColumn(index, weights, switched) {
    const col = el("div", {class: "col", "data-index": String(index), "data-top": topOf(weights) ?? "base",
                           "data-weights": JSON.stringify(weights), title: `token ${index}\n${describeWeights(weights)}`});
    const shares = normalised(weights);
    const names = Object.keys(shares).sort();
    if (!names.length) col.append(el("div", {class: "part", "data-adapter": "base", style: `height:100%;background:${BASE_COLOUR}`}));
    for (const name of names) {
      col.append(el("div", {class: "part", "data-adapter": name,
                            style: `height:${(shares[name] * 100).toFixed(2)}%;background:${colourOf(name)}`}));
    }
    if (switched) col.classList.add("reroute");
    $("strip").append(col);
    const mark = el("div", {class: "mark", "data-index": String(index)});
    if (switched) { mark.classList.add("reroute"); mark.textContent = "▼"; mark.title = `re-routed at token ${index}`; }
    // the cadence in force: the request's, else the server's default (the `auto` entry of /v1/models)
    const routing = this.body.routing, auto = state.models.find((m) => m.id === "auto");
    const every = routing && !routing.weights ? (routing.reroute_every ?? (auto ? auto.reroute_every : undefined)) : undefined;
    if (!switched && every > 0 && index % every === 0) { mark.classList.add("decision"); mark.title = `routing decision at token ${index} (unchanged)`; }
    $("strip-marks").append(mark);
    $("strip-axis").append(el("div", {class: "tick", "data-index": String(index), text: index % 8 === 0 ? String(index) : ""}));
  }

  /** Redraw the markers from the server's trace: it is the truth, the stream only previews it. */
  applySegments(segments) {
    this.segments = segments;
    const end = segments.length ? segments[segments.length - 1].end_token : 0;
    const byIndex = (selector) => {
      const out = new Map();
      for (const node of document.querySelectorAll(selector)) {
        const i = Number(node.dataset.index);
        if (i >= end) node.remove();  // an event after the last generated token (a cancel) is not a token
        else out.set(i, node);
      }
      return out;
    };
    const toks = byIndex("#output .tok"), cols = byIndex("#strip .col"), marks = byIndex("#strip-marks .mark");
    byIndex("#strip-axis .tick");
    segments.forEach((s, k) => {
      for (let i = s.start_token; i < s.end_token; i++) {
        const start = i === s.start_token;
        for (const node of [toks.get(i), cols.get(i)]) {
          if (!node) continue;
          node.dataset.segment = String(k);
          node.classList.toggle(node === cols.get(i) ? "reroute" : "seg-start", start);
        }
        const mark = marks.get(i);
        if (!mark) continue;
        if (start) {
          mark.classList.add("reroute");
          mark.classList.remove("decision");
          mark.textContent = "▼";
          mark.title = `segment ${k} from token ${i}: ${describeWeights(s.weights)}`;
        } else if (mark.classList.contains("reroute")) {
          mark.classList.remove("reroute");
          mark.textContent = "";
          mark.title = "";
        }
      }
    });
    const body = $("trace").querySelector("tbody");
    body.replaceChildren();
    segments.forEach((s, k) => {
      const bar = el("div", {class: "bar"});
      const shares = normalised(s.weights);
      for (const name of Object.keys(shares).sort()) {
        bar.append(el("span", {style: `width:${(shares[name] * 100).toFixed(2)}%;background:${colourOf(name)}`,
                               title: `${name} ${s.weights[name]}`}));
      }
      body.append(el("tr", {"data-segment": String(k), "data-start": String(s.start_token), "data-end": String(s.end_token),
                            "data-weights": JSON.stringify(s.weights)},
                     el("td", {text: `${s.start_token}–${s.end_token - 1}`}),
                     el("td", {}, bar, el("span", {class: "small", text: describeWeights(s.weights)})),
                     el("td", {class: "small", text: s.confidence == null ? "–" : s.confidence.toFixed(2)})));
    });
    $("trace").hidden = !segments.length;
    $("trace").dataset.segments = JSON.stringify(segments);
  }

  done() {
    const out = $("output");
    out.dataset.state = "done";
    out.dataset.finish = this.finish ?? "";
    const n = out.querySelectorAll(".tok").length;
    const seconds = this.firstAt !== null && this.lastAt > this.firstAt ? (this.lastAt - this.firstAt) / 1000 : 0;
    const rate = seconds > 0 && n > 1 ? ` · ${((n - 1) / seconds).toFixed(1)} tok/s` : "";
    const segs = this.segments ? ` · ${this.segments.length} segment${this.segments.length === 1 ? "" : "s"}` : "";
    $("run-stats").textContent = `${n} tokens${segs}${rate} · finish: ${this.finish ?? "?"}`;
    renderLegend();
  }
}

function showRunError(message) {
  const box = $("run-error");
  box.hidden = !message;
  box.textContent = message || "";
}

async function generate() {
  showRunError("");
  const body = requestBody();
  const run = new Run(body);
  state.controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  try {
    const response = await fetch("v1/completions", {method: "POST", headers: {"content-type": "application/json", ...apiKeyHeader()},
                                                     body: JSON.stringify(body), signal: state.controller.signal});
    if (!response.ok) {
      const data = await response.json().catch(() => null);
      throw new Error(data && data.error ? data.error.message : `${response.status} ${response.statusText}`);
    }
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) run.usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const routing = choice.routing || {};
        run.addToken(routing.token_index, choice.text, routing.weights || {});
        if (choice.finish_reason) {
          run.finish = choice.finish_reason;
          if (routing.segments) run.applySegments(routing.segments);
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") showRunError(e.message);
    else run.finish = "stopped";
  } finally {
    run.done();
    state.controller = null;
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

// -- live counters from /metrics -------------------------------------------------------------------
/** Prometheus text format -> [{name, labels, value}] (comments skipped). */
function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const lm of (m[3] || "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[lm[1]] = lm[2];
    out.push({name: m[1], labels, value: Number(m[4])});
  }
  return out;
}

async function pollMetrics() {
  let samples;
  try {
    const r = await fetch("metrics");
    if (!r.ok) return;
    samples = parseMetrics(await r.text());
  } catch { return; }
  const sum = (name, pred = () => true) => samples.filter((s) => s.name === name && pred(s.labels)).reduce((a, s) => a + s.value, 0);
  const requests = sum("switchboard_requests_total");
  const errors = sum("switchboard_requests_total", (l) => !l.status.startsWith("2"));
  const tokens = sum("switchboard_generated_tokens_total");
  const now = performance.now();
  $("m-requests").textContent = String(requests);
  $("m-requests").dataset.value = String(requests);
  $("m-errors").textContent = String(errors);
  $("m-tokens").textContent = String(tokens);
  $("m-tokens").dataset.value = String(tokens);
  $("m-reroutes").textContent = String(sum("switchboard_reroutes_total"));
  state.history.push({at: now, tokens});
  while (state.history.length > 2 && now - state.history[1].at >= RATE_WINDOW_MS) state.history.shift();
  const first = state.history[0];
  if (now > first.at) $("m-tps").textContent = ((tokens - first.tokens) / ((now - first.at) / 1000)).toFixed(1);
  const perAdapter = new Map();
  for (const s of samples.filter((s) => s.name === "switchboard_route_decisions_total")) {
    perAdapter.set(s.labels.adapter, (perAdapter.get(s.labels.adapter) || 0) + s.value);
  }
  const box = $("m-decisions"), max = Math.max(1, ...perAdapter.values());
  box.replaceChildren();
  for (const [name, n] of [...perAdapter.entries()].sort()) {
    box.append(el("div", {class: "bar-row", "data-adapter": name, "data-value": String(n)},
                  el("span", {class: "name", text: name}),
                  el("span", {class: "bar"}, el("span", {style: `width:${(100 * n / max).toFixed(1)}%;background:${colourOf(name)}`})),
                  el("span", {class: "num", text: String(n)})));
  }
  if (!perAdapter.size) box.append(el("span", {class: "muted small", text: "no routing decisions yet"}));
}

// -- wiring ----------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("model").addEventListener("change", updateAutoOnly);
  $("manual-mix").addEventListener("change", updateAutoOnly);
  $("refresh").addEventListener("click", loadModels);
  $("register-form").addEventListener("submit", adminRegister);
  $("reload").addEventListener("click", adminReload);
  let tokenTimer = null;
  $("admin-token").addEventListener("input", () => {
    clearTimeout(tokenTimer);
    tokenTimer = setTimeout(() => { state.token = $("admin-token").value.trim(); loadModels(); }, 300);
  });
  let keyTimer = null;
  $("api-key").addEventListener("input", () => {
    clearTimeout(keyTimer);
    keyTimer = setTimeout(() => { state.apiKey = $("api-key").value.trim(); loadModels(); }, 300);
  });
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(); });
  setAdminState(false, $("admin-state").textContent);
  loadModels().then(() => { document.body.dataset.ready = "1"; });
  pollMetrics();
  setInterval(pollMetrics, 2000);
});
