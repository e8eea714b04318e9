// genqueue status page: polls GET /v1/overview every POLL_MS and redraws. Plain JavaScript,
// no build step, no network access beyond this gateway. The API key (when the gateway has
// keys) is kept in sessionStorage and sent as a Bearer token.
"use strict";

const POLL_MS = 1500;
const KEY = "genq.apiKey";
let timer = null;
let pending = false;

function apiKey() { return sessionStorage.getItem(KEY) || ""; }

function headers() {
  const key = apiKey();
  return key ? { Authorization: "Bearer " + key } : {};
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 1) return "now";
  if (seconds < 90) return Math.round(seconds) + " s";
  if (seconds < 5400) return Math.round(seconds / 60) + " min";
  if (seconds < 172800) return (seconds / 3600).toFixed(1) + " h";
  return Math.round(seconds / 86400) + " d";
}

function when(epoch) {
  if (!epoch) return "–";
  return new Date(epoch * 1000).toLocaleString();
}

function rate(value) { return value ? value.toFixed(value < 10 ? 2 : 1) + "/s" : "–"; }

function bar(fraction, label) {
  const pct = Math.max(0, Math.min(1, fraction || 0)) * 100;
  return el("div", { class: "bar", role: "progressbar", "aria-valuenow": pct.toFixed(1),
                     "aria-valuemin": 0, "aria-valuemax": 100 },
            el("span", { style: "width:" + pct.toFixed(1) + "%" }), el("em", {}, label));
}

function fill(id, rows, empty, columns) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { class: "empty", colspan: columns }, empty))]));
}

// "HTTP 503: why" from a failed answer: genqueue's {"detail": [{"msg"}, ...]} (or a string),
// or OpenAI's {"error": {"message"}}
async function failure(r) {
  const body = await r.json().catch(() => ({}));
  const detail = Array.isArray(body.detail) ? body.detail.map((d) => d.msg).join("; ")
    : body.detail || (body.error && body.error.message) || "";
  return "HTTP " + r.status + (detail ? ": " + detail : "");
}

