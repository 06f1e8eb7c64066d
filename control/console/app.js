// The flagmesh console: a page of plain JavaScript served by control. It
// speaks the Admin API as JSON (`POST /api/flagmesh.v1.Admin/<Method>`, the
// proto3 JSON mapping), with the signed-in token as a bearer credential;
// control checks every call exactly as it checks gRPC. The token lives in
// sessionStorage and never goes into an address.
"use strict";

const TOKEN_KEY = "flagmesh-console-token";
const SILENT_AFTER_MS = 10000;
const POLL_MS = 1000;

// ---------------------------------------------------------------- helpers

const $ = (sel, root = document) => root.querySelector(sel);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({
  "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
}[c]));
const when = (ms) => ms ? new Date(Number(ms)).toISOString().replace("T", " ").slice(0, 19) + " UTC" : "";

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** Calls an Admin method; resolves to its response, or rejects with ApiError. */
async function api(method, body = {}, token = session.token) {
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = "Bearer " + token;
  let r;
  try {
    r = await fetch("/api/flagmesh.v1.Admin/" + method, {
      method: "POST", headers, body: JSON.stringify(body), cache: "no-store",
    });
  } catch (e) {
    throw new ApiError(0, "UNAVAILABLE", "control cannot be reached: " + e.message);
  }
  let answer = {};
  try { answer = await r.json(); } catch (_) { /* not JSON: keep the status */ }
  if (!r.ok) throw new ApiError(r.status, answer.code || "UNKNOWN", answer.message || r.statusText);
  return answer;
}

/** A stored definition (base64 bytes of canonical JSON) as an object. */
function decodeDefinition(b64) {
  const bytes = Uint8Array.from(atob(b64 || ""), (c) => c.charCodeAt(0));
  return JSON.parse(new TextDecoder().decode(bytes) || "null");
}

const pretty = (v) => JSON.stringify(v, null, 2);
const prettyText = (t) => { try { return pretty(JSON.parse(t)); } catch (_) { return t || ""; } };

/** A line diff of two texts (longest common subsequence), as HTML: changed
 * lines with three lines of context, longer unchanged runs folded. */
function diffHtml(before, after) {
  const a = before ? before.split("\n") : [], b = after ? after.split("\n") : [];
  const n = a.length, m = b.length;
  if (n * m > 4e6) return `<pre class="diff"><span class="del">${esc(before)}</span><span class="add">${esc(after)}</span></pre>`;
  const lcs = Array.from({ length: n + 1 }, () => new Uint32Array(m + 1));
  for (let i = n - 1; i >= 0; i--) {
    for (let j = m - 1; j >= 0; j--) {
      lcs[i][j] = a[i] === b[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
    }
  }
  const lines = [];
  let i = 0, j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && a[i] === b[j]) { lines.push(["same", "  " + a[i]]); i++; j++; }
    else if (i < n && (j >= m || lcs[i + 1][j] >= lcs[i][j + 1])) { lines.push(["del", "- " + a[i]]); i++; }
    else { lines.push(["add", "+ " + b[j]]); j++; }
  }
  const CONTEXT = 3;
  const near = lines.map(() => false);
  lines.forEach(([kind], k) => {
    if (kind === "same") return;
    for (let x = Math.max(0, k - CONTEXT); x <= Math.min(lines.length - 1, k + CONTEXT); x++) near[x] = true;
  });
  const out = [];
  for (let k = 0; k < lines.length;) {
    if (near[k] || lines.length <= 2 * CONTEXT + 1) { out.push(`<span class="${lines[k][0]}">${esc(lines[k][1])}</span>`); k++; continue; }
    let run = 0;
    while (k + run < lines.length && !near[k + run]) run++;
    out.push(`<span class="same">  ⋯ ${run} unchanged line${run === 1 ? "" : "s"}</span>`);
    k += run;
  }
  return `<pre class="diff">${out.join("")}</pre>`;
}

function modal(html) {
  const m = $("#modal");
  m.innerHTML = `<div class="dialog" role="dialog" aria-modal="true">${html}</div>`;
  m.hidden = false;
  return m;
}
function closeModal() { const m = $("#modal"); m.hidden = true; m.innerHTML = ""; }

/** Asks for confirmation in a dialog; resolves true when confirmed. */
function confirmDialog(title, html, action, danger) {
  return new Promise((resolve) => {
    const m = modal(`<h2>${esc(title)}</h2>${html}
      <div class="row"><button class="${danger ? "danger solid" : "primary"}" data-confirm>${esc(action)}</button>
      <button data-cancel>Cancel</button></div>`);
    $("[data-confirm]", m).onclick = () => { closeModal(); resolve(true); };
    $("[data-cancel]", m).onclick = () => { closeModal(); resolve(false); };
  });
}

