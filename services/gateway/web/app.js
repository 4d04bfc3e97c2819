// The order system's page: plain JavaScript, no build step, no dependencies.
// Session: the HttpOnly `accessToken` cookie set by login (sent by fetch and
// EventSource alike). Live order updates and notifications: the SSE stream
// /api/v1/push/orders?notifications=true;
// while it is unavailable, pending orders are long-polled (Prefer: wait).
'use strict';

const API = '/api/v1';
const $ = (id) => document.getElementById(id);
const state = {
  orders: new Map(),      // id -> order
  source: null,           // EventSource
  reconnectTimer: null,
  reconnectAttempts: 0,   // reconnections in a row that did not open a stream
  pollTimer: null,
  lastEventId: sessionStorage.getItem('lastEventId') || '',
};

// The page's one call to the API (webpush.js uses it too): JSON in and out,
// the session cookie sent; an error status throws with the server's message.
async function api(method, path, body) {
  const init = { method, credentials: 'same-origin', headers: {} };
  if (body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(API + path, init);
  const text = await resp.text();
  const data = text ? JSON.parse(text) : null;
  if (!resp.ok) {
    const err = new Error((data && data.message) || resp.statusText);
    err.status = resp.status;
    throw err;
  }
  return data;
}

function say(text) { $('message').textContent = text || ''; }
const money = (n) => Number(n).toFixed(2);

// ---- session ----

async function start() {
  try {
    const account = await api('GET', '/billing/account');
    showApp(account);
  } catch (e) {
    if (e.status === 401) showAuth(); else say(e.message);
  }
}

function showAuth() {
  stopStream();
  $('auth').hidden = false;
  $('app').hidden = true;
  $('logout').hidden = true;
  $('who').textContent = '';
}

async function showApp(account) {
  $('auth').hidden = true;
  $('app').hidden = false;
  $('logout').hidden = false;
  renderBalance(account);
  try {
    const profile = await api('GET', '/identity/profile');
    $('who').textContent = profile.email || '';
  } catch (_) { /* the name is decoration */ }
  await loadOrders();
  loadNotifications();
  openStream();
}

$('register-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const f = new FormData(ev.target);
  const body = { email: f.get('email'), password: f.get('password') };
  if (f.get('firstName')) body.firstName = f.get('firstName');
  try {
    await api('POST', '/identity/register', body);
    await login(body.email, body.password);
  } catch (e) { say(`Registration failed: ${e.message}`); }
});

$('login-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const f = new FormData(ev.target);
  try { await login(f.get('email'), f.get('password')); } catch (e) { say(`Login failed: ${e.message}`); }
});

async function login(email, password) {
  await api('POST', '/identity/login', { email, password });
  say('');
  state.lastEventId = '';
  sessionStorage.removeItem('lastEventId');
  showApp(await api('GET', '/billing/account'));
}

$('logout').addEventListener('click', async () => {
  try { await api('POST', '/identity/logout'); } catch (_) { /* logged out either way */ }
  state.orders.clear();
  $('orders').replaceChildren();
  $('notifications').replaceChildren();
  showAuth();
});

// ---- balance and orders ----

function renderBalance(account) { $('balance').textContent = money(account.amount); }

async function refreshBalance() {
  try { renderBalance(await api('GET', '/billing/account')); } catch (e) { handle(e); }
}

$('deposit-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const amount = Number(new FormData(ev.target).get('amount'));
  try {
    await api('POST', '/billing/account/deposit', { amount });
    ev.target.reset();
    say('');
    await refreshBalance();
  } catch (e) { handle(e); }
});

$('order-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const price = Number(new FormData(ev.target).get('price'));
  try {
    const order = await api('POST', '/ordering/orders', { price });
    ev.target.reset();
    say('');
    upsertOrder(order);
    schedulePoll();
  } catch (e) { handle(e); }
});

