// aipipe ui: asks /api/summary and /api/operations and draws the page (plain SVG, no libraries).
// Money arrives as exact decimal text and is shown exactly: trailing zeros past the cents go.
"use strict";

const COLORS = ["#1f6feb", "#f79009", "#12b76a", "#d92d20", "#7a5af8", "#0e9384", "#ee46bc",
                "#667085", "#b54708", "#2e90fa"];
const $ = (id) => document.getElementById(id);
let loads = 0, asked = 0;  // answers shown; requests made (a late answer to an old one is dropped)

function el(tag, attrs, ...children) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS("http://www.w3.org/2000/svg", tag.slice(4))
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

function groups(digits) {
  return digits.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
}

// "1234.500000000" -> "$1,234.50"; "0.039000000" -> "$0.039"; exact, no floating point.
function usd(text) {
  let s = String(text);
  const negative = s.startsWith("-");
  if (negative) s = s.slice(1);
  let [whole, frac = ""] = s.split(".");
  frac = frac.replace(/0+$/, "");
  while (frac.length < 2) frac += "0";
  return (negative ? "-$" : "$") + groups(whole) + "." + frac;
}

function count(n) {
  return groups(String(n));
}

function daysBetween(from, to) {
  const out = [];
  for (let d = new Date(from + "T00:00:00Z"); d <= new Date(to + "T00:00:00Z");
       d.setUTCDate(d.getUTCDate() + 1)) out.push(d.toISOString().slice(0, 10));
  return out;
}

function niceMax(value) {
  if (value <= 0) return 1;
  const step = Math.pow(10, Math.floor(Math.log10(value)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= value) return m * step;
  return 10 * step;
}

function chart(figure, series, days) {
  figure.replaceChildren(el("figcaption", {text: figure.dataset.title}));
  if (series.length === 0) {
    figure.append(el("p", {class: "none", text: "No spend in this range."}));
    return;
  }
  const W = 440, H = 200, left = 52, right = 6, top = 8, bottom = 26;
  const totals = days.map((d) => series.reduce((a, s) => a + Number(s.days[d] || 0), 0));
  const max = niceMax(Math.max(...totals));
  const svg = el("svg:svg", {viewBox: `0 0 ${W} ${H}`, role: "img",
                             "aria-label": figure.dataset.title});
  const plotH = H - top - bottom, band = (W - left - right) / days.length;
  const y = (v) => top + plotH - (v / max) * plotH;
  for (let i = 0; i <= 4; i++) {
    const v = (max * i) / 4;
    svg.append(el("svg:line", {x1: left, x2: W - right, y1: y(v), y2: y(v), stroke: "#e4e7ec"}));
    svg.append(el("svg:text", {x: left - 6, y: y(v) + 4, "text-anchor": "end",
                               text: "$" + (max < 1 ? v.toFixed(3) : v.toLocaleString("en-US"))}));
  }
  const every = Math.max(1, Math.ceil(days.length / 6));
  days.forEach((day, i) => {
    let base = 0;
    series.forEach((s, k) => {
      const v = Number(s.days[day] || 0);
      if (v <= 0) return;
      const rect = el("svg:rect", {x: left + i * band + band * 0.12, width: Math.max(1, band * 0.76),
                                   y: y(base + v), height: Math.max(0.5, y(base) - y(base + v)),
                                   fill: COLORS[k % COLORS.length]});
      rect.append(el("svg:title", {text: `${day} · ${s.name}: ${usd(s.days[day])}`}));
      svg.append(rect);
      base += v;
    });
    if (i % every === 0) {
      svg.append(el("svg:text", {x: left + i * band + band / 2, y: H - bottom + 16,
                                 "text-anchor": "middle", text: day.slice(5)}));
    }
  });
  figure.append(svg);
  const legend = el("table", {class: "legend"});
  legend.append(el("tr", {}, el("th", {text: ""}), el("th", {class: "num", text: "Spend (USD)"}),
                   el("th", {class: "num", text: "Operations"})));
  series.forEach((s, k) => {
    const swatch = el("span", {class: "swatch", style: `background:${COLORS[k % COLORS.length]}`});
    let name = document.createTextNode(s.name);
    if (figure.id === "chart-by_client") {
      name = el("button", {type: "button", class: "link", text: s.name,
                           title: `Show the operations of ${s.name}`});
      name.addEventListener("click", () => drill(s.name).catch((e) => showError(e.message)));
    }
    legend.append(el("tr", {"data-name": s.name}, el("td", {}, swatch, name),
                     el("td", {class: "num total", text: usd(s.total_usd)}),
                     el("td", {class: "num ops", text: count(s.operations)})));
  });
  figure.append(legend);
}

function rows(table, list, render, empty) {
  const body = table.tBodies[0];
  body.replaceChildren();
  if (list.length === 0) {
    const cols = table.tHead.rows[0].cells.length;
    body.append(el("tr", {}, el("td", {colspan: cols, class: "none", text: empty})));
    return;
  }
  for (const item of list) body.append(render(item));
}

function budgets(list) {
  rows($("budgets"), list, (b) => el("tr", {"data-client": b.client_id},
    el("td", {text: b.client_id}),
    el("td", {text: `${b.period} from ${b.period_start.slice(0, 10)}`}),
    el("td", {class: "num budget", text: usd(b.budget_usd)}),
    el("td", {class: "num spent", text: usd(b.spend_usd)}),
    el("td", {class: "num used", text: b.used_percent === null ? "–" : `${b.used_percent} %`}),
    el("td", {class: "thresholds"}, ...(b.thresholds_reached.length
      ? b.thresholds_reached.map((t) => el("span", {class: `badge t${t}`, text: `${t} %`}))
      : [el("span", {class: "none", text: "none"})])),
    el("td", {class: b.over_budget ? "over" : "fine",
              text: b.over_budget ? "over budget: rejecting" : "within budget"})),
  "No budgets set (aipipe budget set, or AIPIPE_BUDGET_USD).");
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v) q.set(k, v);
  return q.toString();
}