function errorNote(e) {
  const code = e instanceof ApiError ? e.code + ": " : "";
  return `<div class="note bad" data-error>${esc(code + e.message)}</div>`;
}

// ---------------------------------------------------------------- session

const session = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  who: null,
  get canWrite() { return !!this.who && ["write", "admin"].includes(this.who.role); },
  get canAdmin() { return !!this.who && this.who.role === "admin"; },
  readOnlyWhy(what) {
    return `Read-only: the token "${this.who.name}" has the ${this.who.role} role; ${what} needs a write or admin token.`;
  },
};

/** Who the stored token is (or, without one, whether control runs in development mode). */
async function identify() {
  try {
    session.who = await api("WhoAmI");
    return true;
  } catch (e) {
    session.who = null;
    if (e.status === 401 || e.status === 403) return false;
    throw e;
  }
}

function renderWho() {
  const w = $("#who");
  if (!session.who) { w.innerHTML = ""; return; }
  w.innerHTML = `signed in as <b data-who>${esc(session.who.name)}</b> (<span data-role>${esc(session.who.role)}</span>)
    <button data-signout>Sign out</button>`;
  $("[data-signout]", w).onclick = () => {
    sessionStorage.removeItem(TOKEN_KEY);
    session.token = "";
    session.who = null;
    go("/signin");
  };
}

// ---------------------------------------------------------------- routing

let stopPage = () => {};

function go(path) {
  history.pushState(null, "", path);
  route();
}

document.addEventListener("click", (ev) => {
  const a = ev.target.closest("a[data-link]");
  if (!a || ev.ctrlKey || ev.metaKey || ev.shiftKey || ev.button !== 0) return;
  ev.preventDefault();
  go(a.getAttribute("href"));
});
window.addEventListener("popstate", () => route());

async function route() {
  stopPage();
  stopPage = () => {};
  closeModal();
  const path = location.pathname;
  const params = new URLSearchParams(location.search);
  const main = $("#main");
  if (path === "/signin") { renderWho(); return signIn(main, params.get("next") || "/"); }
  if (!session.who) {
    try {
      if (!(await identify())) return go("/signin?next=" + encodeURIComponent(path + location.search));
    } catch (e) { main.innerHTML = errorNote(e); return; }
  }
  renderWho();
  let m;
  const nav = path.startsWith("/history") ? "history" : path.startsWith("/propagation") ? "propagation" : "sets";
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === nav);
  try {
    if (path === "/" || path === "/sets") return await setsPage(main);
    if ((m = path.match(/^\/sets\/([^/]+)\/flags\/([^/]+)$/))) {
      return await flagPage(main, decodeURIComponent(m[1]), decodeURIComponent(m[2]));
    }
    if ((m = path.match(/^\/sets\/([^/]+)$/))) return await setPage(main, decodeURIComponent(m[1]), params);
    if (path === "/history") return await historyPage(main, params);
    if (path === "/propagation") return propagationPage(main);
    main.innerHTML = `<h1>Not found</h1><p>No console page at ${esc(path)}. <a href="/" data-link>Flag sets</a></p>`;
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return go("/signin?next=" + encodeURIComponent(path));
    main.innerHTML = errorNote(e);
  }
}

const setHref = (set) => "/sets/" + encodeURIComponent(set);
const flagHref = (set, key) => setHref(set) + "/flags/" + encodeURIComponent(key);

// ---------------------------------------------------------------- sign-in

function signIn(main, next) {
  $("#who").innerHTML = "";
  main.innerHTML = `<form class="signin" id="signin">
    <h1>Sign in to flagmesh</h1>
    <p class="muted">Paste an API token. What you can do follows its role: read sees everything,
      write changes flags, admin also deletes flag sets. The token is kept in this browser tab only.</p>
    <input type="password" id="token" autocomplete="off" placeholder="token" aria-label="token" required>
    <button class="primary" type="submit">Sign in</button>
    <div id="signin-error"></div>
  </form>`;
  $("#signin").onsubmit = async (ev) => {
    ev.preventDefault();
    const token = $("#token").value.trim();
    try {
      session.who = await api("WhoAmI", {}, token);
      session.token = token;
      sessionStorage.setItem(TOKEN_KEY, token);
      go(next.startsWith("/") && !next.startsWith("//") ? next : "/");
    } catch (e) {
      $("#signin-error").innerHTML = errorNote(e);
    }
  };
  $("#token").focus();
}