async function download(path, filename) {
  const r = await fetch(path, { headers: headers() });
  if (!r.ok) { showError(path + ": " + await failure(r)); return; }
  const url = URL.createObjectURL(await r.blob());
  const a = el("a", { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function cancelButton(method, path) {
  // two clicks: "cancel", then "confirm?" (no blocking dialog)
  const button = el("button", { type: "button", class: "cancel" }, "cancel");
  button.addEventListener("click", async () => {
    if (button.dataset.armed !== "1") {
      button.dataset.armed = "1";
      button.textContent = "confirm?";
      setTimeout(() => { button.dataset.armed = ""; button.textContent = "cancel"; }, 4000);
      return;
    }
    button.disabled = true;
    const r = await fetch(path, { method, headers: headers() });
    if (!r.ok) showError(path + ": " + await failure(r));
    refresh();
  });
  return button;
}

function showError(message) {
  const node = document.getElementById("error");
  node.textContent = message || "";
  node.hidden = !message;
}

function selfCheck(check) {
  if (!check) return el("span", { class: "muted" }, "–");
  if (typeof check !== "object") return String(check);
  const ok = check.ok;
  const text = check.skipped ? "off" : ok === true ? (check.cached ? "passed (cached)" : "passed")
    : ok === false ? "failed: " + (check.problems || []).join("; ") : "–";
  return el("span", { class: ok === false ? "bad" : ok ? "ok" : "", title: JSON.stringify(check) },
            text);
}

function drawWorkers(workers) {
  document.getElementById("workers-count").textContent = "(" + workers.length + ")";
  fill("workers", workers.map((w) => el("tr", { "data-name": w.name },
    el("td", {}, w.name), el("td", {}, w.device || "–"), el("td", {}, w.model || "–"),
    el("td", {}, w.backend || "–"),
    el("td", { class: "wrap" }, (w.adapters || []).join(", ") || "–"),
    el("td", { class: "num" }, w.running), el("td", { class: "num" }, w.waiting),
    el("td", { class: "num" }, w.tokens_per_s === null || w.tokens_per_s === undefined
      ? "–" : w.tokens_per_s.toFixed(1)),
    el("td", { title: when(w.last_heartbeat) }, ago(w.heartbeat_age_s) + " ago"),
    el("td", {}, selfCheck(w.self_check)))),
  "no worker alive: requests wait until one starts", 10);
}

function drawQueues(q) {
  fill("queues", ["interactive", "bulk"].map((p) => el("tr", { "data-priority": p },
    el("td", {}, p), el("td", { class: "num" }, q[p].queued ?? "–"),
    el("td", { class: "num" }, q[p].held ?? "–"), el("td", { class: "num" }, q[p].running ?? "–"),
    el("td", {}, q[p].oldest_wait_s == null ? "–" : ago(q[p].oldest_wait_s)))), "", 5);
  fill("owners", (q.owners || []).map((o) => el("tr", {},
    el("td", {}, o.owner), el("td", { class: "num" }, o.pending),
    el("td", { class: "num" }, o.bulk_queued))), "no owner (no API keys)", 3);
}

function tally(id, counts) {
  const parts = Object.entries(counts || {}).map(([k, v]) => v + " " + k);
  document.getElementById(id).textContent = parts.length ? "(" + parts.join(", ") + ")" : "";
}

function jobCounts(c) {
  return [["succeeded", "ok"], ["failed", "bad"], ["running", ""], ["queued", "muted"],
          ["cancelled", "warn"], ["expired", "bad"]]
    .filter(([k]) => c[k]).map(([k, cls]) => el("span", { class: cls }, c[k] + " " + k + " "));
}

function drawJobs(jobs) {
  fill("jobs", jobs.map((j) => {
    const c = j.counts;
    const finished = c.succeeded + c.failed + c.cancelled + c.expired;
    const open = !["completed", "cancelled", "failed"].includes(j.status);
    return el("tr", { "data-id": j.id, "data-finished": finished, "data-total": c.total },
      el("td", { title: j.owner ? "owner: " + j.owner : null }, j.id),
      el("td", { class: "st-" + j.status, title: j.error || null }, j.status),
      el("td", {}, bar(j.progress, finished + " / " + c.total)),
      el("td", {}, jobCounts(c)), el("td", { class: "num" }, rate(j.rate)),
      el("td", {}, open && j.eta_s !== null ? ago(j.eta_s) : "–"),
      el("td", {},
        el("a", { href: "#", onclick: (e) => { e.preventDefault();
          download("/v1/jobs/" + encodeURIComponent(j.id) + "/results", j.id + ".jsonl"); } },
          "results"), " ",
        open ? cancelButton("DELETE", "/v1/jobs/" + encodeURIComponent(j.id)) : null));
  }), "no job", 7);
}

function drawBatches(batches) {
  fill("batches", batches.map((b) => {
    const c = b.request_counts || { total: 0, completed: 0, failed: 0 };
    const finished = c.completed + c.failed;
    const open = !["completed", "cancelled", "failed", "expired"].includes(b.status);
    const file = (id, label) => id ? el("a", { href: "#", onclick: (e) => { e.preventDefault();
      download("/v1/files/" + encodeURIComponent(id) + "/content", b.id + "_" + label + ".jsonl"); } },
      label) : null;
    return el("tr", { "data-id": b.id, "data-finished": finished, "data-total": c.total },
      el("td", { title: b.owner ? "owner: " + b.owner : null }, b.id),
      el("td", { class: "st-" + b.status }, b.status),
      el("td", {}, bar(b.progress, finished + " / " + c.total)),
      el("td", {}, el("span", { class: "ok" }, c.completed + " completed "),
        c.failed ? el("span", { class: "bad" }, c.failed + " failed") : null),
      el("td", { class: "num" }, rate(b.rate)),
      el("td", {}, open && b.eta_s !== null ? ago(b.eta_s) : "–"),
      el("td", {}, file(b.output_file_id, "output"), " ", file(b.error_file_id, "errors"), " ",
        open ? cancelButton("POST", "/v1/batches/" + encodeURIComponent(b.id) + "/cancel") : null));
  }), "no batch", 7);
}

function drawFailures(failures, now) {
  fill("failures", failures.map((f) => el("tr", { "data-id": f.id },
    el("td", { title: when(f.at) }, ago(now - f.at) + " ago"),
    el("td", { class: "bad" }, f.code || "–"), el("td", { class: "wrap" }, f.message || ""),
    el("td", { title: f.custom_id || null }, f.id), el("td", {}, f.job_id || "–"),
    el("td", {}, f.worker || "–"))), "no recent failure", 6);
}

function draw(data) {
  drawWorkers(data.workers);
  drawQueues(data.queues);
  drawJobs(data.jobs);
  tally("jobs-tally", data.job_statuses);
  drawBatches(data.batches);
  tally("batches-tally", data.batch_statuses);
  drawFailures(data.failures, data.at);
  const scope = data.scope || {};
  document.getElementById("who").textContent = scope.owner
    ? "key: " + scope.owner + (scope.admin ? " (admin: everything)" : " (its own work)")
    : "";
}

async function refresh() {
  if (pending) return;
  pending = true;
  const state = document.getElementById("state");
  try {
    const r = await fetch("/v1/overview", { headers: headers(), cache: "no-store" });
    if (r.status === 401) {
      draw({ workers: [], jobs: [], batches: [], failures: [], at: 0, scope: {},
             queues: { interactive: {}, bulk: {}, owners: [] } });
      state.textContent = "an API key is needed";
      showError(apiKey() ? "this API key is not valid" : "enter an API key to see the queue");
      document.getElementById("key").focus();
      return;
    }
    if (!r.ok) throw new Error(await failure(r));
    const data = await r.json();
    draw(data);
    showError("");
    state.textContent = "live · updated " + new Date(data.at * 1000).toLocaleTimeString();
    state.dataset.at = String(data.at);
  } catch (err) {
    state.textContent = "not updated";
    showError("cannot read the overview: " + err.message);
  } finally {
    pending = false;
  }
}

function start() {
  document.getElementById("keyform").addEventListener("submit", (e) => {
    e.preventDefault();
    const input = document.getElementById("key");
    if (input.value) sessionStorage.setItem(KEY, input.value.trim());
    input.value = "";
    refresh();
  });
  document.getElementById("keyforget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    refresh();
  });
  refresh();
  timer = setInterval(() => { if (!document.hidden) refresh(); }, POLL_MS);
}

document.addEventListener("DOMContentLoaded", start);
