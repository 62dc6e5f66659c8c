// The system under test, started from scratch on free loopback ports: one redis-server,
// N chat-gateway instances on it, and nginx (deploy/nginx/nginx.conf) balancing over them.
// Everything lives in a temporary directory; logs go to artifacts/e2e-logs/ (a named stack's
// to artifacts/e2e-logs/<name>/, so that test files do not overwrite each other's).

import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const artifactsDir = path.join(repoRoot, 'artifacts');
export const logsDir = path.join(artifactsDir, 'e2e-logs');

const children = new Set();
// If the test process goes away abruptly, take the children with it. SIGTERM, not SIGKILL:
// a killed nginx master would leave its workers (and the port) behind.
process.on('exit', () => {
  for (const child of children) {
    try {
      child.kill('SIGTERM');
    } catch {
      /* already gone */
    }
  }
});

/** A port nothing listens on right now (the OS picks it). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

function which(cmd, fallbacks = []) {
  for (const dir of (process.env.PATH || '').split(':').concat(['/usr/sbin', '/usr/bin', '/sbin'])) {
    const p = path.join(dir, cmd);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      return p;
    } catch {
      /* next */
    }
  }
  for (const p of fallbacks) if (fs.existsSync(p)) return p;
  throw new Error(`${cmd} not found on PATH (run e2e/ci.sh to install it)`);
}

/** Spawns a long-running child with stdout+stderr appended to <dir>/<name>.log. */
function launch(name, cmd, args, { env = {}, cwd, dir = logsDir } = {}) {
  fs.mkdirSync(dir, { recursive: true });
  const logPath = path.join(dir, `${name}.log`);
  const fd = fs.openSync(logPath, 'a');
  fs.writeSync(fd, `\n=== ${new Date().toISOString()} ${cmd} ${args.join(' ')}\n`);
  const child = spawn(cmd, args, {
    cwd,
    env: { ...process.env, ...env },
    stdio: ['ignore', fd, fd],
  });
  fs.closeSync(fd);
  children.add(child);
  child.exited = new Promise((resolve) => {
    child.on('exit', (code, signal) => {
      children.delete(child);
      resolve({ code, signal });
    });
  });
  child.logPath = logPath;
  return child;
}

async function until(what, check, { timeoutMs = 20000, child } = {}) {
  const deadline = Date.now() + timeoutMs;
  let lastErr;
  for (;;) {
    if (child && child.exitCode !== null) {
      throw new Error(`${what}: process exited with ${child.exitCode}; see ${child.logPath}\n${tail(child.logPath)}`);
    }
    try {
      if (await check()) return;
    } catch (e) {
      lastErr = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`${what}: not ready after ${timeoutMs} ms (${lastErr?.message ?? 'no answer'})${child ? `\n${tail(child.logPath)}` : ''}`);
    }
    // Readiness polling of a starting process (not test synchronisation).
    await new Promise((r) => setTimeout(r, 50));
  }
}

export function tail(file, lines = 30) {
  try {
    return fs.readFileSync(file, 'utf8').split('\n').slice(-lines).join('\n');
  } catch {
    return '';
  }
}

function redisPing(port) {
  return new Promise((resolve) => {
    const sock = net.connect(port, '127.0.0.1');
    let buf = '';
    sock.setTimeout(1000, () => sock.destroy());
    sock.on('connect', () => sock.write('PING\r\n'));
    sock.on('data', (d) => {
      buf += d;
      if (buf.includes('\r\n')) {
        sock.end();
        resolve(buf.startsWith('+PONG'));
      }
    });
    sock.on('error', () => resolve(false));
    sock.on('close', () => resolve(false));
  });
}

/** One Redis command over RESP; resolves with the raw reply. */
function redisCommand(port, args) {
  return new Promise((resolve, reject) => {
    const sock = net.connect(port, '127.0.0.1');
    let buf = '';
    sock.setTimeout(2000, () => sock.destroy(new Error('redis command timed out')));
    sock.on('connect', () => {
      sock.write(`*${args.length}\r\n${args.map((a) => `$${Buffer.byteLength(String(a))}\r\n${a}\r\n`).join('')}`);
    });
    sock.on('data', (d) => {
      buf += d;
      if (buf.endsWith('\r\n')) {
        sock.end();
        if (buf.startsWith('-')) reject(new Error(buf.trim()));
        else resolve(buf);
      }
    });
    sock.on('error', reject);
  });
}

async function httpStatus(url) {
  const res = await fetch(url, { signal: AbortSignal.timeout(2000) });
  await res.arrayBuffer();
  return res.status;
}

export class Stack {
  /**
   * @param {{name?: string, gatewayEnv?: Record<string, string>}} options
   * `name`: logs go to artifacts/e2e-logs/<name>/ (default: artifacts/e2e-logs/ itself).
   * `gatewayEnv`: extra environment of every gateway (e.g. AUTH_JWT_SECRET), over the
   * defaults below; startGateway() can add more for one instance.
   */
  constructor({ name = '', gatewayEnv = {} } = {}) {
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chat-e2e-'));
    // nginx workers drop root privileges: let them reach the prefix.
    fs.chmodSync(this.dir, 0o755);
    this.gateways = new Map();
    this.gatewayEnv = gatewayEnv;
    this.gatewayBin = path.resolve(repoRoot, process.env.GATEWAY_BIN || 'target/release/chat-gateway');
    if (!fs.existsSync(this.gatewayBin)) {
      throw new Error(`gateway binary ${this.gatewayBin} not found: build it (cargo build --release -p chat-gateway) or set GATEWAY_BIN`);
    }
    this.logsDir = name ? path.join(logsDir, name) : logsDir;
    // Only this stack's logs of an earlier run: another test file's stay.
    if (name) {
      fs.rmSync(this.logsDir, { recursive: true, force: true });
    } else if (fs.existsSync(logsDir)) {
      for (const f of fs.readdirSync(logsDir)) if (f.endsWith('.log')) fs.rmSync(path.join(logsDir, f), { force: true });
    }
  }

