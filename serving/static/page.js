// The compare page: lists the served models, streams 2-4 of them side by side through /v3, shows each
// version's validation report (GET /v3/models/{id}/manifest) and live figures from /metrics.
// The API key stays in this tab (sessionStorage) and goes out only as a Bearer token on the page's own calls.

const MAX_MODELS = 4;
const METRICS_EVERY_MS = 3000;
const HISTORY = 40; // metric samples kept per chart (2 minutes at 3 s)
const RETRY_LOADING_MS = 2000; // a 503 while the server loads its models: ask again after this

const $ = (selector) => document.querySelector(selector);
const state = {
  key: sessionStorage.getItem("lora-api-key") || "",
  served: new Map(), // id -> model card (GET /v3/models)
  selected: [], // names, in the order chosen (may hold names the server does not serve: they get an error panel)
  manifests: new Map(), // id -> Promise of {manifest} or an Error
  history: new Map(), // model -> [{t, requests, tokens, ttft: [{le, count}]}]
  pendingRun: false, // a shared link asked for a comparison: run it once the models are listed
};

// ---------- small helpers ----------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c !== undefined && c !== null && c !== false) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

function svgEl(tag, attrs = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function num(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "—";
  if (x === 0) return "0";
  const a = Math.abs(x);
  return a >= 1e-2 && a < 1e5 ? String(Number(x.toPrecision(digits))) : x.toExponential(1);
}

function secs(x) {
  return x === null || x === undefined ? "—" : `${num(x)} s`;
}

function when(seconds) {
  if (!seconds) return "—";
  return new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 16) + " UTC";
}

// An error a person can read: the HTTP status, the server's own message, and what to do about it.
class PageError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.status = status;
  }
}

const HINTS = {
  401: "The server needs its API key: enter it at the top of the page.",
  404: "",
  503: "The server is still loading its models, or this model's queue is full: try again in a moment.",
};

