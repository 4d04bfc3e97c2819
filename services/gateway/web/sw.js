// The page's service worker: shows the order outcomes the server sends by
// Web Push (RFC 8030) while no tab of the page is open. The browser decrypts
// the message (RFC 8291) before `push` fires; its body is the JSON the
// notification service queued: {notificationId, orderId, title, body}.
'use strict';

self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (event) => event.waitUntil(self.clients.claim()));

self.addEventListener('push', (event) => {
  let data = {};
  try {
    data = event.data ? event.data.json() : {};
  } catch (_) {
    data = { body: event.data ? event.data.text() : '' };
  }
  event.waitUntil(self.registration.showNotification(data.title || 'Your order', {
    body: data.body || '',
    // A second copy of one notification (a push sent twice) replaces the
    // first instead of showing again.
    tag: data.notificationId || undefined,
    data: { orderId: data.orderId || null },
  }));
});

// A click brings the page forward, or opens it.
self.addEventListener('notificationclick', (event) => {
  event.notification.close();
  event.waitUntil((async () => {
    const windows = await self.clients.matchAll({ type: 'window', includeUncontrolled: true });
    for (const w of windows) {
      if ('focus' in w) return w.focus();
    }
    return self.clients.openWindow('/');
  })());
});

// The push service replaced the subscription (it expired): subscribe again
// with the server's key and hand the new one over, as the page does.
self.addEventListener('pushsubscriptionchange', (event) => {
  event.waitUntil((async () => {
    const resp = await fetch('/api/v1/notifications/push-public-key', { credentials: 'same-origin' });
    if (!resp.ok) return;
    const { publicKey } = await resp.json();
    const sub = await self.registration.pushManager.subscribe({
      userVisibleOnly: true,
      applicationServerKey: base64urlToBytes(publicKey),
    });
    await fetch('/api/v1/notifications/push-subscriptions', {
      method: 'POST',
      credentials: 'same-origin',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(sub),
    });
  })());
});

function base64urlToBytes(text) {
  const b64 = text.replace(/-/g, '+').replace(/_/g, '/') + '='.repeat((4 - (text.length % 4)) % 4);
  return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
}
