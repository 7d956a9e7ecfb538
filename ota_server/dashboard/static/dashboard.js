// edgec dashboard: live tables, wave progress and plots. Polls /ui/data/* every 2 s; an
// operator's actions POST with the page's CSRF token. No framework, no build step.
"use strict";
(function () {
  const POLL_MS = 2000;
  const page = document.body.dataset.page;
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

  function text(value, digits) {
    if (value === null || value === undefined || value === "") return "-";
    if (typeof value === "number" && digits !== undefined) return value.toFixed(digits);
    return String(value);
  }
  function cell(row, value, cls) {
    const td = row.insertCell();
    td.textContent = text(value);
    if (cls) td.className = cls;
    return td;
  }
  function link(row, href, label) {
    const td = row.insertCell();
    const a = document.createElement("a");
    a.href = href;
    a.textContent = label;
    td.appendChild(a);
  }
  async function getJson(url) {
    const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (response.status === 401) { window.location = "/ui/login?next=" + encodeURIComponent(location.pathname); return null; }
    if (!response.ok) throw new Error(url + ": " + response.status);
    return response.json();
  }
  async function post(url) {
    const response = await fetch(url, { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf } });
    let body = {};
    try { body = await response.json(); } catch (e) { /* not JSON */ }
    return { ok: response.ok, status: response.status, body: body };
  }
  function stamp() {
    const el = document.getElementById("updated");
    if (el) el.textContent = "updated " + new Date().toLocaleTimeString();
  }

  // -- tables -------------------------------------------------------------------------------
  function fleetRows(devices) {
    const body = document.querySelector("#fleet-table tbody");
    if (!body) return;
    body.textContent = "";
    for (const d of devices) {
      const row = body.insertRow();
      row.dataset.device = d.id;
      const t = d.telemetry || {};
      link(row, "/ui/devices/" + encodeURIComponent(d.id), d.id);
      cell(row, d.group); cell(row, d.profile); cell(row, d.installed_release); cell(row, d.desired_release);
      cell(row, d.status, "status status-" + d.status); cell(row, d.last_seen);
      cell(row, t.p50_ms, "num"); cell(row, t.p95_ms, "num"); cell(row, t.drift, "drift drift-" + (t.drift || "none"));
    }
    const count = document.getElementById("fleet-count");
    if (count) count.textContent = devices.length + " devices";
  }
  function rolloutRows(rollouts) {
    const body = document.querySelector("#rollout-list tbody");
    if (!body) return;
    body.textContent = "";
    for (const r of rollouts) {
      const row = body.insertRow();
      row.dataset.rollout = r.id;
      link(row, "/ui/rollouts/" + encodeURIComponent(r.id), r.id);
      cell(row, r.release); cell(row, r.group); cell(row, r.state, "state state-" + r.state);
      cell(row, r.wave); cell(row, r.created_at); cell(row, r.reason || "");
    }
  }
  function rolloutView(r) {
    const state = document.getElementById("state");
    state.textContent = r.state;
    state.className = "state state-" + r.state;
    document.getElementById("wave").textContent = r.wave;
    document.getElementById("reason").textContent = r.reason || "";
    const waves = document.getElementById("waves");
    waves.textContent = "";
    for (const w of r.waves) {
      const installed = w.installed || 0;
      const div = document.createElement("div");
      div.className = "wave";
      div.dataset.wave = w.wave; div.dataset.devices = w.devices; div.dataset.installed = installed;
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = "wave " + w.wave + " (" + w.size + "): ";
      const count = document.createElement("span");
      count.className = "count";
      count.textContent = installed + "/" + w.devices;
      label.appendChild(count);
      label.appendChild(document.createTextNode(" installed"));
      const bar = document.createElement("progress");
      bar.max = w.devices || 1; bar.value = installed;
      div.appendChild(label); div.appendChild(bar);
      waves.appendChild(div);
    }
    const rules = document.querySelector("#rules tbody");
    rules.textContent = "";
    for (const rule of r.rules) {
      const row = rules.insertRow();
      cell(row, rule.rule); cell(row, rule.canary, "num"); cell(row, rule.control, "num");
      cell(row, rule.threshold, "num"); cell(row, rule.verdict, "verdict verdict-" + rule.verdict);
    }
    const cohorts = document.querySelector("#cohorts tbody");
    cohorts.textContent = "";
    for (const name of ["canary", "control"]) {
      const c = r[name], row = cohorts.insertRow();
      row.dataset.cohort = name;
      cell(row, name); cell(row, c.devices, "num"); cell(row, c.windows, "num"); cell(row, c.p50_ms, "num");
      cell(row, c.p95_ms, "num"); cell(row, c.p99_ms, "num"); cell(row, c.error_rate, "num"); cell(row, c.drift);
    }
    const devices = document.querySelector("#rollout-devices tbody");
    devices.textContent = "";
    for (const d of r.devices) {
      const row = devices.insertRow();
      row.dataset.device = d.device;
      link(row, "/ui/devices/" + encodeURIComponent(d.device), d.device);
      cell(row, d.wave, "num"); cell(row, d.state, "state"); cell(row, d.from); cell(row, d.detail || "");
    }
  }

  // -- plots --------------------------------------------------------------------------------
  const charts = new Map();
  function plotSeries(kind, data) {
    // [[x...], [y...]...] and uPlot series options for one plot kind
    const x = data.t, columns = [x], series = [{}];
    const releases = Object.keys(data.releases);
    let n = 0;
    function add(label, values, dash) {
      columns.push(values);
      series.push({ label: label, stroke: COLORS[n++ % COLORS.length], width: 2, dash: dash, spanGaps: false });
    }
    for (const release of releases) {
      const s = data.releases[release];
      if (kind === "latency") add(release, s.p95_ms);
      else if (kind === "latency-all") { add("p50", s.p50_ms); add("p95", s.p95_ms); add("p99", s.p99_ms); }
      else if (kind === "rate") add(release, s.requests_per_s);
      else if (kind === "errors") add(release, s.error_rate);
      else if (kind === "psi") add(release, x.map((_, i) => {
        let worst = null;
        for (const name in s.psi) { const v = s.psi[name][i]; if (v !== null && (worst === null || v > worst)) worst = v; }
        return worst;
      }));
      else if (kind === "psi-inputs") for (const name in s.psi) add(name + " (" + release + ")", s.psi[name]);
    }
    return { columns: columns, series: series };
  }
  function drawPlots(section, data) {
    for (const box of section.querySelectorAll(".plot")) {
      const kind = box.dataset.plot;
      const made = plotSeries(kind, data);
      box.dataset.points = String(made.columns.slice(1).reduce((n, c) => n + c.filter((v) => v !== null).length, 0));
      const key = box;
      const old = charts.get(key);
      const signature = made.series.map((s) => s.label).join("|");
      if (old && old.signature === signature) { old.chart.setData(made.columns); continue; }
      if (old) old.chart.destroy();
      const width = Math.max(box.clientWidth - 8, 280);
      const scales = { x: { time: true } };
      if (kind === "errors" || kind === "psi" || kind === "psi-inputs") {
        // a flat zero line is drawn near the bottom, not in the middle of 0..100
        scales.y = { range: (u, min, max) => [0, Math.max(max || 0, kind === "errors" ? 0.01 : 0.1)] };
      }
      const chart = new uPlot({ width: width, height: 200, series: made.series, scales: scales,
        axes: [{}, { size: 60 }] }, made.columns, box);
      charts.set(key, { chart: chart, signature: signature });
    }
  }
  async function refreshPlots() {
    for (const section of document.querySelectorAll("section.plots")) {
      const query = section.dataset.telemetry;
      const data = await getJson("/ui/data/telemetry" + (query ? "?" + query : ""));
      if (data && typeof uPlot !== "undefined") drawPlots(section, data);
    }
  }

  // -- the page's loop ----------------------------------------------------------------------
  async function refresh() {
    try {
      if (page === "fleet") {
        const data = await getJson("/ui/data/fleet");
        if (data) { fleetRows(data.devices); rolloutRows(data.rollouts); }
      } else if (page === "rollouts") {
        const data = await getJson("/ui/data/fleet");
        if (data) rolloutRows(data.rollouts);
      } else if (page === "rollout") {
        const data = await getJson("/ui/data/rollouts/" + encodeURIComponent(document.body.dataset.rollout));
        if (data) rolloutView(data);
      }
      await refreshPlots();
      stamp();
    } catch (e) {
      const el = document.getElementById("updated");
      if (el) el.textContent = "update failed: " + e.message;
    }
  }

  for (const button of document.querySelectorAll("#actions button")) {
    button.addEventListener("click", async function () {
      const action = button.dataset.action;
      const result = document.getElementById("action-result");
      result.textContent = action + "…";
      const answer = await post("/ui/rollouts/" + encodeURIComponent(document.body.dataset.rollout) + "/" + action);
      result.textContent = answer.ok ? action + ": done" : action + " refused (" + answer.status + "): " + (answer.body.error || "");
      result.className = answer.ok ? "ok" : "error";
      if (answer.ok) rolloutView(answer.body);
    });
  }
  const logout = document.getElementById("logout");
  if (logout) logout.addEventListener("click", async function () {
    await post("/ui/logout");
    window.location = "/ui/login";
  });
  if (page && page !== "login" && page !== "missing") {
    refresh();
    setInterval(refresh, POLL_MS);
  }
})();
