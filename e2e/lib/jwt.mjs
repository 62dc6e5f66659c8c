// HS256 JSON Web Tokens for the tests, with Node's crypto (what `chat-gateway token` prints,
// without starting a process): base64url(header).base64url(payload).base64url(HMAC-SHA256).

import crypto from 'node:crypto';

const b64url = (value) => Buffer.from(typeof value === 'string' ? value : JSON.stringify(value)).toString('base64url');

/** Signs `claims` with `secret` (HS256). */
export function signHs256(secret, claims) {
  const signed = `${b64url({ alg: 'HS256', typ: 'JWT' })}.${b64url(claims)}`;
  const signature = crypto.createHmac('sha256', secret).update(signed).digest('base64url');
  return `${signed}.${signature}`;
}

/** Unix seconds now. */
export const nowSecs = () => Math.floor(Date.now() / 1000);