// ---------------------------------------------------------------- flag sets

async function setsPage(main) {
  const [sets, rev] = await Promise.all([api("ListFlagSets"), api("GetRevision")]);
  main.innerHTML = `<h1>Flag sets</h1>
    <div class="row"><input type="search" id="filter" placeholder="filter by name" aria-label="filter">
    <span class="muted">head revision r${rev.revision}</span></div>
    <table><thead><tr><th>flag set</th><th>flags</th><th>last change</th></tr></thead>
    <tbody id="sets"></tbody></table>`;
  const draw = () => {
    const q = $("#filter").value.toLowerCase();
    const rows = sets.flagSets.filter((s) => s.id.toLowerCase().includes(q)).map((s) =>
      `<tr data-set="${esc(s.id)}"><td><a href="${setHref(s.id)}" data-link>${esc(s.id)}</a></td>
       <td>${s.flagCount}</td><td>r${s.modRevision}</td></tr>`);
    $("#sets").innerHTML = rows.join("") || `<tr><td colspan="3" class="muted">no flag set${q ? " matches" : " yet: apply one with flagctl apply"}</td></tr>`;
  };
  $("#filter").oninput = draw;
  draw();
}

/** Every flag of a set (all pages). */
async function allFlags(set) {
  const flags = [];
  let pageToken = "";
  do {
    const r = await api("ListFlags", { flagSet: set, pageSize: 1000, pageToken });
    flags.push(...r.flags);
    pageToken = r.nextPageToken;
  } while (pageToken);
  return flags;
}

/** Who made each revision touching a set, as far as `limit` change sets back. */
async function changesBy(set, limit = 500) {
  const by = new Map();
  const r = await api("ListHistory", { flagSet: set, pageSize: limit });
  for (const c of r.changeSets) by.set(c.revision, c);
  return by;
}

async function setPage(main, set, params) {
  const [flags, by] = await Promise.all([allFlags(set), changesBy(set)]);
  const rows = flags.map((f) => {
    const d = decodeDefinition(f.definitionJson) || {};
    return { key: f.key, d, mod: f.modRevision, change: by.get(f.modRevision) };
  });
  main.innerHTML = `<h1>Flag set <span data-set-name>${esc(set)}</span></h1>
    <div class="row">
      <input type="search" id="filter" placeholder="search keys and variants" aria-label="search" value="${esc(params.get("q") || "")}">
      <select id="state" aria-label="state"><option value="">any state</option><option>ENABLED</option><option>DISABLED</option></select>
      <label><input type="checkbox" id="targeted"> with targeting</label>
      <span class="muted" id="count"></span>
      <a href="/history?set=${encodeURIComponent(set)}" data-link>history of this set</a>
      <button class="danger" id="delete-set" ${session.canAdmin ? "" : "disabled"}
        title="${session.canAdmin ? "" : "deleting a flag set needs an admin token"}">Delete set</button>
    </div>
    <table><thead><tr><th>key</th><th>state</th><th>variants</th><th>default</th><th>targeting</th><th>last change</th></tr></thead>
    <tbody id="flags"></tbody></table>`;
  const draw = () => {
    const q = $("#filter").value.toLowerCase(), st = $("#state").value, tg = $("#targeted").checked;
    const shown = rows.filter((r) =>
      (!q || r.key.toLowerCase().includes(q) || Object.keys(r.d.variants || {}).some((v) => v.toLowerCase().includes(q))) &&
      (!st || r.d.state === st) && (!tg || (r.d.targeting && Object.keys(r.d.targeting).length)));
    $("#count").textContent = `${shown.length} of ${rows.length} flags`;
    $("#flags").innerHTML = shown.map((r) => `<tr data-flag="${esc(r.key)}">
      <td><a href="${flagHref(set, r.key)}" data-link>${esc(r.key)}</a></td>
      <td><span class="badge ${r.d.state === "ENABLED" ? "enabled" : "disabled"}">${esc(r.d.state)}</span></td>
      <td class="mono">${esc(Object.keys(r.d.variants || {}).join(", "))}</td>
      <td class="mono">${esc(r.d.defaultVariant ?? "—")}</td>
      <td>${r.d.targeting && Object.keys(r.d.targeting).length ? "yes" : "no"}</td>
      <td>${r.change ? `${esc(r.change.actor)} · ${when(r.change.committedAtUnixMs)} · ` : ""}r${r.mod}</td></tr>`).join("");
  };
  for (const id of ["filter", "state", "targeted"]) $("#" + id).oninput = draw;
  draw();
  $("#delete-set").onclick = async () => {
    const sets = await api("ListFlagSets");
    const s = sets.flagSets.find((x) => x.id === set);
    const ok = await confirmDialog(`Delete flag set ${set}?`,
      `<p>All ${rows.length} flags go, in one change set; every PoP stops serving them. The history keeps them, and a revert brings them back.</p>`,
      "Delete the set", true);
    if (!ok) return;
    try {
      await api("DeleteFlagSet", { flagSet: set, expectedModRevision: s ? s.modRevision : 0 });
      go("/");
    } catch (e) { main.insertAdjacentHTML("afterbegin", errorNote(e)); }
  };
}

