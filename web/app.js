// The chat page: renders ChatClient's events and turns what the person does into calls on
// it. User text only ever reaches the page through textContent / attributes, never as HTML.

import { ChatClient, ROOM_RE, checkUsername, decodeToken, tokenName } from './chat.js';

const NAME_KEY = 'chat.username';
const ROOMS_KEY = 'chat.rooms';
const TOKEN_KEY = 'chat.token';
const DEFAULT_ROOM = 'general';
const GROUP_WINDOW_MS = 5 * 60 * 1000;
const MAX_FRAME_TEXT_BYTES = 60000; // under the server's smallest sane MAX_FRAME_BYTES default (64 KiB)

const $ = (id) => document.getElementById(id);
const els = {
  status: $('status'),
  statusText: $('status-text'),
  retryNow: $('retry-now'),
  userButton: $('user-button'),
  userName: $('user-name'),
  userAvatar: $('user-avatar'),
  roomList: $('room-list'),
  joinForm: $('join-form'),
  joinInput: $('join-input'),
  joinHint: $('join-hint'),
  chat: $('chat'),
  roomTitle: $('room-title'),
  onlineButton: $('online-button'),
  onlineCount: $('online-count'),
  leaveButton: $('leave-button'),
  members: $('members'),
  memberList: $('member-list'),
  membersMore: $('members-more'),
  older: $('older'),
  loadOlder: $('load-older'),
  olderStatus: $('older-status'),
  typing: $('typing'),
  scroller: $('scroller'),
  emptyState: $('empty-state'),
  logs: $('logs'),
  pendingList: $('pending-list'),
  jumpButton: $('jump-button'),
  composer: $('composer'),
  composerLabel: $('composer-label'),
  input: $('composer-input'),
  sendButton: $('send-button'),
  toasts: $('toasts'),
  announcer: $('announcer'),
  sessionNote: $('session-note'),
  nameDialog: $('name-dialog'),
  nameForm: $('name-form'),
  nameTitle: $('name-title'),
  nameText: $('name-text'),
  nameSubmit: $('name-submit'),
  nameInput: $('name-input'),
  nameError: $('name-error'),
  nameCancel: $('name-cancel'),
};

const timeFmt = new Intl.DateTimeFormat(undefined, { hour: 'numeric', minute: '2-digit' });
const fullFmt = new Intl.DateTimeFormat(undefined, { dateStyle: 'full', timeStyle: 'medium' });
const dayFmt = new Intl.DateTimeFormat(undefined, { weekday: 'long', month: 'long', day: 'numeric' });

// ---- local state --------------------------------------------------------------------------

const storage = safeLocalStorage();
/** The token when storage is unavailable (private mode, disabled): for this page only. */
let tokenInMemory = null;
let tokenStorageBroken = false;
// First of all: a sign-in token in the URL moves to storage and out of the address bar.
takeTokenFromHash();
/** The name this device remembers (used when not signed in). */
let chosenName = checkUsername(storage?.getItem(NAME_KEY) ?? '').ok ? storage.getItem(NAME_KEY).trim() : '';
/** Signed in (a token is in use): the name is the token's and cannot be edited here. */
let signedIn = false;
/** The name of own messages, for a token without a usable `name` claim. */
let ownName = '';
let username = chosenName;
{
  const token = currentToken();
  if (token) {
    signedIn = true;
    username = tokenName(decodeToken(token));
  }
}

/** Per room: its log element and what the UI needs to know about it. */
const views = new Map();
let activeRoom = null;
/** The server has no HTTP API (404): older history cannot be paged. */
let apiOff = false;
/** The member list: null (as the screen width suggests), or what the person chose. */
let membersChoice = null;

const hashRoom = roomFromHash();
const initialRooms = loadRooms();
if (hashRoom && !initialRooms.includes(hashRoom)) initialRooms.push(hashRoom);
if (initialRooms.length === 0) initialRooms.push(DEFAULT_ROOM);

const client = new ChatClient({ username, rooms: initialRooms, tokenSource: currentToken });
// For the end-to-end test and the curious: the live client, read-only use please.
window.chat = client;

// ---- rooms ----------------------------------------------------------------------------------

function loadRooms() {
  try {
    const list = JSON.parse(storage?.getItem(ROOMS_KEY) || '[]');
    return Array.isArray(list) ? [...new Set(list.filter((r) => typeof r === 'string' && ROOM_RE.test(r)))] : [];
  } catch {
    return [];
  }
}

function saveRooms() {
  try {
    storage?.setItem(ROOMS_KEY, JSON.stringify(client.roomNames()));
  } catch {
    /* ignore */
  }
}

