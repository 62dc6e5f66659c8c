// The browser client end to end, as people use it: Debian's Chromium (playwright-core, no
// browser download) on the page served by two chat-gateway instances on one Redis, behind
// nginx balancing round-robin. Every wait is on a selector, an event or a condition; no
// fixed sleeps.
//
//   GATEWAY_BIN=target/release/chat-gateway node --test test/     (from e2e/; see ci.sh)
//
// Screenshots go to artifacts/ (UPDATE_SCREENSHOT=1 also refreshes docs/screenshot.png).

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { connectedInstance, exactly, landOn, messages, openUser as openUserAt, send, startStackAndBrowser, watch as watchPage } from '../lib/fixture.mjs';
import { artifactsDir, repoRoot } from '../lib/stack.mjs';

const ROOM = 'lobby';
const XSS = '<img src=x onerror=alert(1)>';

let stack;
let browser;
const problems = { dialogs: [], pageErrors: [] };
const { dialogs, pageErrors } = problems;

/** alice, bob: the two desktop users; their page and instance. */
const users = {};
/** carol: the user whose WebSocket runs through a Playwright route. */
let carol;

before(async () => {
  ({ stack, browser } = await startStackAndBrowser());
});

after(async () => {
  await browser?.close();
  await stack?.stop();
});

// ---- helpers --------------------------------------------------------------------------------

const watch = (page, who) => watchPage(page, who, problems);

function openUser(name, { room = ROOM, contextOptions = {} } = {}) {
  return openUserAt(browser, `${stack.baseUrl}/#room=${room}`, name, { contextOptions, problems });
}

function pending(page, text) {
  return page.locator('#pending-list > li.pending').filter({ has: page.locator('.text', { hasText: exactly(text) }) });
}

async function visibleLog(page) {
  return page.locator('ol.messages:not([hidden]) > li.msg[data-id]').evaluateAll((lis) =>
    lis.map((li) => ({ id: Number(li.dataset.id), author: li.dataset.author, text: li.querySelector('.text').textContent, own: li.classList.contains('own') })),
  );
}

function assertStrictlyIncreasing(log) {
  for (let i = 1; i < log.length; i++) {
    assert.ok(log[i].id > log[i - 1].id, `ids out of order or repeated: ${log[i - 1].id} then ${log[i].id}`);
  }
}

/** A WebSocket frame recorder in the page: status changes and replayed messages. */
async function recordClient(page) {
  await page.evaluate(() => {
    window.__status = [];
    window.__replayed = [];
    window.__t0 = Date.now();
    window.chat.addEventListener('status', (e) => window.__status.push(`${e.detail.state}:${e.detail.attempt}@${Date.now() - window.__t0}`));
    window.chat.addEventListener('messages', (e) => {
      if (e.detail.replay) window.__replayed.push(...e.detail.messages.map((m) => m.text));
    });
  });
}

async function screenshot(page, name) {
  const file = path.join(artifactsDir, name);
  await page.screenshot({ path: file });
  return file;
}

const conversation = [
  ['alice', 'Morning! Is the new gateway build live?'],
  ['bob', 'Yes: two instances behind nginx, both on the same Redis.'],
  ['alice', 'Nice. Messages show up here instantly.'],
  ['bob', 'Ids come from Redis, so everyone sees the same order.'],
  ['alice', 'Then let us restart one and see whether anyone notices.'],
  ['bob', 'Go ahead, the page reconnects on its own.'],
];
const lobbyTexts = [];

// ---- scenarios ------------------------------------------------------------------------------

