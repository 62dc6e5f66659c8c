// Signing in, end to end: two chat-gateway instances with AUTH_JWT_SECRET (and
// AUTH_ANONYMOUS=read) on one Redis behind nginx, and Debian's Chromium on the page. Tokens
// are minted here (HS256, lib/jwt.mjs) and handed to the page as `#token=…` or through its
// localStorage, as an embedding page would. Every wait is on a selector or a condition.
//
//   GATEWAY_BIN=target/release/chat-gateway node --test test/auth.test.mjs   (from e2e/)

import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { connectedInstance, landOn, messages, send, startStackAndBrowser, watch as watchPage } from '../lib/fixture.mjs';
import { signHs256, nowSecs } from '../lib/jwt.mjs';
import { artifactsDir } from '../lib/stack.mjs';

const ROOM = 'signed';
const SECRET = crypto.randomBytes(32).toString('hex');

let stack;
let browser;
const problems = { dialogs: [], pageErrors: [] };
const { dialogs, pageErrors } = problems;
/** Every token minted here: none may show up in a gateway's log. */
const minted = [];
/** alice and bob: signed in, on different instances; their pages stay open. */
let alice;
let bob;

before(async () => {
  // API_KEY: the server API exists (the page reads older history through it with its token).
  const API_KEY = crypto.randomBytes(24).toString('hex');
  ({ stack, browser } = await startStackAndBrowser({ name: 'auth', gatewayEnv: { AUTH_JWT_SECRET: SECRET, AUTH_ANONYMOUS: 'read', API_KEY } }));
});

after(async () => {
  await browser?.close();
  await stack?.stop();
});

// ---- helpers --------------------------------------------------------------------------------


/** A token for `sub` signed with the gateways' secret; `ttl` seconds from `iat`. */
function mint(sub, name, { ttl = 600, iat = nowSecs(), rooms } = {}) {
  const token = signHs256(SECRET, { sub, name, iat, exp: iat + ttl, ...(rooms ? { rooms } : {}) });
  minted.push(token);
  return token;
}

const watch = (page, who) => watchPage(page, who, problems);

async function openPage(who, hash) {
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  ctx.setDefaultTimeout(15000);
  const page = await ctx.newPage();
  watch(page, who);
  await page.goto(`${stack.baseUrl}/${hash}`);
  return { who, ctx, page };
}


/** The page's address as the browser shows it: no token, the room kept. */
async function assertTokenGone(page, token) {
  const href = await page.evaluate(() => window.location.href);
  assert.ok(!href.includes(token) && !href.includes('token='), `token still in the URL: ${href}`);
  assert.equal(new URL(href).hash, `#room=${ROOM}`);
}

// ---- scenarios ------------------------------------------------------------------------------

