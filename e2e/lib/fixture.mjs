// What every scenario file shares: Debian's Chromium, launched headless the way this
// kind of machine needs it, in front of a two-gateway stack behind nginx.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import { chromium } from 'playwright-core';
import { Stack, artifactsDir } from './stack.mjs';

const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
const LAUNCH_ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
];

/** Starts Redis, two gateways and nginx (`options` go to `new Stack`), and a browser. */
export async function startStackAndBrowser(options) {
  fs.mkdirSync(artifactsDir, { recursive: true });
  const stack = options ? new Stack(options) : new Stack();
  await stack.startRedis();
  await stack.startGateway('gateway-1');
  await stack.startGateway('gateway-2');
  await stack.startNginx();
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: LAUNCH_ARGS, headless: true });
  return { stack, browser };
}

const escapeRe = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

/** A regular expression that matches exactly `s`. */
export const exactly = (s) => new RegExp(`^${escapeRe(s)}$`);

/** Waits for the status badge to say "connected" and returns the instance it names. */
export async function connectedInstance(page) {
  const badge = page.locator('#status[data-state="connected"]');
  await badge.waitFor();
  const instance = await badge.getAttribute('data-instance');
  assert.equal(await page.locator('#status-text').textContent(), `Connected to ${instance}`);
  return instance;
}

/** The confirmed (stored, id-carrying) messages with this exact text in the visible room. */
export function messages(page, text) {
  return page
    .locator('ol.messages:not([hidden]) > li.msg[data-id]')
    .filter({ has: page.locator('.text', { hasText: exactly(text) }) });
}

/**
 * Records a page's dialogs (dismissed at once) and uncaught script errors in `problems`
 * (`{dialogs: [], pageErrors: []}`), each prefixed with `who`.
 */
export function watch(page, who, problems) {
  page.on('dialog', async (d) => {
    problems.dialogs.push(`${who}: ${d.type()} ${d.message()}`);
    await d.dismiss().catch(() => {});
  });
  page.on('pageerror', (e) => problems.pageErrors.push(`${who}: ${e.message}`));
}

/** Types `text` in the message box and presses Enter; waits for its stored copy unless `confirmed` is false. */
export async function send(page, text, { confirmed = true } = {}) {
  const box = page.getByRole('textbox', { name: /^Message #/ });
  await box.fill(text);
  await box.press('Enter');
  if (confirmed) await messages(page, text).waitFor();
}

/**
 * A first-time visitor called `name` in a new browser context (desktop-sized unless
 * `contextOptions` say otherwise), on `url`: the name dialog answered, connected.
 */
export async function openUser(browser, url, name, { contextOptions = {}, problems } = {}) {
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 }, ...contextOptions });
  ctx.setDefaultTimeout(15000);
  const page = await ctx.newPage();
  if (problems) watch(page, name, problems);
  await page.goto(url);
  // First visit: the page asks for a name.
  await page.getByLabel('Your name', { exact: true }).fill(name);
  await page.getByRole('button', { name: 'Start chatting' }).click();
  await page.locator('#name-dialog').waitFor({ state: 'hidden' });
  const instance = await connectedInstance(page);
  return { name, ctx, page, instance };
}

/**
 * Reloads `user.page` until its WebSocket is on an instance that `wanted(instance)`
 * accepts: nginx balances round-robin, but page loads also fetch CSS/JS through it, so one
 * extra request shifts the rotation. A restarted instance gets nothing until nginx's
 * `fail_timeout` (5 s) after its last failure has passed, hence a time bound rather than
 * a number of tries. Updates `user.instance`; returns the reloads it took.
 */
export async function landOn(user, baseUrl, wanted, { timeoutMs = 20000 } = {}) {
  const deadline = Date.now() + timeoutMs;
  let reloads = 0;
  for (; Date.now() < deadline && !wanted(user.instance); reloads++) {
    await fetch(`${baseUrl}/healthz`).then((r) => r.arrayBuffer());
    await user.page.reload();
    user.instance = await connectedInstance(user.page);
  }
  assert.ok(wanted(user.instance), `${user.name ?? user.who} is on ${user.instance} after ${reloads} reloads`);
  return reloads;
}
