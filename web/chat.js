// Protocol v1 client for chat-gateway (see docs/protocol.md): one WebSocket, any number of
// rooms, resume with `since` after every reconnect, de-duplication by id, an outbox of
// messages that stay pending until acknowledged (re-sent with the same `ref` under a stable
// per-tab `client` id, so the server stores each at most once), who is in each room and who
// is typing, and older history paged over HTTP (/api). No DOM here: app.js renders the events.
//
// Events (CustomEvent, payload in `detail`):
//   status    {state: 'connecting'|'connected'|'reconnecting'|'offline', instance, attempt, retryAt, reason}
//   messages  {room, messages, replay}   new messages of a room, in id order, never twice
//   reset     {room}                     the room's ids restarted on the server: forget what was shown
//   gap       {room}                     messages between what was shown and the replay that follows are lost
//   joined    {room, recovered, resumed, reset} the room is live (after its history replay)
//   roomerror {room, code, text}         the room could not be joined and was dropped
//   outbox    {}                         a pending message changed state, appeared or went away
//   problem   {code, text}               a server error not tied to a message, in words
//   identity  {token, claims, user}      the sign-in token in use or the verified user id changed
//   auth      {state, text, exp}         the sign-in token's life, in words (see setAuth)
//   presence  {room}                     who is in the room changed (read it with presenceOf)
//   typing    {room}                     who is typing in the room changed (read it with typistsOf)
//
// Sign-in: `tokenSource` (a function) returns the current token, or null. It is read on
// every connect (sent as the `token` query parameter: browsers cannot set headers on a
// WebSocket) and again shortly before the token in use expires, to send `refresh` with
// whatever the source holds by then (the embedding page may have put a new token there).

export const ROOM_RE = /^[A-Za-z0-9_-]{1,64}$/;
const CONTROL_RE = /[\u0000-\u001f\u007f-\u009f]/;

/** The protocol's username rule: 1–32 characters after trimming, no control characters. */
export function checkUsername(raw) {
  const value = String(raw ?? '').trim();
  const length = [...value].length;
  if (length === 0) return { ok: false, value, reason: 'Please enter a name.' };
  if (length > 32) return { ok: false, value, reason: 'Names are at most 32 characters.' };
  if (CONTROL_RE.test(value)) return { ok: false, value, reason: 'Names cannot contain control characters.' };
  return { ok: true, value };
}

/** Server error codes in words a person can act on. */
export function describeError(code, message) {
  switch (code) {
    case 'rate_limited':
      return 'You are sending too fast. Your message will be retried in a moment.';
    case 'too_large':
      return 'That message is too long for the server. Shorten it and try again.';
    case 'invalid_room':
      return 'That room name is not valid: use 1–64 letters, digits, "-" or "_".';
    case 'invalid_username':
      return 'The server refused your name: use 1–32 characters without control characters.';
    case 'not_joined':
      return 'You are not in that room (yet); rejoining.';
    case 'unavailable':
      return 'The chat service is temporarily unavailable. Retrying…';
    case 'unauthorized':
      return 'Sending needs a sign-in: without one you can read this room, not write in it.';
    case 'forbidden':
      return 'You are not allowed to do that.';
    case 'bad_request':
      return `The server did not understand a request${message ? `: ${message}` : '.'}`;
    default:
      return message || `The server answered with an error (${code}).`;
  }
}

const BACKOFF_BASE_MS = 1000;
const BACKOFF_CAP_MS = 30000;
const CONNECT_TIMEOUT_MS = 10000;
const OUTBOX_KEY = 'chat.outbox';
/** This tab's `client` id (sessionStorage: kept across reloads of the tab, not shared with others). */
const CLIENT_KEY = 'chat.client';
const CLIENT_RE = /^[A-Za-z0-9_-]{1,64}$/;
/** `typing` goes out at most this often per room (the server relays one per 2 s anyway). */
const TYPING_SEND_EVERY_MS = 2000;
/** Someone is shown typing this long after their last `typing` frame. */
export const TYPING_SHOW_MS = 3500;
/** Messages per page of older history. */
export const PAGE_LIMIT = 50;
/** The server's clock leeway on `exp` (auth.rs LEEWAY_SECS). */
const TOKEN_LEEWAY_S = 5;
/** Refresh this long before `exp`: a quarter of the token's life, within these bounds. */
const REFRESH_LEAD_MIN_S = 2;
const REFRESH_LEAD_MAX_S = 60;
/** How often the token source is looked at while waiting for a new token. */
const TOKEN_POLL_MS = 1000;

/**
 * The claims of a JWT (its payload, base64url JSON), decoded without any verification: the
 * server verifies; the page only reads `name`, `sub`, `exp`, `iat` and `rooms` to show them
 * and to know when to refresh. Null when it cannot be read.
 */
export function decodeToken(token) {
  if (typeof token !== 'string') return null;
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  try {
    let b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    b64 += '='.repeat((4 - (b64.length % 4)) % 4);
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === 'object' && !Array.isArray(claims) ? claims : null;
  } catch {
    return null;
  }
}

/** The display name a token gives (its `name`, else its `sub`, as the server does), or ''. */
export function tokenName(claims) {
  for (const value of [claims?.name, claims?.sub]) {
    if (typeof value !== 'string') continue;
    const check = checkUsername(value);
    if (check.ok) return check.value;
  }
  return '';
}

/** Whether a token's `rooms` claim (names and `prefix*` patterns; none: all) allows `room`. */
export function tokenAllowsRoom(claims, room) {
  if (!claims || !Array.isArray(claims.rooms)) return true;
  return claims.rooms.some((p) => typeof p === 'string' && (p.endsWith('*') ? room.startsWith(p.slice(0, -1)) : p === room));
}

function expOf(claims) {
  const exp = Number(claims?.exp);
  return Number.isFinite(exp) && exp > 0 ? exp : null;
}

function clockTime(unixSeconds) {
  return new Date(unixSeconds * 1000).toLocaleTimeString(undefined, { hour: 'numeric', minute: '2-digit', second: '2-digit' });
}