async function errorOf(response) {
  let message = response.statusText;
  try {
    const body = await response.json();
    message = body?.error?.message || JSON.stringify(body);
  } catch {
    // not JSON: the status text says it
  }
  const hint = HINTS[response.status] || "";
  return new PageError(`${response.status} ${response.statusText}: ${message}${hint ? "\n" + hint : ""}`,
                       response.status);
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (e) {
    throw new PageError(`Cannot reach the server (${e.message}).`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

function setStatus(node, text, isError = false) {
  node.textContent = text || "";
  node.classList.toggle("error", Boolean(isError && text));
}

// ---------- the served models ----------

function kindOf(card) {
  if (card.kind === "adapter") return `runtime adapter on ${card.parent}`;
  return card.kind || (card.parent ? `runtime adapter on ${card.parent}` : "model");
}

function numericsOf(card) {
  const n = card.numerics;
  if (!n) return "—";
  const eff = n.effective;
  const pinned = n.pinned;
  const text = `${eff.inference_precision} compute, ${eff.kv_cache_precision} KV cache`;
  if (!pinned) return `${text} (not pinned)`;
  const same = pinned.inference_precision === eff.inference_precision && pinned.kv_cache_precision === eff.kv_cache_precision;
  return same ? text : `${text} (pinned ${pinned.inference_precision}/${pinned.kv_cache_precision})`;
}

async function loadModels() {
  const status = $("#models-status");
  setStatus(status, "Asking the server for its models…");
  let list;
  try {
    list = await (await api("/v3/models")).json();
  } catch (e) {
    setStatus(status, e.message, true);
    if (e.status === 503) setTimeout(loadModels, RETRY_LOADING_MS);
    else renderReports(); // their panels say the same in words rather than stay blank
    return;
  }
  state.served = new Map(list.data.map((card) => [card.id, card]));
  refreshMetrics(); // the figures of the models just listed, without waiting for the next tick
  renderModels();
  const unknown = state.selected.filter((name) => !state.served.has(name));
  setStatus(status, unknown.length
    ? `Not served here: ${unknown.join(", ")} (their panels below say what the server answered).` : "",
    unknown.length > 0);
  selectionChanged();
  if (state.pendingRun) {
    state.pendingRun = false;
    compare();
  }
}

function renderModels() {
  const body = $("#models tbody");
  body.replaceChildren();
  for (const card of state.served.values()) {
    const box = el("input", {
      type: "checkbox", value: card.id, "aria-label": `compare ${card.id}`, checked: state.selected.includes(card.id),
      onchange: (event) => toggle(card.id, event.target),
    });
    body.append(el("tr", { dataset: { model: card.id } },
      el("td", {}, box),
      el("td", {}, el("b", {}, card.id)),
      el("td", { class: "kind" }, kindOf(card)),
      el("td", { class: "version" }, card.version ?? "—"),
      el("td", { class: "weights" }, card.weight_format ?? "—"),
      el("td", { class: "numerics" }, numericsOf(card)),
      el("td", { class: "published" }, when(card.created)),
    ));
  }
  if (!state.served.size) body.append(el("tr", {}, el("td", { colspan: 7 }, "The server serves no model yet.")));
}

function toggle(name, box) {
  if (box.checked) {
    if (state.selected.length >= MAX_MODELS) {
      box.checked = false;
      setStatus($("#compose-status"), `At most ${MAX_MODELS} models side by side: untick one first.`, true);
      return;
    }
    state.selected.push(name);
  } else {
    state.selected = state.selected.filter((n) => n !== name);
  }
  setStatus($("#compose-status"), "");
  selectionChanged();
}

function selectionChanged() {
  renderAnswerPanels();
  renderReports();
}

// ---------- manifests: validation prompts and reports ----------

function manifestOf(name) {
  if (!state.manifests.has(name)) {
    const pending = api(`/v3/models/${encodeURIComponent(name)}/manifest`).then((r) => r.json(), (e) => e);
    state.manifests.set(name, pending);
  }
  return state.manifests.get(name);
}

async function renderReports() {
  const box = $("#reports");
  const names = [...state.selected];
  if (!names.length) return box.replaceChildren(el("p", { class: "note" }, "Pick models above to see their reports."));
  box.replaceChildren(...names.map((name) => el("article", { class: "report", dataset: { model: name } },
    el("h3", {}, name), el("p", { class: "note" }, "Reading the manifest…"))));
  const found = await Promise.all(names.map(manifestOf));
  if (names.join() !== state.selected.join()) return; // the selection changed meanwhile: a newer render runs
  box.replaceChildren(...names.map((name, i) => report(name, found[i])));
  renderValidationPrompts(names, found);
}

function figureRow(label, value, bound, ok, boundText) {
  const verdict = ok === null ? "" : ok ? "✓" : "✗";
  return el("tr", {},
    el("td", {}, label), el("td", {}, value), el("td", {}, bound === null ? "" : `${boundText} ${num(bound)}`),
    el("td", { class: ok === null ? "" : ok ? "ok" : "notok" }, verdict));
}

function report(name, found) {
  const node = el("article", { class: "report", dataset: { model: name } });
  if (found instanceof Error) {
    node.append(el("h3", {}, name), el("p", { class: "error" }, found.message));
    return node;
  }
  const m = found.manifest;
  const v = m.validation;
  const verdict = !v ? el("span", { class: "verdict none" }, "no report")
    : el("span", { class: `verdict ${v.passed ? "passed" : "failed"}` }, v.passed ? "passed" : "failed");
  node.append(el("header", {}, el("h3", {}, `${found.id} `, el("small", {}, `version ${found.version}, ${found.kind}`)),
    verdict));
  if (!v) {
    node.append(el("p", { class: "note" },
      "This version's manifest holds no validation report: it was published without the build flow" +
      (m.built_by ? ` (built by ${m.built_by})` : "") + "."));
  } else {
    const b = v.bounds || {};
    const minAgreement = v.min_agreement ?? b.min_agreement;
    const rows = [
      figureRow("agreement (margin-aware top-1)", num(v.agreement, 4), minAgreement, v.agreement >= minAgreement, "≥"),
      figureRow("raw top-1 agreement", num(v.top1, 4), null, null),
      figureRow("tokens compared", v.tokens, null, null),
    ];
    if (v.kld_mean !== null && v.kld_mean !== undefined) {
      rows.push(figureRow("KL divergence, mean", num(v.kld_mean), b.max_kld_mean ?? null,
        b.max_kld_mean == null ? null : v.kld_mean <= b.max_kld_mean, "≤"));
      rows.push(figureRow("KL divergence, p99", num(v.kld_p99), b.max_kld_p99 ?? null,
        b.max_kld_p99 == null ? null : v.kld_p99 <= b.max_kld_p99, "≤"));
    }
    if (v.logprob_gap !== null && v.logprob_gap !== undefined) {
      rows.push(figureRow("log-prob gap, largest", num(v.logprob_gap), b.max_logprob_gap ?? null,
        b.max_logprob_gap == null ? null : v.logprob_gap <= b.max_logprob_gap, "≤"));
    }
    if (v.prompts_changed_by_adapters !== null && v.prompts_changed_by_adapters !== undefined) {
      rows.push(figureRow("prompts the adapters change", v.prompts_changed_by_adapters, v.min_changed,
        v.prompts_changed_by_adapters >= v.min_changed, "≥"));
    }
    if (v.scores) {
      const s = v.scores;
      rows.push(figureRow(`token F1, base → candidate (${s.prompts} references)`, `${num(s.base_f1)} → ${num(s.model_f1)}`,
        null, v.kind === "base" ? null : s.model_f1 >= s.base_f1));
      rows.push(figureRow("exact match, base → candidate", `${num(s.base_exact)} → ${num(s.model_exact)}`, null, null));
    }
    node.append(el("table", { class: "figures-table" },
      el("thead", {}, el("tr", {}, el("th", {}, "measure"), el("th", {}, "value"), el("th", {}, "bound"), el("th", {}))),
      el("tbody", {}, rows)));
    if (v.failures?.length) node.append(el("p", { class: "error" }, v.failures.join("\n")));
    if (b.measured) node.append(el("p", { class: "note" }, `Bounds: ${b.measured}.`));
    if (v.base_answers) node.append(el("p", { class: "note" }, `Base answers from ${v.base_answers}.`));
    const label = { merged: "merged", base: "exported", adapter: "adapter" }[v.kind] || "candidate";
    node.append(el("h4", {}, "Base vs candidate on the validation prompts"), el("table", { class: "rows" },
      el("thead", {}, el("tr", {}, el("th", {}, "prompt"), el("th", {}, "base"), el("th", {}, label),
        el("th", {}, "agreement"))),
      el("tbody", {}, (v.rows || []).map((r) => el("tr", {},
        el("td", { class: "out", title: r.prompt }, shortPrompt(r.prompt)),
        el("td", { class: "out" }, r.base_output),
        el("td", { class: "out" }, r.model_output),
        el("td", {}, num(r.agreement, 3)))))));
  }
  node.append(el("h4", {}, "Built from"), builtFrom(m));
  return node;
}

function describeSource(s) {
  if (!s) return "—";
  const where = s.repo_id || s.path || s.spec;
  const asked = s.requested_revision && s.requested_revision !== s.revision ? ` (asked for ${s.requested_revision})` : "";
  return `${where} @ ${s.revision}${asked}`;
}

function builtFrom(m) {
  const items = [];
  const add = (k, v) => items.push(el("dt", {}, k), el("dd", {}, v));
  const src = m.sources || {};
  if (m.sources) {
    // A runtime adapter's manifest names the served base it was validated on (and that base's own source).
    const base = src.base?.name ? `${src.base.name} version ${src.base.version}, from ${describeSource(src.base.source)}`
      : describeSource(src.base);
    add("base", base);
    (src.adapters || []).forEach((a, i) => add(`adapter ${i + 1}`, describeSource(a)));
    if (src.adapter) {
      const shape = m.adapter ? ` (rank ${m.adapter.rank}, scale ${m.adapter.scale})` : "";
      add("adapter", describeSource(src.adapter) + shape);
    }
    if (src.tokenizer) add("tokenizer", describeSource(src.tokenizer));
  }
  if (m.weight_format) add("weights", `${m.weight_format} for ${m.target_device || "CPU"}`);
  if (m.numerics) add("numerics", `${m.numerics.inference_precision} compute, ${m.numerics.kv_cache_precision} KV cache`);
  if (m.build) add("built", `${m.build.built_at || "—"} (build key ${m.build.key || "—"})`);
  if (m.tools) add("tools", Object.entries(m.tools).map(([k, v]) => `${k} ${v}`).join(", "));
  if (m.built_by) add("built by", m.built_by);
  return items.length ? el("dl", {}, items) : el("p", { class: "note" }, "The manifest names no sources.");
}

function shortPrompt(prompt) {
  // The demo's prompts end with what differs (the question, the word): show their last line without the
  // chat markers and the "question:" label; the whole prompt is in the tooltip.
  const bare = prompt.replace(/\[\/?(user|assistant)\]/g, "").trim();
  const last = bare.split("\n").map((line) => line.trim()).filter(Boolean).at(-1) || bare;
  const text = last.replace(/^question:\s*/, "");
  return text.length > 80 ? text.slice(0, 77) + "…" : text;
}

function renderValidationPrompts(names, found) {
  const box = $("#validation-prompts");
  const prompts = new Map(); // prompt -> models validated on it
  found.forEach((f, i) => {
    for (const row of f?.manifest?.validation?.rows || []) {
      if (!prompts.has(row.prompt)) prompts.set(row.prompt, []);
      prompts.get(row.prompt).push(names[i]);
    }
  });
  box.replaceChildren();
  if (!prompts.size) return;
  box.append(el("span", { class: "note" }, "Validation prompts: "));
  for (const [prompt, models] of prompts) {
    box.append(el("button", {
      type: "button", class: "chip", title: `${prompt}\n\n(validated on ${models.join(", ")})`,
      onclick: () => { $("#prompt").value = prompt; },
    }, shortPrompt(prompt)));
  }
}

// ---------- streaming side by side ----------

function renderAnswerPanels() {
  const box = $("#answers");
  const existing = new Map([...box.children].map((n) => [n.dataset.model, n]));
  box.replaceChildren(...state.selected.map((name) => existing.get(name) || answerPanel(name)));
  if (!state.selected.length) box.append(el("p", { class: "note" }, "Pick 2 to 4 models above, then Compare."));
}

function answerPanel(name) {
  return el("article", { class: "answer", dataset: { model: name } },
    el("header", {}, el("h3", {}, name),
      el("span", { class: "figures" }, "TTFT ", el("b", { class: "ttft" }, "—"), " · ",
        el("b", { class: "tps" }, "—"), " tok/s · ", el("b", { class: "tokens" }, "0"), " tokens")),
    el("pre", { class: "text" }),
    el("p", { class: "error", hidden: true }),
    el("p", { class: "state" }, "not run yet"));
}

function request() {
  return {
    prompt: $("#prompt").value,
    mode: $("#mode").value,
    maxTokens: Number($("#max-tokens").value) || undefined,
    temperature: $("#temperature").value === "" ? undefined : Number($("#temperature").value),
  };
}

async function compare() {
  const status = $("#compose-status");
  const r = request();
  if (state.selected.length < 1) return setStatus(status, "Pick 2 to 4 models to compare.", true);
  if (!r.prompt) return setStatus(status, "Write a prompt, or pick one of the validation prompts.", true);
  setStatus(status, state.selected.length === 1 ? "One model picked: pick another to compare side by side." : "");
  renderAnswerPanels();
  $("#compare").disabled = true;
  try {
    await Promise.all(state.selected.map((name) => stream(name, r)));
  } finally {
    $("#compare").disabled = false;
  }
}

async function stream(model, r) {
  const panel = $(`#answers article[data-model="${CSS.escape(model)}"]`);
  const text = panel.querySelector(".text");
  const error = panel.querySelector(".error");
  const stateLine = panel.querySelector(".state");
  const show = (sel, value) => { panel.querySelector(sel).textContent = value; };
  text.textContent = "";
  error.hidden = true;
  show(".ttft", "—"); show(".tps", "—"); show(".tokens", "0");
  panel.dataset.status = "running";
  stateLine.textContent = "waiting for the first token…";
  const fail = (message) => {
    error.textContent = message;
    error.hidden = false;
    panel.dataset.status = "error";
    stateLine.textContent = "failed";
  };

  const common = { model, stream: true, stream_options: { include_usage: true },
                   max_tokens: r.maxTokens, temperature: r.temperature };
  const chat = r.mode === "chat";
  const body = chat ? { ...common, messages: [{ role: "user", content: r.prompt }] } : { ...common, prompt: r.prompt };
  const started = performance.now();
  let first = null;
  let last = null;
  let pieces = 0;
  let usage = null;
  let response;
  try {
    response = await api(chat ? "/v3/chat/completions" : "/v3/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
  } catch (e) {
    return fail(e.message);
  }
  const figures = () => {
    const tokens = usage?.completion_tokens ?? pieces;
    show(".tokens", String(tokens));
    if (first !== null) show(".ttft", `${Math.round(first - started)} ms`);
    // Over the whole request: a fast engine sends tokens in bursts, so the time between the first and
    // the last chunk can be near zero and would make a decode-only rate meaningless.
    if (tokens > 0 && last > started) show(".tps", num(tokens / ((last - started) / 1000), 3));
  };
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 1);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") {
          figures();
          panel.dataset.status = panel.dataset.status === "error" ? "error" : "done";
          if (panel.dataset.status === "done") stateLine.textContent = "done";
          return;
        }
        const chunk = JSON.parse(data);
        if (chunk.error) {
          fail(`The generation failed mid-way: ${chunk.error.message}`);
          continue;
        }
        const choice = chunk.choices?.[0];
        const piece = chat ? choice?.delta?.content : choice?.text;
        if (piece) {
          const now = performance.now();
          if (first === null) first = now;
          last = now;
          pieces += 1;
          text.textContent += piece;
          stateLine.textContent = "streaming…";
        }
        if (chunk.usage) usage = chunk.usage;
        figures();
      }
    }
    fail("The stream ended without its [DONE] line: the server closed the connection.");
  } catch (e) {
    fail(`The stream broke off: ${e.message}`);
  }
}