// ---------------------------------------------------------------- a flag

async function flagPage(main, set, key) {
  const loaded = await api("GetFlag", { flagSet: set, key });
  const f = {
    set, key,
    mod: loaded.flag.modRevision,
    def: decodeDefinition(loaded.flag.definitionJson),
  };
  f.text = pretty(f.def);
  const by = await changesBy(set, 200);
  const last = by.get(f.mod);
  const canWrite = session.canWrite;
  const enabled = f.def.state === "ENABLED";
  main.innerHTML = `<div class="muted"><a href="${setHref(set)}" data-link>${esc(set)}</a> /</div>
    <h1><span data-flag-key>${esc(key)}</span>
      <span class="badge ${enabled ? "enabled" : "disabled"}" data-state>${esc(f.def.state)}</span></h1>
    <div class="muted">revision r<span data-mod>${f.mod}</span>${last ? ` · last changed by ${esc(last.actor)} at ${when(last.committedAtUnixMs)}${last.comment ? ` (“${esc(last.comment)}”)` : ""}` : ""}
      · <a href="/history?set=${encodeURIComponent(set)}&key=${encodeURIComponent(key)}" data-link>history</a></div>
    ${canWrite ? "" : `<div class="note warn" data-readonly>${esc(session.readOnlyWhy("saving"))}</div>`}
    <div class="row">
      <label>state <select id="q-state" ${canWrite ? "" : "disabled"}><option>ENABLED</option><option>DISABLED</option></select></label>
      <label>default variant <select id="q-default" ${canWrite ? "" : "disabled"}></select></label>
      <button class="danger ${enabled ? "solid" : ""}" id="kill" ${canWrite ? "" : "disabled"}>${enabled ? "Kill switch: disable" : "Enable again"}</button>
    </div>
    <div id="outcome"></div>
    <div class="cols">
      <section>
        <h2>Definition</h2>
        <textarea id="definition" spellcheck="false" aria-label="definition" ${canWrite ? "" : "readonly"}></textarea>
        <div id="validation" class="note">unchanged</div>
        <div class="row">
          <input type="text" id="comment" placeholder="why (kept in the history)" aria-label="comment" size="40" ${canWrite ? "" : "disabled"}>
          <button class="primary" id="review" ${canWrite ? "" : "disabled"}>Review and save</button>
          <button id="revert-edit">Discard my edit</button>
        </div>
      </section>
      <section>
        <h2>Try it</h2>
        <p class="muted">Evaluates the definition in the editor (saved or not) with the engine the PoPs run.</p>
        <textarea id="context" spellcheck="false" aria-label="context">${esc(pretty({ targetingKey: "user-1" }))}</textarea>
        <div class="row"><button id="evaluate">Evaluate</button></div>
        <div id="evaluation"></div>
      </section>
    </div>`;
  const editor = $("#definition");
  editor.value = f.text;
  const fillQuick = () => {
    let d;
    try { d = JSON.parse(editor.value); } catch (_) { return; }
    $("#q-state").value = d.state;
    $("#q-default").innerHTML = `<option value="">(none: the caller's default)</option>` +
      Object.keys(d.variants || {}).map((v) => `<option value="${esc(v)}">${esc(v)}</option>`).join("");
    $("#q-default").value = d.defaultVariant ?? "";
  };
  fillQuick();
  const quick = (change) => {
    let d;
    try { d = JSON.parse(editor.value); } catch (e) { return; }
    change(d);
    editor.value = pretty(d);
    validate();
  };
  $("#q-state").onchange = () => quick((d) => { d.state = $("#q-state").value; });
  $("#q-default").onchange = () => quick((d) => {
    const v = $("#q-default").value;
    if (v) d.defaultVariant = v; else delete d.defaultVariant;
  });
  $("#revert-edit").onclick = () => { editor.value = f.text; fillQuick(); validate(); };

  // validation as you type: the server's dry run of this very write
  let timer = 0, seq = 0;
  const validation = $("#validation");
  const validate = () => {
    clearTimeout(timer);
    const text = editor.value;
    if (text === f.text) { validation.className = "note"; validation.textContent = "unchanged"; return; }
    try { JSON.parse(text); } catch (e) {
      validation.className = "note bad";
      validation.textContent = "not valid JSON: " + e.message;
      return;
    }
    if (!canWrite) { validation.className = "note"; validation.textContent = "edited here only: this token cannot save"; return; }
    const mine = ++seq;
    timer = setTimeout(async () => {
      try {
        const r = await api("UpdateFlag", { flagSet: set, key, definitionJson: text, expectedModRevision: f.mod, dryRun: true });
        if (mine !== seq) return;
        validation.className = r.warnings.length ? "note warn" : "note ok";
        validation.innerHTML = (r.changed ? "valid: ready to save" : "valid, and the same as saved") +
          (r.warnings.length ? `; flagd would load it with ${r.warnings.length} warning(s):<ul>` +
            r.warnings.map((w) => `<li><code>${esc(w.pointer)}</code> ${esc(w.message)}</li>`).join("") + "</ul>" : "");
        validation.dataset.valid = "true";
      } catch (e) {
        if (mine !== seq) return;
        validation.className = "note bad";
        validation.dataset.valid = "false";
        validation.textContent = e.code === "FAILED_PRECONDITION"
          ? "conflict: this flag changed since you opened it; saving will show what changed" : e.message;
      }
    }, 250);
  };
  editor.addEventListener("input", () => { fillQuick(); validate(); });

  const save = async (definitionJson, expected, comment) => {
    const r = await api("UpdateFlag", { flagSet: set, key, definitionJson, expectedModRevision: expected, comment });
    return r;
  };
  const saved = (r, what) => {
    $("#outcome").innerHTML = `<div class="note ok" data-saved="${r.revision}">${esc(what)} as revision r${r.revision}; the PoPs follow within a second.</div>`;
  };

  // a write that met a newer version: show it, then reload or overwrite
  const conflict = async (mine, comment) => {
    const now = await api("GetFlag", { flagSet: set, key });
    const theirs = pretty(decodeDefinition(now.flag.definitionJson));
    const who = (await changesBy(set, 50)).get(now.flag.modRevision);
    const m = modal(`<h2>Conflict: ${esc(key)} changed since you opened it</h2>
      <p data-conflict>It is now at revision r${now.flag.modRevision}${who ? `, changed by ${esc(who.actor)} at ${when(who.committedAtUnixMs)}` : ""}.
      Nothing was saved. Their change, from the version you started from:</p>
      ${diffHtml(f.text, theirs)}
      <p>Your edit, against their version:</p>${diffHtml(theirs, prettyText(mine))}
      <div class="row"><button class="primary" data-reload>Reload (discard my edit)</button>
      <button class="danger" data-overwrite>Overwrite with my edit</button><button data-cancel>Keep editing</button></div>`);
    $("[data-reload]", m).onclick = () => { closeModal(); route(); };
    $("[data-cancel]", m).onclick = () => closeModal();
    $("[data-overwrite]", m).onclick = async () => {
      closeModal();
      try {
        const r = await save(mine, now.flag.modRevision, comment);
        saved(r, "Overwritten");
        setTimeout(() => route(), 600);
      } catch (e) {
        if (e.code === "FAILED_PRECONDITION") return conflict(mine, comment);
        $("#outcome").innerHTML = errorNote(e);
      }
    };
  };

  $("#review").onclick = async () => {
    const mine = editor.value, comment = $("#comment").value;
    const after = prettyText(mine);
    if (after === f.text) { $("#outcome").innerHTML = `<div class="note">Nothing to save: the definition is unchanged.</div>`; return; }
    const ok = await confirmDialog(`Save ${key}?`, `<p>What changes (from revision r${f.mod}):</p>${diffHtml(f.text, after)}`, "Save");
    if (!ok) return;
    try {
      saved(await save(mine, f.mod, comment), "Saved");
      setTimeout(() => route(), 600);
    } catch (e) {
      if (e.code === "FAILED_PRECONDITION") return conflict(mine, comment);
      $("#outcome").innerHTML = errorNote(e);
    }
  };

  $("#kill").onclick = async () => {
    const off = f.def.state === "ENABLED";
    const ok = await confirmDialog(off ? `Disable ${key}?` : `Enable ${key}?`,
      off ? `<p>Every PoP then answers <b>DISABLED</b> for ${esc(key)}: callers get their own default value.
        This is one change, reverted like any other.</p>`
        : `<p>Every PoP serves ${esc(key)}'s variants again.</p>`,
      off ? "Disable everywhere" : "Enable", off);
    if (!ok) return;
    const d = { ...f.def, state: off ? "DISABLED" : "ENABLED" };
    try {
      saved(await save(JSON.stringify(d), f.mod, $("#comment").value || (off ? "kill switch" : "enabled again")),
        off ? "Disabled" : "Enabled");
      setTimeout(() => route(), 600);
    } catch (e) {
      if (e.code === "FAILED_PRECONDITION") return conflict(JSON.stringify(d), "kill switch");
      $("#outcome").innerHTML = errorNote(e);
    }
  };

  $("#evaluate").onclick = async () => {
    const out = $("#evaluation");
    let context;
    try { context = JSON.parse($("#context").value || "{}"); } catch (e) {
      out.innerHTML = `<div class="note bad">the context is not valid JSON: ${esc(e.message)}</div>`;
      return;
    }
    const edited = editor.value !== f.text;
    try {
      const r = await api("PreviewEvaluation", { flagSet: set, key, context, definitionJson: edited ? editor.value : "" });
      out.innerHTML = `<div class="result" data-evaluation>
        <span class="muted">value</span><code data-value>${esc(r.value === undefined || r.value === null ? "(the caller's default)" : JSON.stringify(r.value))}</code>
        <span class="muted">variant</span><code data-variant>${esc(r.variant || "—")}</code>
        <span class="muted">reason</span><code data-reason>${esc(String(r.reason).replace("REASON_", ""))}</code>
        ${r.errorMessage ? `<span class="muted">error</span><span>${esc(String(r.errorCode).replace("ERROR_CODE_", "") + ": " + r.errorMessage)}</span>` : ""}
        <span class="muted">of</span><span>${edited ? "the definition in the editor (not saved)" : "the saved definition, r" + f.mod}</span></div>`;
    } catch (e) { out.innerHTML = errorNote(e); }
  };
}

