// mesh dashboard: renders the views the server pushes over /api/stream (no polling).
"use strict";

const views = {};          // latest data of each view, by name
const ACTION = {"X-Mesh-Dashboard": "1"};
let current = "services";

// --- tiny DOM helpers (text only: nothing from the mesh is parsed as HTML) ----------
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}
const num = (n) => (n ?? 0).toLocaleString("en");
const rate = (n) => (n ?? 0).toFixed(n >= 10 ? 0 : 1);
function ago(epoch) {
  if (!epoch) return "-";
  const s = Math.max(0, Math.round(Date.now() / 1000 - epoch));
  if (s >= 86400) return `${Math.floor(s / 86400)}d`;
  if (s >= 3600) return `${Math.floor(s / 3600)}h`;
  if (s >= 60) return `${Math.floor(s / 60)}m`;
  return `${s}s`;
}
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
function table(caption, headers, rows, attrs) {
  return h("table", attrs,
    caption ? h("caption", {}, caption) : null,
    h("thead", {}, h("tr", {}, headers.map((t) => h("th", {scope: "col"}, t)))),
    h("tbody", {}, rows));
}
const td = (value, field, extra) => h("td", {dataset: field ? {field} : undefined, ...extra}, value);

// Re-rendering keeps keyboard focus on the "same" control (same data-key).
function replace(container, ...children) {
  const active = document.activeElement;
  const key = active && container.contains(active) ? active.dataset.key : null;
  const open = [...container.querySelectorAll("details[open]")].map((d) => d.dataset.key);
  container.replaceChildren(...children);
  for (const k of open) container.querySelector(`details[data-key="${CSS.escape(k)}"]`)?.setAttribute("open", "");
  if (key) container.querySelector(`[data-key="${CSS.escape(key)}"]`)?.focus();
}

// --- views -----------------------------------------------------------------------------
function renderServices(data) {
  const services = data.services || [];
  if (!services.length) return replace(document.getElementById("services"), h("p", {class: "empty"}, "No services answer $SRV.PING."));
  replace(document.getElementById("services"), ...services.map((s) => h("article",
    {class: "card" + (s.down ? " has-down" : ""), dataset: {service: s.name}, "aria-labelledby": `svc-${s.name}`},
    h("header", {},
      h("h3", {id: `svc-${s.name}`}, s.name, h("span", {class: "version"}, ` ${s.version}`)),
      h("p", {class: "desc"}, s.description || ""),
      h("dl", {class: "totals"},
        h("div", {}, h("dt", {}, "instances"), h("dd", {dataset: {field: "instances"}}, `${s.up} up`, s.down ? h("span", {class: "bad"}, ` ${s.down} down`) : "")),
        h("div", {}, h("dt", {}, "requests"), h("dd", {dataset: {field: "requests"}}, num(s.requests))),
        h("div", {}, h("dt", {}, "errors"), h("dd", {dataset: {field: "errors"}, class: s.errors ? "bad" : ""}, num(s.errors))),
        h("div", {}, h("dt", {}, "req/s"), h("dd", {dataset: {field: "rate"}}, rate(s.rate))),
        h("div", {}, h("dt", {}, "err/s"), h("dd", {dataset: {field: "error_rate"}}, rate(s.error_rate))),
        h("div", {}, h("dt", {}, "avg"), h("dd", {dataset: {field: "avg_ms"}}, `${s.avg_ms.toFixed(2)} ms`)))),
    table(null, ["Endpoint", "Kind", "Subject / event", "Requests", "Errors", "req/s", "err/s", "Avg ms", "Lag", "Redelivered", "Dead-lettered", "Last error"],
      s.endpoints.map((e) => h("tr", {dataset: {endpoint: e.name}},
        h("th", {scope: "row"}, e.name), td(e.kind, "kind"), td(e.event_type || e.subject, "subject"),
        td(num(e.requests), "requests"), td(num(e.errors), "errors", {class: e.errors ? "bad" : ""}),
        td(rate(e.rate), "rate"), td(rate(e.error_rate), "error_rate"), td(e.avg_ms.toFixed(2), "avg_ms"),
        td(e.kind === "subscriber" ? num(e.pending) : "", "pending"),
        td(e.kind === "subscriber" ? num(e.redelivered) : "", "redelivered"),
        td(e.kind === "subscriber" ? num(e.dead_lettered) : "", "dead_lettered"),
        td(e.last_error, "last_error", {class: "error"}))), {class: "endpoints"}),
    h("details", {dataset: {key: `inst-${s.name}`}},
      h("summary", {}, `Instances (${s.instances.length})`),
      h("ul", {class: "instances"}, s.instances.map((i) => h("li", {class: i.up ? "up" : "down", dataset: {instance: i.id}},
        h("code", {}, i.id), ` ${i.version} — `, i.up ? "up" : `down (last seen ${ago(i.last_seen)} ago)`, ` — started ${i.started}`)))))));
}