test('two people on different instances chat both ways', { timeout: 60000 }, async () => {
  users.alice = await openUser('alice');
  users.bob = await openUser('bob');
  // If bob's WebSocket landed on alice's instance, shift nginx's rotation and reload.
  const reloads = await landOn(users.bob, stack.baseUrl, (i) => i !== users.alice.instance);
  console.log(`# alice on ${users.alice.instance}, bob on ${users.bob.instance} (after ${reloads} reloads)`);
  assert.notEqual(users.bob.instance, users.alice.instance, 'the two browsers should be on different instances');
  assert.deepEqual(new Set([users.alice.instance, users.bob.instance]), new Set(['gateway-1', 'gateway-2']));

  for (const [who, text] of conversation) {
    const from = users[who];
    const to = who === 'alice' ? users.bob : users.alice;
    await send(from.page, text);
    await messages(to.page, text).waitFor();
    lobbyTexts.push(text);
  }

  // Author, own messages told apart, in the same order on both sides.
  for (const u of [users.alice, users.bob]) {
    const log = await visibleLog(u.page);
    assert.deepEqual(log.map((m) => m.text), lobbyTexts);
    assert.deepEqual(log.map((m) => m.author), conversation.map(([who]) => who));
    for (const m of log) assert.equal(m.own, m.author === u.name, `own flag of "${m.text}" for ${u.name}`);
    assertStrictlyIncreasing(log);
  }
  // Screen readers hear new messages from others through the polite live region.
  await users.alice.page.locator('#announcer[aria-live="polite"]', { hasText: `bob: ${conversation.at(-1)[1]}` }).waitFor({ state: 'attached' });
  const aliceFirst = messages(users.alice.page, conversation[0][1]);
  assert.equal(await aliceFirst.locator('.author').textContent(), 'alice');
  assert.match(await aliceFirst.locator('time').textContent(), /\d/);

  // More rooms: alice joins two from the form, bob follows a #room= link.
  const { page: a } = users.alice;
  for (const room of ['random', 'ops']) {
    await a.getByLabel('Room to join').fill(room);
    await a.getByLabel('Room to join').press('Enter');
    await a.locator('#room-title', { hasText: `#${room}` }).waitFor();
  }
  await a.getByRole('link', { name: ROOM, exact: true }).click();
  await a.locator('#room-title', { hasText: `#${ROOM}` }).waitFor();
  assert.equal(new URL(a.url()).hash, `#room=${ROOM}`);

  const { page: b } = users.bob;
  await b.goto(`${stack.baseUrl}/#room=random`);
  await b.locator('#room-title', { hasText: '#random' }).waitFor();
  await send(b, 'Lunch at 12:30, anyone?');
  // alice is in #lobby: an unread count appears on #random.
  await a.locator('.room-item[data-room="random"] .unread', { hasText: '1' }).waitFor();
  await b.getByRole('link', { name: ROOM, exact: true }).click();
  await b.locator('#room-title', { hasText: `#${ROOM}` }).waitFor();

  const desktop = await screenshot(a, 'chat-desktop.png');
  if (process.env.UPDATE_SCREENSHOT === '1') fs.copyFileSync(desktop, path.join(repoRoot, 'docs/screenshot.png'));

  // Phone width: a third person opens the room and gets its history.
  const dana = await openUser('dana', {
    contextOptions: { viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true },
  });
  await messages(dana.page, lobbyTexts.at(-1)).waitFor();
  assert.deepEqual((await visibleLog(dana.page)).map((m) => m.text), lobbyTexts);
  await send(dana.page, 'Reading along from my phone.');
  lobbyTexts.push('Reading along from my phone.');
  await screenshot(dana.page, 'chat-phone.png');
  await dana.ctx.close();
  await messages(a, 'Reading along from my phone.').waitFor();
  await messages(b, 'Reading along from my phone.').waitFor();
});