function roomFromHash() {
  const m = /(?:^#|&)room=([^&]*)/.exec(window.location.hash);
  if (!m) return null;
  let name;
  try {
    name = decodeURIComponent(m[1]);
  } catch {
    return null;
  }
  return ROOM_RE.test(name) ? name : null;
}

// ---- sign-in token ----------------------------------------------------------------------------
//
// The token comes from `#token=…` in the page's URL (an embedding page may set it at any
// time) or from an earlier visit (localStorage, which an embedding page may update too).
// ChatClient reads it through currentToken() on every connect and before each refresh.

/** Moves a `token=` hash parameter to storage and removes it from the visible URL. */
function takeTokenFromHash() {
  const hash = window.location.hash.replace(/^#/, '');
  const parts = hash.split('&');
  const found = parts.find((p) => p.startsWith('token='));
  if (found === undefined) return false;
  let token = '';
  try {
    token = decodeURIComponent(found.slice('token='.length)).trim();
  } catch {
    token = '';
  }
  // Out of the address bar (and of this history entry) before anyone copies the link.
  const rest = parts.filter((p) => !p.startsWith('token=') && p !== '').join('&');
  history.replaceState(history.state, '', `${window.location.pathname}${window.location.search}${rest ? `#${rest}` : ''}`);
  storeToken(token || null); // `#token=` (empty) signs out
  return true;
}

function storeToken(token) {
  tokenInMemory = token;
  try {
    if (!storage) throw new Error('no storage');
    if (token) storage.setItem(TOKEN_KEY, token);
    else storage.removeItem(TOKEN_KEY);
    tokenStorageBroken = false;
  } catch {
    tokenStorageBroken = true;
  }
}

/** The current token: the URL's if it has one (taken now), else the stored one. */
function currentToken() {
  takeTokenFromHash();
  if (!tokenStorageBroken && storage) {
    try {
      return storage.getItem(TOKEN_KEY) || null;
    } catch {
      /* fall through */
    }
  }
  return tokenInMemory;
}

/** Whether `m` was written by this person: by user id when signed in, else by name. */
function isOwn(m) {
  if (client.user) return m.user === client.user;
  return !m.user && m.username === username;
}

function viewFor(room) {
  let view = views.get(room);
  if (!view) {
    const log = document.createElement('ol');
    log.className = 'messages';
    log.dataset.room = room;
    // role=log, but announced through #announcer: a history replay must not be read out
    // message by message.
    log.setAttribute('role', 'log');
    log.setAttribute('aria-live', 'off');
    log.setAttribute('aria-label', `Messages in #${room}`);
    log.hidden = room !== activeRoom;
    els.logs.append(log);
    // lastMsg: the previous message, for grouping (null after a notice); lastTs: for day dividers.
    // firstId: the oldest message shown (older ones can be paged in); exhausted: nothing
    // older to page; generation: moves when the log starts over (a page fetched before is void).
    view = {
      room,
      log,
      unread: 0,
      lastMsg: null,
      lastTs: null,
      loaded: false,
      firstId: null,
      exhausted: false,
      loadingOlder: false,
      olderError: '',
      generation: 0,
    };
    views.set(room, view);
  }
  return view;
}

function joinRoom(room, { activate = true } = {}) {
  if (!ROOM_RE.test(room)) return false;
  if (client.join(room)) {
    viewFor(room);
    saveRooms();
  }
  if (activate) setActive(room);
  renderRooms();
  return true;
}

function leaveRoom(room) {
  client.leave(room);
  const view = views.get(room);
  view?.log.remove();
  views.delete(room);
  saveRooms();
  if (activeRoom === room) {
    const next = client.roomNames()[0] ?? null;
    setActive(next);
  }
  renderRooms();
  announce(`You left #${room}.`);
}

function setActive(room) {
  activeRoom = room;
  for (const view of views.values()) view.log.hidden = view.room !== room;
  const hash = room ? `#room=${encodeURIComponent(room)}` : '';
  if (window.location.hash !== hash) {
    history.replaceState(null, '', `${window.location.pathname}${window.location.search}${hash}`);
  }
  if (room) {
    const view = viewFor(room);
    view.unread = 0;
    els.roomTitle.textContent = `#${room}`;
    els.composerLabel.textContent = `Message #${room}`;
    els.input.placeholder = `Message #${room}`;
  } else {
    els.roomTitle.textContent = 'No room';
    els.composerLabel.textContent = 'Message';
    els.input.placeholder = 'Join a room to start chatting';
  }
  els.leaveButton.hidden = !room;
  els.input.disabled = !room;
  els.sendButton.disabled = !room;
  renderRooms();
  renderPending();
  renderEmptyState();
  renderPresence();
  renderTyping();
  renderOlder();
  scrollToBottom();
  updateTitle();
}

function renderRooms() {
  const frag = document.createDocumentFragment();
  for (const room of client.roomNames()) {
    const view = viewFor(room);
    const li = document.createElement('li');
    li.className = 'room-item';
    li.dataset.room = room;
    const a = document.createElement('a');
    a.href = `#room=${encodeURIComponent(room)}`;
    a.className = 'room-link';
    if (room === activeRoom) {
      li.classList.add('active');
      a.setAttribute('aria-current', 'page');
    }
    const hash = document.createElement('span');
    hash.className = 'room-hash';
    hash.setAttribute('aria-hidden', 'true');
    hash.textContent = '#';
    const name = document.createElement('span');
    name.className = 'room-name';
    name.textContent = room;
    a.append(hash, name);
    if (view.unread > 0 && room !== activeRoom) {
      const badge = document.createElement('span');
      badge.className = 'unread';
      badge.textContent = view.unread > 99 ? '99+' : String(view.unread);
      badge.setAttribute('aria-label', `${view.unread} unread`);
      a.append(badge);
    }
    const leave = document.createElement('button');
    leave.type = 'button';
    leave.className = 'room-leave';
    leave.setAttribute('aria-label', `Leave #${room}`);
    leave.title = `Leave #${room}`;
    leave.textContent = '×';
    leave.addEventListener('click', () => leaveRoom(room));
    li.append(a, leave);
    frag.append(li);
  }
  els.roomList.replaceChildren(frag);
}

// ---- messages -------------------------------------------------------------------------------

function hueOf(name) {
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.codePointAt(0)) % 360;
  return h;
}

function avatarInto(el, name) {
  el.textContent = ([...name.trim()][0] ?? '?').toUpperCase();
  el.style.setProperty('--hue', String(hueOf(name)));
}

function sameDay(a, b) {
  const x = new Date(a);
  const y = new Date(b);
  return x.getFullYear() === y.getFullYear() && x.getMonth() === y.getMonth() && x.getDate() === y.getDate();
}

function dayLabel(ts) {
  const now = Date.now();
  if (sameDay(ts, now)) return 'Today';
  if (sameDay(ts, now - 86400000)) return 'Yesterday';
  return dayFmt.format(new Date(ts));
}

function messageElement(m, prev) {
  const own = isOwn(m);
  const li = document.createElement('li');
  li.className = 'msg';
  if (own) li.classList.add('own');
  li.dataset.id = String(m.id);
  li.dataset.author = m.username;
  li.dataset.ts = String(Number(m.ts) || 0);
  if (typeof m.user === 'string') li.dataset.user = m.user;
  if (groupedWith(prev, m)) li.classList.add('cont');

  const avatar = document.createElement('span');
  avatar.className = 'avatar';
  avatar.setAttribute('aria-hidden', 'true');
  avatarInto(avatar, m.username);

  const bubble = document.createElement('div');
  bubble.className = 'bubble';
  const meta = document.createElement('div');
  meta.className = 'meta';
  const author = document.createElement('span');
  author.className = 'author';
  author.textContent = m.username;
  meta.append(author);
  if (own) {
    const you = document.createElement('span');
    you.className = 'you';
    you.textContent = '(you)';
    meta.append(you);
  }
  const time = document.createElement('time');
  const date = new Date(Number(m.ts) || 0);
  time.dateTime = date.toISOString();
  time.title = fullFmt.format(date);
  time.textContent = timeFmt.format(date);
  meta.append(time);

  const text = document.createElement('p');
  text.className = 'text';
  text.textContent = String(m.text ?? '');

  bubble.append(meta, text);
  li.append(avatar, bubble);
  return li;
}

/** Whether `m` continues `prev`'s group (same author, within GROUP_WINDOW_MS). */
function groupedWith(prev, m) {
  return Boolean(prev) && prev.username === m.username && (prev.user ?? null) === (m.user ?? null) && m.ts - prev.ts < GROUP_WINDOW_MS && m.ts >= prev.ts;
}

function dayDivider(ts) {
  const day = document.createElement('li');
  day.className = 'day-divider';
  day.dataset.ts = String(ts);
  const label = document.createElement('span');
  label.textContent = dayLabel(ts);
  day.append(label);
  return day;
}

/**
 * Elements for consecutive messages, with day dividers and grouping, continuing after
 * `prev` (the message before them, null: none or a notice) and `lastTs` (null: a new day
 * divider first).
 */
function renderRun(messages, prev, lastTs) {
  const frag = document.createDocumentFragment();
  for (const m of messages) {
    if (lastTs === null || !sameDay(lastTs, m.ts)) {
      frag.append(dayDivider(m.ts));
      prev = null;
    }
    frag.append(messageElement(m, prev));
    prev = m;
    lastTs = m.ts;
  }
  return { frag, prev, lastTs };
}

function noticeElement(text) {
  const li = document.createElement('li');
  li.className = 'notice';
  li.setAttribute('role', 'note');
  li.textContent = text;
  return li;
}

function appendMessages(room, messages, replay) {
  const view = viewFor(room);
  adoptOwnName(messages);
  const stick = room !== activeRoom || isNearBottom() || replay || messages.some(isOwn);
  const { frag, prev, lastTs } = renderRun(messages, view.lastMsg, view.lastTs);
  view.lastMsg = prev;
  view.lastTs = lastTs;
  view.log.append(frag);
  view.loaded = true;
  if (view.firstId === null && messages.length > 0) {
    view.firstId = messages[0].id;
    if (room === activeRoom) renderOlder();
  }

  if (!replay) {
    const others = messages.filter((m) => !isOwn(m));
    if (room === activeRoom) {
      for (const m of others) announce(`${m.username}: ${m.text}`);
    } else if (others.length > 0) {
      view.unread += others.length;
      renderRooms();
      updateTitle();
    }
  }
  if (room === activeRoom) {
    renderEmptyState();
    if (stick) scrollToBottom();
    else els.jumpButton.hidden = false;
  }
}

function renderEmptyState() {
  const view = activeRoom ? views.get(activeRoom) : null;
  let text = '';
  if (!activeRoom) text = 'You are not in any room. Join one on the left (or above) to start chatting.';
  else if (view && view.log.childElementCount === 0 && client.isLive(activeRoom) && client.pendingFor(activeRoom).length === 0) {
    text = `No messages in #${activeRoom} yet. Say hello!`;
  }
  els.emptyState.textContent = text;
  els.emptyState.hidden = text === '';
}

function renderPending() {
  const frag = document.createDocumentFragment();
  const connected = client.status.state === 'connected';
  for (const p of activeRoom ? client.pendingFor(activeRoom) : []) {
    const li = document.createElement('li');
    li.className = 'msg own pending';
    li.dataset.ref = p.ref;
    li.dataset.state = p.state;
    const avatar = document.createElement('span');
    avatar.className = 'avatar';
    avatar.setAttribute('aria-hidden', 'true');
    avatarInto(avatar, p.username || '?');
    const bubble = document.createElement('div');
    bubble.className = 'bubble';
    const text = document.createElement('p');
    text.className = 'text';
    text.textContent = p.text;
    const status = document.createElement('div');
    status.className = 'pending-status';
    status.textContent = pendingLabel(p, connected);
    bubble.append(text, status);
    if (p.state === 'failed') {
      const actions = document.createElement('div');
      actions.className = 'pending-actions';
      const retry = document.createElement('button');
      retry.type = 'button';
      retry.className = 'link-button';
      if (p.code === 'too_large') {
        // Sending it again would fail the same way: back to the composer to shorten it.
        retry.textContent = 'Edit';
        retry.addEventListener('click', () => {
          client.discard(p.ref);
          els.input.value = p.text;
          autosize();
          els.input.focus();
        });
      } else {
        retry.textContent = 'Try again';
        retry.addEventListener('click', () => client.retry(p.ref));
      }
      const discard = document.createElement('button');
      discard.type = 'button';
      discard.className = 'link-button';
      discard.textContent = 'Discard';
      discard.addEventListener('click', () => client.discard(p.ref));
      actions.append(retry, discard);
      bubble.append(actions);
    }
    li.append(avatar, bubble);
    frag.append(li);
  }
  const stick = isNearBottom();
  els.pendingList.replaceChildren(frag);
  if (stick) scrollToBottom();
}

function pendingLabel(p, connected) {
  switch (p.state) {
    case 'queued':
      return connected ? 'Sending…' : 'Waiting for the connection…';
    case 'sent':
      return 'Sending…';
    case 'retrying':
      return p.error || 'Retrying…';
    case 'acked':
      return 'Sent';
    case 'failed':
      return `Not sent. ${p.error || ''}`.trim();
    default:
      return '';
  }
}

// ---- older history ------------------------------------------------------------------------------
//
// A fresh join replays only the newest messages (the server's JOIN_REPLAY_LIMIT); older
// ones are paged over HTTP, PAGE_LIMIT at a time, before the oldest one shown.

function renderOlder() {
  const view = activeRoom ? views.get(activeRoom) : null;
  const canPage = Boolean(view) && !apiOff && !view.exhausted && view.firstId !== null && view.firstId > 1;
  els.loadOlder.hidden = !canPage;
  els.loadOlder.disabled = Boolean(view?.loadingOlder);
  els.loadOlder.textContent = view?.loadingOlder ? 'Loading older messages…' : 'Load older messages';
  const text = view && !apiOff ? view.olderError : '';
  els.olderStatus.textContent = text;
  els.olderStatus.hidden = text === '';
  els.older.hidden = !canPage && text === '';
}

async function loadOlder() {
  const room = activeRoom;
  const view = room ? views.get(room) : null;
  if (!view || view.loadingOlder || apiOff || view.exhausted || !(view.firstId > 1)) return;
  const { generation } = view;
  view.loadingOlder = true;
  view.olderError = '';
  renderOlder();
  const result = await client.fetchOlder(room, view.firstId);
  view.loadingOlder = false;
  // Left, or the room started over while the page was on its way: it belongs to nothing shown.
  if (views.get(room) !== view || view.generation !== generation) {
    if (room === activeRoom) renderOlder();
    return;
  }
  switch (result.kind) {
    case 'off':
      apiOff = true; // this server cannot page: nothing to say, nothing to offer
      break;
    case 'epoch':
      // Those are from another life of the room than the messages shown: not mixed in.
      view.exhausted = true;
      view.olderError = 'This room started over on the server: older messages are from before that and are not shown here.';
      break;
    case 'error':
      view.olderError = result.text;
      break;
    default: {
      const older = result.messages.filter((m) => m.id < view.firstId);
      if (older.length > 0) prependMessages(view, older);
      if (!result.hasMore || older.length === 0) view.exhausted = true;
    }
  }
  if (room === activeRoom) {
    const hadFocus = document.activeElement === els.loadOlder;
    renderOlder();
    // The button went away under the keyboard: keep the focus in the conversation.
    if (hadFocus && els.loadOlder.hidden) els.scroller.focus({ preventScroll: true });
  }
}

/** Puts older messages (ascending, all below view.firstId) above the oldest shown, keeping the scroll position. */
function prependMessages(view, older) {
  const { log } = view;
  // The first message shown, or the day divider just above it: the new ones go before it
  // (a notice above stays above everything of the room's current life).
  const firstMsg = log.querySelector(':scope > li.msg');
  const before = firstMsg?.previousElementSibling?.classList.contains('day-divider') ? firstMsg.previousElementSibling : firstMsg;
  const { frag, prev } = renderRun(older, null, null);
  const scroller = els.scroller;
  const active = view.room === activeRoom;
  // What stays put on the screen: the bottom of the message that was first (it may lose its
  // header when it joins the group of the last old one; everything below it is unchanged).
  const bottom = () => (firstMsg ? firstMsg.getBoundingClientRect().bottom : scroller.scrollHeight);
  const was = bottom();
  log.insertBefore(frag, before ?? null);
  if (firstMsg) {
    // The seam: one day divider per day, and the message that was first may now continue
    // the last old one's group.
    const first = { username: firstMsg.dataset.author, user: firstMsg.dataset.user, ts: Number(firstMsg.dataset.ts) };
    if (before !== firstMsg && sameDay(Number(before.dataset.ts), prev.ts)) before.remove();
    else if (before === firstMsg && !sameDay(prev.ts, first.ts)) log.insertBefore(dayDivider(first.ts), firstMsg);
    firstMsg.classList.toggle('cont', firstMsg.previousElementSibling?.classList.contains('msg') === true && groupedWith(prev, first));
  } else {
    view.lastMsg = prev;
    view.lastTs = prev.ts;
  }
  view.firstId = older[0].id;
  if (active) scroller.scrollTop += bottom() - was;
}

// ---- who is here, who is typing -------------------------------------------------------------------

/** Whether the member list is shown: the person's choice, else open on wide screens. */
function membersOpen() {
  return membersChoice ?? !narrowScreen.matches;
}

function renderPresence() {
  const p = activeRoom ? client.presenceOf(activeRoom) : null;
  els.onlineButton.hidden = !p;
  els.members.hidden = !p;
  els.chat.dataset.members = p && membersOpen() ? 'open' : 'closed';
  els.onlineButton.setAttribute('aria-expanded', String(Boolean(p) && membersOpen()));
  if (!p) {
    els.memberList.replaceChildren();
    return;
  }
  els.onlineCount.textContent = `${p.count} online`;
  els.onlineButton.title = p.live ? `${p.count} in #${activeRoom}: show or hide who` : 'Not connected: who was here when the connection was lost';
  els.members.dataset.live = String(p.live);
  const byName = (a, b) => a.name.localeCompare(b.name) || (a.user < b.user ? -1 : a.user > b.user ? 1 : 0);
  const members = [...p.members].sort((a, b) => (b.user === p.self) - (a.user === p.self) || byName(a, b));
  const frag = document.createDocumentFragment();
  for (const m of members) {
    const li = document.createElement('li');
    li.className = 'member';
    li.dataset.user = m.user;
    const avatar = document.createElement('span');
    avatar.className = 'avatar';
    avatar.setAttribute('aria-hidden', 'true');
    avatarInto(avatar, m.name);
    const name = document.createElement('span');
    name.className = 'member-name';
    name.textContent = m.name;
    li.append(avatar, name);
    if (m.user === p.self) {
      li.classList.add('self');
      const you = document.createElement('span');
      you.className = 'you';
      you.textContent = '(you)';
      li.append(you);
    }
    frag.append(li);
  }
  els.memberList.replaceChildren(frag);
  const more = p.count - p.members.length;
  els.membersMore.textContent = more > 0 ? `and ${more} more` : '';
  els.membersMore.hidden = more <= 0;
}

function renderTyping() {
  const names = activeRoom ? client.typistsOf(activeRoom).map((t) => t.name) : [];
  let text = '';
  if (names.length === 1) text = `${names[0]} is typing…`;
  else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
  else if (names.length > 2) text = 'Several people are typing…';
  els.typing.textContent = text;
}

const narrowScreen = window.matchMedia('(max-width: 720px)');
narrowScreen.addEventListener('change', renderPresence);
els.onlineButton.addEventListener('click', () => {
  membersChoice = !membersOpen();
  renderPresence();
});

function isNearBottom() {
  const s = els.scroller;
  return s.scrollHeight - s.scrollTop - s.clientHeight < 120;
}

function scrollToBottom() {
  els.scroller.scrollTop = els.scroller.scrollHeight;
  els.jumpButton.hidden = true;
}

// ---- status, toasts, announcements ------------------------------------------------------------

function renderStatus(s) {
  els.status.dataset.state = s.state;
  if (s.instance) els.status.dataset.instance = s.instance;
  else delete els.status.dataset.instance;
  let text;
  switch (s.state) {
    case 'connected':
      text = `Connected to ${s.instance}`;
      break;
    case 'connecting':
      text = 'Connecting…';
      break;
    case 'reconnecting':
      text = `Reconnecting (attempt ${Math.max(1, s.attempt)})…`;
      break;
    default:
      text = 'Offline';
  }
  els.statusText.textContent = text;
  els.status.title = s.reason || (s.state === 'connected' ? `Connected to instance ${s.instance}` : '');
  els.retryNow.hidden = !(s.state === 'offline' || (s.state === 'reconnecting' && s.retryAt));
  renderPending();
}

const recentToasts = new Map();
function toast(text, kind = 'error') {
  const now = Date.now();
  if (recentToasts.get(text) > now - 4000) return;
  recentToasts.set(text, now);
  const item = document.createElement('div');
  item.className = `toast ${kind}`;
  const msg = document.createElement('span');
  msg.textContent = text;
  const close = document.createElement('button');
  close.type = 'button';
  close.className = 'toast-close';
  close.setAttribute('aria-label', 'Dismiss');
  close.textContent = '×';
  close.addEventListener('click', () => item.remove());
  item.append(msg, close);
  els.toasts.append(item);
  setTimeout(() => item.remove(), 7000);
}

function announce(text) {
  const line = document.createElement('p');
  line.textContent = text.length > 300 ? `${text.slice(0, 300)}…` : text;
  els.announcer.append(line);
  while (els.announcer.childElementCount > 5) els.announcer.firstElementChild.remove();
}

function updateTitle() {
  let unread = 0;
  for (const v of views.values()) if (v.room !== activeRoom) unread += v.unread;
  document.title = `${unread > 0 ? `(${unread}) ` : ''}${activeRoom ? `#${activeRoom} · ` : ''}Chat`;
}

// ---- username ---------------------------------------------------------------------------------

function renderUser() {
  els.userName.textContent = username || (signedIn ? 'Signed in' : 'Choose a name');
  avatarInto(els.userAvatar, username || '?');
  els.userButton.classList.toggle('signed-in', signedIn);
  if (signedIn) els.userButton.title = `Signed in as ${username || client.user || 'you'}`;
  else els.userButton.removeAttribute('title');
}

/** The token in use (or its verified user) changed: the name follows it. */
function applyIdentity({ token, claims, user }) {
  const was = signedIn;
  signedIn = Boolean(token);
  if (!was && signedIn && els.nameDialog.open) els.nameDialog.close();
  if (!signedIn) ownName = '';
  const name = signedIn ? tokenName(claims) || ownName || user || '' : chosenName;
  if (name !== username) username = name;
  client.setUsername(username);
  renderUser();
  refreshOwnership();
}

/** A token the page cannot read a name from: the server's name on own messages is the one to show. */
function adoptOwnName(messages) {
  if (!signedIn || !client.user || tokenName(decodeToken(client.token)) !== '') return;
  for (const m of messages) if (m.user === client.user && typeof m.username === 'string') ownName = m.username;
  if (ownName && ownName !== username) {
    username = ownName;
    client.setUsername(username);
    renderUser();
  }
}

function openNameDialog(first) {
  const locked = signedIn;
  els.nameInput.value = username;
  els.nameInput.readOnly = locked;
  els.nameTitle.textContent = locked ? 'Signed in' : 'What should we call you?';
  els.nameText.textContent = locked
    ? 'You are signed in: your name comes from your sign-in and cannot be changed here.'
    : 'Your name is shown next to your messages and remembered on this device.';
  els.nameSubmit.textContent = locked ? 'Close' : 'Start chatting';
  els.nameError.textContent = '';
  els.nameCancel.hidden = first || locked;
  els.nameDialog.dataset.first = first ? 'true' : 'false';
  if (!els.nameDialog.open) els.nameDialog.showModal();
  els.nameInput.focus();
  els.nameInput.select();
}

els.nameDialog.addEventListener('cancel', (e) => {
  if (els.nameDialog.dataset.first === 'true') e.preventDefault(); // a name is needed to chat
});
els.nameCancel.addEventListener('click', () => els.nameDialog.close());
els.nameForm.addEventListener('submit', (e) => {
  e.preventDefault();
  if (signedIn) {
    els.nameDialog.close();
    return;
  }
  const check = checkUsername(els.nameInput.value);
  if (!check.ok) {
    els.nameError.textContent = check.reason;
    els.nameInput.setAttribute('aria-invalid', 'true');
    els.nameInput.focus();
    return;
  }
  els.nameInput.removeAttribute('aria-invalid');
  const changed = username !== check.value;
  username = check.value;
  chosenName = username;
  try {
    storage?.setItem(NAME_KEY, username);
  } catch {
    /* ignore */
  }
  client.setUsername(username);
  startClient();
  renderUser();
  els.nameDialog.close();
  if (changed) refreshOwnership();
  els.input.focus();
});

/** Connects, if not yet (a first visit waits for a name or a sign-in). */
function startClient() {
  if (client.stopped) client.start();
}
els.userButton.addEventListener('click', () => openNameDialog(false));

/** After a name or identity change, "own" follows the new name or user id. */
function refreshOwnership() {
  for (const li of els.logs.querySelectorAll('li.msg')) {
    const own = isOwn({ username: li.dataset.author, user: li.dataset.user });
    if (own === li.classList.contains('own')) continue;
    li.classList.toggle('own', own);
    const meta = li.querySelector('.meta');
    meta.querySelector('.you')?.remove();
    if (own) {
      const you = document.createElement('span');
      you.className = 'you';
      you.textContent = '(you)';
      meta.querySelector('.author').after(you);
    }
  }
  renderPending();
}

// ---- composer -----------------------------------------------------------------------------------

function autosize() {
  els.input.style.height = 'auto';
  els.input.style.height = `${els.input.scrollHeight}px`;
}

els.input.addEventListener('input', () => {
  autosize();
  // Others see "… is typing" (ChatClient sends it at most every 2 s); not for an empty box.
  if (activeRoom && els.input.value.trim() !== '') client.typing(activeRoom);
});
els.input.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    els.composer.requestSubmit();
  }
});
els.composer.addEventListener('submit', (e) => {
  e.preventDefault();
  if (!activeRoom) return;
  if (!username && !signedIn) {
    openNameDialog(true);
    return;
  }
  const text = els.input.value.trim();
  if (!text) return;
  if (new TextEncoder().encode(text).length > MAX_FRAME_TEXT_BYTES) {
    toast('That message is too long. Please shorten it.');
    return;
  }
  client.send(activeRoom, text);
  els.input.value = '';
  autosize();
  els.input.focus();
  scrollToBottom();
});

