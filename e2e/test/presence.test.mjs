// Who is here, who is typing, and older history, end to end: Debian's Chromium on the page
// served by two chat-gateway instances on one Redis behind nginx, the gateways started with
// the server API on (API_KEY), a short JOIN_REPLAY_LIMIT (a fresh join shows only the
// newest 5 messages) and a short presence lease (PRESENCE_TTL_SECS=3, so the users of a
// killed instance are reported gone within seconds). Every wait is on a selector or a
// condition; nothing sleeps for a fixed time.
//
//   GATEWAY_BIN=target/release/chat-gateway node --test test/presence.test.mjs   (from e2e/)

import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { landOn, messages, openUser as openUserAt, startStackAndBrowser } from '../lib/fixture.mjs';
import { artifactsDir } from '../lib/stack.mjs';

const ROOM = 'hall';
const API_KEY = crypto.randomBytes(24).toString('hex');
const JOIN_REPLAY_LIMIT = 5;
const PRESENCE_TTL_SECS = 3;
/** The client shows someone typing this long after their last `typing` (web/chat.js TYPING_SHOW_MS). */
const TYPING_SHOW_MS = 3500;

let stack;
let browser;
const problems = { dialogs: [], pageErrors: [] };
/** ann and ben: on different instances, in ROOM, for the whole file. */
let ann;
let ben;

before(async () => {
  ({ stack, browser } = await startStackAndBrowser({
    name: 'presence',
    gatewayEnv: { API_KEY, JOIN_REPLAY_LIMIT: String(JOIN_REPLAY_LIMIT), PRESENCE_TTL_SECS: String(PRESENCE_TTL_SECS) },
  }));
});

after(async () => {
  await browser?.close();
  await stack?.stop();
});

// ---- helpers --------------------------------------------------------------------------------

function openUser(name, { room = ROOM, contextOptions } = {}) {
  return openUserAt(browser, `${stack.baseUrl}/#room=${room}`, name, { contextOptions, problems });
}

/** The member list as shown: [{user, name, self}], in display order. */
function memberList(page) {
  return page.locator('#member-list > li.member').evaluateAll((lis) =>
    lis.map((li) => ({ user: li.dataset.user, name: li.querySelector('.member-name').textContent, self: li.querySelector('.you') !== null })),
  );
}

/**
 * Waits until `page` lists exactly `names` (any order) under "N online", and none of the
 * user ids in `without`. The error says what the page showed instead.
 */
async function waitForMembers(page, names, { without = [], timeout = 15000 } = {}) {
  const want = [...names].sort();
  try {
    await page.waitForFunction(
      ({ want, without }) => {
        const lis = [...document.querySelectorAll('#member-list > li.member')];
        const got = lis.map((li) => li.querySelector('.member-name').textContent).sort();
        return (
          JSON.stringify(got) === JSON.stringify(want) &&
          document.querySelector('#online-count')?.textContent === `${want.length} online` &&
          !lis.some((li) => without.includes(li.dataset.user))
        );
      },
      { want, without },
      { timeout, polling: 100 },
    );
  } catch (e) {
    const shown = await memberList(page).catch(() => []);
    const count = await page.locator('#online-count').textContent().catch(() => '?');
    throw new Error(`waiting for members ${JSON.stringify(want)} (without ${without}): the page shows "${count}", ${JSON.stringify(shown)}\n${e.message}`);
  }
}

/** This page's user id in presence lists (anon-<instance>-<conn> with authentication off). */
const presenceId = (page) => page.evaluate(() => window.chat.presenceId);

/** Waits until the typing line under the messages says `text` ('' = nobody is typing). */
async function waitForTyping(page, text, { timeout = 15000 } = {}) {
  await page.waitForFunction((want) => document.querySelector('#typing').textContent === want, text, { timeout, polling: 50 });
}

/** Waits until the page's client may send `typing` in `room` again (it sends one per 2 s at most). */
async function typingAllowed(page, room = ROOM) {
  await page.waitForFunction((r) => Date.now() - window.chat.rooms.get(r).typingSentAt >= 2000, room, { polling: 100 });
}

/** Records, in the page, the order of the client's `typing`, `messages` and `presence` events. */
async function recordEvents(page) {
  await page.evaluate(() => {
    window.__events = [];
    const chat = window.chat;
    chat.addEventListener('typing', (e) => window.__events.push(`typing:${chat.typistsOf(e.detail.room).map((t) => t.name).join('+')}`));
    chat.addEventListener('messages', (e) => window.__events.push(`messages:${e.detail.messages.map((m) => m.text).join('+')}`));
    chat.addEventListener('presence', () => window.__events.push('presence'));
  });
}