test('a reload shows the history in order', { timeout: 30000 }, async () => {
  const { page } = users.alice;
  await page.reload();
  await connectedInstance(page);
  // The name is remembered: no dialog this time.
  assert.equal(await page.locator('#name-dialog').evaluate((d) => d.open), false);
  await messages(page, lobbyTexts.at(-1)).waitFor();
  const log = await visibleLog(page);
  assert.deepEqual(log.map((m) => m.text), lobbyTexts);
  assertStrictlyIncreasing(log);
  // Rooms are remembered too; leaving one forgets it.
  const rooms = () => page.locator('.room-item').evaluateAll((li) => li.map((x) => x.dataset.room));
  assert.deepEqual(await rooms(), [ROOM, 'random', 'ops']);
  await page.getByRole('button', { name: 'Leave #ops' }).click();
  await page.locator('.room-item[data-room="ops"]').waitFor({ state: 'detached' });
  assert.deepEqual(await rooms(), [ROOM, 'random']);
  assert.deepEqual(JSON.parse(await page.evaluate(() => localStorage.getItem('chat.rooms'))), [ROOM, 'random']);
  assert.equal(await page.locator('#room-title').textContent(), `#${ROOM}`);
});

test('a message containing HTML shows as text', { timeout: 30000 }, async () => {
  await send(users.bob.page, XSS);
  const shown = messages(users.alice.page, XSS);
  await shown.waitFor();
  lobbyTexts.push(XSS);
  assert.equal(await shown.locator('.text').textContent(), XSS);
  assert.ok(await shown.locator('.text').isVisible());
  for (const u of [users.alice, users.bob]) {
    assert.equal(await u.page.locator('#logs img').count(), 0, `${u.name}: an <img> was injected`);
  }
  // A later message arriving after it proves the page kept running (and had every chance to
  // load the bogus image): still no dialog.
  await send(users.alice.page, 'That one stayed text. Good.');
  lobbyTexts.push('That one stayed text. Good.');
  await messages(users.bob.page, 'That one stayed text. Good.').waitFor();
  assert.deepEqual(dialogs, []);
});

