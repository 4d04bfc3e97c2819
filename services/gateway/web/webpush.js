// "Notify me when my order settles": subscribes this browser to Web Push
// with the server's VAPID public key (service worker /sw.js) and hands the
// subscription to the notification service, or removes it again. Kept apart
// from app.js: it needs nothing of the page but its button, and app.js's
// `api()` (index.html loads app.js first).
'use strict';

(function () {
  const BASE = '/notifications';  // the notification service, under app.js's API
  const button = document.getElementById('push-toggle');
  const note = document.getElementById('push-state');
  const say = (text) => { note.textContent = text || ''; };

  if (!('serviceWorker' in navigator) || !('PushManager' in window) || !('Notification' in window)) {
    button.hidden = true;
    say('This browser cannot show notifications while the page is closed.');
    return;
  }

  // The page's one API call (app.js, loaded before this script), under the
  // notification service's path.
  const call = (method, path, body) => api(method, BASE + path, body);

  function base64urlToBytes(text) {
    const b64 = text.replace(/-/g, '+').replace(/_/g, '/') + '='.repeat((4 - (text.length % 4)) % 4);
    return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  }

  async function current() {
    const reg = await navigator.serviceWorker.getRegistration('/');
    return reg ? reg.pushManager.getSubscription() : null;
  }

  async function render() {
    const sub = await current();
    button.dataset.subscribed = sub ? 'yes' : 'no';
    button.textContent = sub ? 'Stop notifying me' : 'Notify me when my order settles';
  }

  async function subscribe() {
    const { publicKey } = await call('GET', '/push-public-key');
    if (await Notification.requestPermission() !== 'granted') {
      throw new Error('notifications are blocked for this page in the browser');
    }
    await navigator.serviceWorker.register('/sw.js');
    const reg = await navigator.serviceWorker.ready;
    const key = base64urlToBytes(publicKey);
    let sub = await reg.pushManager.getSubscription();
    // One made with another server key (the key was rotated) cannot be reused.
    if (sub && sub.options.applicationServerKey
        && new Uint8Array(sub.options.applicationServerKey).join() !== key.join()) {
      await sub.unsubscribe();
      sub = null;
    }
    sub = sub || await reg.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey: key });
    await call('POST', '/push-subscriptions', sub.toJSON());
    say('This browser will be notified when your orders settle, even with the page closed.');
  }

  async function unsubscribe() {
    const sub = await current();
    if (!sub) return;
    try {
      await call('DELETE', '/push-subscriptions', { endpoint: sub.endpoint });
    } catch (_) { /* gone on the server already */ }
    await sub.unsubscribe();
    say('');
  }

  button.addEventListener('click', async () => {
    button.disabled = true;
    try {
      if (button.dataset.subscribed === 'yes') await unsubscribe(); else await subscribe();
    } catch (e) {
      say(`Notifications: ${e.message}`);
    } finally {
      button.disabled = false;
      render();
    }
  });
  render();
}());