/**
 * Plain WebSocket clients opened inside `page` (other users, without a page of their own):
 * `open(name)` connects to ROOM under that name and resolves once it is joined;
 * `typing(name)` sends `typing`; `close(name)` closes it.
 */
function rawClients(page) {
  return {
    open: (name) =>
      page.evaluate(
        ({ name, room }) =>
          new Promise((resolve, reject) => {
            const url = new URL('ws', window.location.href);
            url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
            url.hash = '';
            url.search = new URLSearchParams({ room, username: name }).toString();
            const ws = new WebSocket(url);
            (window.__raw ??= {})[name] = ws;
            ws.onmessage = (e) => {
              if (JSON.parse(e.data).type === 'joined') resolve();
            };
            ws.onerror = () => reject(new Error(`${name}: WebSocket error`));
          }),
        { name, room: ROOM },
      ),
    typing: (name) => page.evaluate(({ name, room }) => window.__raw[name].send(JSON.stringify({ type: 'typing', room })), { name, room: ROOM }),
    close: (name) => page.evaluate((n) => window.__raw[n].close(1000), name),
  };
}

/** Posts `text` to `room` through the server API (as a backend would), returning the stored message. */
async function post(room, text, username = 'feed') {
  const res = await fetch(`${stack.baseUrl}/api/rooms/${room}/messages`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${API_KEY}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ text, username }),
  });
  assert.equal(res.status, 201, `POST ${room}: ${res.status} ${await res.clone().text()}`);
  return res.json();
}

async function shownIds(page) {
  return page.locator('ol.messages:not([hidden]) > li.msg[data-id]').evaluateAll((lis) => lis.map((li) => Number(li.dataset.id)));
}

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

// ---- scenarios ------------------------------------------------------------------------------