test('server errors are shown in words', { timeout: 30000 }, async () => {
  const { page } = users.alice;
  // Over the server's MAX_TEXT_BYTES (4096): refused with `too_large`, never stored.
  const box = page.getByRole('textbox', { name: /^Message #/ });
  const big = 'x'.repeat(5000);
  await box.fill(big);
  await box.press('Enter');
  const failed = page.locator('#pending-list > li.pending[data-state="failed"]');
  await failed.waitFor();
  assert.match(await failed.locator('.pending-status').textContent(), /^Not sent\. That message is too long/);
  await page.getByRole('alert').locator('.toast', { hasText: 'That message is too long for the server' }).waitFor();
  // Retrying as is would fail again: "Edit" puts the text back in the message box.
  await failed.getByRole('button', { name: 'Edit' }).click();
  await failed.waitFor({ state: 'detached' });
  assert.equal(await box.inputValue(), big);
  await box.fill('');
});

test('killing an instance: the browser reconnects through nginx and misses nothing', { timeout: 60000 }, async () => {
  const { alice, bob } = users;
  await recordClient(bob.page);
  // Hold bob's page still (like a tab the OS froze for a moment) so that the messages below
  // are certainly sent while his browser has no connection: its JavaScript, timers and the
  // WebSocket's close event wait until the page resumes.
  const cdp = await bob.ctx.newCDPSession(bob.page);
  await cdp.send('Debugger.enable');
  await cdp.send('Debugger.pause');
  await stack.killGateway(bob.instance);

  const meanwhile = ['Restarted one of them just now.', 'Did you miss anything?', 'These were sent while you were away.'];
  for (const text of meanwhile) {
    await send(alice.page, text);
    lobbyTexts.push(text);
  }
  await cdp.send('Debugger.resume');
  await cdp.send('Debugger.disable');
  await cdp.detach();

  const now = await connectedInstance(bob.page);
  assert.equal(now, alice.instance, 'bob should now be on the surviving instance');
  for (const text of meanwhile) await messages(bob.page, text).waitFor();
  // Barrier: a message sent after them arrives after any duplicate could have.
  await send(alice.page, 'Welcome back.');
  lobbyTexts.push('Welcome back.');
  await messages(bob.page, 'Welcome back.').waitFor();

  for (const text of meanwhile) assert.equal(await messages(bob.page, text).count(), 1, `"${text}" shown once`);
  const log = await visibleLog(bob.page);
  assert.deepEqual(log.map((m) => m.text), lobbyTexts);
  assertStrictlyIncreasing(log);
  const status = await bob.page.evaluate(() => window.__status);
  assert.ok(status.some((s) => s.startsWith('reconnecting:1')), `status went through "reconnecting (attempt 1)": ${status}`);
  // They came with the resume (join with since), not live.
  const replayed = await bob.page.evaluate(() => window.__replayed);
  assert.deepEqual(replayed, meanwhile);
  console.log(`# bob's status: ${status.join(' → ')}`);
  await screenshot(bob.page, 'reconnected-desktop.png');

  // Bring the instance back for what follows.
  await stack.startGateway(bob.instance);
});

test('a pending message survives a reconnect and is delivered once', { timeout: 60000 }, async () => {
  const { bob } = users;
  // carol's WebSocket goes through a Playwright route that forwards every frame to the real
  // server (via nginx), and cuts the connection at chosen moments.
  const wire = { sends: new Map(), refs: new Map(), urls: [], mode: null, refuse: false, cut: null, held: null };
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  ctx.setDefaultTimeout(15000);
  await ctx.routeWebSocket(/\/ws(\?|$)/, (ws) => {
    wire.urls.push(ws.url());
    if (wire.refuse) {
      ws.close({ code: 1013, reason: 'test: refused' });
      return;
    }
    const server = ws.connectToServer();
    let open = true;
    /** A `send` kept from the server on this connection (see 'hold-send'), and its answer. */
    let held = null;
    const cut = () => {
      if (!open) return;
      open = false;
      ws.close({ code: 1012, reason: 'test: cut' });
      server.close({ code: 1000, reason: 'test: cut' });
    };
    wire.cut = cut;
    ws.onMessage((data) => {
      if (!open) return;
      const f = JSON.parse(String(data));
      if (f.type === 'send') {
        wire.sends.set(f.text, (wire.sends.get(f.text) ?? 0) + 1);
        wire.refs.set(f.text, [...(wire.refs.get(f.text) ?? []), f.ref]);
        if (wire.mode?.kind === 'drop-send' && wire.mode.text === f.text) {
          // Lost on the way: the server never sees it.
          wire.mode = null;
          cut();
          return;
        }
        if (wire.mode?.kind === 'hold-send' && wire.mode.text === f.text) {
          // Delayed on the way: the browser loses this connection; the server's side of it
          // stays open, and the frame reaches the server only when the test says so.
          wire.mode = null;
          let acked;
          held = { ref: f.ref, acked: new Promise((resolve) => (acked = resolve)) };
          held.resolve = acked;
          held.release = () => server.send(data);
          held.close = () => server.close({ code: 1000, reason: 'test: done' });
          wire.held = held;
          open = false;
          ws.close({ code: 1012, reason: 'test: cut' });
          return;
        }
        if (wire.mode?.kind === 'drop-ack' && wire.mode.text === f.text) wire.mode.ref = f.ref;
      }
      server.send(data);
    });
    server.onMessage((data) => {
      const f = JSON.parse(String(data));
      if (held && f.type === 'ack' && f.ref === held.ref) held.resolve(f);
      if (!open) return;
      const m = wire.mode;
      if (m?.kind === 'drop-ack' && ((f.type === 'ack' && f.ref === m.ref) || (f.type === 'message' && f.text === m.text))) {
        // Stored, but the connection breaks before the browser hears of it.
        wire.mode = null;
        cut();
        return;
      }
      ws.send(data);
    });
  });
  const page = await ctx.newPage();
  watch(page, 'carol');
  await page.goto(`${stack.baseUrl}/#room=${ROOM}`);
  await page.getByLabel('Your name', { exact: true }).fill('carol');
  await page.getByRole('button', { name: 'Start chatting' }).click();
  await connectedInstance(page);
  await messages(page, lobbyTexts.at(-1)).waitFor();
  await recordClient(page);

  // 1. The frame is lost before reaching the server: re-sent after the reconnect, once.
  const lost = 'This one got lost on the way, then retried.';
  wire.mode = { kind: 'drop-send', text: lost };
  await send(page, lost, { confirmed: false });
  await pending(page, lost).waitFor();
  await messages(page, lost).waitFor();
  await messages(bob.page, lost).waitFor();
  assert.equal(wire.sends.get(lost), 2, 'sent, lost, sent again');
  lobbyTexts.push(lost);

  // 2. Stored, but the ack (and the copy) never reach the browser: found in the resume
  //    replay, not sent again.
  const unacked = 'This one was stored but its ack was lost.';
  wire.mode = { kind: 'drop-ack', text: unacked };
  await send(page, unacked, { confirmed: false });
  await pending(page, unacked).waitFor();
  await messages(page, unacked).waitFor();
  await messages(bob.page, unacked).waitFor();
  lobbyTexts.push(unacked);

  // 3. Written while disconnected: waits for the connection, then goes out once.
  wire.refuse = true;
  wire.cut();
  await page.locator('#status[data-state="reconnecting"]').waitFor();
  assert.match(await page.locator('#status-text').textContent(), /^Reconnecting \(attempt \d+\)…$/);
  const offline = 'Typed while the connection was down.';
  await send(page, offline, { confirmed: false });
  await pending(page, offline).locator('.pending-status', { hasText: 'Waiting for the connection…' }).waitFor();
  await screenshot(page, 'pending-desktop.png');
  wire.refuse = false;
  await page.evaluate(() => window.chat.retryNow());
  await connectedInstance(page);
  await messages(page, offline).waitFor();
  await messages(bob.page, offline).waitFor();
  lobbyTexts.push(offline);

  // 4. Stored only after it was re-sent: the first frame, held back on its old connection
  //    (as if Redis had answered too late for the replay to show it), reaches the server
  //    after the page re-sent the message, with the same ref, on a new connection. The
  //    server answers the late one with the original's id and stores nothing.
  const late = 'This one reached the server twice and was stored once.';
  wire.mode = { kind: 'hold-send', text: late };
  await send(page, late, { confirmed: false });
  await messages(page, late).waitFor();
  await messages(bob.page, late).waitFor();
  const storedId = Number(await messages(page, late).getAttribute('data-id'));
  wire.held.release();
  const lateAck = await wire.held.acked;
  wire.held.close();
  assert.deepEqual(lateAck, { type: 'ack', ref: wire.refs.get(late)[0], room: ROOM, id: storedId });
  lobbyTexts.push(late);

  // Barrier: one more message from carol. Frames on a connection are processed in order,
  // so any duplicate of the above would have reached bob before it.
  await send(page, 'All four arrived exactly once.');
  lobbyTexts.push('All four arrived exactly once.');
  await messages(bob.page, 'All four arrived exactly once.').waitFor();

  for (const text of [lost, unacked, offline, late]) {
    assert.equal(await messages(bob.page, text).count(), 1, `bob sees "${text}" once`);
    assert.equal(await messages(page, text).count(), 1, `carol sees "${text}" once`);
  }
  assert.equal(wire.sends.get(unacked), 1, 'a stored message is not sent again');
  assert.equal(wire.sends.get(offline), 1);
  // A re-send is the same message to the server: the same ref, under the same client id.
  for (const text of [lost, late]) {
    const refs = wire.refs.get(text);
    assert.equal(refs.length, 2, `"${text}" sent twice`);
    assert.equal(refs[1], refs[0], `"${text}" re-sent with its ref`);
  }
  const clientId = await page.evaluate(() => sessionStorage.getItem('chat.client'));
  assert.match(clientId, /^[A-Za-z0-9_-]{1,64}$/);
  assert.deepEqual(new Set(wire.urls.map((u) => new URL(u).searchParams.get('client'))), new Set([clientId]));
  assert.equal(await page.locator('#pending-list > li').count(), 0, 'nothing left pending');
  const log = await visibleLog(bob.page);
  assert.deepEqual(log.map((m) => m.text), lobbyTexts);
  assertStrictlyIncreasing(log);
  const status = await page.evaluate(() => window.__status);
  console.log(`# carol's status: ${status.join(' → ')}`);
  carol = { page, ctx, wire };
});

test('resuming past the retained history shows a notice', { timeout: 30000 }, async () => {
  const { alice } = users;
  const { page, wire } = carol;
  const room = 'archive';
  await alice.page.getByLabel('Room to join').fill(room);
  await alice.page.getByLabel('Room to join').press('Enter');
  await send(alice.page, 'Archive entry 1');
  await send(alice.page, 'Archive entry 2');
  await page.goto(`${stack.baseUrl}/#room=${room}`);
  await messages(page, 'Archive entry 2').waitFor();

  // carol drops off; meanwhile two more messages, and the room's history is cut down to the
  // last one (as if HISTORY_SIZE had been exceeded while she was away).
  wire.refuse = true;
  wire.cut();
  await page.locator('#status[data-state="reconnecting"]').waitFor();
  await send(alice.page, 'Archive entry 3 (gone from history)');
  await send(alice.page, 'Archive entry 4');
  await stack.redis('LTRIM', `chat:{${room}}:history`, '-1', '-1');
  wire.refuse = false;
  await page.evaluate(() => window.chat.retryNow());
  await connectedInstance(page);

  await messages(page, 'Archive entry 4').waitFor();
  await page.locator('ol.messages:not([hidden]) > li.notice', { hasText: 'Some earlier messages are no longer available' }).waitFor();
  assert.equal(await messages(page, 'Archive entry 3 (gone from history)').count(), 0);
  // The notice stands where the hole is.
  const shown = await page
    .locator('ol.messages:not([hidden]) > li:is(.msg, .notice)')
    .evaluateAll((lis) => lis.map((li) => (li.classList.contains('notice') ? '(notice)' : li.querySelector('.text').textContent)));
  assert.deepEqual(shown, ['Archive entry 1', 'Archive entry 2', '(notice)', 'Archive entry 4']);
  await screenshot(page, 'notice-desktop.png');

  // A second tab on the room: a fresh join replays what is retained (entry 4 only), so
  // older messages may exist. These gateways have no API_KEY: the page asks (404) and
  // quietly stops offering them.
  const tab = await carol.ctx.newPage();
  watch(tab, 'carol (second tab)');
  await tab.goto(`${stack.baseUrl}/#room=${room}`);
  await messages(tab, 'Archive entry 4').waitFor();
  const older = tab.getByRole('button', { name: 'Load older messages' });
  const [res] = await Promise.all([tab.waitForResponse((r) => new URL(r.url()).pathname === `/api/rooms/${room}/messages`), older.click()]);
  assert.equal(res.status(), 404);
  await older.waitFor({ state: 'hidden' });
  assert.equal(await tab.locator('#older-status').textContent(), '');
  assert.deepEqual((await visibleLog(tab)).map((m) => m.text), ['Archive entry 4']);
  // Another tab, another client id (the ids of retried sends must not meet).
  const ids = await Promise.all([page, tab].map((p) => p.evaluate(() => sessionStorage.getItem('chat.client'))));
  assert.notEqual(ids[0], ids[1]);
  await carol.ctx.close();
});

test('no dialog and no script error on any page', () => {
  assert.deepEqual(dialogs, []);
  assert.deepEqual(pageErrors, []);
});