/**
 * Exponential backoff with "equal jitter": attempt 1 waits 0.5–1 s, attempt 2 1–2 s, …,
 * capped at 15–30 s, so a fleet of clients dropped by one instance does not come back in
 * lock-step.
 */
export function backoffDelay(attempt, random = Math.random) {
  const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** Math.max(0, attempt - 1));
  return Math.round(ceiling / 2 + random() * (ceiling / 2));
}

/** `ws(s)://…/ws` next to the page: wss when the page is on https, and it works under a path prefix. */
export function defaultUrl(loc = window.location) {
  const url = new URL('ws', loc.href);
  url.protocol = loc.protocol === 'https:' ? 'wss:' : 'ws:';
  url.search = '';
  url.hash = '';
  return url.toString();
}

/** The HTTP address of `path` (relative, e.g. `api/rooms/R/messages`) next to WebSocket URL `wsUrl`. */
export function httpUrlNextTo(wsUrl, path) {
  const base = new URL(wsUrl);
  base.protocol = base.protocol === 'wss:' ? 'https:' : 'http:';
  base.search = '';
  base.hash = '';
  return new URL(path, base);
}

/** `bytes` random bytes from the platform's CSPRNG, as lowercase hex (within `[A-Za-z0-9_-]`). */
export function randomHex(bytes) {
  const buf = new Uint8Array(bytes);
  crypto.getRandomValues(buf);
  return Array.from(buf, (b) => b.toString(16).padStart(2, '0')).join('');
}

/**
 * This tab's stable `client` id: kept in sessionStorage, so a reload of the tab reuses it
 * (its pending messages are re-sent under it) while another tab gets its own.
 */
function loadClientId(storage) {
  try {
    const known = storage?.getItem(CLIENT_KEY);
    if (known && CLIENT_RE.test(known)) return known;
  } catch {
    /* storage disabled: an id for this page only */
  }
  const id = `t${randomHex(16)}`;
  try {
    storage?.setItem(CLIENT_KEY, id);
  } catch {
    /* ignore */
  }
  return id;
}

export class ChatClient extends EventTarget {
  /**
   * @param {{url?: string, username?: string, rooms?: string[], storage?: Storage, tokenSource?: () => (string|null)}} options
   * `storage` (sessionStorage by default) keeps the outbox across a reload of this tab; it is
   * per tab on purpose, so two tabs never both re-send the same pending message.
   * `tokenSource` returns the current sign-in token (none: the page is anonymous).
   */
  constructor({ url = defaultUrl(), username = '', rooms = [], storage = safeSessionStorage(), tokenSource = () => null } = {}) {
    super();
    this.url = url;
    this.username = username;
    this.storage = storage;
    this.tokenSource = tokenSource;
    /** The token the current (or last) connection uses: set at connect, moved by `refreshed`. */
    this.token = null;
    /** When that token expires (Unix seconds), as far as the page knows. */
    this.tokenExp = null;
    /** The verified user id (`welcome.user`); null when the server did not authenticate us. */
    this.user = null;
    /** A `refresh` awaiting its answer: {token, ref}. */
    this.refreshing = null;
    /** Tokens the server refused in a `refresh` (not offered again). */
    this.refusedTokens = [];
    this.refreshError = '';
    this.refreshDue = 0;
    this.refreshTimer = null;
    this.tokenWatch = null;
    this.authFailures = 0;
    this.auth = { state: 'none', text: '', exp: null };
    /** @type {Map<string, {name: string, lastId: number, state: 'idle'|'joining'|'joined', buffer: object[], retryTimer: any}>} */
    this.rooms = new Map();
    for (const name of rooms) if (ROOM_RE.test(name)) this.rooms.set(name, newRoom(name));
    /** Pending messages, oldest first. */
    this.outbox = loadOutbox(storage).filter((p) => this.rooms.has(p.room));
    this.ws = null;
    this.connSeq = 0;
    this.attempt = 0;
    this.welcomed = false;
    this.instance = null;
    this.stopped = true;
    this.reconnectTimer = null;
    this.connectTimer = null;
    this.autoJoin = null;
    /**
     * Sends carry `ref` = refPrefix-N. The server stores a `send` at most once per (room,
     * user or client id, ref), and the client id outlives a reload of the tab, so refs must
     * never repeat within it: the prefix is random per page load (48 bits), the counter per
     * page. (A tab duplicated by the browser copies sessionStorage, client id included; the
     * random prefix keeps the two tabs' refs apart too.) A pending message keeps its ref for
     * every re-send, also after a reload (the outbox is stored with it).
     */
    this.clientId = loadClientId(storage);
    this.refSeq = 0;
    this.refPrefix = `c${randomHex(6)}`;
    /** The name the current connection was opened with (presence lists it under that name). */
    this.connName = '';
    /** `conn` of the current connection's `welcome`. */
    this.conn = null;
    /** Who this connection is in presence lists and `typing` (see presenceId). */
    this.presenceId = null;
    /** The server refused our `typing` (a reader without a sign-in): not sent again on this connection. */
    this.typingRefused = false;
    this.status = { state: 'offline', instance: null, attempt: 0, retryAt: null, reason: '' };
    this.onOnline = () => this.retryNow();
    this.onOffline = () => {
      if (!this.ws) this.setStatus({ state: 'offline', instance: null, attempt: this.attempt, retryAt: null, reason: 'Your device is offline.' });
    };
  }

  // ---- public API ----------------------------------------------------------------------