  /** The log files of this stack's processes (e.g. to check what they wrote). */
  logFiles() {
    return fs.existsSync(this.logsDir)
      ? fs.readdirSync(this.logsDir).filter((f) => f.endsWith('.log')).map((f) => path.join(this.logsDir, f))
      : [];
  }

  async startRedis() {
    this.redisPort = await freePort();
    const dir = path.join(this.dir, 'redis');
    fs.mkdirSync(dir);
    this.redisProc = launch('redis', which('redis-server'), [
      '--port', String(this.redisPort),
      '--bind', '127.0.0.1',
      '--save', '',
      '--appendonly', 'no',
      '--dir', dir,
    ], { dir: this.logsDir });
    await until('redis-server', () => redisPing(this.redisPort), { child: this.redisProc });
    this.redisUrl = `redis://127.0.0.1:${this.redisPort}`;
  }

  /** Runs one command on the test's Redis (e.g. to cut a room's history short). */
  redis(...args) {
    return redisCommand(this.redisPort, args);
  }

  /**
   * Starts (or restarts, on the same port and with the same `env`) the gateway called `id`.
   * `env`: extra environment for this instance, over the stack's `gatewayEnv`.
   */
  async startGateway(id, port, { env: extra } = {}) {
    const known = this.gateways.get(id);
    port ??= known?.port ?? (await freePort());
    extra ??= known?.env ?? {};
    const env = {
      APP_ENV: 'production', // never read a developer's .env
      HOST: '127.0.0.1',
      PORT: String(port),
      REDIS_URL: this.redisUrl,
      INSTANCE_ID: id,
      HISTORY_SIZE: '200',
      SHUTDOWN_DRAIN_SECS: '0',
      SHUTDOWN_GRACE_SECS: '2',
      RUST_LOG: 'info',
      LOG_FORMAT: 'pretty',
      // Empty = the copy embedded in the binary (what ships). Set WEB_DIR to test edits
      // to web/ without rebuilding.
      WEB_DIR: process.env.WEB_DIR || '',
      NO_COLOR: '1',
      ...this.gatewayEnv,
      ...extra,
    };
    const child = launch(`gateway-${id}`, this.gatewayBin, [], { env, cwd: this.dir, dir: this.logsDir });
    await until(`gateway ${id}`, async () => (await httpStatus(`http://127.0.0.1:${port}/readyz`)) === 200, { child });
    const gw = { id, port, child, env: extra };
    this.gateways.set(id, gw);
    return gw;
  }

  /** SIGKILL: the instance dies without closing its connections (a crash). */
  async killGateway(id) {
    const gw = this.gateways.get(id);
    if (!gw) throw new Error(`no gateway ${id}`);
    gw.child.kill('SIGKILL');
    await gw.child.exited;
  }

  async startNginx() {
    this.nginxPort = await freePort();
    const prefix = path.join(this.dir, 'nginx');
    const conf = path.join(prefix, 'conf');
    fs.mkdirSync(conf, { recursive: true });
    // The deploy config as is; only the two include files are ours.
    fs.copyFileSync(path.join(repoRoot, 'deploy/nginx/nginx.conf'), path.join(conf, 'nginx.conf'));
    const servers = [...this.gateways.values()]
      .map((g) => `    server 127.0.0.1:${g.port} max_fails=1 fail_timeout=5s;`)
      .join('\n');
    fs.writeFileSync(path.join(conf, 'upstream.conf'), `upstream chat {\n${servers}\n}\n`);
    fs.writeFileSync(path.join(conf, 'listen.conf'), `listen 127.0.0.1:${this.nginxPort};\n`);
    const nginx = which('nginx', ['/usr/sbin/nginx']);
    const args = ['-p', prefix, '-c', path.join(conf, 'nginx.conf'), '-e', path.join(prefix, 'error.log'), '-g', 'daemon off;'];
    try {
      // stdout to /dev/null: the config's `access_log /dev/stdout` cannot open a socket.
      execFileSync(nginx, [...args, '-t'], { stdio: ['ignore', 'ignore', 'pipe'] });
    } catch (e) {
      throw new Error(`nginx -t failed:\n${e.stderr}`);
    }
    this.nginx = launch('nginx', nginx, args, { dir: this.logsDir });
    this.baseUrl = `http://127.0.0.1:${this.nginxPort}`;
    await until('nginx', async () => (await httpStatus(`${this.baseUrl}/healthz`)) === 200, { child: this.nginx });
  }

  async stop() {
    const all = [...children];
    for (const child of all) child.kill('SIGTERM');
    const done = Promise.all(all.map((c) => c.exited));
    let timer;
    const late = new Promise((resolve) => {
      timer = setTimeout(() => {
        for (const child of all) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
        resolve();
      }, 5000);
    });
    await Promise.race([done, late]);
    await done;
    clearTimeout(timer);
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}