function sparkline(history) {
  const w = 160, hgt = 28, values = history.map((p) => p[1]);
  const max = Math.max(1, ...values);
  const points = values.map((v, i) => `${values.length > 1 ? (i * w) / (values.length - 1) : 0},${hgt - 2 - (v * (hgt - 4)) / max}`).join(" ");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${hgt}`);
  svg.setAttribute("width", w); svg.setAttribute("height", hgt);
  svg.setAttribute("role", "img");
  const last = values.length ? values[values.length - 1] : 0;
  svg.setAttribute("aria-label", `lag over the last ${values.length} samples: now ${last}, max ${Math.max(0, ...values)}`);
  const line = document.createElementNS(svg.namespaceURI, "polyline");
  line.setAttribute("points", points);
  line.setAttribute("class", "spark");
  svg.append(line);
  return svg;
}

function renderStreams(data) {
  const streams = data.streams || [];
  if (!streams.length) return replace(document.getElementById("streams"), h("p", {class: "empty"}, "No JetStream streams."));
  const stores = streams.filter((s) => s.kind === "key-value" || s.kind === "objects");
  const others = streams.filter((s) => !stores.includes(s));
  const storeTable = stores.length ? h("article", {class: "card"}, h("h3", {}, "Key-value buckets and object stores"),
    table(null, ["Stream", "Kind", "Entries", "Bytes"], stores.map((s) => h("tr", {dataset: {stream: s.name}},
      h("th", {scope: "row"}, s.name), td(s.kind), td(num(s.messages), "messages"), td(bytes(s.bytes))))))
    : null;
  replace(document.getElementById("streams"), ...others.map((s) => h("article", {class: "card", dataset: {stream: s.name}},
    h("header", {}, h("h3", {}, s.name, h("span", {class: "version"}, ` ${s.kind}`)),
      h("dl", {class: "totals"},
        h("div", {}, h("dt", {}, "messages"), h("dd", {dataset: {field: "messages"}}, num(s.messages))),
        h("div", {}, h("dt", {}, "bytes"), h("dd", {}, bytes(s.bytes))),
        h("div", {}, h("dt", {}, "subjects"), h("dd", {}, s.subjects.join(", "))))),
    s.consumers.length ? table(null, ["Consumer", "Lag (pending)", "Ack pending", "Redelivered", "Waiting pulls", "Lag over time"],
      s.consumers.map((c) => h("tr", {dataset: {consumer: c.name}},
        h("th", {scope: "row"}, c.name), td(num(c.pending), "pending", {class: c.pending ? "warn" : ""}),
        td(num(c.ack_pending), "ack_pending"), td(num(c.redelivered), "redelivered"), td(num(c.waiting), "waiting"),
        h("td", {}, sparkline(c.lag_history)))), {class: "consumers"}) : h("p", {class: "empty"}, "No consumers."))), storeTable);
}

function renderDeadLetters(data) {
  const rows = data.rows || [];
  document.getElementById("dl-count").textContent = data.total ? `(${data.total})` : "";
  if (!rows.length) return replace(document.getElementById("deadletters"), h("p", {class: "empty", id: "dl-empty"}, "No dead letters."));
  replace(document.getElementById("deadletters"), table(
    data.total > rows.length ? `The oldest ${rows.length} of ${data.total}` : null,
    ["ID", "Handler", "Reason", "Attempts", "Event type", "Age", "Error", "Actions"],
    rows.map((d) => h("tr", {dataset: {letterId: d.id}},
      h("th", {scope: "row"}, d.id), td(`${d.service}.${d.handler}`, "handler"), td(d.reason, "reason"),
      td(d.attempts, "attempts"), td(d.event_type, "event_type"), td(ago(d.time), "age"), td(d.error, "error", {class: "error"}),
      h("td", {class: "actions"},
        h("button", {type: "button", dataset: {key: `show-${d.id}`}, onclick: () => showLetter(d.id)}, "Show"),
        h("button", {type: "button", dataset: {key: `replay-${d.id}`}, onclick: () => letterAction(d.id, "replay")}, "Replay"),
        h("button", {type: "button", class: "danger", dataset: {key: `discard-${d.id}`}, onclick: () => letterAction(d.id, "discard")}, "Discard")))),
    {id: "deadletter-table"}));
}

async function showLetter(id) {
  const reply = await fetch(`/api/deadletters/${id}`);
  const data = await reply.json();
  if (!reply.ok) return say("dl-message", data.error.message);
  const dialog = document.getElementById("letter-dialog");
  dialog.dataset.letterId = id;
  document.getElementById("letter-title").textContent = `Dead letter ${id}`;
  const fields = [["Handler", `${data.service}.${data.handler}`], ["Reason", data.reason], ["Error", data.error],
    ["Attempts", data.attempts], ["Event type", data.event_type], ["Event ID", data.event_id],
    ["Subject", data.subject], ["Stream", `${data.stream} seq ${data.sequence}`], ["Dead since", new Date(data.time * 1000).toISOString()]];
  document.getElementById("letter-fields").replaceChildren(...fields.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  document.getElementById("letter-headers").textContent = Object.entries(data.headers).map(([k, v]) => `${k}: ${v}`).join("\n") || "(none)";
  let payload = data.data;
  try { payload = JSON.stringify(JSON.parse(data.data), null, 2); } catch { /* not JSON: as stored */ }
  document.getElementById("letter-payload").textContent = payload || "(empty)";
  dialog.showModal();
}

async function letterAction(id, action) {
  if (action === "discard" && !confirm(`Discard dead letter ${id}? Its event will not be handled.`)) return;
  const reply = await fetch(`/api/deadletters/${id}/${action}`, {method: "POST", headers: ACTION});
  const data = await reply.json();
  if (!reply.ok) return say("dl-message", `${action} of ${id} failed: ${data.error.message}`);
  say("dl-message", action === "replay" ? `Replayed ${id} to ${data.subject} (seq ${data.seq}).` : `Discarded ${id}.`);
  const dialog = document.getElementById("letter-dialog");
  if (dialog.open && dialog.dataset.letterId === String(id)) dialog.close();
}

function say(id, text) { document.getElementById(id).textContent = text; }

function progressCell(job) {
  const percent = Math.round((job.progress || 0) * 100);
  return h("td", {class: "progress"},
    h("progress", {max: "100", value: String(percent), "aria-label": `${job.kind} ${job.id} progress`}),
    h("span", {dataset: {field: "percent"}}, ` ${percent} %`));
}

function renderJobs(data) {
  const kinds = data.kinds || [];
  const jobs = data.jobs || [];
  const states = ["scheduled", "queued", "running", "retrying", "succeeded", "failed", "cancelled"];
  const container = document.getElementById("jobs");
  if (!kinds.length && !jobs.length) return replace(container, h("p", {class: "empty"}, data.note || "No job kinds and no jobs."));
  replace(container,
    table("Jobs by kind and state", ["Kind", ...states], kinds.map((k) => h("tr", {dataset: {kind: k.kind}},
      h("th", {scope: "row"}, k.kind), ...states.map((s) => td(num(k.counts[s] || 0), s)))), {id: "job-kinds"}),
    table("Recent jobs", ["Kind", "ID", "State", "Progress", "Message", "Attempt", "Error", "Actions"],
      jobs.map((j) => h("tr", {dataset: {job: `${j.kind}/${j.id}`, state: j.state}},
        td(j.kind, "kind"), h("th", {scope: "row"}, j.id), td(j.state, "state"), progressCell(j),
        td(j.message || "", "message"), td(`${j.attempt}/${j.max_attempts}`, "attempt"), td(j.error || "", "error", {class: "error"}),
        h("td", {class: "actions"},
          ["queued", "scheduled", "running", "retrying"].includes(j.state)
            ? h("button", {type: "button", class: "danger", dataset: {key: `cancel-${j.kind}-${j.id}`}, onclick: () => jobAction(j, "cancel")}, "Cancel") : null,
          ["failed", "cancelled"].includes(j.state)
            ? h("button", {type: "button", dataset: {key: `retry-${j.kind}-${j.id}`}, onclick: () => jobAction(j, "retry")}, "Retry") : null))),
      {id: "job-table"}));
}

async function jobAction(job, action) {
  const reply = await fetch(`/api/jobs/${encodeURIComponent(job.kind)}/${encodeURIComponent(job.id)}/${action}`, {method: "POST", headers: ACTION});
  const data = await reply.json();
  say("job-message", reply.ok ? `${action}: ${job.kind} ${job.id} ${data.message || "done"}` : `${action} failed: ${data.error.message}`);
}

function renderTraces(data) {
  const container = document.getElementById("traces");
  if (!data.file) return replace(container, h("p", {class: "empty"}, "No trace file: start the mesh with `mesh up` (it sets MESH_TRACE_FILE), or run `mesh dashboard --trace-file PATH`."));
  const traces = data.traces || [];
  if (!traces.length) return replace(container, h("p", {class: "empty"}, `No traces in ${data.file} yet.`));
  replace(container, ...traces.map((t, i) => h("details", {dataset: {key: t.trace_id}, open: i === 0},
    h("summary", {}, h("code", {}, t.trace_id.slice(0, 16)), ` ${t.services.join(" → ")} — ${t.spans} spans, ${t.duration_ms} ms, ${ago(t.ended)} ago`,
      t.errors ? h("span", {class: "bad"}, ` ${t.errors} error${t.errors > 1 ? "s" : ""}`) : ""),
    h("pre", {class: "tree"}, t.tree))));
}

function renderHealth(data) {
  const errors = Object.entries(data.errors || {});
  const text = data.connected ? `connected to ${data.server}` : "NATS connection lost: reconnecting";
  const el = document.getElementById("health");
  el.textContent = errors.length ? `${text} — ${errors.map(([k, v]) => `${k}: ${v}`).join("; ")}` : text;
  el.className = data.connected && !errors.length ? "ok" : "bad";
}

async function loadCatalog() {
  const container = document.getElementById("catalog");
  const reply = await fetch("/api/asyncapi");
  const doc = await reply.json();
  if (!reply.ok) return replace(container, h("p", {class: "bad"}, doc.error.message));
  const rows = Object.entries(doc.operations).map(([id, op]) => {
    const channel = doc.channels[op.channel.$ref.split("/").pop()];
    const message = Object.values(channel.messages)[0];
    const key = message.$ref ? message.$ref.split("/").pop() : "";
    const payload = key ? doc.components.messages[key].payload : {};
    return h("tr", {dataset: {operation: id}}, h("th", {scope: "row"}, op.title || id), td(op.action), td(channel.address || "(reply inbox)"),
      h("td", {}, h("details", {dataset: {key: `schema-${id}`}}, h("summary", {}, key || "-"), h("pre", {}, JSON.stringify(payload, null, 2)))));
  });
  replace(container, h("p", {}, doc.info.description),
    table(`${rows.length} operations, AsyncAPI ${doc.asyncapi}`, ["Operation", "Action", "Channel", "Payload schema"], rows, {id: "catalog-table"}),
    h("details", {dataset: {key: "schemas"}}, h("summary", {}, `Schemas (${Object.keys(doc.components.schemas).length})`),
      h("pre", {}, JSON.stringify(doc.components.schemas, null, 2))));
}

const renderers = {services: renderServices, streams: renderStreams, deadletters: renderDeadLetters,
  jobs: renderJobs, traces: renderTraces, health: renderHealth};

// --- navigation (links, hash, keys 1-6) ------------------------------------------------
function show(name) {
  if (!document.getElementById(`view-${name}`)) name = "services";
  current = name;
  for (const section of document.querySelectorAll("main > section")) section.hidden = section.id !== `view-${name}`;
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.view === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (name === "catalog") loadCatalog();
}
window.addEventListener("hashchange", () => show(location.hash.slice(1)));
document.addEventListener("keydown", (ev) => {
  if (ev.altKey || ev.ctrlKey || ev.metaKey || /^(INPUT|TEXTAREA|SELECT)$/.test(ev.target.tagName)) return;
  if (document.getElementById("letter-dialog").open) return;
  const link = document.querySelectorAll("nav a")[Number(ev.key) - 1];
  if (link) { location.hash = link.getAttribute("href"); document.getElementById("main").focus(); }
});

// --- wiring ------------------------------------------------------------------------------
function connect() {
  const source = new EventSource("/api/stream");
  for (const name of Object.keys(renderers)) {
    source.addEventListener(name, (ev) => { views[name] = JSON.parse(ev.data); renderers[name](views[name]); });
  }
  source.onerror = () => { const el = document.getElementById("health"); el.textContent = "dashboard unreachable: reconnecting…"; el.className = "bad"; };
}

document.addEventListener("DOMContentLoaded", () => {
  const dialog = document.getElementById("letter-dialog");
  document.getElementById("letter-close").addEventListener("click", () => dialog.close());
  document.getElementById("letter-replay").addEventListener("click", () => letterAction(dialog.dataset.letterId, "replay"));
  document.getElementById("letter-discard").addEventListener("click", () => letterAction(dialog.dataset.letterId, "discard"));
  document.getElementById("catalog-refresh").addEventListener("click", loadCatalog);
  show(location.hash.slice(1) || "services");
  connect();
});
