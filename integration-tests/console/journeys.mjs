// The web console's journeys, in Debian's headless Chromium driven by
// playwright-core. `integration-tests/tests/console.rs` starts a real mesh,
// runs `node journeys.mjs <journey>` with what the journey needs in the
// environment, and checks at the PoPs what the journey changed. Each
// journey prints one JSON line starting with "result " and exits 0, or
// prints why it failed (with a screenshot in $FAILURE_DIR) and exits 1.
//
// Environment: CONSOLE (control's HTTP address, http://...), CHROMIUM
// (the browser), READ_TOKEN, WRITE_TOKEN, SET, KEY, and per journey:
// VARIANT, REVISION, HEAD, NODE, NODES; SHOTS (a folder: screenshots of
// the pages the journey passes).

import { chromium } from "playwright-core";

const env = (name) => {
  const v = process.env[name];
  if (v === undefined) throw new Error(`${name} is not set`);
  return v;
};
const CONSOLE = env("CONSOLE");
const TIMEOUT = 15000;
const ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];

function check(cond, what) {
  if (!cond) throw new Error(what);
}

async function shot(page, name) {
  if (!process.env.SHOTS) return;
  await page.screenshot({ path: `${process.env.SHOTS}/console-${name}.png`, fullPage: false });
}

/** A fresh browser session (its own sessionStorage) signed in with `token`
 * through the sign-in page, after asking for `path`. */
async function signedIn(browser, token, path) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  page.on("pageerror", (e) => console.error("page error:", e.message));
  await page.goto(CONSOLE + path);
  await page.waitForURL(/\/signin\?next=/);
  await page.fill("#token", token);
  await page.click("form#signin button[type=submit]");
  await page.waitForURL((u) => u.pathname === path.split("?")[0]);
  await page.waitForSelector("[data-who]");
  return page;
}

const flagPath = () => `/sets/${encodeURIComponent(env("SET"))}/flags/${encodeURIComponent(env("KEY"))}`;

/** Opens the flag page and waits for its editor. */
async function openFlag(page) {
  if (new URL(page.url()).pathname !== flagPath()) await page.goto(CONSOLE + flagPath());
  await page.waitForSelector("#definition");
}

/** Picks a default variant with the quick control and waits for the
 * server's dry run to call the edit valid. */
async function pickDefault(page, variant) {
  await page.selectOption("#q-default", variant);
  await page.waitForFunction(() => {
    const v = document.querySelector("#validation");
    return v && v.dataset.valid !== undefined && !v.textContent.startsWith("unchanged");
  });
  return page.textContent("#validation");
}

async function reviewAndSave(page) {
  await page.click("#review");
  await page.waitForSelector("#modal .dialog pre.diff");
  await page.click("#modal [data-confirm]");
}

