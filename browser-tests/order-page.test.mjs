// The gateway's page in a real browser: headless Chromium (Debian's
// /usr/bin/chromium) driven by playwright-core.
//
// Starts the order system (target/<profile>/order-system) with its own
// ports, databases (a name prefix) and RabbitMQ vhost, and the push service
// as a separate process (target/<profile>/push-service) that the gateway
// reaches over EXTERNAL_PUSH_URL, so that the test can stop and start it.
// Then, in the page: register, deposit, one order that succeeds and one that
// fails, both seen changing on screen without a reload, and their
// notifications arriving from the event stream (no refetch); the page's requests
// go over HTTP/2; the push service is stopped, an order is placed and its
// outcome shown by long polling (Prefer: wait), the push service starts again and the page
// catches up from the event stream.
//
// Environment: PROFILE (debug), CHROMIUM (/usr/bin/chromium),
// POSTGRES_URL, AMQP_BASE, RABBITMQ_API as in scripts/test's servers;
// SCREENSHOT=file.png keeps a picture of the page at the end.

import { chromium } from 'playwright-core';
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const profile = process.env.PROFILE || 'debug';
const bin = (name) => path.join(root, 'target', profile, name);
const postgres = process.env.POSTGRES_URL || 'postgres://postgres@127.0.0.1:5432';
const amqpBase = process.env.AMQP_BASE || 'amqp://guest:guest@127.0.0.1:5672';
const rabbitApi = process.env.RABBITMQ_API || 'http://127.0.0.1:15672/api';
const rabbitAuth = 'Basic ' + Buffer.from('guest:guest').toString('base64');
const TIMEOUT = 30_000;

const run = `b${Math.random().toString(16).slice(2, 10)}`;
const children = [];
let step = 'start';

function log(...args) { console.log(`[browser-test] ${args.join(' ')}`); }
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

/// A gateway port with the five after it free too (the launcher's internal ports).
async function freePortBlock() {
  for (let i = 0; i < 50; i++) {
    const base = 20000 + Math.floor(Math.random() * 30000);
    const ok = await Promise.all([0, 1, 2, 3, 4, 5].map((n) => new Promise((resolve) => {
      const s = net.createServer();
      s.once('error', () => resolve(false));
      s.listen(base + n, '127.0.0.1', () => s.close(() => resolve(true)));
    })));
    if (ok.every(Boolean)) return base;
  }
  throw new Error('no free block of ports');
}

async function rabbit(method, p, body) {
  const r = await fetch(`${rabbitApi}${p}`, {
    method,
    headers: { authorization: rabbitAuth, 'content-type': 'application/json' },
    body: body && JSON.stringify(body),
  });
  if (!r.ok && !(method === 'DELETE' && r.status === 404)) throw new Error(`RabbitMQ API ${method} ${p}: ${r.status}`);
}

function start(name, file, env) {
  const child = spawn(file, [], { env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'warn', ...env }, stdio: ['ignore', 'inherit', 'inherit'] });
  child.name = name;
  child.exited = new Promise((resolve) => child.once('exit', resolve));
  children.push(child);
  log(`started ${name} (pid ${child.pid})`);
  return child;
}

async function stop(child) {
  child.kill('SIGTERM');
  const code = await Promise.race([child.exited, sleep(20_000).then(() => 'timeout')]);
  if (code === 'timeout') child.kill('SIGKILL');
  log(`stopped ${child.name} (${code})`);
}

async function until(what, check, limit = TIMEOUT) {
  const deadline = Date.now() + limit;
  for (;;) {
    try { const v = await check(); if (v) return v; } catch (_) { /* not yet */ }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(200);
  }
}