async function loadOrders() {
  try {
    const list = await api('GET', '/ordering/orders');
    list.reverse().forEach((o) => upsertOrder(o));
    schedulePoll();
  } catch (e) { handle(e); }
}

// Keeps the newest-known state of an order and its row. `eventId` is set
// when the update came from the event stream.
function upsertOrder(order, eventId) {
  const known = state.orders.get(order.id);
  if (known && known.status !== 'pending' && order.status === 'pending') return; // stale
  const merged = Object.assign({}, known, order);
  state.orders.set(order.id, merged);
  let row = document.querySelector(`tr[data-order-id="${order.id}"]`);
  if (!row) {
    row = document.createElement('tr');
    row.dataset.orderId = order.id;
    for (let i = 0; i < 5; i++) row.appendChild(document.createElement('td'));
    $('orders').prepend(row);
  }
  const cells = row.children;
  cells[0].textContent = order.id.slice(-8); // ids are UUIDv7: the start is the time
  cells[0].title = order.id;
  cells[1].textContent = money(merged.price);
  cells[2].textContent = merged.status;
  cells[2].className = `status status-${merged.status}`;
  cells[3].textContent = merged.reason || '';
  cells[4].textContent = new Date(merged.occurredAt || merged.updatedAt || merged.createdAt || Date.now())
    .toLocaleTimeString();
  row.dataset.status = merged.status;
  if (eventId !== undefined) row.dataset.eventId = eventId;
}

// ---- notifications ----

function notificationItem(n) {
  const li = document.createElement('li');
  li.textContent = n.message;
  li.dataset.id = n.id;
  return li;
}

async function loadNotifications() {
  try {
    const list = await api('GET', '/notifications');
    // One the stream brought while this request was on its way stays.
    const ids = new Set(list.map((n) => n.id));
    const live = [...$('notifications').children].filter((li) => li.dataset.live && !ids.has(li.dataset.id));
    $('notifications').replaceChildren(...live, ...list.map(notificationItem));
  } catch (e) { handle(e); }
}

// A notification from the event stream: newest first, once (a replay after
// a reconnect may bring one the list already shows).
function onNotificationEvent(ev) {
  rememberId(ev.lastEventId);
  const n = JSON.parse(ev.data);
  const list = $('notifications');
  if ([...list.children].some((li) => li.dataset.id === n.id)) return;
  const li = notificationItem(n);
  li.dataset.live = 'true';
  list.prepend(li);
}
$('refresh-notifications').addEventListener('click', loadNotifications);

// ---- live updates ----

function setStreamState(s) {
  const el = $('stream-state');
  el.dataset.state = s;
  el.textContent = `updates: ${s}`;
}

function rememberId(id) {
  if (!id) return;
  state.lastEventId = id;
  sessionStorage.setItem('lastEventId', id);
}

function onOrderEvent(ev) {
  rememberId(ev.lastEventId);
  const e = JSON.parse(ev.data);
  upsertOrder({ id: e.orderId, status: e.status, price: e.price, reason: e.reason, occurredAt: e.occurredAt },
    ev.lastEventId);
  refreshBalance();
  // Its notification arrives on the stream as its own event.
}

function openStream() {
  stopStream();
  // A first connection resumes from the id this tab saw last (the browser
  // sends Last-Event-ID itself on its own reconnections).
  // `notifications=true`: the user's notifications come on the stream too.
  const url = `${API}/push/orders?notifications=true`
    + (state.lastEventId ? `&lastEventId=${encodeURIComponent(state.lastEventId)}` : '');
  const source = new EventSource(url, { withCredentials: true });
  state.source = source;
  setStreamState('connecting');
  source.addEventListener('open', () => {
    state.reconnectAttempts = 0;
    setStreamState('live');
    // Without an id to resume from, what happened while away is in the list.
    if (!state.lastEventId) loadOrders();
  });
  source.addEventListener('OrderCreated', onOrderEvent);
  source.addEventListener('OrderFailed', onOrderEvent);
  source.addEventListener('NotificationCreated', onNotificationEvent);
  source.addEventListener('reset', (ev) => {
    // Events were missed beyond the retention window: refetch.
    rememberId(ev.lastEventId);
    loadOrders();
    refreshBalance();
    loadNotifications();
  });
  source.addEventListener('error', () => {
    if (state.source !== source) return;
    schedulePoll();
    if (source.readyState === EventSource.CLOSED) {
      // The browser gives up on an error status (e.g. 502 while the push
      // service restarts, 503 while the gateway sheds load): retry
      // ourselves, resuming from the last id.
      setStreamState('polling');
      scheduleReconnect(0);
    } else {
      setStreamState('reconnecting');
    }
  });
}