// ---------------------------------------------------------------- history

async function historyPage(main, params) {
  const set = params.get("set") || "", key = params.get("key") || "";
  main.innerHTML = `<h1>History</h1>
    <form class="row" id="filters">
      <input type="text" name="set" placeholder="flag set" aria-label="flag set" value="${esc(set)}">
      <input type="text" name="key" placeholder="flag key" aria-label="flag key" value="${esc(key)}">
      <button type="submit">Filter</button>
      <span class="muted" id="window"></span>
    </form>
    ${session.canWrite ? "" : `<div class="note warn" data-readonly>${esc(session.readOnlyWhy("reverting"))}</div>`}
    <div id="outcome"></div>
    <div id="changes"></div>
    <div class="row"><button id="older" hidden>Older changes</button></div>`;
  $("#filters").onsubmit = (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    for (const [k, v] of new FormData(ev.target)) if (v) q.set(k, v);
    go("/history" + (q.toString() ? "?" + q : ""));
  };
  let pageToken = "";
  const more = async () => {
    const r = await api("ListHistory", { flagSet: set, key, pageSize: 50, pageToken });
    pageToken = r.nextPageToken;
    $("#older").hidden = !pageToken;
    $("#window").textContent = `the change log holds deltas from r${r.oldestRevision}; the audit trail is kept whole`;
    $("#changes").insertAdjacentHTML("beforeend", r.changeSets.map((c) => changeSetHtml(c, set, key)).join("") ||
      (pageToken ? "" : `<p class="muted">No change${set || key ? " matches" : " yet"}.</p>`));
  };
  $("#older").onclick = more;
  $("#changes").addEventListener("click", async (ev) => {
    const b = ev.target.closest("button[data-revert-set]");
    if (!b) return;
    await revert(b.dataset.revertSet, b.dataset.revertKey || "", Number(b.dataset.to));
  });
  await more();
}