// ---------- the shareable link ----------

function shareLink() {
  const r = request();
  const parts = [`models=${state.selected.map(encodeURIComponent).join(",")}`,
                 `prompt=${encodeURIComponent(r.prompt)}`, `mode=${r.mode}`];
  if (r.maxTokens !== undefined) parts.push(`max_tokens=${r.maxTokens}`);
  if (r.temperature !== undefined) parts.push(`temperature=${r.temperature}`);
  return `${location.origin}/?${parts.join("&")}`;
}

function readLink() {
  const q = new URLSearchParams(location.search);
  if (q.get("models")) state.selected = q.get("models").split(",").map((s) => s.trim()).filter(Boolean).slice(0, MAX_MODELS);
  if (q.has("prompt")) $("#prompt").value = q.get("prompt");
  if (["completions", "chat"].includes(q.get("mode"))) $("#mode").value = q.get("mode");
  if (q.has("max_tokens")) $("#max-tokens").value = q.get("max_tokens");
  if (q.has("temperature")) $("#temperature").value = q.get("temperature");
  state.pendingRun = state.selected.length > 0 && Boolean(q.get("prompt"));
}

// ---------- live figures from /metrics ----------

function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return samples;
}

function sum(samples, name, model) {
  return samples.filter((s) => s.name === name && s.labels.model === model).reduce((a, s) => a + s.value, 0);
}