test('who is here: across instances, a closed tab, a killed instance', { timeout: 60000 }, async () => {
  ann = await openUser('ann');
  ben = await openUser('ben');
  const reloads = await landOn(ben, stack.baseUrl, (i) => i !== ann.instance);
  console.log(`# ann on ${ann.instance}, ben on ${ben.instance} (after ${reloads} reloads)`);

  // Each sees the other, and themselves marked, with the count in the header.
  await waitForMembers(ann.page, ['ann', 'ben']);
  await waitForMembers(ben.page, ['ann', 'ben']);
  const annId = await presenceId(ann.page);
  const benId = await presenceId(ben.page);
  assert.match(annId, new RegExp(`^anon-${ann.instance}-\\d+$`));
  assert.deepEqual(await memberList(ann.page), [
    { user: annId, name: 'ann', self: true },
    { user: benId, name: 'ben', self: false },
  ]);
  assert.deepEqual(await memberList(ben.page), [
    { user: benId, name: 'ben', self: true },
    { user: annId, name: 'ann', self: false },
  ]);
  assert.equal(await ann.page.locator('#online-button').getAttribute('aria-expanded'), 'true');

  // A third person comes, changes her name (without a sign-in that takes a new connection,
  // opened at once: no "reconnecting"), and closes the tab: gone from both lists at once.
  const cat = await openUser('cat');
  await waitForMembers(ann.page, ['ann', 'ben', 'cat']);
  await waitForMembers(ben.page, ['ann', 'ben', 'cat']);
  await cat.page.evaluate(() => {
    window.__states = [];
    window.chat.addEventListener('status', (e) => window.__states.push(e.detail.state));
  });
  await cat.page.locator('#user-button').click();
  await cat.page.getByLabel('Your name', { exact: true }).fill('cathy');
  await cat.page.getByRole('button', { name: 'Start chatting' }).click();
  await waitForMembers(ann.page, ['ann', 'ben', 'cathy']);
  await waitForMembers(cat.page, ['ann', 'ben', 'cathy']);
  assert.deepEqual(await cat.page.evaluate(() => window.__states), ['connecting', 'connected']);
  await cat.ctx.close();
  await waitForMembers(ann.page, ['ann', 'ben']);
  await waitForMembers(ben.page, ['ann', 'ben']);

  // Phone-sized: the list is behind the count in the header, opened on demand.
  const dan = await openUser('dan', { contextOptions: { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true } });
  await waitForMembers(dan.page, ['ann', 'ben', 'dan']);
  const toggle = dan.page.locator('#online-button');
  assert.equal(await toggle.textContent().then((t) => t.trim()), '3 online');
  assert.equal(await toggle.getAttribute('aria-expanded'), 'false');
  assert.equal(await dan.page.locator('#members').isVisible(), false);
  await toggle.click();
  await dan.page.locator('#member-list > li.member.self', { hasText: 'dan' }).waitFor({ state: 'visible' });
  assert.equal(await toggle.getAttribute('aria-expanded'), 'true');
  await dan.page.screenshot({ path: path.join(artifactsDir, 'members-phone.png') });
  await toggle.click();
  await dan.page.locator('#members').waitFor({ state: 'hidden' });

  // dan goes to ben's instance, which is then killed. dan's page is held still (like a
  // frozen tab), so it cannot reconnect: the survivors must report it gone when its
  // presence lease runs out. ben's page reconnects through nginx at once, as a new
  // connection (authentication is off: a new user id, the old one runs out like dan's).
  await landOn(dan, stack.baseUrl, (i) => i === ben.instance);
  await waitForMembers(ann.page, ['ann', 'ben', 'dan']);
  const danId = await presenceId(dan.page);
  const killed = ben.instance;
  const onSurvivor = `#status[data-state="connected"][data-instance="${ann.instance}"]`;
  const cdp = await dan.ctx.newCDPSession(dan.page);
  await cdp.send('Debugger.enable');
  await cdp.send('Debugger.pause');
  const killedAt = Date.now();
  await stack.killGateway(killed);
  await waitForMembers(ann.page, ['ann', 'ben'], { without: [danId, benId], timeout: (PRESENCE_TTL_SECS * 1.34 + 8) * 1000 });
  console.log(`# the killed instance's users were reported gone after ${Date.now() - killedAt} ms (lease ${PRESENCE_TTL_SECS} s)`);
  await ben.page.locator(onSurvivor).waitFor();
  ben.instance = ann.instance;
  await waitForMembers(ben.page, ['ann', 'ben'], { without: [danId, benId] });
  assert.notEqual(await presenceId(ben.page), benId);

  // dan's page wakes up, reconnects to the survivor and is back in every list.
  await cdp.send('Debugger.resume');
  await cdp.send('Debugger.disable');
  await cdp.detach();
  await dan.page.locator(onSurvivor).waitFor();
  await waitForMembers(ann.page, ['ann', 'ben', 'dan'], { without: [danId] });
  await waitForMembers(ben.page, ['ann', 'ben', 'dan'], { without: [danId] });
  await dan.ctx.close();
  await waitForMembers(ann.page, ['ann', 'ben']);

  // Bring the instance back, and ben onto it, for what follows.
  await stack.startGateway(killed);
  await landOn(ben, stack.baseUrl, (i) => i === killed);
  await waitForMembers(ann.page, ['ann', 'ben']);
  await ann.page.screenshot({ path: path.join(artifactsDir, 'members-desktop.png') });
});