const journeys = {
  /** 1: a write token changes a flag's default variant. */
  async "change-default"(browser) {
    const page = await signedIn(browser, env("WRITE_TOKEN"), flagPath());
    await openFlag(page);
    const validation = await pickDefault(page, env("VARIANT"));
    check(validation.includes("valid"), `the edit was not validated: ${validation}`);
    await page.click("#evaluate");
    await page.waitForSelector("[data-evaluation]");
    await shot(page, "flag");
    await reviewAndSave(page);
    const saved = await page.waitForSelector("[data-saved]");
    return { revision: Number(await saved.getAttribute("data-saved")) };
  },

  /** 2: a read token sees everything and cannot save, and is told why. */
  async "read-only"(browser) {
    const page = await signedIn(browser, env("READ_TOKEN"), "/");
    await page.waitForSelector(`#sets tr[data-set="${env("SET")}"]`);
    check((await page.textContent("[data-role]")) === "read", "the role shown is not read");
    await page.click(`#sets tr[data-set="${env("SET")}"] a`);
    await page.waitForSelector(`#flags tr[data-flag="${env("KEY")}"]`);
    await shot(page, "set");
    await page.click(`#flags tr[data-flag="${env("KEY")}"] a`);
    await openFlag(page);
    const definition = await page.inputValue("#definition");
    check(definition.includes('"variants"'), "the definition is not shown");
    check(await page.isDisabled("#review"), "a read token may press save");
    check(await page.isDisabled("#kill"), "a read token may press the kill switch");
    check(await page.isDisabled("#q-default"), "a read token may change the default variant");
    const why = await page.textContent("[data-readonly]");
    check(why.includes("read role") && why.includes("write or admin token"), `the page does not say why: ${why}`);
    // trying anyway, from the page with its token: control refuses it too
    const refused = await page.evaluate(async ([set, key]) => {
      const r = await fetch("/api/flagmesh.v1.Admin/UpdateFlag", {
        method: "POST",
        headers: { "Content-Type": "application/json", Authorization: "Bearer " + sessionStorage.getItem("flagmesh-console-token") },
        body: JSON.stringify({ flagSet: set, key, force: true,
          definitionJson: JSON.stringify({ state: "DISABLED", variants: { on: true }, defaultVariant: "on" }) }),
      });
      return { status: r.status, body: await r.json() };
    }, [env("SET"), env("KEY")]);
    check(refused.status === 403 && refused.body.code === "PERMISSION_DENIED", `a read token wrote: ${JSON.stringify(refused)}`);
    // the history is there, its revert buttons are not for this token
    await page.click("a[data-nav=history]");
    await page.waitForSelector("article.change");
    check(await page.isDisabled("article.change button[data-revert-set]"), "a read token may revert");
    check((await page.textContent("[data-readonly]")).includes("reverting needs a write or admin token"), "history does not say why");
    return { refused: refused.body.message };
  },

  /** 3: two editors change the same flag; the second sees the conflict. */
  async conflict(browser) {
    const first = await signedIn(browser, env("WRITE_TOKEN"), flagPath());
    const second = await signedIn(browser, env("WRITE_TOKEN"), flagPath());
    await openFlag(first);
    await openFlag(second);
    await pickDefault(first, env("VARIANT"));
    await reviewAndSave(first);
    const saved = Number(await (await first.waitForSelector("[data-saved]")).getAttribute("data-saved"));
    // the second editor still has the page as it was: its edit conflicts
    await second.selectOption("#q-state", "DISABLED");
    await second.click("#review");
    await second.waitForSelector("#modal [data-confirm]");
    await second.click("#modal [data-confirm]");
    const text = await (await second.waitForSelector("[data-conflict]")).textContent();
    check(text.includes("changed since you opened it") || text.includes(`r${saved}`), `no conflict shown: ${text}`);
    check(text.includes(`r${saved}`), `the conflict does not name the newer revision r${saved}: ${text}`);
    await shot(second, "conflict");
    // the second editor reloads: now it shows the first one's change
    await second.click("#modal [data-reload]");
    await second.waitForFunction((rev) => document.querySelector("[data-mod]")?.textContent === String(rev), saved);
    const d = JSON.parse(await second.inputValue("#definition"));
    check(d.defaultVariant === env("VARIANT") && d.state === "ENABLED", `reload did not bring the newer version: ${JSON.stringify(d)}`);
    return { saved, conflict: text.trim() };
  },

  /** 4: the kill switch turns a flag off. */
  async "kill-switch"(browser) {
    const page = await signedIn(browser, env("WRITE_TOKEN"), flagPath());
    await openFlag(page);
    check((await page.textContent("[data-state]")) === "ENABLED", "the flag is not enabled to begin with");
    await page.click("#kill");
    const dialog = await page.waitForSelector("#modal .dialog");
    check((await dialog.textContent()).includes("DISABLED"), "the confirmation does not say what happens");
    await page.click("#modal [data-confirm]");
    const saved = await page.waitForSelector("[data-saved]");
    await page.waitForFunction(() => document.querySelector("[data-state]")?.textContent === "DISABLED");
    return { revision: Number(await saved.getAttribute("data-saved")) };
  },

  /** 5: a revert from history restores an earlier definition. */
  async revert(browser) {
    const path = `/history?set=${encodeURIComponent(env("SET"))}&key=${encodeURIComponent(env("KEY"))}`;
    const page = await signedIn(browser, env("WRITE_TOKEN"), path);
    const article = `article.change[data-revision="${env("REVISION")}"]`;
    await page.waitForSelector(article);
    await shot(page, "history");
    await page.click(`${article} button[data-revert-key="${env("KEY")}"]`);
    const dialog = await page.waitForSelector("#modal .dialog pre.diff");
    check((await dialog.textContent()).length > 0, "the revert shows no diff");
    await page.click("#modal [data-confirm]");
    const done = await page.waitForSelector("[data-reverted]");
    return { revision: Number(await done.getAttribute("data-reverted")) };
  },

  /** 6: every node at the head revision, or one of them lagging. */
  async propagation(browser) {
    const page = await signedIn(browser, env("READ_TOKEN"), "/propagation");
    const head = env("HEAD"), lagging = process.env.NODE || "";
    const nodes = env("NODES").split(",");
    await page.waitForFunction(([head, nodes, lagging]) => {
      const s = document.querySelector("#summary");
      if (!s || s.dataset.head !== head) return false;
      return nodes.every((n) => {
        const t = document.querySelector(`.tile[data-node="${n}"]`);
        return t && t.dataset.state === (n === lagging ? "lagging" : "current");
      });
    }, [head, nodes, lagging], { timeout: 30000 });
    const summary = await page.textContent("#summary");
    if (!lagging) await shot(page, "propagation");
    const states = await page.$$eval(".tile[data-node]", (ts) => ts.map((t) => [t.dataset.node, t.dataset.state]));
    return { summary: summary.replace(/\s+/g, " ").trim(), states: Object.fromEntries(states) };
  },

  /** The propagation page's rendering of 300 nodes (3 regions × 5 hubs ×
   * 19 PoPs, a tenth of them lagging), timed in the page. */
  async "render-300"(browser) {
    const page = await signedIn(browser, env("READ_TOKEN"), "/propagation");
    await page.waitForSelector("#summary");
    const ms = await page.evaluate(() => {
      const now = Date.now(), head = 5000, nodes = [];
      for (let r = 0; r < 3; r++) {
        for (let h = 0; h < 5; h++) {
          const hub = `hub-${r}-${h}`;
          nodes.push({ nodeId: hub, role: "NODE_ROLE_HUB", region: `region-${r}`, via: "", appliedRevision: head,
            lastReportUnixMs: now, rejectedRevision: 0, conflictHistoryId: "" });
          for (let p = 0; p < 19; p++) {
            nodes.push({ nodeId: `pop-${r}-${h}-${p}`, role: "NODE_ROLE_POP", region: `region-${r}`, via: hub,
              appliedRevision: p % 10 === 0 ? head - 1 : head, lastReportUnixMs: now, rejectedRevision: 0, conflictHistoryId: "" });
          }
        }
      }
      const view = { headRevision: head, nodes, revisions: [], appliedDistribution: { [head]: 270, [head - 1]: 30 } };
      const view_el = document.querySelector("#view");
      const times = [];
      for (let i = 0; i < 30; i++) {
        const t0 = performance.now();
        view_el.innerHTML = window.flagmeshConsole.renderPropagation(view, now);
        void view_el.offsetHeight; // layout included
        times.push(performance.now() - t0);
      }
      times.sort((a, b) => a - b);
      return { nodes: nodes.length, tiles: document.querySelectorAll(".tile[data-node]").length,
        median_ms: times[15], max_ms: times[29] };
    });
    check(ms.tiles === 300, `rendered ${ms.tiles} tiles, not 300`);
    return ms;
  },

  /** The sign-in page, for the docs. */
  async "sign-in-page"(browser) {
    const context = await browser.newContext({ viewport: { width: 1280, height: 600 } });
    const page = await context.newPage();
    await page.goto(CONSOLE + "/");
    await page.waitForSelector("#token");
    await page.fill("#token", "wrong-token");
    await page.click("form#signin button[type=submit]");
    const error = await (await page.waitForSelector("#signin-error [data-error]")).textContent();
    check(error.includes("UNAUTHENTICATED"), `a wrong token is not refused: ${error}`);
    await shot(page, "sign-in");
    return { error };
  },
};

const name = process.argv[2];
const journey = journeys[name];
if (!journey) {
  console.error(`no journey "${name}"; journeys: ${Object.keys(journeys).join(", ")}`);
  process.exit(2);
}
const browser = await chromium.launch({ executablePath: env("CHROMIUM"), args: ARGS, headless: true });
try {
  const result = await journey(browser);
  console.log("result " + JSON.stringify(result));
} catch (e) {
  console.error(`journey ${name} failed: ${e.stack || e}`);
  if (process.env.FAILURE_DIR) {
    for (const [i, page] of browser.contexts().flatMap((c) => c.pages()).entries()) {
      await page.screenshot({ path: `${process.env.FAILURE_DIR}/${name}-${i}.png`, fullPage: true }).catch(() => {});
      console.error(`page ${i} at ${page.url()}:\n` + (await page.textContent("main").catch(() => "")));
    }
  }
  process.exitCode = 1;
} finally {
  await browser.close();
}