test('a token in the URL: its name, read-only, seen by another user on the other instance', { timeout: 60000 }, async () => {
  const aliceToken = mint('u-alice', 'Alice Liddell', { rooms: [ROOM, 'team-*'] });
  alice = await openPage('alice', `#room=${ROOM}&token=${aliceToken}`);
  alice.instance = await connectedInstance(alice.page);
  // Nothing to choose: the name is the token's.
  assert.equal(await alice.page.locator('#name-dialog').evaluate((d) => d.open), false);
  assert.equal(await alice.page.locator('#user-name').textContent(), 'Alice Liddell');
  // Out of the address bar at once, kept for the next visit.
  await assertTokenGone(alice.page, aliceToken);
  assert.equal(await alice.page.evaluate(() => localStorage.getItem('chat.token')), aliceToken);

  const bobToken = mint('u-bob', 'Bob');
  bob = await openPage('bob', `#token=${bobToken}&room=${ROOM}`);
  bob.instance = await connectedInstance(bob.page);
  await assertTokenGone(bob.page, bobToken);
  // Round-robin also serves the page's files: shift the rotation until bob is on the other
  // instance. A reload signs in with the token stored by the first visit.
  const reloads = await landOn(bob, stack.baseUrl, (i) => i !== alice.instance);
  console.log(`# alice on ${alice.instance}, bob on ${bob.instance} (after ${reloads} reloads)`);
  assert.notEqual(bob.instance, alice.instance, 'the two browsers should be on different instances');
  assert.equal(await bob.page.locator('#user-name').textContent(), 'Bob');

  // alice writes; bob, on the other instance, sees it under the token's name.
  const hello = 'Hello from a signed-in Alice.';
  await send(alice.page, hello);
  const atBob = messages(bob.page, hello);
  await atBob.waitFor();
  assert.equal(await atBob.locator('.author').textContent(), 'Alice Liddell');
  assert.equal(await atBob.getAttribute('data-user'), 'u-alice');
  assert.equal(await atBob.evaluate((li) => li.classList.contains('own')), false);
  const atAlice = messages(alice.page, hello);
  assert.equal(await atAlice.evaluate((li) => li.classList.contains('own')), true, 'own message, by user id');
  assert.equal(await atAlice.locator('.you').count(), 1);

  // Who is here: listed by user id under the token's name; "you" is the token's `sub`.
  const members = (page) =>
    page.waitForFunction(() => document.querySelectorAll('#member-list > li.member').length === 2).then(() =>
      page.locator('#member-list > li.member').evaluateAll((lis) => lis.map((li) => `${li.dataset.user}:${li.querySelector('.member-name').textContent}${li.querySelector('.you') ? ' (you)' : ''}`)),
    );
  assert.deepEqual(await members(alice.page), ['u-alice:Alice Liddell (you)', 'u-bob:Bob']);
  assert.deepEqual(await members(bob.page), ['u-bob:Bob (you)', 'u-alice:Alice Liddell']);
  assert.equal(await bob.page.locator('#online-count').textContent(), '2 online');
  // Older history over HTTP is read with the page's token (Authorization: Bearer), so the
  // token's `rooms` apply: its room is read, another is refused in words.
  const older = (room) => alice.page.evaluate((r) => window.chat.fetchOlder(r, 1000), room);
  const own = await older(ROOM);
  assert.equal(own.kind, 'page', JSON.stringify(own));
  assert.deepEqual(own.messages.map((m) => [m.text, m.user]), [['Hello from a signed-in Alice.', 'u-alice']]);
  assert.deepEqual(await older('private'), { kind: 'error', text: 'Could not load older messages: your sign-in does not give you access to this room.' });

  const reply = 'Hi Alice, Bob here.';
  await send(bob.page, reply);
  const replyAtAlice = messages(alice.page, reply);
  await replyAtAlice.waitFor();
  assert.equal(await replyAtAlice.locator('.author').textContent(), 'Bob');
  assert.equal(await replyAtAlice.evaluate((li) => li.classList.contains('own')), false);
  await alice.page.screenshot({ path: path.join(artifactsDir, 'signed-in-desktop.png') });

  // The name field shows the token's name and cannot be edited.
  await alice.page.locator('#user-button').click();
  const nameBox = alice.page.getByLabel('Your name', { exact: true });
  await nameBox.waitFor();
  assert.equal(await nameBox.inputValue(), 'Alice Liddell');
  assert.equal(await nameBox.isEditable(), false);
  await alice.page.locator('#name-dialog').getByRole('button', { name: 'Close' }).click();
  await alice.page.locator('#name-dialog').waitFor({ state: 'hidden' });

  // A room the token does not allow: refused, in words; one its `team-*` pattern allows: in.
  const join = alice.page.getByLabel('Room to join');
  await join.fill('private');
  await join.press('Enter');
  await alice.page
    .getByRole('alert')
    .locator('.toast', { hasText: 'Could not join #private. Your sign-in does not give you access to this room.' })
    .waitFor();
  await alice.page.locator('.room-item[data-room="private"]').waitFor({ state: 'detached' });
  await join.fill('team-blue');
  await join.press('Enter');
  await alice.page.locator('#empty-state', { hasText: 'No messages in #team-blue yet' }).waitFor();
  await alice.page.getByRole('link', { name: ROOM, exact: true }).click();
  await alice.page.locator('#room-title', { hasText: `#${ROOM}` }).waitFor();
});

test('a refused token is said in words, the page backs off, and a new token gets in at once', { timeout: 30000 }, async () => {
  const forged = signHs256('not the gateways secret, though just as long', { sub: 'u-eve', name: 'Eve', exp: nowSecs() + 600 });
  minted.push(forged);
  const eve = await openPage('eve', `#room=${ROOM}&token=${forged}`);
  const note = eve.page.locator('#session-note');
  await note.filter({ hasText: /^The server refused your sign-in token\. / }).waitFor();
  await eve.page.locator('#status[data-state="reconnecting"]').waitFor();
  // Not hammering: the next attempt is seconds away.
  const { retryAt, wait } = await eve.page.evaluate(() => ({ retryAt: window.chat.status.retryAt, wait: window.chat.status.retryAt - Date.now() }));
  assert.ok(wait > 1000, `next attempt in ${wait} ms`);
  await eve.page.screenshot({ path: path.join(artifactsDir, 'refused-desktop.png') });

  // The embedding page hands over a valid token in the URL: used now, not after the backoff.
  const erinToken = mint('u-erin', 'Erin');
  await eve.page.evaluate((t) => {
    window.location.hash = `#token=${t}`;
  }, erinToken);
  await connectedInstance(eve.page);
  assert.ok((await eve.page.evaluate(() => Date.now())) < retryAt, 'connected before the backoff ran out');
  await note.waitFor({ state: 'hidden' });
  assert.equal(await eve.page.locator('#user-name').textContent(), 'Erin');
  await assertTokenGone(eve.page, erinToken);
  await messages(eve.page, 'Hi Alice, Bob here.').waitFor();
  await eve.ctx.close();
});