// Reconnecting after the browser gave up: exponential backoff with jitter,
// so that the pages one restart cut do not all come back at the same
// instant, and never sooner than a Retry-After the server asked for. A
// cheap request first says whether to try yet (401: log in again; 503 or
// 429: wait as its Retry-After says), since EventSource shows no status.
const RECONNECT_BASE_MS = 1000;
const RECONNECT_CAP_MS = 30000;

function reconnectDelay(retryAfterSecs) {
  const ceiling = Math.min(RECONNECT_CAP_MS, RECONNECT_BASE_MS * 2 ** state.reconnectAttempts);
  state.reconnectAttempts += 1;
  const backoff = ceiling / 2 + Math.random() * ceiling / 2;
  const asked = retryAfterSecs > 0 ? retryAfterSecs * 1000 * (1 + Math.random() / 2) : 0;
  return Math.max(backoff, asked);
}

function scheduleReconnect(retryAfterSecs) {
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = setTimeout(async () => {
    let resp;
    try {
      resp = await fetch(API + '/billing/account', { credentials: 'same-origin' });
    } catch (e) {
      return scheduleReconnect(0);   // the network is away
    }
    if (resp.status === 401) return showAuth();
    if (resp.status === 503 || resp.status === 429) {
      return scheduleReconnect(Number(resp.headers.get('retry-after')) || 0);
    }
    openStream();
  }, reconnectDelay(retryAfterSecs));
}

function stopStream() {
  clearTimeout(state.reconnectTimer);
  if (state.source) state.source.close();
  state.source = null;
  setStreamState('off');
}

// While the stream is not live, each pending order is long-polled: the
// server holds the request until the order settles (or 30 s pass, then 304),
// so the outcome shows within milliseconds with one request per order.
const longPolls = new Set();   // ids of orders with a long poll in flight

function schedulePoll() {
  if (state.pollTimer) return;
  state.pollTimer = setTimeout(poll, 2000);
}

function streamLive() { return $('stream-state').dataset.state === 'live'; }

function poll() {
  state.pollTimer = null;
  if ($('app').hidden || streamLive()) return;
  for (const o of state.orders.values()) {
    if (o.status === 'pending' && !longPolls.has(o.id)) longPoll(o.id);
  }
}

async function longPoll(id) {
  longPolls.add(id);
  let tag = null;
  try {
    while (!$('app').hidden && !streamLive()) {
      const headers = { prefer: 'wait=30' };
      if (tag) headers['if-none-match'] = tag;
      const resp = await fetch(`${API}/ordering/orders/${id}`, { credentials: 'same-origin', headers });
      if (resp.status === 401) return showAuth();
      if (resp.status === 304) continue;
      if (!resp.ok) { await new Promise((r) => setTimeout(r, 2000)); continue; }
      tag = resp.headers.get('etag');
      const fresh = await resp.json();
      upsertOrder(fresh);
      if (fresh.status !== 'pending') { refreshBalance(); return; }
    }
  } catch (e) {
    // The network is away: the next poll round tries again.
  } finally {
    longPolls.delete(id);
    schedulePoll();
  }
}

function handle(e) {
  if (e.status === 401) showAuth(); else say(e.message);
}

start();