  start() {
    if (!this.stopped) return;
    this.stopped = false;
    if (typeof window !== 'undefined') {
      window.addEventListener('online', this.onOnline);
      window.addEventListener('offline', this.onOffline);
    }
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.refreshTimer);
    this.stopWatchingToken();
    if (this.ws) this.ws.close(1000, 'bye');
    if (typeof window !== 'undefined') {
      window.removeEventListener('online', this.onOnline);
      window.removeEventListener('offline', this.onOffline);
    }
  }

  /** Connect now instead of waiting for the backoff timer (also after a policy close). */
  retryNow() {
    if (this.stopped || this.ws) return;
    clearTimeout(this.reconnectTimer);
    this.connect();
  }

  setUsername(name) {
    this.username = name;
    this.renewForName();
  }

  /**
   * Without a sign-in, the server lists a connection (presence, typing) under the name it
   * connected with, and has no frame to rename it: a new name takes a new connection
   * (resumed with `since` like any reconnect, so nothing is missed).
   */
  renewForName() {
    if (this.welcomed && !this.user && queryName(this.username) !== this.connName) this.reconnectNow('');
  }

  /**
   * The token source may hold a new token (the page calls this on `hashchange` and
   * `storage` events; the source is also looked at on a timer when it matters): refresh
   * with it now, reconnect with it after a refusal or an expiry, or sign in with it.
   */
  tokenChanged() {
    if (this.stopped) return;
    const next = this.currentToken();
    if (!this.ws) {
      if (next && next !== this.token) this.retryNow();
      return;
    }
    if (!this.welcomed) return; // connecting: its outcome decides what comes next
    if (this.token && this.user) {
      this.tryRefresh();
    } else if (next && next !== this.token) {
      // Anonymous until now: signing in takes a new connection.
      this.reconnectNow('Signing in…');
    }
  }

  roomNames() {
    return [...this.rooms.keys()];
  }

  isLive(room) {
    return this.rooms.get(room)?.state === 'joined';
  }

  join(name) {
    if (!ROOM_RE.test(name) || this.rooms.has(name)) return false;
    const room = newRoom(name);
    this.rooms.set(name, room);
    if (this.welcomed) this.sendJoin(room);
    return true;
  }

  leave(name) {
    const room = this.rooms.get(name);
    if (!room) return;
    clearTimeout(room.retryTimer);
    this.rooms.delete(name);
    // A room still joining is left when its `joined` arrives (a `leave` before that would be
    // refused with not_joined).
    if (room.state === 'joined') this.sendFrame({ type: 'leave', room: name, ref: `l:${name}` });
    const before = this.outbox.length;
    this.outbox = this.outbox.filter((p) => p.room !== name);
    if (this.outbox.length !== before) this.outboxChanged();
  }

  /** Queue a message; it is sent as soon as the room is live and stays pending until acked. */
  send(roomName, text) {
    const room = this.rooms.get(roomName);
    if (!room || !text) return null;
    const pending = {
      ref: `${this.refPrefix}-${++this.refSeq}`,
      room: roomName,
      text,
      username: this.username,
      createdAt: Date.now(),
      // Last id of the room seen when this message was first put on a wire: only a later
      // message can be its stored copy.
      baseline: null,
      attempts: 0,
      state: 'queued', // queued | sent | retrying | acked | failed
      id: null,
      error: null,
      conn: null,
    };
    this.outbox.push(pending);
    this.outboxChanged();
    this.flush(roomName);
    return pending.ref;
  }

  /** Send a failed message again. */
  retry(ref) {
    const p = this.outbox.find((x) => x.ref === ref);
    if (!p || p.state !== 'failed') return;
    p.state = 'queued';
    p.error = null;
    p.code = null;
    this.outboxChanged();
    this.flush(p.room);
  }

  discard(ref) {
    const before = this.outbox.length;
    this.outbox = this.outbox.filter((p) => p.ref !== ref || p.state === 'sent');
    if (this.outbox.length !== before) this.outboxChanged();
  }

  pendingFor(room) {
    return this.outbox.filter((p) => p.room === room);
  }

  /**
   * Who is in `room`, as the server last said: {members: [{user, name}], count, live,
   * self}, or null before the first `presence` (or with presence off on the server).
   * `count` is exact (the list may be capped by the server); `live` is false while
   * disconnected (the list is what it was); `self` is this connection's user id.
   */
  presenceOf(roomName) {
    const p = this.rooms.get(roomName)?.presence;
    if (!p) return null;
    return { members: [...p.members.values()], count: p.members.size + p.extra, live: p.live, self: this.presenceId };
  }

  /** Who is typing in `room` now: [{user, name}], in the order they started. */
  typistsOf(roomName) {
    const room = this.rooms.get(roomName);
    return room ? [...room.typists.values()].map(({ user, name }) => ({ user, name })) : [];
  }

  /**
   * The person is typing in `room`: tells the others, at most every TYPING_SEND_EVERY_MS,
   * and only once the room is live. Returns whether a frame went out.
   */
  typing(roomName) {
    const room = this.rooms.get(roomName);
    if (!room || room.state !== 'joined' || this.typingRefused) return false;
    const now = Date.now();
    if (now - room.typingSentAt < TYPING_SEND_EVERY_MS) return false;
    if (!this.sendFrame({ type: 'typing', room: roomName, ref: `t:${roomName}` })) return false;
    room.typingSentAt = now;
    return true;
  }

  /**
   * A page of `room`'s history older than id `before`, over HTTP (GET
   * /api/rooms/{room}/messages; docs/api.md), with the sign-in token when the server
   * verified one. Resolves (never rejects) with one of:
   *   {kind: 'page', messages (oldest first, ids below `before`, each once), hasMore}
   *   {kind: 'off'}    the server has no API (404): nothing older can be fetched
   *   {kind: 'epoch'}  the page is from another epoch of the room than the one shown
   *   {kind: 'error', text}
   */
  async fetchOlder(roomName, before, limit = PAGE_LIMIT) {
    const url = httpUrlNextTo(this.url, `api/rooms/${encodeURIComponent(roomName)}/messages`);
    url.searchParams.set('before', String(before));
    url.searchParams.set('limit', String(limit));
    const headers = { Accept: 'application/json' };
    // Only a token the server accepted: with authentication off, a token is refused here.
    if (this.token && this.user) headers.Authorization = `Bearer ${this.token}`;
    let res;
    let body = null;
    try {
      res = await fetch(url, { headers, cache: 'no-store' });
      if (res.status === 404) return { kind: 'off' };
      body = await res.json().catch(() => null);
    } catch {
      return { kind: 'error', text: 'Could not load older messages: the network request failed. Try again.' };
    }
    if (!res.ok || !body || !Array.isArray(body.messages)) {
      return { kind: 'error', text: `Could not load older messages: ${describeReadError(res.status, body)}` };
    }
    const epoch = typeof body.epoch === 'string' ? body.epoch : null;
    const room = this.rooms.get(roomName);
    if (room?.epoch && epoch && epoch !== room.epoch) return { kind: 'epoch' };
    const seen = new Set();
    const messages = body.messages
      .filter((m) => m && typeof m === 'object' && Number.isInteger(m.id) && m.id < before && m.room === roomName && !seen.has(m.id) && seen.add(m.id))
      .sort((a, b) => a.id - b.id);
    return { kind: 'page', messages, hasMore: body.has_more === true };
  }

  // ---- connection ----------------------------------------------------------------------

  connect() {
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    const url = new URL(this.url);
    const first = this.rooms.values().next().value;
    // The first room rides on the connect query (the automatic join); the others are joined
    // with `join` frames after `welcome`.
    if (first) {
      url.searchParams.set('room', first.name);
      if (first.lastId > 0) {
        url.searchParams.set('since', String(first.lastId));
        if (first.epoch) url.searchParams.set('epoch', first.epoch);
      }
    }
    this.connName = queryName(this.username);
    if (this.connName) url.searchParams.set('username', this.connName);
    url.searchParams.set('client', this.clientId);
    const token = this.currentToken();
    this.stopWatchingToken();
    clearTimeout(this.refreshTimer);
    this.refreshing = null;
    this.refreshError = '';
    if (token !== this.token) {
      this.token = token;
      this.emitIdentity();
    }
    this.tokenExp = expOf(decodeToken(token));
    if (token) url.searchParams.set('token', token);
    this.setStatus({
      state: this.attempt > 0 ? 'reconnecting' : 'connecting',
      instance: null,
      attempt: this.attempt,
      retryAt: null,
      reason: '',
    });

    let ws;
    try {
      ws = new WebSocket(url.toString());
    } catch (e) {
      this.scheduleReconnect(String(e));
      return;
    }
    const seq = ++this.connSeq;
    this.ws = ws;
    this.welcomed = false;
    this.conn = null;
    this.presenceId = null;
    this.typingRefused = false;
    for (const room of this.rooms.values()) {
      room.state = 'idle';
      room.buffer = [];
      clearTimeout(room.retryTimer);
    }
    if (first) first.state = 'joining';
    this.autoJoin = first ?? null;

    clearTimeout(this.connectTimer);
    this.connectTimer = setTimeout(() => {
      if (this.ws === ws && !this.welcomed) ws.close(4000, 'connect timeout');
    }, CONNECT_TIMEOUT_MS);

    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (frame && typeof frame === 'object') this.onFrame(frame, seq);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.onClose(ev, seq);
    };
    // An `error` event is always followed by `close`, which does the work.
    ws.onerror = () => {};
  }

  onClose(ev, seq) {
    const welcomed = this.welcomed;
    clearTimeout(this.connectTimer);
    clearTimeout(this.refreshTimer);
    this.refreshing = null;
    this.ws = null;
    this.welcomed = false;
    this.instance = null;
    for (const room of this.rooms.values()) {
      room.state = 'idle';
      room.buffer = [];
      clearTimeout(room.retryTimer);
      // Disconnected: the list is kept (shown as such) until the next join's snapshot
      // replaces it; nobody is shown typing.
      if (room.presence?.live) {
        room.presence.live = false;
        this.emit('presence', { room: room.name });
      }
      this.clearTypists(room);
    }
    let changed = false;
    for (const p of this.outbox) {
      if (p.state === 'sent' || p.state === 'retrying') {
        clearTimeout(p.retryTimer);
        if (ev.code === 1009 && p.conn === seq) {
          // The server closed us for a frame over MAX_FRAME_BYTES: sending it again would
          // only repeat that.
          p.state = 'failed';
          p.code = 'too_large';
          p.error = 'That message is too large for the server.';
        } else {
          // Fate unknown (it may have been stored before the drop): after the reconnect the
          // room's replay decides whether it still needs sending. See matchOutbox().
          p.state = 'queued';
        }
        changed = true;
      }
    }
    if (changed) this.outboxChanged();
    if (this.stopped) {
      this.setStatus({ state: 'offline', instance: null, attempt: 0, retryAt: null, reason: '' });
      return;
    }
    if (ev.immediate) {
      this.connect();
      return;
    }
    if (ev.code === 1008) {
      // Policy (bad origin, auth): retrying blindly would fail the same way.
      this.setStatus({
        state: 'offline',
        instance: null,
        attempt: this.attempt,
        retryAt: null,
        reason: `The server refused the connection${ev.reason ? `: ${ev.reason}` : ''}.`,
      });
      return;
    }
    if (ev.code === 4001) {
      this.onTokenExpired();
      return;
    }
    if (this.token && !welcomed && ev.code === 1006) {
      // Closed before `welcome` without a close frame: the upgrade was refused. The page
      // cannot read the HTTP status; with a token the likely answer is 401.
      this.onTokenRefused();
      return;
    }
    if (typeof navigator !== 'undefined' && navigator.onLine === false) {
      this.setStatus({ state: 'offline', instance: null, attempt: this.attempt, retryAt: null, reason: 'Your device is offline.' });
      return;
    }
    this.scheduleReconnect(closeReason(ev));
  }

  /** Closes the connection now and opens a new one at once (no backoff, not an outage). */
  reconnectNow(reason) {
    const ws = this.ws;
    if (!ws) return this.retryNow();
    this.onClose({ code: 1000, reason, immediate: true }, this.connSeq);
    ws.close(1000, 'reconnecting');
  }

  // ---- the sign-in token ---------------------------------------------------------------

  currentToken() {
    let token = null;
    try {
      token = this.tokenSource();
    } catch {
      token = null;
    }
    return typeof token === 'string' && token.trim() !== '' ? token.trim() : null;
  }

  emitIdentity() {
    this.emit('identity', { token: this.token, claims: decodeToken(this.token), user: this.user });
  }

  /**
   * `state`: none (no token in use) | active (accepted; `refreshed` set after a refresh) |
   * expiring (due for a refresh and the source has nothing new) | refresh-refused |
   * refused (the connection was refused) | expired (closed with 4001). `text` is what to
   * tell the person ('' when nothing needs saying).
   */
  setAuth(state, text = '', extra = {}) {
    const live = state === 'active' || state === 'expiring' || state === 'refresh-refused';
    this.auth = { state, text, exp: live && this.user ? this.tokenExp : null, ...extra };
    this.emit('auth', this.auth);
  }

  /** After `welcome`: arm the refresh of a token the server verified. */
  startTokenLife() {
    this.authFailures = 0;
    if (this.token && this.user) {
      this.setAuth('active');
      this.scheduleRefresh();
    } else {
      // No token, or a server with authentication off (it ignored the token).
      this.setAuth('none');
    }
  }

  scheduleRefresh() {
    clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
    if (!this.token || !this.user || !this.tokenExp) return;
    const iat = Number(decodeToken(this.token)?.iat);
    const nowS = Date.now() / 1000;
    const life = this.tokenExp - (Number.isFinite(iat) && iat < this.tokenExp ? iat : nowS);
    const lead = Math.min(REFRESH_LEAD_MAX_S, Math.max(REFRESH_LEAD_MIN_S, life / 4));
    this.refreshDue = (this.tokenExp - lead) * 1000;
    // setTimeout fires at once beyond 2^31-1 ms: wake up daily and look again.
    const delay = Math.min(Math.max(0, this.refreshDue - Date.now()), 86400000);
    this.refreshTimer = setTimeout(() => this.onRefreshDue(), delay);
  }

  onRefreshDue() {
    this.refreshTimer = null;
    if (!this.welcomed || !this.token || !this.user || this.refreshing) return;
    if (Date.now() < this.refreshDue) {
      this.scheduleRefresh();
      return;
    }
    if (this.tryRefresh()) return; // the answer re-arms the timer
    // The source still holds the token in use: say so, and look again shortly.
    if (this.auth.state !== 'expiring') {
      const until = this.tokenExp ? ` at ${clockTime(this.tokenExp)}` : ' soon';
      const why = this.refreshError ? ` The last new token was refused: ${this.refreshError}` : '';
      this.setAuth('expiring', `Your session expires${until} and no new sign-in token is available yet.${why}`);
    }
    this.refreshTimer = setTimeout(() => this.onRefreshDue(), TOKEN_POLL_MS);
  }

  /** Sends `refresh` if the source holds a token other than the one in use. */
  tryRefresh() {
    if (!this.welcomed || !this.token || !this.user || this.refreshing) return false;
    const next = this.currentToken();
    if (!next || next === this.token || this.refusedTokens.includes(next)) return false;
    const ref = `r:${++this.refSeq}`;
    if (!this.sendFrame({ type: 'refresh', token: next, ref })) return false;
    this.refreshing = { token: next, ref };
    return true;
  }

  onRefreshed(f) {
    const pending = this.refreshing;
    if (!pending) return;
    this.refreshing = null;
    this.refreshError = '';
    this.token = pending.token;
    this.tokenExp = Number(f.exp) || expOf(decodeToken(this.token));
    this.emitIdentity();
    this.setAuth('active', '', { refreshed: true });
    this.scheduleRefresh();
  }

  onRefreshRefused(f) {
    const pending = this.refreshing;
    if (!pending || pending.ref !== f.ref) return;
    this.refreshing = null;
    this.refusedTokens = [...this.refusedTokens.slice(-4), pending.token];
    this.refreshError = typeof f.message === 'string' && f.message ? f.message : String(f.code ?? 'refused');
    const until = this.tokenExp ? ` until ${clockTime(this.tokenExp)}` : '';
    this.setAuth('refresh-refused', `A new sign-in token was refused (${this.refreshError}); your session goes on${until}.`);
    this.scheduleRefresh();
  }

  /** Closed with 4001: the token in use expired without a refresh. */
  onTokenExpired() {
    const next = this.currentToken();
    if (next && next !== this.token) {
      const text = 'Your session expired: reconnecting with a fresh token.';
      this.setAuth('expired', text);
      this.scheduleReconnect(text);
      return;
    }
    const text = 'Your session expired.';
    this.setAuth('expired', `${text} Waiting for a new sign-in token…`);
    this.setStatus({ state: 'offline', instance: null, attempt: this.attempt, retryAt: null, reason: text });
    this.watchToken();
  }

  /** The connection was refused before `welcome` while a token was in use. */
  onTokenRefused() {
    this.authFailures += 1;
    const claims = decodeToken(this.token);
    let why = '';
    if (!claims) why = ' (it is not a readable token)';
    else if (expOf(claims) && expOf(claims) + TOKEN_LEEWAY_S < Date.now() / 1000) why = ` (it expired at ${clockTime(expOf(claims))})`;
    const text = `The server refused your sign-in token${why}. Trying again later, or as soon as a new token is available.`;
    // Backing off: 2–4 s, then 4–8 s, … up to 15–30 s, whatever the attempt count says.
    this.attempt += 1;
    const delay = backoffDelay(this.authFailures + 2);
    this.setAuth('refused', text);
    this.setStatus({ state: 'reconnecting', instance: null, attempt: this.attempt, retryAt: Date.now() + delay, reason: text });
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => this.connect(), delay);
    this.watchToken();
  }

  /** While disconnected because of the token: connect as soon as the source has another. */
  watchToken() {
    this.stopWatchingToken();
    this.tokenWatch = setInterval(() => {
      if (this.stopped || this.ws) return this.stopWatchingToken();
      const next = this.currentToken();
      if (next && next !== this.token) this.retryNow();
    }, TOKEN_POLL_MS);
  }

  stopWatchingToken() {
    clearInterval(this.tokenWatch);
    this.tokenWatch = null;
  }

  scheduleReconnect(reason) {
    this.attempt += 1;
    const delay = backoffDelay(this.attempt);
    this.setStatus({ state: 'reconnecting', instance: null, attempt: this.attempt, retryAt: Date.now() + delay, reason });
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => this.connect(), delay);
  }

  sendFrame(frame) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  sendJoin(room) {
    room.state = 'joining';
    room.buffer = [];
    const frame = { type: 'join', room: room.name, ref: `j:${room.name}` };
    if (room.lastId > 0) {
      frame.since = room.lastId;
      if (room.epoch) frame.epoch = room.epoch;
    }
    this.sendFrame(frame);
  }

  setStatus(status) {
    this.status = status;
    this.emit('status', status);
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  // ---- incoming frames -----------------------------------------------------------------

  onFrame(f, seq) {
    switch (f.type) {
      case 'welcome': {
        this.welcomed = true;
        this.instance = String(f.instance ?? '');
        clearTimeout(this.connectTimer);
        this.conn = f.conn === undefined || f.conn === null ? null : String(f.conn);
        const user = typeof f.user === 'string' ? f.user : null;
        // Without authentication the server lists a connection as anon-<instance>-<conn>.
        this.presenceId = user ?? (this.instance && this.conn ? `anon-${this.instance}-${this.conn}` : null);
        if (user !== this.user) {
          this.user = user;
          this.emitIdentity();
        }
        this.startTokenLife();
        this.setStatus({ state: 'connected', instance: this.instance, attempt: 0, retryAt: null, reason: '' });
        for (const room of this.rooms.values()) if (room.state === 'idle') this.sendJoin(room);
        // The name changed while this connection was being opened.
        this.renewForName();
        break;
      }
      case 'presence':
        this.onPresence(f);
        break;
      case 'presence_diff':
        this.onPresenceDiff(f);
        break;
      case 'typing':
        this.onTyping(f);
        break;
      case 'message':
        this.onMessage(f);
        break;
      case 'joined':
        this.onJoined(f);
        break;
      case 'left':
        this.onLeft(f);
        break;
      case 'refreshed':
        this.onRefreshed(f);
        break;
      case 'ack':
        this.onAck(f);
        break;
      case 'error':
        this.onError(f, seq);
        break;
      default:
        break;
    }
  }

  onMessage(m) {
    if (typeof m.id !== 'number' || typeof m.room !== 'string') return;
    const room = this.rooms.get(m.room);
    if (!room) return; // not ours (e.g. left, or the server's default room after leaving all)
    if (room.state === 'joining') room.buffer.push(m);
    else this.deliver(room, [m], false);
  }

  onJoined(f) {
    const room = this.rooms.get(f.room);
    if (!room) {
      // Joined automatically or left while joining: we do not want it.
      this.sendFrame({ type: 'leave', room: f.room, ref: `l:${f.room}` });
      return;
    }
    // The connection's first successful join: the link is healthy, restart the backoff.
    this.attempt = 0;
    const resumed = room.lastId > 0;
    const lastId = Number(f.last_id) || 0;
    // `epoch` (when the server sends one) names the room's id sequence; a new one means
    // the room's ids started again. Without it, a last id below ours means the same.
    const epoch = typeof f.epoch === 'string' ? f.epoch : null;
    const newEpoch = room.epoch !== null && epoch !== null && epoch !== room.epoch;
    const reset = resumed && f.recovered === false && (newEpoch || lastId < room.lastId);
    if (reset) {
      // What we showed is from another life of the room: start over with this replay.
      room.lastId = 0;
      for (const p of this.outbox) if (p.room === room.name && p.baseline !== null) p.baseline = 0;
      this.emit('reset', { room: room.name });
    }
    if (epoch !== null) room.epoch = epoch;
    if (resumed && f.recovered === false && !reset) {
      // `since` is older than the retained history: there is a hole before this replay.
      this.emit('gap', { room: room.name });
    }
    const replay = room.buffer;
    room.buffer = [];
    room.state = 'joined';
    this.deliver(room, replay, true);
    room.lastId = Math.max(room.lastId, lastId);
    this.emit('joined', { room: room.name, recovered: f.recovered !== false, resumed, reset });
    this.flush(room.name);
  }

  /** A `left` we did not ask for: a refreshed token no longer allows the room. */
  onLeft(f) {
    const room = this.rooms.get(f.room);
    // Our own leave removed the room first; a re-join's `left` comes before its `joined`.
    if (!room || room.state !== 'joined') return;
    clearTimeout(room.retryTimer);
    this.rooms.delete(room.name);
    const before = this.outbox.length;
    this.outbox = this.outbox.filter((p) => p.room !== room.name);
    if (this.outbox.length !== before) this.outboxChanged();
    this.emit('roomerror', { room: room.name, code: 'forbidden', left: true, text: 'Your sign-in no longer gives you access to this room.' });
  }

  onAck(f) {
    const p = this.outbox.find((x) => x.ref === f.ref);
    if (!p) return; // already matched with its stored copy
    clearTimeout(p.retryTimer);
    const room = this.rooms.get(p.room);
    if (room && room.lastId >= f.id) {
      this.removePending(p);
    } else {
      // Acked: it is stored and will never be sent again. It stays visible (as sent) until
      // its `message` frame arrives, which may come just after the ack.
      p.state = 'acked';
      p.id = f.id;
      this.outboxChanged();
    }
  }

  onError(f, seq) {
    const code = String(f.code ?? 'error');
    const text = describeError(code, f.message);
    const ref = typeof f.ref === 'string' ? f.ref : null;
    if (ref && ref.startsWith('t:')) {
      // Typing is best effort: nothing to tell the person. A reader without a sign-in
      // (AUTH_ANONYMOUS=read) may not type: stop asking on this connection.
      if (code === 'unauthorized' || code === 'forbidden') this.typingRefused = true;
      return;
    }
    const pending = ref && this.outbox.find((x) => x.ref === ref);
    if (pending) {
      this.onSendError(pending, code, text, seq);
      return;
    }
    if (ref && ref.startsWith('l:')) return; // a leave that raced with a drop: nothing to do
    if (ref && ref.startsWith('r:')) {
      this.onRefreshRefused(f);
      return;
    }
    if (!ref && this.autoJoin && this.autoJoin.state === 'joining' && (code === 'unavailable' || code === 'invalid_room' || code === 'forbidden')) {
      // The connection's automatic join (the `room` query parameter) failed: such an error
      // carries no ref. Handle it as the failure of that room's join.
      this.onError({ ...f, ref: `j:${this.autoJoin.name}` }, seq);
      return;
    }
    if (ref && ref.startsWith('j:')) {
      const room = this.rooms.get(ref.slice(2));
      if (!room) return;
      if (code === 'unavailable' || code === 'rate_limited') {
        room.state = 'idle';
        clearTimeout(room.retryTimer);
        room.retryTimer = setTimeout(() => {
          if (this.welcomed && this.rooms.get(room.name) === room && room.state === 'idle') this.sendJoin(room);
        }, backoffDelay(2));
        this.emit('problem', { code, text: `Could not join #${room.name} right now; retrying.` });
      } else if (code === 'bad_request' && room.state === 'joining') {
        // "already joined": harmless, the replay is on its way.
      } else {
        this.rooms.delete(room.name);
        this.outbox = this.outbox.filter((p) => p.room !== room.name);
        this.outboxChanged();
        const why = code === 'forbidden' ? this.forbiddenText(room.name) : text;
        this.emit('roomerror', { room: room.name, code, text: why });
      }
      return;
    }
    this.emit('problem', { code, text });
  }

  forbiddenText(room) {
    const claims = this.token && this.user ? decodeToken(this.token) : null;
    if (claims && !tokenAllowsRoom(claims, room)) return 'Your sign-in does not give you access to this room.';
    return 'You are in as many rooms as the server allows; leave one first.';
  }

  onSendError(p, code, text, seq) {
    clearTimeout(p.retryTimer);
    if (code === 'unavailable' || code === 'rate_limited') {
      // Not stored, says the server (though a publish cut off mid-way may have run, see
      // docs/operations.md); try again later on this connection. Until then the live
      // stream can still reveal a stored copy (see matchOutbox) and settle it.
      p.state = 'retrying';
      p.error = text;
      p.retries = (p.retries || 0) + 1;
      p.retryTimer = setTimeout(() => {
        if (p.state === 'retrying' && this.outbox.includes(p)) {
          p.state = 'queued';
          this.flush(p.room);
        }
      }, backoffDelay(Math.min(p.retries + 1, 5)));
      this.outboxChanged();
      this.emit('problem', { code, text });
    } else if (code === 'not_joined') {
      p.state = 'queued';
      const room = this.rooms.get(p.room);
      if (room && room.state === 'joined' && this.connSeq === seq) this.sendJoin(room);
      this.outboxChanged();
    } else {
      p.state = 'failed';
      p.error = text;
      p.code = code;
      this.outboxChanged();
      this.emit('problem', { code, text });
    }
  }

  // ---- presence and typing ---------------------------------------------------------------

  /** The snapshot after `joined`: replaces whatever the room's list was. */
  onPresence(f) {
    const room = this.rooms.get(f.room);
    if (!room || !Array.isArray(f.users)) return;
    const members = new Map();
    for (const u of f.users) if (isPresenceUser(u)) members.set(u.user, { user: u.user, name: u.name });
    const count = Number.isInteger(f.count) && f.count >= 0 ? f.count : members.size;
    // `extra`: users the server counted but did not list (PRESENCE_MAX_USERS).
    room.presence = { members, extra: Math.max(0, count - members.size), live: true };
    this.emit('presence', { room: room.name });
  }

  /**
   * Comings and goings after the snapshot, applied as a set keyed by `user`: a join of
   * someone listed or a leave of someone absent changes nothing (the snapshot may already
   * include what a diff announces, e.g. our own arrival).
   */
  onPresenceDiff(f) {
    const room = this.rooms.get(f.room);
    // The server sends a room's diffs only after its snapshot: none before, none to keep.
    if (!room || !room.presence?.live) return;
    const p = room.presence;
    for (const u of Array.isArray(f.left) ? f.left : []) {
      if (!isPresenceUser(u)) continue;
      if (p.members.has(u.user)) p.members.delete(u.user);
      else if (p.extra > 0) p.extra -= 1; // one of those not listed
      this.stopTyping(room, (t) => t.user === u.user);
    }
    for (const u of Array.isArray(f.joined) ? f.joined : []) {
      if (isPresenceUser(u)) p.members.set(u.user, { user: u.user, name: u.name });
    }
    this.emit('presence', { room: room.name });
  }

  onTyping(f) {
    const room = this.rooms.get(f.room);
    if (!room || room.state !== 'joined' || !isPresenceUser(f) || f.user === this.presenceId) return;
    const known = room.typists.get(f.user);
    clearTimeout(known?.timer);
    const typist = { user: f.user, name: f.name, timer: null };
    typist.timer = setTimeout(() => {
      if (this.rooms.get(room.name) === room && room.typists.get(f.user) === typist) this.stopTyping(room, (t) => t === typist);
    }, TYPING_SHOW_MS);
    room.typists.set(f.user, typist);
    if (!known || known.name !== f.name) this.emit('typing', { room: room.name });
  }

  /** Stops showing the typists `which` selects. */
  stopTyping(room, which) {
    let changed = false;
    for (const [user, t] of room.typists) {
      if (!which(t)) continue;
      clearTimeout(t.timer);
      room.typists.delete(user);
      changed = true;
    }
    if (changed) this.emit('typing', { room: room.name });
  }

  clearTypists(room) {
    this.stopTyping(room, () => true);
  }

  /** A message from someone shown typing ends their typing (by user id; by name when the message has none). */
  messagesEndTyping(room, messages) {
    if (room.typists.size === 0) return;
    for (const m of messages) {
      this.stopTyping(room, (t) => (typeof m.user === 'string' ? t.user === m.user : t.name === m.username));
    }
  }

  // ---- delivery, de-duplication, outbox ------------------------------------------------

  /** Hand messages to the UI in id order, each id once; settle pending messages they prove stored. */
  deliver(room, messages, replay) {
    if (messages.length === 0) return;
    const sorted = [...messages].sort((a, b) => a.id - b.id);
    const fresh = [];
    for (const m of sorted) {
      if (m.id <= room.lastId) continue; // seen already (resume overlap, duplicate)
      room.lastId = m.id;
      fresh.push(m);
    }
    if (fresh.length === 0) return;
    this.matchOutbox(room, fresh);
    this.emit('messages', { room: room.name, messages: fresh, replay });
    this.messagesEndTyping(room, fresh);
  }

  /**
   * A message whose connection dropped before its `ack` may or may not have been stored.
   * First line of defence: the server's. This tab connects with a stable `client` id and
   * re-sends a pending message with the same `ref`, so a repeat of a stored one is
   * answered `ack` with the original id and stored nothing (docs/protocol.md, "Sends that
   * can be retried"). Second line, for a server that does not de-duplicate (or a record
   * past IDEMPOTENCY_WINDOW_SECS): after the reconnect, the room is resumed with `since`,
   * and a replayed (or live) message of the same room, same author and same text with an
   * id above the last id we had seen when we first sent ours is taken as our stored copy;
   * only a message not found that way is sent again (in flush(), which runs after the
   * room's `joined`). Acked messages are settled by id. The heuristic errs on the side of
   * "delivered" if the same name posts the same text from elsewhere at that moment.
   */
  matchOutbox(room, fresh) {
    let changed = false;
    for (const m of fresh) {
      const byId = this.outbox.find((p) => p.state === 'acked' && p.id === m.id && p.room === room.name);
      if (byId) {
        this.removePending(byId, false);
        changed = true;
        continue;
      }
      const byContent = this.outbox.find(
        (p) =>
          p.room === room.name &&
          p.attempts > 0 &&
          p.state !== 'acked' &&
          p.state !== 'failed' &&
          p.baseline !== null &&
          m.id > p.baseline &&
          this.sameAuthor(p, m) &&
          p.text === m.text,
      );
      if (byContent) {
        this.removePending(byContent, false);
        changed = true;
      }
    }
    // Acked ones whose message we already have (e.g. replay covered them).
    for (const p of [...this.outbox]) {
      if (p.state === 'acked' && p.room === room.name && p.id <= room.lastId) {
        this.removePending(p, false);
        changed = true;
      }
    }
    if (changed) this.outboxChanged();
  }

  /** Whether stored message `m` can be pending message `p`: same user id, else same name. */
  sameAuthor(p, m) {
    if (typeof m.user === 'string') return m.user === this.user;
    return String(p.username ?? '').trim() === m.username;
  }

  removePending(p, notify = true) {
    clearTimeout(p.retryTimer);
    this.outbox = this.outbox.filter((x) => x !== p);
    if (notify) this.outboxChanged();
  }

  /** Put queued messages of a live room on the wire, oldest first. */
  flush(roomName) {
    const room = this.rooms.get(roomName);
    if (!room || room.state !== 'joined' || !this.ws || this.ws.readyState !== WebSocket.OPEN) return;
    let changed = false;
    for (const p of this.outbox) {
      if (p.room !== roomName || p.state !== 'queued') continue;
      if (p.baseline === null) p.baseline = room.lastId;
      const frame = { type: 'send', room: p.room, text: p.text, ref: p.ref };
      if (checkUsername(p.username).ok) frame.username = p.username.trim();
      if (!this.sendFrame(frame)) break;
      p.state = 'sent';
      p.attempts += 1;
      p.conn = this.connSeq;
      changed = true;
    }
    if (changed) this.outboxChanged();
  }

  outboxChanged() {
    saveOutbox(this.storage, this.outbox);
    this.emit('outbox', {});
  }
}