test('who is typing: shown on the other instance, ended by a message, a leave or time', { timeout: 60000 }, async () => {
  await recordEvents(ben.page);
  await recordEvents(ann.page);
  const box = ann.page.getByRole('textbox', { name: /^Message #/ });
  await typingAllowed(ann.page);

  // ann types (no Enter yet): ben, on the other instance, sees it.
  await box.fill('Is everyone here for the');
  await waitForTyping(ben.page, 'ann is typing…');
  // ann sends: her message ends it at once (not the 3.5 s timer).
  const text = 'Is everyone here for the 3 pm call?';
  await box.fill(text);
  await box.press('Enter');
  await messages(ben.page, text).waitFor();
  assert.equal(await ben.page.locator('#typing').textContent(), '');
  const events = await ben.page.evaluate(() => window.__events);
  const at = events.indexOf(`messages:${text}`);
  assert.deepEqual(events.slice(at - 1, at + 2), ['typing:ann', `messages:${text}`, 'typing:'], `ben's events: ${events}`);

  // Several at once: two more people (plain WebSocket clients) and ann again, all within
  // the 3.5 s that one `typing` shows for.
  const raw = rawClients(ann.page);
  await raw.open('fay');
  await raw.open('gus');
  await waitForMembers(ben.page, ['ann', 'ben', 'fay', 'gus']);
  await typingAllowed(ann.page);
  await raw.typing('fay');
  await waitForTyping(ben.page, 'fay is typing…');
  await raw.typing('gus');
  await waitForTyping(ben.page, 'fay and gus are typing…');
  await box.fill('Almost');
  await waitForTyping(ben.page, 'Several people are typing…');
  // fay leaves: her typing ends with her (gus's and ann's, sent after hers, still show).
  await raw.close('fay');
  await waitForTyping(ben.page, 'gus and ann are typing…');
  await waitForMembers(ben.page, ['ann', 'ben', 'gus']);
  // Nobody typing any more: it goes by itself, some 3.5 s after the last frame.
  const quietFrom = Date.now();
  await waitForTyping(ben.page, '');
  assert.ok(Date.now() - quietFrom > 1000, 'the typing line stayed a while');
  // Never shown to the one typing (ann saw fay and gus, never herself).
  await waitForTyping(ann.page, '');
  const annEvents = (await ann.page.evaluate(() => window.__events)).filter((e) => e.startsWith('typing:'));
  assert.ok(annEvents.includes('typing:fay+gus'), `ann's typing events: ${annEvents}`);
  assert.ok(!annEvents.some((e) => /\bann\b/.test(e)), `ann was shown typing to herself: ${annEvents}`);
  await raw.close('gus');
  await box.fill('');
  await waitForMembers(ben.page, ['ann', 'ben']);
});

test('older messages are paged in over HTTP, in order, once each', { timeout: 60000 }, async () => {
  const room = 'history';
  const total = 120;
  for (let i = 1; i <= total; i++) {
    const m = await post(room, `Entry ${i}`);
    assert.equal(m.id, i);
  }
  const hal = await openUser('hal', { room });
  await messages(hal.page, `Entry ${total}`).waitFor();
  // A fresh join shows the newest JOIN_REPLAY_LIMIT, and offers the rest.
  assert.deepEqual(await shownIds(hal.page), range(total - JOIN_REPLAY_LIMIT + 1, total));
  const older = hal.page.getByRole('button', { name: 'Load older messages' });
  await older.waitFor();
  const status = hal.page.locator('#older-status');

  // A failure is said in words, and the button stays for another try.
  const pageApi = (url) => /^\/api\/rooms\/[^/]+\/messages$/.test(url.pathname);
  await hal.page.route(pageApi, (route) =>
    route.fulfill({ status: 503, contentType: 'application/json', body: '{"error":"unavailable","message":"test"}' }),
  );
  await older.click();
  await status.filter({ hasText: 'Could not load older messages: the chat service is temporarily unavailable' }).waitFor();
  assert.deepEqual(await shownIds(hal.page), range(total - JOIN_REPLAY_LIMIT + 1, total));
  await hal.page.unrouteAll();

  // Page by page (50 at a time) down to id 1; the button then goes away.
  let clicks = 0;
  for (; clicks < 10 && (await older.isVisible()); clicks++) {
    const first = (await shownIds(hal.page))[0];
    const anchor = hal.page.locator(`li.msg[data-id="${first}"]`);
    await older.scrollIntoViewIfNeeded();
    const bottomOf = async () => {
      const box = await anchor.boundingBox();
      return box.y + box.height;
    };
    const y = await bottomOf();
    await older.click();
    await hal.page.waitForFunction((f) => Number(document.querySelector('ol.messages:not([hidden]) > li.msg[data-id]').dataset.id) < f, first);
    if (clicks > 0) {
      // The message that was at the top stays where it was on the screen (its bottom edge:
      // it loses its name line when it joins the group of the message now above it).
      const moved = (await bottomOf()) - y;
      assert.ok(Math.abs(moved) <= 2, `the message that was first moved by ${moved}px`);
    }
  }
  await older.waitFor({ state: 'hidden' });
  assert.equal(clicks, Math.ceil((total - JOIN_REPLAY_LIMIT) / 50));
  assert.deepEqual(await shownIds(hal.page), range(1, total));
  assert.equal(await status.textContent(), '');
  await hal.page.screenshot({ path: path.join(artifactsDir, 'older-desktop.png') });

  // A page from another epoch of the room (as if it had started over meanwhile) is not mixed in.
  await hal.page.reload();
  await messages(hal.page, `Entry ${total}`).waitFor();
  await hal.page.route(pageApi, async (route) => {
    const res = await route.fetch();
    const body = await res.json();
    await route.fulfill({ response: res, json: { ...body, epoch: 'another-epoch' } });
  });
  await older.click();
  await status.filter({ hasText: 'This room started over on the server' }).waitFor();
  await older.waitFor({ state: 'hidden' });
  assert.deepEqual(await shownIds(hal.page), range(total - JOIN_REPLAY_LIMIT + 1, total));
  await hal.ctx.close();
});

test('no dialog and no script error on any page', () => {
  assert.deepEqual(problems.dialogs, []);
  assert.deepEqual(problems.pageErrors, []);
});