// Prometheus's histogram_quantile: linear inside the bucket the rank falls in.
function quantile(q, buckets) {
  const total = buckets.length ? buckets[buckets.length - 1].count : 0;
  if (!total) return null;
  const rank = q * total;
  let lower = 0;
  let below = 0;
  for (const b of buckets) {
    if (b.count >= rank) {
      if (b.le === Infinity) return lower;
      return lower + (b.le - lower) * (rank - below) / Math.max(b.count - below, 1e-12);
    }
    lower = b.le;
    below = b.count;
  }
  return lower;
}

function sparkline(values, width = 150, height = 30) {
  const svg = svgEl("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
  const points = values.map((v, i) => [i, v]).filter(([, v]) => v !== null);
  if (points.length < 2) return svg;
  const top = Math.max(...points.map(([, v]) => v), 1e-9);
  // The newest sample at the right edge; older ones to its left, one step each (the chart fills as samples come).
  const x = (i) => width - (values.length - 1 - i) * (width / (HISTORY - 1));
  const y = (v) => height - 2 - (v / top) * (height - 4);
  svg.append(svgEl("polyline", { points: points.map(([i, v]) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ") }));
  return svg;
}

function chart(label, values, latest, unit, cls) {
  return el("div", { class: `chart ${cls}` }, el("span", { class: "label" }, label), sparkline(values),
    el("b", { class: "value" }, latest === null ? "—" : `${num(latest)}${unit}`));
}

async function refreshMetrics() {
  const status = $("#metrics-status");
  let samples;
  try {
    samples = parseMetrics(await (await api("/metrics")).text());
  } catch (e) {
    setStatus(status, e.message, true);
    return;
  }
  setStatus(status, "");
  const now = performance.now() / 1000;
  // The names /metrics itself reports loaded: the figures need no key, so they show even when the listing is refused.
  const names = [...new Set(samples.filter((s) => s.name === "lora_serve_model_loaded").map((s) => s.labels.model))];
  if (!names.length) setStatus(status, "The server reports no loaded model yet.");
  const box = $("#metrics");
  box.replaceChildren();
  for (const model of names) {
    const buckets = samples
      .filter((s) => s.name === "lora_serve_time_to_first_token_seconds_bucket" && s.labels.model === model)
      .map((s) => ({ le: s.labels.le === "+Inf" ? Infinity : Number(s.labels.le), count: s.value }))
      .sort((a, b) => a.le - b.le);
    const sample = {
      t: now,
      requests: sum(samples, "lora_serve_requests_total", model),
      tokens: sum(samples, "lora_serve_completion_tokens_total", model),
      p50: quantile(0.5, buckets), p90: quantile(0.9, buckets), p99: quantile(0.99, buckets),
    };
    const history = state.history.get(model) || [];
    history.push(sample);
    if (history.length > HISTORY) history.shift();
    state.history.set(model, history);
    // Rates between consecutive samples: what the server did in the last few seconds.
    const rate = (key) => history.map((s, i) => (i === 0 ? null : (s[key] - history[i - 1][key]) / (s.t - history[i - 1].t)));
    const reqRates = rate("requests");
    const tokRates = rate("tokens");
    box.append(el("article", { class: "metrics", dataset: { model } },
      el("header", {}, el("h3", {}, model),
        el("span", { class: "figures" }, el("b", { class: "requests" }, String(sample.requests)), " requests · ",
          el("b", { class: "completion-tokens" }, String(sample.tokens)), " tokens")),
      chart("requests/s", reqRates, reqRates.at(-1), "", "requests-rate"),
      chart("tokens/s", tokRates, tokRates.at(-1), "", "tokens-rate"),
      chart("TTFT p50", history.map((s) => s.p50), sample.p50, " s", "ttft-p50"),
      el("p", { class: "note ttft" },
        `TTFT since start: p50 ${secs(sample.p50)} · p90 ${secs(sample.p90)} · p99 ${secs(sample.p99)}`)));
  }
}

// ---------- wiring ----------

function start() {
  $("#api-key").value = state.key;
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("#api-key").value.trim();
    sessionStorage.setItem("lora-api-key", state.key);
    state.manifests.clear(); // fetched with the old key: maybe refused
    loadModels();
  });
  $("#compare-form").addEventListener("submit", (event) => {
    event.preventDefault();
    compare();
  });
  $("#share").addEventListener("click", () => {
    const link = shareLink();
    history.replaceState(null, "", link);
    const field = $("#share-link");
    field.value = link;
    field.hidden = false;
    field.select();
    navigator.clipboard?.writeText(link).catch(() => {}); // the field shows it where the clipboard is refused
  });
  readLink();
  renderAnswerPanels();
  loadModels();
  refreshMetrics();
  setInterval(refreshMetrics, METRICS_EVERY_MS);
}

start();