function changeSetHtml(c, set, key) {
  const rev = c.revision;
  const changes = c.changes.filter((x) => (!set || x.flagSet === set) && (!key || x.key === key));
  const sets = [...new Set(changes.map((x) => x.flagSet))];
  const disabled = session.canWrite ? "" : "disabled";
  return `<article class="change" data-revision="${rev}">
    <header><span class="rev">r${rev}</span><span>${when(c.committedAtUnixMs)}</span>
      <b data-actor>${esc(c.actor)}</b><span class="badge">${esc(c.operation)}</span>
      <span>${esc(c.comment)}</span>
      ${c.warnings.length ? `<span class="muted">${c.warnings.length} warning(s)</span>` : ""}</header>
    ${changes.map((x) => `<details ${changes.length <= 3 ? "open" : ""} data-change="${esc(x.flagSet)}/${esc(x.key)}">
      <summary><span class="mono">${esc(x.flagSet)}/${esc(x.key || "(metadata)")}</span>
        <span class="muted">${esc(String(x.kind).replace("CHANGE_KIND_", "").toLowerCase())}</span>
        ${x.key ? `<button data-revert-set="${esc(x.flagSet)}" data-revert-key="${esc(x.key)}" data-to="${rev - 1}" ${disabled}>Revert this flag to r${rev - 1}</button>` : ""}
      </summary>
      ${diffHtml(prettyText(x.beforeJson), prettyText(x.afterJson))}</details>`).join("")}
    ${sets.map((s) => `<div class="row"><button data-revert-set="${esc(s)}" data-to="${rev - 1}" ${disabled}>Revert set ${esc(s)} to r${rev - 1}</button>
      <span class="muted">(undoes this change and every later one to the set)</span></div>`).join("")}
  </article>`;
}