async function ask(path, params) {
  // X-Aipipe-UI: the API answers requests that carry it (a page elsewhere cannot send it)
  const response = await fetch(`${path}?${query(params)}`,
                               {headers: {Accept: "application/json", "X-Aipipe-UI": "1"}});
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function filters() {
  return {from: $("from").value, to: $("to").value, client: $("client").value};
}

function showError(message) {
  $("error").hidden = !message;
  $("error").textContent = message || "";
}

async function load() {
  const f = filters(), mine = ++asked;
  $("status").textContent = "Loading…";
  try {
    const data = await ask("/api/summary", f);
    if (mine !== asked) return;
    showError("");
    history.replaceState(null, "", "?" + query(f));
    const select = $("client"), chosen = select.value;
    select.replaceChildren(el("option", {value: "", text: "All clients"}),
                           ...data.clients.map((c) => el("option", {value: c, text: c})));
    select.value = data.clients.includes(chosen) ? chosen : "";
    $("total-usd").textContent = usd(data.total_usd);
    $("total-ops").textContent = count(data.operations);
    $("total-rejected").textContent = count(data.rejections.reduce((a, r) => a + r.count, 0));
    $("total-errors").textContent = count(data.provider_errors.reduce((a, e) => a + e.count, 0));
    const days = daysBetween(data.from, data.to);
    for (const name of ["by_client", "by_model", "by_operation_type"]) {
      chart($(`chart-${name}`), data[name], days);
    }
    budgets(data.budgets);
    const most = Math.max(1, ...data.rejections.map((r) => r.count));
    rows($("rejections"), data.rejections, (r) => el("tr", {"data-reason": r.reason},
      el("td", {text: r.reason}), el("td", {class: "num", text: count(r.count)}),
      el("td", {}, el("span", {class: "bar", style: `width:${Math.round(120 * r.count / most)}px`}))),
      "No rejected requests in this range.");
    rows($("provider-errors"), data.provider_errors, (e) => el("tr", {},
      el("td", {text: e.provider}), el("td", {text: e.model}), el("td", {text: e.error || "–"}),
      el("td", {class: "num", text: count(e.count)}),
      el("td", {text: e.last_at.slice(0, 19).replace("T", " ")})),
      "No failed operations in this range.");
    if (f.client) await drill(f.client); else clearDrill();
    $("status").textContent = `Updated ${new Date().toISOString().slice(11, 19)} UTC`;
  } catch (err) {
    if (mine !== asked) return;
    showError(err.message);
    $("status").textContent = "Not updated";
  }
  document.body.dataset.loads = String(++loads);
}

function clearDrill() {
  $("drilldown-title").textContent =
    "Operations: choose a client (the Client filter, or a name in the chart by client)";
  rows($("operations"), [], null, "No client chosen.");
  delete $("drilldown").dataset.client;
}

function usage(o) {
  const parts = [];
  if (o.input_tokens) parts.push(`${count(o.input_tokens)} tokens in`);
  if (o.output_tokens) parts.push(`${count(o.output_tokens)} tokens out`);
  if (o.image_count) parts.push(`${o.image_count} image${o.image_count > 1 ? "s" : ""}`);
  if (o.video_seconds !== null) parts.push(`${Number(o.video_seconds)} s video`);
  return parts.join(", ") || "–";
}

async function drill(client) {
  const f = filters();
  const data = await ask("/api/operations", {from: f.from, to: f.to, client});
  $("drilldown").dataset.client = client;
  $("drilldown-title").textContent = `Operations of ${client}: ${count(data.count)}, ` +
    `${usd(data.total_usd)}` + (data.truncated ? ` (the latest ${data.operations.length} shown)` : "");
  rows($("operations"), data.operations, (o) => el("tr", {"data-request": o.request_id},
    el("td", {text: o.requested_at.slice(0, 19).replace("T", " ")}),
    el("td", {class: "uri", text: o.request_id}),
    el("td", {text: o.operation_type.replace("_generation", "")}),
    el("td", {text: o.model}),
    el("td", {class: o.success ? "fine" : "over", text: o.success ? "ok" : `failed: ${o.error}`}),
    el("td", {class: "num cost", text: usd(o.cost_usd)}),
    el("td", {text: usage(o)}),
    el("td", {class: "uri outputs"}, ...(o.outputs.length
      ? o.outputs.map((x) => el("div", {text: `${x.uri} (${x.mime_type})`}))
      : [el("span", {class: "none", text: "none"})]))),
    "No operations of this client in this range.");
}

function start() {
  const url = new URLSearchParams(location.search);
  const today = new Date().toISOString().slice(0, 10);
  const monthAgo = new Date(Date.now() - 29 * 86400000).toISOString().slice(0, 10);
  $("from").value = url.get("from") || monthAgo;
  $("to").value = url.get("to") || today;
  if (url.get("client")) {
    $("client").append(el("option", {value: url.get("client"), text: url.get("client")}));
    $("client").value = url.get("client");
  }
  $("filters").addEventListener("submit", (e) => { e.preventDefault(); load(); });
  $("client").addEventListener("change", load);
  load();
}

document.addEventListener("DOMContentLoaded", start);