function newRoom(name) {
  return {
    name,
    lastId: 0,
    epoch: null,
    state: 'idle',
    buffer: [],
    retryTimer: null,
    /** {members: Map<user, {user, name}>, extra, live} from `presence`, or null. */
    presence: null,
    /** user → {user, name, timer}: who is shown typing. */
    typists: new Map(),
    typingSentAt: 0,
  };
}

function isPresenceUser(u) {
  return u && typeof u === 'object' && typeof u.user === 'string' && u.user !== '' && typeof u.name === 'string';
}

/** The name to connect with: the valid, trimmed username, or '' (none). */
function queryName(name) {
  const check = checkUsername(name);
  return check.ok ? check.value : '';
}

/** Why a read of the server API failed, in words. */
function describeReadError(status, body) {
  switch (status) {
    case 401:
      return 'the server did not accept your sign-in for reading history.';
    case 403:
      return 'your sign-in does not give you access to this room.';
    case 503:
      return 'the chat service is temporarily unavailable. Try again in a moment.';
    default:
      return typeof body?.message === 'string' && body.message ? body.message : `the server answered ${status}.`;
  }
}

function closeReason(ev) {
  switch (ev.code) {
    case 1012:
      return 'The server is restarting.';
    case 1013:
      return 'The connection fell behind and was reset.';
    case 1011:
      return 'The server had an internal error.';
    case 1009:
      return 'A message was too large for the server.';
    case 4000:
      return 'The server did not answer in time.';
    default:
      return 'The connection was lost.';
  }
}

function safeSessionStorage() {
  try {
    return window.sessionStorage;
  } catch {
    return null;
  }
}

function loadOutbox(storage) {
  if (!storage) return [];
  try {
    const items = JSON.parse(storage.getItem(OUTBOX_KEY) || '[]');
    if (!Array.isArray(items)) return [];
    return items
      .filter((p) => p && typeof p.ref === 'string' && typeof p.room === 'string' && typeof p.text === 'string')
      .map((p) => ({
        ...p,
        // Whatever was on the wire when the page went away is of unknown fate: queued, and
        // matched against the replay before any re-send.
        state: p.state === 'failed' || p.state === 'acked' ? p.state : 'queued',
        retryTimer: null,
      }));
  } catch {
    return [];
  }
}

function saveOutbox(storage, outbox) {
  if (!storage) return;
  try {
    const plain = outbox.map(({ retryTimer, ...rest }) => rest);
    storage.setItem(OUTBOX_KEY, JSON.stringify(plain));
  } catch {
    /* storage full or disabled: the outbox still lives in memory */
  }
}