async function revert(set, key, to) {
  const what = key ? `${set}/${key}` : `flag set ${set}`;
  const base = { flagSet: set, key, toRevision: to };
  let dry;
  try { dry = await api("Revert", { ...base, dryRun: true }); } catch (e) { $("#outcome").innerHTML = errorNote(e); return; }
  if (!dry.changes.length) {
    $("#outcome").innerHTML = `<div class="note">${esc(what)} is already as it was at r${to}: nothing to revert.</div>`;
    return;
  }
  const ok = await confirmDialog(`Revert ${what} to r${to}?`,
    `<p>A new change restores what it was at r${to}; the history keeps everything.</p>` +
    dry.changes.map((x) => `<div class="mono">${esc(x.flagSet)}/${esc(x.key)}</div>` +
      diffHtml(prettyText(x.beforeJson), prettyText(x.afterJson))).join(""), "Revert");
  if (!ok) return;
  try {
    const r = await api("Revert", base);
    $("#outcome").innerHTML = `<div class="note ok" data-reverted="${r.revision}">Reverted ${esc(what)} to r${to} as revision r${r.revision}.</div>`;
    setTimeout(() => { if (location.pathname === "/history") route(); }, 800);
  } catch (e) { $("#outcome").innerHTML = errorNote(e); }
}

// ---------------------------------------------------------------- propagation

/** A node's state: conflict, rejected, lagging (behind the head), silent (no report lately) or current. */
function nodeState(n, head, now) {
  if (n.conflictHistoryId) return "conflict";
  if (Number(n.rejectedRevision) > 0) return "rejected";
  if (Number(n.appliedRevision) < head) return "lagging";
  if (now - Number(n.lastReportUnixMs) > SILENT_AFTER_MS) return "silent";
  return "current";
}

function tile(n, head, now) {
  const state = nodeState(n, head, now);
  const silent = now - Number(n.lastReportUnixMs) > SILENT_AFTER_MS;
  const role = String(n.role).replace("NODE_ROLE_", "").toLowerCase();
  const title = `${n.nodeId} (${role}${n.region ? ", " + n.region : ""}): applied r${n.appliedRevision}` +
    `, last report ${Math.round((now - Number(n.lastReportUnixMs)) / 1000)} s ago` +
    (n.rejectedError ? `, rejected r${n.rejectedRevision}: ${n.rejectedError}` : "") +
    (n.conflictHistoryId ? `, refuses history ${n.conflictHistoryId}` : "");
  return `<span class="tile ${state}${silent ? " silent" : ""}" data-node="${esc(n.nodeId)}" data-state="${state}" title="${esc(title)}">` +
    `<span>${esc(n.nodeId)}</span><span class="rev">r${esc(n.appliedRevision)}</span>` +
    `${state === "current" ? "" : `<span>${state === "lagging" ? "behind " + (head - Number(n.appliedRevision)) : state}</span>`}</span>`;
}