async function main() {
  const gatewayPort = await freePortBlock();
  const httpsPort = await freePort();
  const pushPort = await freePort();
  const mailDir = mkdtempSync(path.join(os.tmpdir(), 'order-system-browser-'));
  const base = `https://127.0.0.1:${httpsPort}`;

  step = 'rabbitmq vhost';
  await rabbit('PUT', `/vhosts/${run}`);
  await rabbit('PUT', `/permissions/${run}/guest`, { configure: '.*', write: '.*', read: '.*' });
  const amqp = `${amqpBase}/${run}`;

  step = 'starting the system';
  // The launcher's gateway signs who the caller is; the push service, its
  // own process, verifies that with the public half.
  const keys = Object.fromEntries(execFileSync(bin('order-system'), ['internal-keys'], { encoding: 'utf8' })
    .split('\n').filter((l) => l.startsWith('INTERNAL_')).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
  const pushEnv = {
    INTERNAL_VERIFY_KEY: keys.INTERNAL_VERIFY_KEY,
    AMQP_URL: amqp,
    PUSH_ADDR: `127.0.0.1:${pushPort}`,
    PUSH_TLS_ADDR: '',
    SSE_HEARTBEAT_SECS: '2',
    SSE_RETRY_MS: '1000',
    PUSH_DRAIN_SECS: '1',
  };
  let push = start('push-service', bin('push-service'), pushEnv);
  start('order-system', bin('order-system'), {
    POSTGRES_URL: postgres,
    DATABASE_PREFIX: `${run}_`,
    AMQP_URL: amqp,
    GATEWAY_ADDR: `127.0.0.1:${gatewayPort}`,
    GATEWAY_HTTPS_ADDR: `127.0.0.1:${httpsPort}`,
    EXTERNAL_PUSH_URL: `http://127.0.0.1:${pushPort}`,
    INTERNAL_SIGNING_KEY: keys.INTERNAL_SIGNING_KEY,
    PUSH_TLS_ADDR: '',
    MAIL_DIR: mailDir,
  });
  // Ready when the gateway verifies tokens (identity is up with its key).
  await until('the gateway', async () => {
    const r = await fetch(`http://127.0.0.1:${gatewayPort}/api/v1/identity/logout`, { method: 'POST', headers: { authorization: 'Bearer x.y.z' } });
    return r.status === 401;
  }, 120_000);
  await until('the push service', async () => (await fetch(`http://127.0.0.1:${pushPort}/health/ready`)).ok, 60_000);

  step = 'browser';
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--ignore-certificate-errors'],
  });
  try {
    const page = await browser.newPage({ ignoreHTTPSErrors: true });
    page.on('pageerror', (e) => log(`page error: ${e.message}`));
    page.setDefaultTimeout(TIMEOUT);
    await page.goto(`${base}/`);
    await page.evaluate(() => { window.__notReloaded = true; });

    step = 'register';
    const email = `${run}@example.com`;
    await page.fill('#register-form input[name=email]', email);
    await page.fill('#register-form input[name=password]', 'correct horse battery');
    await page.fill('#register-form input[name=firstName]', 'Browser');
    await page.click('#register-form button[type=submit]');
    await page.waitForSelector('#app:not([hidden])');
    await page.waitForSelector('#stream-state[data-state=live]');
    log('registered and logged in; stream live');
    // The page fetched its notifications once, when it opened; from now on
    // a new one must come from the event stream, not from a refetch.
    const listFetches = [];
    page.on('request', (r) => {
      if (new URL(r.url()).pathname === '/api/v1/notifications') listFetches.push(r.url());
    });

    step = 'deposit';
    await page.fill('#deposit-form input[name=amount]', '100');
    await page.click('#deposit-form button[type=submit]');
    await page.waitForFunction(() => document.getElementById('balance').textContent === '100.00');

    step = 'order that succeeds';
    const order = async (price) => {
      const before = await page.locator('#orders tr').count();
      await page.fill('#order-form input[name=price]', String(price));
      await page.click('#order-form button[type=submit]');
      await page.waitForFunction((n) => document.querySelectorAll('#orders tr').length === n + 1, before);
      return page.locator('#orders tr').first().getAttribute('data-order-id');
    };
    const row = (id) => `#orders tr[data-order-id="${id}"]`;
    const ok = await order(60);
    await page.waitForSelector(`${row(ok)}[data-status=succeeded][data-event-id]`);
    await page.waitForFunction(() => document.getElementById('balance').textContent === '40.00');
    log(`order ${ok} succeeded on screen (from the stream)`);

    step = 'order that fails';
    const failed = await order(100);
    await page.waitForSelector(`${row(failed)}[data-status=failed][data-event-id]`);
    const reason = await page.locator(`${row(failed)} td`).nth(3).textContent();
    if (reason !== 'not enough money') throw new Error(`reason shown: ${reason}`);
    log(`order ${failed} failed on screen: ${reason}`);

    step = 'notifications';
    await page.waitForFunction(() => {
      const live = [...document.querySelectorAll('#notifications li[data-live]')];
      return live.some((li) => li.textContent.includes('not enough money'))
        && live.some((li) => li.textContent.includes('successfully processed'));
    });
    const shown = await page.locator('#notifications li').allTextContents();
    if (shown.length !== 2 || !shown[0].includes('not enough money')) {
      throw new Error(`notifications shown, newest first: ${JSON.stringify(shown)}`);
    }
    if (listFetches.length) throw new Error(`the list was fetched again: ${listFetches.join(', ')}`);
    log('both notifications appeared from the event stream: no refetch, no reload');

    step = 'HTTP/2';
    const protocols = await page.evaluate(() => performance.getEntriesByType('navigation')
      .concat(performance.getEntriesByType('resource'))
      .map((e) => ({ name: e.name, protocol: e.nextHopProtocol })));
    const notH2 = protocols.filter((p) => p.protocol !== 'h2');
    if (protocols.length < 5 || notH2.length > 0) {
      throw new Error(`expected every request over h2: ${JSON.stringify(protocols)}`);
    }
    log(`${protocols.length} requests, all over h2`);

    step = 'push service stopped';
    const longPolls = [];
    page.on('request', (r) => { if ((r.headers().prefer || '').startsWith('wait=')) longPolls.push(r.url()); });
    await stop(push);
    await page.waitForFunction(() => document.getElementById('stream-state').dataset.state !== 'live');
    const whileDown = await order(10);
    log(`order ${whileDown} placed while the push service is down`);
    // Let it settle in the back end while nobody streams it.
    await until('the order to settle', async () => {
      const status = await page.evaluate(async (id) => (await (await fetch(`/api/v1/ordering/orders/${id}`)).json()).status, whileDown);
      return status === 'succeeded';
    });

    step = 'polling while the stream is down';
    // The page polls the pending order and shows its outcome without the stream.
    await page.waitForSelector(`${row(whileDown)}[data-status=succeeded]`);
    if (await page.locator(row(whileDown)).getAttribute('data-event-id') !== null) {
      throw new Error('an event arrived while the push service was down');
    }
    if (!longPolls.some((u) => u.endsWith(`/ordering/orders/${whileDown}`))) {
      throw new Error(`the page did not long-poll the pending order: ${JSON.stringify(longPolls)}`);
    }
    log(`order ${whileDown} succeeded on screen by long polling (Prefer: wait)`);

    step = 'push service started again';
    push = start('push-service', bin('push-service'), pushEnv);
    await page.waitForSelector('#stream-state[data-state=live]', { timeout: 60_000 });
    await page.waitForSelector(`${row(whileDown)}[data-status=succeeded][data-event-id]`);
    const ids = await page.evaluate(() => [...document.querySelectorAll('#orders tr')].map((r) => Number(r.dataset.eventId)));
    if (!(ids[0] > ids[1] && ids[1] > ids[2])) throw new Error(`event ids not increasing: ${ids}`);
    log(`the page caught up from the stream (event ids ${ids.reverse().join(', ')})`);

    step = 'no reload';
    if (!(await page.evaluate(() => window.__notReloaded === true))) throw new Error('the page was reloaded');
    await page.waitForFunction(() => document.getElementById('balance').textContent === '30.00');
    if (process.env.SCREENSHOT) await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
    log('PASS');
  } finally {
    await browser.close();
  }
}

let failed = false;
try {
  await main();
} catch (e) {
  failed = true;
  console.error(`[browser-test] FAIL at step "${step}": ${e.stack || e}`);
} finally {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) await stop(c);
  await rabbit('DELETE', `/vhosts/${run}`).catch(() => {});
  for (const db of ['identity', 'billing', 'ordering', 'notification']) {
    try {
      execFileSync('psql', [`${postgres}/postgres`, '-qc', `DROP DATABASE IF EXISTS "${run}_${db}" WITH (FORCE)`], { stdio: 'ignore' });
    } catch (_) { /* best effort */ }
  }
}
process.exit(failed ? 1 : 0);
