// The tunnel2 inspector page: a live list (Server-Sent Events from /api/events), a detail
// view (/api/requests/{id}) and replay (POST /api/requests/{id}/replay). Everything a
// visitor sent is put in the page as text (textContent), never as HTML.
"use strict";

const exchanges = new Map(); // id -> summary
let selected = null;
let banner = null; // {kind, text} shown above the selected exchange

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "className") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
  }
  return node;
}

function size(bytes) {
  if (bytes < 1024) return bytes + " B";
  if (bytes < 1024 * 1024) return (bytes / 1024).toFixed(1) + " KiB";
  return (bytes / 1024 / 1024).toFixed(1) + " MiB";
}

function millis(seconds) {
  return seconds === null || seconds === undefined ? "…" : (seconds * 1000).toFixed(1) + " ms";
}

function statusCell(e) {
  if (e.status !== null) return el("td", {className: "s" + String(e.status)[0]}, String(e.status));
  if (e.error) return el("td", {className: "err", title: e.error}, "error");
  return el("td", {}, "…");
}

function renderList() {
  const rows = document.getElementById("rows");
  const ids = [...exchanges.keys()].sort((a, b) => b - a); // newest first
  rows.replaceChildren(...ids.map((id) => {
    const e = exchanges.get(id);
    const tag = e.replay_of === null ? null : el("span", {className: "tag"}, "replay of #" + e.replay_of);
    return el("tr", {"data-id": String(id), className: id === selected ? "selected" : "",
                     onclick: () => select(id)},
      el("td", {}, String(id)),
      el("td", {}, e.method),
      el("td", {className: "target", title: e.target}, e.target, " ", tag),
      statusCell(e),
      el("td", {}, millis(e.duration)),
      el("td", {}, size(e.response_size)));
  }));
  document.getElementById("empty").style.display = ids.length ? "none" : "block";
}

function fields(pairs) {
  const list = el("dl");
  for (const [name, value] of pairs) list.append(el("dt", {}, name), el("dd", {}, value));
  return pairs.length ? list : el("p", {}, "(no header fields)");
}

function hexdump(bytes) {
  const lines = [];
  for (let i = 0; i < bytes.length; i += 16) {
    const row = bytes.slice(i, i + 16);
    const hex = [...row].map((b) => b.toString(16).padStart(2, "0")).join(" ");
    const text = [...row].map((b) => (b >= 32 && b < 127 ? String.fromCharCode(b) : ".")).join("");
    lines.push(i.toString(16).padStart(8, "0") + "  " + hex.padEnd(48) + "  " + text);
  }
  return lines.join("\n");
}

function body(b) {
  const note = b.truncated ? size(b.size) + " (first " + size(atob(b.base64).length) + " kept)" : size(b.size);
  if (b.size === 0) return el("p", {}, "(empty body)");
  let content;
  if (b.text !== null) content = b.text;
  else content = hexdump(Uint8Array.from(atob(b.base64), (c) => c.charCodeAt(0)));
  return el("div", {}, el("p", {}, (b.text !== null ? "text, " : "binary, ") + note), el("pre", {}, content));
}

function renderDetail(e) {
  const detail = document.getElementById("detail");
  const replay = el("button", {id: "replay", onclick: () => replayExchange(e.id)}, "Replay");
  if (e.not_replayable) {
    replay.disabled = true;
    replay.title = e.not_replayable;
  }
  const shown = banner === null ? el("div", {id: "banner"})
    : el("div", {id: "banner", className: banner.kind}, banner.text);
  const response = e.status === null
    ? el("p", {className: e.error ? "err" : ""}, e.error || "waiting for the response…")
    : el("div", {},
        el("p", {className: "s" + String(e.status)[0]}, "HTTP/1.1 " + e.status + " " + e.reason),
        fields(e.response_headers),
        el("h3", {}, "Response body"),
        e.upgraded ? el("p", {}, "(upgraded: the bytes after the handshake are not recorded)") : body(e.response_body));
  detail.replaceChildren(
    el("h2", {}, e.method + " " + e.target),
    el("p", {}, replay, " ", e.replay_of === null ? null : el("span", {className: "tag"}, "replay of #" + e.replay_of),
       e.not_replayable ? el("span", {className: "tag"}, e.not_replayable) : null),
    shown,
    el("h3", {}, "Timing"),
    el("dl", {},
      el("dt", {}, "started"), el("dd", {}, new Date(e.started_at * 1000).toISOString()),
      el("dt", {}, "response head after"), el("dd", {}, millis(e.response_after)),
      el("dt", {}, "complete after"), el("dd", {}, millis(e.duration)),
      e.error ? el("dt", {}, "error") : null, e.error ? el("dd", {className: "err"}, e.error) : null),
    el("h3", {}, "Request"),
    el("p", {}, e.method + " " + e.target + " HTTP/" + e.http_version),
    fields(e.request_headers),
    el("h3", {}, "Request body"),
    body(e.request_body),
    el("h3", {}, "Response"),
    response);
}

async function select(id, keepBanner) {
  if (!keepBanner) banner = null;
  selected = id;
  renderList();
  const answer = await fetch("/api/requests/" + id, {headers: {"Accept": "application/json"}});
  const data = await answer.json();
  if (selected !== id) return;
  if (!answer.ok) {
    document.getElementById("detail").replaceChildren(el("p", {className: "err"}, data.error));
    return;
  }
  renderDetail(data);
}

async function replayExchange(id) {
  const button = document.getElementById("replay");
  button.disabled = true;
  button.textContent = "Replaying…";
  let data;
  let ok = false;
  try {
    const answer = await fetch("/api/requests/" + id + "/replay", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: "{}"});
    data = await answer.json();
    ok = answer.ok;
  } catch (error) {
    data = {error: "the inspector did not answer: " + error};
  }
  if (data.exchange) {
    exchanges.set(data.exchange.id, data.exchange);
    banner = ok ? {kind: "info", text: "Replay of #" + id + " answered " + data.exchange.status}
                : {kind: "error", text: "Replay of #" + id + " failed: " + data.error};
    await select(data.exchange.id, true);
  } else {
    banner = {kind: "error", text: "Replay of #" + id + " failed: " + data.error};
    await select(id, true);
  }
}

function listen() {
  const state = document.getElementById("state");
  const events = new EventSource("/api/events");
  events.onopen = () => { state.textContent = "live"; };
  events.onerror = () => { state.textContent = "disconnected: retrying…"; };
  events.onmessage = (message) => {
    const data = JSON.parse(message.data);
    for (const id of [...exchanges.keys()]) if (id < data.oldest) exchanges.delete(id);
    let refresh = false;
    for (const e of data.requests) {
      exchanges.set(e.id, e);
      if (e.id === selected) refresh = true;
    }
    renderList();
    if (refresh) select(selected, true);
  };
}

listen();