els.joinForm.addEventListener('submit', (e) => {
  e.preventDefault();
  const room = els.joinInput.value.trim().replace(/^#/, '');
  if (!room) return;
  if (!ROOM_RE.test(room)) {
    els.joinHint.textContent = 'Room names use 1–64 letters, digits, "-" or "_".';
    els.joinInput.setAttribute('aria-invalid', 'true');
    return;
  }
  els.joinHint.textContent = '';
  els.joinInput.removeAttribute('aria-invalid');
  els.joinInput.value = '';
  joinRoom(room);
  els.input.focus();
});
els.joinInput.addEventListener('input', () => {
  els.joinHint.textContent = '';
  els.joinInput.removeAttribute('aria-invalid');
});

els.leaveButton.addEventListener('click', () => {
  if (activeRoom) leaveRoom(activeRoom);
});
els.retryNow.addEventListener('click', () => client.retryNow());
els.jumpButton.addEventListener('click', scrollToBottom);
els.loadOlder.addEventListener('click', loadOlder);
els.scroller.addEventListener('scroll', () => {
  if (isNearBottom()) els.jumpButton.hidden = true;
});

window.addEventListener('hashchange', () => {
  // An embedding page handing over a (new) token: take it, out of the URL, and use it.
  if (takeTokenFromHash()) {
    if (!roomFromHash() && activeRoom) {
      history.replaceState(history.state, '', `${window.location.pathname}${window.location.search}#room=${encodeURIComponent(activeRoom)}`);
    }
    if (currentToken()) startClient();
    client.tokenChanged();
    const room = roomFromHash();
    if (room && room !== activeRoom) joinRoom(room);
    return;
  }
  const room = roomFromHash();
  if (room) joinRoom(room);
  else if (window.location.hash.includes('room=')) toast('That link names an invalid room.');
});

// ---- client events ------------------------------------------------------------------------------

client.addEventListener('status', (e) => renderStatus(e.detail));
client.addEventListener('messages', (e) => appendMessages(e.detail.room, e.detail.messages, e.detail.replay));
client.addEventListener('reset', (e) => {
  const view = viewFor(e.detail.room);
  view.log.replaceChildren(noticeElement('This room started over on the server: earlier messages are no longer available.'));
  view.lastMsg = null;
  view.lastTs = null;
  view.firstId = null;
  view.exhausted = false;
  view.olderError = '';
  view.generation += 1;
  if (e.detail.room === activeRoom) renderOlder();
});
client.addEventListener('gap', (e) => {
  const { room } = e.detail;
  const view = viewFor(room);
  const text = 'Some earlier messages are no longer available: you were away longer than this room keeps history.';
  view.log.append(noticeElement(text));
  view.lastMsg = null;
  if (room === activeRoom) announce(text);
});
client.addEventListener('joined', (e) => {
  const view = viewFor(e.detail.room);
  view.loaded = true;
  if (e.detail.room === activeRoom) {
    renderEmptyState();
    renderPending();
  }
});
client.addEventListener('roomerror', (e) => {
  const { room, text, left } = e.detail;
  toast(left ? `You left #${room}. ${text}` : `Could not join #${room}. ${text}`);
  views.get(room)?.log.remove();
  views.delete(room);
  saveRooms();
  if (activeRoom === room) setActive(client.roomNames()[0] ?? null);
  renderRooms();
});
client.addEventListener('presence', (e) => {
  if (e.detail.room === activeRoom) renderPresence();
});
client.addEventListener('typing', (e) => {
  if (e.detail.room === activeRoom) renderTyping();
});
client.addEventListener('outbox', () => {
  renderPending();
  renderEmptyState();
});
client.addEventListener('problem', (e) => toast(e.detail.text));
client.addEventListener('identity', (e) => applyIdentity(e.detail));
client.addEventListener('auth', (e) => renderAuth(e.detail));
// Another tab (or the embedding page in one) stored a new token.
window.addEventListener('storage', (e) => {
  if (e.key !== TOKEN_KEY && e.key !== null) return;
  if (currentToken()) startClient();
  client.tokenChanged();
});

let lastAuthText = '';
function renderAuth(a) {
  els.sessionNote.textContent = a.text;
  els.sessionNote.hidden = a.text === '';
  els.sessionNote.dataset.state = a.state;
  // For the curious and the end-to-end test: when the token in use expires.
  if (a.exp) els.status.dataset.tokenExp = String(a.exp);
  else delete els.status.dataset.tokenExp;
  if (a.refreshed && lastAuthText !== '') announce('Your session was renewed.');
  lastAuthText = a.text;
}

// ---- start ----------------------------------------------------------------------------------------

function safeLocalStorage() {
  try {
    return window.localStorage;
  } catch {
    return null;
  }
}

for (const room of client.roomNames()) viewFor(room);
saveRooms();
renderUser();
setActive(hashRoom ?? client.roomNames()[0] ?? null);
if (!username && !signedIn) {
  // First visit: connect once there is a name (startClient), so that the others never see
  // a nameless "anonymous" come and go in their member lists.
  openNameDialog(true);
} else {
  client.start();
  els.input.focus();
}
