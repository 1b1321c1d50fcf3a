// The console's behaviour: every page is server-rendered, and this fills it in by calling
// the control API (/api/v1) with the session cookie, sending the CSRF token on unsafe
// requests, exactly as any API client does. Elements say what they want with data-*
// attributes (docs/console.md); nothing here is inline, as the page's CSP forbids it.
"use strict";

(function () {
  const CSRF_COOKIE = "ot_csrf";

  function cookie(name) {
    for (const part of document.cookie.split(";")) {
      const [k, ...v] = part.trim().split("=");
      if (k === name) return decodeURIComponent(v.join("="));
    }
    return "";
  }

  class ApiError extends Error {
    constructor(status, message, code) {
      super(message);
      this.status = status;
      this.code = code || "";
    }
  }

  // `body`: JSON, or with `raw` a File sent as it is (an attachment: the API decides its
  // type from the bytes).
  async function api(method, url, body, raw) {
    const headers = { Accept: "application/json" };
    if (method !== "GET") headers["X-CSRF-Token"] = cookie(CSRF_COOKIE);
    const init = { method, headers, credentials: "same-origin" };
    if (raw) {
      headers["Content-Type"] = "application/octet-stream";
      init.body = body;
    } else if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const r = await fetch(url, init);
    const type = r.headers.get("content-type") || "";
    const data = r.status === 204 ? null : type.includes("json") ? await r.json() : await r.text();
    if (!r.ok) {
      const e = data && data.error ? data.error : {};
      if (r.status === 401 && !location.pathname.startsWith("/signin")) {
        location.assign("/signin?next=" + encodeURIComponent(location.pathname));
      }
      throw new ApiError(r.status, e.message || "The request failed (" + r.status + ").", e.code);
    }
    return data;
  }

  // -- values ------------------------------------------------------------------------------

  function get(obj, path) {
    let v = obj;
    for (const k of path.split(".")) v = v == null ? undefined : v[k];
    return v;
  }

  function set(obj, path, value) {
    const keys = path.split(".");
    let o = obj;
    for (const k of keys.slice(0, -1)) o = o[k] = o[k] || {};
    o[keys[keys.length - 1]] = value;
  }

  function todayUtc() {
    const d = new Date();
    return new Date(Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), d.getUTCDate())).toISOString();
  }

  // "{name}" in a URL: from `values` (a form's fields or a table row), URL-encoded;
  // "{q_name}" from the page's own query string (a ticket page's ?id=).
  function expand(url, values) {
    const query = new URLSearchParams(location.search);
    return url.replace(/\{(\w+)\}/g, (_, k) => {
      if (k === "today") return encodeURIComponent(todayUtc());
      if (k.startsWith("q_")) return encodeURIComponent(query.get(k.slice(2)) || "");
      return encodeURIComponent(get(values, k) ?? "");
    });
  }

  function format(value, fmt) {
    if (value === null || value === undefined || value === "") return "";
    switch (fmt) {
      case "time": {
        const d = typeof value === "number" ? new Date(value / 1000) : new Date(value);
        return isNaN(d) ? String(value) : d.toISOString().replace("T", " ").slice(0, 19);
      }
      case "nano": return nano(value);
      case "ms": return (Number(value) / 1000).toFixed(1) + " ms";
      case "list": return Array.isArray(value) ? value.join(", ") : String(value);
      // An application's keys: name and display id of each.
      case "keys": return Array.isArray(value) ? value.map((k) => k.name + " (" + k.display + ")").join(", ") : String(value);
      case "yesno": return value === true ? "yes" : value === false ? "no" : String(value);
      case "json": return JSON.stringify(value, null, 1);
      // [{group, role}, ...] (an identity provider's group-to-role map) as "group = role" lines.
      case "pairs": return Array.isArray(value)
        ? value.map((p) => Object.values(p).join(" = ")).join("\n") : String(value);
      default: return typeof value === "object" ? JSON.stringify(value) : String(value);
    }
  }

  // Integer nano-units (the call log's cost) as an exact decimal: string digits, no float.
  function nano(value) {
    const s = String(value);
    if (!/^-?\d+$/.test(s)) return s;
    const neg = s.startsWith("-");
    const digits = (neg ? s.slice(1) : s).padStart(10, "0");
    const whole = digits.slice(0, -9).replace(/^0+(?=\d)/, "");
    const frac = digits.slice(-9).replace(/0+$/, "");
    return (neg ? "-" : "") + whole + (frac ? "." + frac : "");
  }

  function showError(el, err) {
    if (!el) return;
    el.textContent = err ? err.message + (err.code ? " (" + err.code + ")" : "") : "";
  }

  function errorSlot(el) {
    const sel = el.dataset.error;
    return sel ? document.querySelector(sel) : el.querySelector(".form-error");
  }

  // -- results shown once (new keys, secrets, payment references) ---------------------------

  // A query's answer ({columns, rows}) as a table, every cell as text.
  function showGrid(box, data) {
    const table = document.createElement("table");
    const head = table.createTHead().insertRow();
    for (const c of data.columns) {
      const th = document.createElement("th");
      th.textContent = c;
      head.append(th);
    }
    const body = table.createTBody();
    for (const row of data.rows) {
      const tr = body.insertRow();
      row.forEach((v, i) => {
        const td = tr.insertCell();
        td.dataset.label = data.columns[i];
        td.textContent = format(v);
      });
    }
    const note = document.createElement("p");
    note.className = "hint";
    note.textContent = data.row_count + " rows" + (data.truncated ? " (truncated)" : "") +
      " in " + data.elapsed_ms + " ms";
    const wrap = document.createElement("div");
    wrap.className = "scroll";
    wrap.append(table);
    box.replaceChildren(note, wrap);
    box.hidden = false;
  }

  function showResult(box, data, values) {
    if (!box || !data) return;
    if (box.dataset.grid !== undefined) return showGrid(box, data);
    box.replaceChildren();
    const label = document.createElement("p");
    label.textContent = box.dataset.label || "";
    box.append(label);
    const dl = document.createElement("dl");
    for (const f of (box.dataset.show || "").split(",").filter(Boolean)) {
      const v = get(data, f);
      if (v === undefined || v === null) continue;
      const dt = document.createElement("dt");
      dt.textContent = f;
      const dd = document.createElement("dd");
      dd.className = "value";
      dd.dataset.f = f;
      dd.textContent = format(v);
      dl.append(dt, dd);
    }
    box.append(dl);
    if (box.dataset.link) {
      // A page about the answer (a new incident's thread).
      const [url, text] = box.dataset.link.split("|");
      const a = document.createElement("a");
      a.href = expand(url, data);
      a.textContent = text;
      box.append(a);
    }
    if (box.dataset.download) {
      const [url, text] = box.dataset.download.split("|");
      const a = document.createElement("a");
      a.href = expand(url, values || data);
      a.textContent = text;
      a.setAttribute("download", "");
      box.append(a);
    }
    box.hidden = false;
  }

  // -- loaders: dl/pre (one object) and tables (lists) -------------------------------------

  const loaders = new Map();

  function fillObject(el, data) {
    if (el.dataset.first) data = (get(data, el.dataset.first) || [])[0] || {};
    if (el.tagName === "PRE") {
      el.textContent = format(data, "json");
      return;
    }
    for (const part of el.querySelectorAll("[data-each]")) {
      const items = get(data, part.dataset.each);
      if (part.tagName === "TABLE") renderTable(part, Array.isArray(items) ? items : []);
      else renderList(part, Array.isArray(items) ? items : []);
    }
    for (const dd of el.querySelectorAll("[data-f]")) {
      if (dd.closest("[data-each]")) continue;
      let v = get(data, dd.dataset.f);
      if (v === undefined || v === null) v = dd.dataset.default ?? "";
      let text = format(v, dd.dataset.fmt);
      if (dd.dataset.unit && data[dd.dataset.unit]) text += " " + data[dd.dataset.unit];
      dd.textContent = text;
    }
  }

  function rowActions(th, row, table) {
    const cell = document.createElement("td");
    cell.dataset.label = th.textContent;
    cell.className = "actions";
    for (const spec of (th.dataset.actions || "").split(";").filter(Boolean)) {
      // text|method|url|condition|fields of the row sent as the JSON body
      const [text, method, url, when, fields] = spec.split("|");
      if (when) {
        const [k, v] = when.split("=");
        if (String(get(row, k)) !== v) continue;
      }
      const b = document.createElement("button");
      b.type = "button";
      b.className = "small";
      b.textContent = text;
      b.addEventListener("click", async () => {
        if (method === "DELETE" && !confirm(text + "?")) return;
        const slot = errorSlot(table);
        showError(slot, null);
        try {
          const body = fields
            ? Object.fromEntries(fields.split(",").map((f) => [f, get(row, f)]))
            : undefined;
          const data = await api(method, expand(url, row), body);
          const box = table.dataset.result && document.querySelector(table.dataset.result);
          if (box && data && get(data, box.dataset.show.split(",")[0]) !== undefined) {
            showResult(box, data, row);
          }
          await reload(table);
          for (const sel of (table.dataset.reload || "").split(",").filter(Boolean)) {
            const el = document.querySelector(sel);
            if (el) await reload(el);
          }
        } catch (err) {
          showError(slot, err);
        }
      });
      cell.append(b);
    }
    for (const spec of (th.dataset.links || "").split(";").filter(Boolean)) {
      const [text, url] = spec.split("|");
      const a = document.createElement("a");
      a.href = expand(url, row);
      a.textContent = text;
      a.setAttribute("download", "");
      a.className = "small";
      cell.append(a, " ");
    }
    return cell;
  }

  function rowsOf(table, data) {
    const items = table.dataset.items ? get(data, table.dataset.items) : data;
    return Array.isArray(items) ? items : [];
  }

  // A list from its <template>: each item a copy, its [data-f] elements filled as text.
  function renderList(list, items) {
    const template = list.querySelector("template");
    list.querySelectorAll(":scope > :not(template)").forEach((n) => n.remove());
    for (const item of items) {
      const node = template.content.firstElementChild.cloneNode(true);
      for (const f of node.querySelectorAll("[data-f]")) f.textContent = format(get(item, f.dataset.f), f.dataset.fmt);
      list.append(node);
    }
  }

  function renderRows(table) {
    const st = loaders.get(table);
    st.shown = st.rows.filter(st.keep || (() => true));
    renderTable(table, st.shown);
  }

  function renderTable(table, shown) {
    const heads = [...table.querySelectorAll("thead th")];
    const body = table.tBodies[0];
    body.replaceChildren();
    for (const row of shown) {
      const tr = document.createElement("tr");
      for (const th of heads) {
        if (th.dataset.actions !== undefined || th.dataset.links !== undefined) {
          tr.append(rowActions(th, row, table));
          continue;
        }
        const td = document.createElement("td");
        td.dataset.label = th.textContent;
        const text = format(get(row, th.dataset.f), th.dataset.fmt);
        if (th.dataset.link) {
          const a = document.createElement("a");
          a.href = expand(th.dataset.link, row);
          a.textContent = text || "(no subject)";
          td.append(a);
        } else {
          td.textContent = text;
        }
        tr.append(td);
      }
      body.append(tr);
    }
    if (!shown.length) {
      const tr = document.createElement("tr");
      const td = document.createElement("td");
      td.colSpan = heads.length;
      td.className = "empty";
      td.textContent = "Nothing here yet.";
      tr.append(td);
      body.append(tr);
    }
  }

  function withParams(url, params) {
    const u = new URL(url, location.origin);
    for (const [k, v] of Object.entries(params || {})) u.searchParams.set(k, v);
    return u.pathname + u.search;
  }

  async function load(el, more) {
    const st = loaders.get(el) || { rows: [], params: {} };
    loaders.set(el, st);
    const slot = errorSlot(el);
    let url = withParams(expand(el.dataset.load, {}), st.params);
    if (more && st.cursor) url = withParams(url, { cursor: st.cursor });
    try {
      const data = await api("GET", url);
      showError(slot, null);
      if (el.tagName !== "TABLE") {
        fillObject(el, data);
        return;
      }
      const rows = rowsOf(el, data);
      st.rows = more ? st.rows.concat(rows) : rows;
      st.cursor = data && data.next_cursor;
      const moreButton = el.dataset.more && document.querySelector(el.dataset.more);
      if (moreButton) moreButton.hidden = !st.cursor;
      renderRows(el);
    } catch (err) {
      if (slot) showError(slot, err);
      else el.dataset.failed = err.message;
    }
  }

  function reload(el) {
    return load(el, false);
  }

  // -- forms -------------------------------------------------------------------------------

  function utc(value) {
    return value ? new Date(value + "Z").toISOString() : "";
  }

  function freshId() {
    return (crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random()).replace(/[^A-Za-z0-9-]/g, "");
  }

  function formValues(form) {
    const out = {};
    for (const input of form.querySelectorAll("input[name], select[name], textarea[name]")) {
      if (input.type === "file") continue;
      const type = input.dataset.type || "";
      // An explicit null (take an assignment away), which an empty field cannot say.
      if (type === "null") {
        set(out, input.name, null);
        continue;
      }
      if (type === "checks") {
        const list = get(out, input.name) || [];
        if (input.checked) list.push(input.value);
        set(out, input.name, list);
        continue;
      }
      let v = input.value.trim();
      if (input.type === "checkbox") v = input.checked;
      else if (v === "") continue;
      else if (type === "int") v = Number.parseInt(v, 10);
      else if (type === "list") v = v.split(",").map((s) => s.trim()).filter(Boolean);
      else if (type === "pairs") {
        // "key = value" per line into [{key, value}] under the names data-keys gives.
        const [k, w] = (input.dataset.keys || "key,value").split(",");
        v = v.split("\n").map((l) => l.trim()).filter(Boolean).map((l) => {
          const at = l.lastIndexOf("=");
          return { [k]: l.slice(0, at < 0 ? l.length : at).trim(), [w]: at < 0 ? "" : l.slice(at + 1).trim() };
        });
      }
      else if (type === "utc") v = utc(v);
      else if (type === "json") {
        // The whole body: the API checks it and says what is wrong.
        try {
          return JSON.parse(v);
        } catch (e) {
          throw new ApiError(0, "Not valid JSON: " + e.message, "invalid_json");
        }
      }
      set(out, input.name, v);
    }
    return out;
  }

  function prepareForm(form) {
    for (const input of form.querySelectorAll('[data-type="fresh-id"]')) input.value = freshId();
  }

  async function submit(form) {
    const slot = form.querySelector(".form-error");
    showError(slot, null);
    if (form.dataset.confirm && !confirm(form.dataset.confirm)) return;
    // A step that cannot be undone asks for a value typed again (an org's id): the input
    // has no name, so it is never sent.
    for (const input of form.querySelectorAll("input[data-same-as]")) {
      const other = form.querySelector(`[name="${input.dataset.sameAs}"]`);
      if (!other || input.value.trim() !== other.value.trim()) {
        showError(slot, new ApiError(0, input.dataset.mismatch || "The values differ.", "not_confirmed"));
        return;
      }
    }
    const method = form.dataset.method || "POST";
    let values;
    try {
      values = formValues(form);
    } catch (err) {
      showError(slot, err);
      return;
    }
    const body = { ...values };
    // Fields named in the URL go there, not in the body.
    for (const m of form.dataset.api.matchAll(/\{(\w+)\}/g)) delete body[m[1]];
    const button = form.querySelector("button[type=submit]");
    if (button) button.disabled = true;
    try {
      const data = await api(method, expand(form.dataset.api, values),
        method === "GET" || method === "DELETE" ? undefined : body);
      // Files go after the record they belong to exists (a new ticket's id).
      for (const input of form.querySelectorAll("input[type=file][data-upload]")) {
        for (const file of input.files) {
          const url = expand(input.dataset.upload, { ...values, ...(data || {}) });
          await api("POST", url + "?filename=" + encodeURIComponent(file.name), file, true);
        }
      }
      const box = form.dataset.result && document.querySelector(form.dataset.result);
      showResult(box, data, values);
      if (form.dataset.go) {
        // Another site the API sent us to (an identity provider's sign-in page): only an
        // absolute http(s) URL, never a script.
        const to = new URL(String(get(data, form.dataset.go) ?? ""), location.origin);
        if (to.protocol === "https:" || to.protocol === "http:") {
          location.assign(to.href);
          return;
        }
      }
      if (form.dataset.nextTo) {
        location.assign(expand(form.dataset.nextTo, data));
        return;
      }
      if (form.dataset.next !== undefined) {
        location.assign(safeNext(form.dataset.next));
        return;
      }
      if (form.dataset.keep === undefined) form.reset();
      prepareForm(form);
      for (const sel of (form.dataset.reload || "").split(",").filter(Boolean)) {
        const el = document.querySelector(sel);
        if (el) await reload(el);
      }
    } catch (err) {
      for (const spec of (form.dataset.reveal || "").split(",").filter(Boolean)) {
        const [code, sel] = spec.split(":");
        if (err.code === code) {
          const row = document.querySelector(sel);
          row.hidden = false;
          const input = row.querySelector("input");
          if (input) { input.required = true; input.focus(); }
        }
      }
      showError(slot, err);
    } finally {
      if (button) button.disabled = false;
    }
  }

  // Only a path of this console: never another host (open redirect).
  function safeNext(fallback) {
    const next = new URLSearchParams(location.search).get("next") || fallback || "/";
    return /^\/(?![/\\])/.test(next) ? next : "/";
  }

  // -- filters, CSV, charts ----------------------------------------------------------------

  function applyFilter(form) {
    const table = document.querySelector(form.dataset.filter);
    const st = loaders.get(table) || { rows: [], params: {} };
    loaders.set(table, st);
    const params = {};
    const matches = [];
    for (const input of form.querySelectorAll("[name]")) {
      const v = input.value.trim();
      if (input.dataset.param !== undefined) {
        if (v) params[input.name] = input.dataset.type === "utc" ? utc(v) : v;
      } else if (input.dataset.match !== undefined && v) {
        matches.push([input.name, v.toLowerCase()]);
      }
    }
    st.keep = (row) => matches.every(([k, v]) => String(get(row, k) ?? "").toLowerCase().includes(v));
    const changed = JSON.stringify(params) !== JSON.stringify(st.params);
    st.params = params;
    if (changed) return reload(table);
    renderRows(table);
    return Promise.resolve();
  }

  // A cell a spreadsheet would run as a formula is written as text.
  function csvCell(v) {
    let s = v === null || v === undefined ? "" : typeof v === "object" ? JSON.stringify(v) : String(v);
    if (/^[=+\-@\t\r]/.test(s) && !/^-?\d+(\.\d+)?$/.test(s)) s = "'" + s;
    return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }

  function exportCsv(table) {
    const st = loaders.get(table);
    const heads = [...table.querySelectorAll("thead th[data-f]")];
    const lines = [heads.map((th) => th.dataset.f).join(",")];
    for (const row of (st && st.shown) || []) {
      // Raw API values, except exact money, written as decimals.
      lines.push(heads.map((th) => {
        const v = get(row, th.dataset.f);
        return csvCell(th.dataset.fmt === "nano" ? nano(v) : v);
      }).join(","));
    }
    const blob = new Blob([lines.join("\r\n") + "\r\n"], { type: "text/csv" });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = (table.id || "export") + ".csv";
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  }

  async function chart(el) {
    try {
      const data = await api("GET", el.dataset.chart);
      const rows = Array.isArray(data.data) ? data.data : [];
      const x = rows.map((r) => get(r, el.dataset.x));
      const [y1, y2] = el.dataset.y.split(",");
      const traces = [{ type: "bar", name: y1, x, y: rows.map((r) => Number(get(r, y1))) }];
      if (y2) {
        traces.push({ type: "scatter", mode: "lines+markers", name: y2, x, yaxis: "y2",
          y: rows.map((r) => Number(get(r, y2))) });
      }
      el.dataset.points = String(rows.length);
      window.Plotly.newPlot(el, traces, {
        margin: { l: 40, r: 40, t: 10, b: 60 }, height: 260, showlegend: true,
        legend: { orientation: "h" }, xaxis: { type: "category", automargin: true },
        yaxis: { title: { text: y1 } },
        yaxis2: { title: { text: y2 || "" }, overlaying: "y", side: "right" },
      }, { displayModeBar: false, responsive: true });
    } catch (err) {
      el.textContent = err.message;
    }
  }

  // -- start -------------------------------------------------------------------------------

  async function start() {
    for (const b of document.querySelectorAll("[data-signout]")) {
      b.addEventListener("click", async () => {
        try { await api("POST", "/api/v1/auth/logout"); } finally { location.assign("/signin"); }
      });
    }
    for (const form of document.querySelectorAll("form[data-api]")) {
      prepareForm(form);
      form.addEventListener("submit", (ev) => { ev.preventDefault(); submit(form); });
    }
    for (const form of document.querySelectorAll("form[data-filter]")) {
      form.addEventListener("submit", (ev) => { ev.preventDefault(); applyFilter(form); });
    }
    for (const b of document.querySelectorAll("[data-csv]")) {
      b.addEventListener("click", () => exportCsv(document.querySelector(b.dataset.csv)));
    }
    for (const table of document.querySelectorAll("table[data-more]")) {
      const b = document.querySelector(table.dataset.more);
      b.addEventListener("click", () => load(table, true));
    }
    const jobs = [...document.querySelectorAll("[data-load]")].map((el) => reload(el));
    jobs.push(...[...document.querySelectorAll("[data-chart]")].map(chart));
    await Promise.all(jobs);
    document.body.dataset.ready = "true";
  }

  document.addEventListener("DOMContentLoaded", start);
})();
