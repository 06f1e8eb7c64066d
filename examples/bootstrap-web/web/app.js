// The browser half of the bootstrap example. The server rendered the page
// with every flag's value already in the HTML (first paint needs no flag
// request) and left two globals:
//   window.__FLAGS__  the bootstrap payload ({flags: {key: {value, …}}, revision})
//   window.__FLAGMESH__  {ofrepUrl, flagSet, context, pollMs, reportUrl}
// From here the OpenFeature web SDK takes over, with the OFREP web provider
// polling the PoP, and the page follows every change.

import { OpenFeature, ProviderEvents } from '@openfeature/web-sdk';
import { OFREPWebProvider } from '@openfeature/ofrep-web-provider';

const config = window.__FLAGMESH__;
const bootstrap = window.__FLAGS__ || { flags: {} };

// each flag read with the accessor of its type, as an application would
const kinds = {};
for (const [key, f] of Object.entries(bootstrap.flags)) {
  const v = f.value;
  kinds[key] =
    typeof v === 'boolean' ? 'boolean' : typeof v === 'number' ? 'number' : typeof v === 'string' ? 'string' : 'object';
}

const client = OpenFeature.getClient();

function read(key) {
  switch (kinds[key]) {
    case 'boolean':
      return client.getBooleanDetails(key, false);
    case 'number':
      return client.getNumberDetails(key, 0);
    case 'string':
      return client.getStringDetails(key, '');
    default:
      return client.getObjectDetails(key, {});
  }
}

// which PoP answers, at which revision: the headers CORS exposes
async function versions() {
  const res = await fetch(`${config.ofrepUrl}/ofrep/v1/evaluate/flags`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', 'flagd-selector': config.flagSet },
    body: JSON.stringify({ context: config.context }),
  });
  return {
    pop: res.headers.get('x-flagmesh-pop'),
    revision: res.headers.get('x-flagmesh-revision'),
    etag: res.headers.get('etag'),
  };
}

let renders = 0;

async function render(cause) {
  const flags = {};
  for (const key of Object.keys(kinds)) {
    const d = read(key);
    flags[key] = { value: d.value, variant: d.variant, reason: d.reason, errorCode: d.errorCode };
    const el = document.getElementById(`flag-${key}`);
    if (el) el.textContent = JSON.stringify(d.value);
  }
  renders += 1;
  const seen = await versions().catch((e) => ({ error: String(e) }));
  document.getElementById('source').textContent = `OFREP (${cause}), PoP ${seen.pop} at revision ${seen.revision}`;
  if (config.reportUrl) {
    // the example's server logs what the page shows (its test reads it)
    await fetch(config.reportUrl, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ cause, renders, flags, ...seen }),
    }).catch(() => {});
  }
}

async function main() {
  const provider = new OFREPWebProvider({
    baseUrl: config.ofrepUrl,
    headers: [['flagd-selector', config.flagSet]],
    pollInterval: config.pollMs,
    changeDetection: 'polling',
    // the first values came with the HTML; nothing to keep between visits
    cacheMode: 'disabled',
  });
  OpenFeature.addHandler(ProviderEvents.ConfigurationChanged, () => render('changed'));
  await OpenFeature.setProviderAndWait(provider, config.context);
  await render('ready');
}

main().catch((e) => {
  document.getElementById('source').textContent = `error: ${e}`;
  if (config.reportUrl) {
    fetch(config.reportUrl, { method: 'POST', body: JSON.stringify({ cause: 'error', error: String(e) }) });
  }
});