test('without a token (AUTH_ANONYMOUS=read) the room can be read; sending says why not', { timeout: 30000 }, async () => {
  const dana = await openPage('dana', `#room=${ROOM}`);
  await dana.page.getByLabel('Your name', { exact: true }).fill('dana');
  await dana.page.getByRole('button', { name: 'Start chatting' }).click();
  await connectedInstance(dana.page);
  await messages(dana.page, 'Hi Alice, Bob here.').waitFor();
  await send(dana.page, 'May I join in?', { confirmed: false });
  const failed = dana.page.locator('#pending-list > li.pending[data-state="failed"]');
  await failed.waitFor();
  assert.match(await failed.locator('.pending-status').textContent(), /^Not sent\. Sending needs a sign-in: without one you can read this room, not write in it\.$/);
  await dana.page.getByRole('alert').locator('.toast', { hasText: 'Sending needs a sign-in' }).waitFor();
  // Typing the message sent `typing`, refused too (a reader may not type): not sent again
  // on this connection, and no toast of its own.
  assert.equal(await dana.page.evaluate(() => window.chat.typingRefused), true);
  assert.equal(await dana.page.getByRole('alert').locator('.toast').count(), 1);
  // Older history over HTTP needs no credential for a reader here (AUTH_ANONYMOUS=read).
  const page = await dana.page.evaluate(() => window.chat.fetchOlder('signed', 1000));
  assert.equal(page.kind, 'page', JSON.stringify(page));
  assert.ok(page.messages.some((m) => m.text === 'Hi Alice, Bob here.'));
  // A reader is not listed (its name is self-chosen): dana sees the signed-in users, not herself.
  await dana.page.waitForFunction(() => document.querySelector('#online-count')?.textContent === '2 online');
  assert.equal(await dana.page.locator('#member-list > li.member.self').count(), 0);
  await dana.ctx.close();
});

test('a short-lived token is refreshed from storage before it expires; unrefreshed, the session ends in words', { timeout: 60000 }, async () => {
  // Refreshed 2 s before exp (a quarter of a short life, at least 2 s); the server closes
  // an unrefreshed connection at exp + its 5 s leeway.
  const t0 = nowSecs();
  const first = mint('u-carol', 'Carol', { iat: t0, ttl: 5 });
  const second = mint('u-carol', 'Carol', { iat: t0, ttl: 8 });
  const carol = await openPage('carol', `#room=${ROOM}&token=${first}`);
  const { page } = carol;
  await connectedInstance(page);
  const note = page.locator('#session-note');
  assert.equal(await page.locator('#status').getAttribute('data-token-exp'), String(t0 + 5));
  await page.evaluate(() => {
    window.__conn = window.chat.connSeq;
    window.__states = [];
    window.chat.addEventListener('status', (e) => window.__states.push(e.detail.state));
  });

  // Due for a refresh, and the source holds the same token: said in words.
  await note.filter({ hasText: /^Your session expires at .+ and no new sign-in token is available yet\.$/ }).waitFor();
  // The embedding page stores a new token: the page refreshes with it (`refreshed` moves exp).
  await page.evaluate((t) => localStorage.setItem('chat.token', t), second);
  await page.locator(`#status[data-state="connected"][data-token-exp="${t0 + 8}"]`).waitFor();

  // Past the moment the server would have closed the first token's connection, before the
  // second's: still the same connection, never disconnected, and it still works.
  await page.waitForFunction((t) => Date.now() / 1000 > t, t0 + 5 + 5 + 1.4, { polling: 100 });
  assert.equal(await page.locator('#status').getAttribute('data-state'), 'connected');
  assert.equal(await page.evaluate(() => window.chat.connSeq), await page.evaluate(() => window.__conn));
  assert.deepEqual(await page.evaluate(() => window.__states), []);
  const still = 'Still here after my first token expired.';
  await send(page, still);
  await messages(alice.page, still).waitFor();

  // Nothing new in the source this time: at the second token's end the server closes (4001).
  await note.filter({ hasText: 'Your session expired. Waiting for a new sign-in token…' }).waitFor();
  await page.locator('#status[data-state="offline"]').waitFor();
  await page.screenshot({ path: path.join(artifactsDir, 'expired-desktop.png') });
  // A new token in the URL: back in at once, and out of the URL again.
  const third = mint('u-carol', 'Carol');
  await page.evaluate((t) => {
    window.location.hash = `#token=${t}`;
  }, third);
  await connectedInstance(page);
  await note.waitFor({ state: 'hidden' });
  await assertTokenGone(page, third);
  assert.equal(await page.evaluate(() => localStorage.getItem('chat.token')), third);
  assert.equal(await page.locator('#user-name').textContent(), 'Carol');
  await messages(page, still).waitFor();
  await carol.ctx.close();
});

test('no dialog, no script error, and no token in the gateways\' logs', () => {
  assert.deepEqual(dialogs, []);
  assert.deepEqual(pageErrors, []);
  const logs = stack.logFiles().filter((f) => path.basename(f).startsWith('gateway-'));
  assert.equal(logs.length, 2);
  for (const file of logs) {
    const text = fs.readFileSync(file, 'utf8');
    for (const token of minted) assert.ok(!text.includes(token), `${path.basename(file)} contains a token`);
  }
});