/** The propagation view as HTML; pure, so 300 nodes cost one string. */
function renderPropagation(v, now) {
  const head = Number(v.headRevision);
  const nodes = v.nodes;
  const counts = { current: 0, lagging: 0, silent: 0, conflict: 0, rejected: 0 };
  for (const n of nodes) counts[nodeState(n, head, now)]++;
  // regions, each with its hubs and the PoPs reporting through them
  const byId = new Map(nodes.map((n) => [n.nodeId, n]));
  const regions = new Map();
  const place = (region) => {
    if (!regions.has(region)) regions.set(region, { hubs: new Map(), direct: [] });
    return regions.get(region);
  };
  for (const n of nodes) {
    if (String(n.role) === "NODE_ROLE_HUB") place(n.region || "").hubs.set(n.nodeId, { hub: n, pops: [] });
  }
  for (const n of nodes) {
    if (String(n.role) === "NODE_ROLE_HUB") continue;
    const parent = byId.get(n.via);
    if (parent && String(parent.role) === "NODE_ROLE_HUB") place(parent.region || "").hubs.get(parent.nodeId).pops.push(n);
    else place(n.region || "").direct.push(n);
  }
  const dist = Object.entries(v.appliedDistribution || {}).map(([r, c]) => [Number(r), Number(c)]).sort((a, b) => b[0] - a[0]);
  const max = Math.max(1, ...dist.map((d) => d[1]));
  const bars = dist.slice(0, 12).map(([r, c], i) =>
    `<text x="0" y="${i * 20 + 14}">r${r}</text><rect class="bar${r === head ? " head" : ""}" x="70" y="${i * 20 + 3}" height="14" width="${Math.max(2, 560 * c / max)}"></rect>` +
    `<text x="${76 + 560 * c / max}" y="${i * 20 + 14}">${c} node${c === 1 ? "" : "s"}</text>`).join("");
  const sorted = (xs) => xs.slice().sort((a, b) => a.nodeId.localeCompare(b.nodeId));
  const regionHtml = [...regions.entries()].sort((a, b) => a[0].localeCompare(b[0])).map(([name, r]) =>
    `<div class="region" data-region="${esc(name)}"><h3>${name ? "region " + esc(name) : "no region"}</h3>` +
    [...r.hubs.values()].sort((a, b) => a.hub.nodeId.localeCompare(b.hub.nodeId)).map((h) =>
      `<div class="hub">${tile(h.hub, head, now)}<div class="tiles">${sorted(h.pops).map((p) => tile(p, head, now)).join("")}</div></div>`).join("") +
    (r.direct.length ? `<div class="hub"><span class="muted">direct to control</span><div class="tiles">${sorted(r.direct).map((p) => tile(p, head, now)).join("")}</div></div>` : "") +
    `</div>`).join("");
  const revisions = v.revisions.map((p) => `<tr data-revision="${p.revision}"><td>r${p.revision}</td><td>${when(p.committedAtUnixMs)}</td>
    <td>${p.nodesApplied}/${p.nodesTotal}</td><td>${p.allAppliedAfterMs === undefined || p.allAppliedAfterMs === null ? "not yet" : p.allAppliedAfterMs + " ms"}</td></tr>`).join("");
  return `<div class="row" id="summary" data-head="${head}">
      <b>head r${head}</b> · <span data-current>${counts.current}/${nodes.length} nodes current</span> ·
      <span>${counts.lagging} lagging</span> · <span>${counts.silent} silent</span> ·
      <span>${counts.conflict} history conflict${counts.conflict === 1 ? "" : "s"}</span> · <span>${counts.rejected} rejected</span>
      <span class="muted">updated ${when(now)}</span></div>
    <div class="legend muted"><span class="tile">current</span><span class="tile lagging">lagging: behind the head</span>
      <span class="tile silent">silent: no report for 10 s</span><span class="tile conflict">history conflict or rejected</span></div>
    <h2>Version distribution</h2>
    <svg width="720" height="${Math.max(24, dist.slice(0, 12).length * 20 + 4)}" role="img" aria-label="nodes per applied revision">${bars}</svg>
    <h2>Nodes by region and hub</h2>${regionHtml || `<p class="muted">No node has reported yet.</p>`}
    <h2>Time to every node</h2>
    <table><thead><tr><th>revision</th><th>committed</th><th>applied</th><th>all applied after</th></tr></thead><tbody>${revisions}</tbody></table>`;
}

function propagationPage(main) {
  main.innerHTML = `<h1>Propagation</h1><div id="poll-error"></div><div id="view"><p class="muted">loading…</p></div>`;
  let stopped = false, timer = 0;
  const tick = async () => {
    try {
      const v = await api("GetPropagation", { recentRevisions: 20 });
      if (stopped) return;
      const t0 = performance.now();
      $("#view").innerHTML = renderPropagation(v, Date.now());
      $("#view").dataset.renderMs = (performance.now() - t0).toFixed(2);
      $("#poll-error").innerHTML = "";
    } catch (e) {
      if (stopped) return;
      // one note while control cannot be reached; the last view stays
      $("#poll-error").innerHTML = errorNote(e);
    }
    if (!stopped) timer = setTimeout(tick, POLL_MS);
  };
  stopPage = () => { stopped = true; clearTimeout(timer); };
  tick();
}

// exposed for tests and measurements
window.flagmeshConsole = { renderPropagation, diffHtml };

route();
