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
