//! The two Lua scripts that make a publish and a history read atomic, how they are run
//! (`EVALSHA`, loading them when Redis does not know them), and how their replies are read.
//!
//! Lua only concatenates: every byte of JSON (a message's, an epoch notice's) comes from
//! Rust, so what is stored, published and replayed is exactly what serde would produce.

use std::{fmt::Write as _, time::Duration};

use bytes::{Bytes, BytesMut};
use chat_protocol::{MessageTemplate, RoomName, message::TEMPLATE_TAIL, peek_id};
use fred::{
    prelude::*,
    types::{Key, Value, scripts::Script},
};

use crate::bus::{
    BusError, Dedupe, Epoch, EpochNotice, History, Msg, Page, Published, keys::Keys, new_epoch,
    put_new_epoch,
};

/// Publishes one or more messages (a batch: see `batch.rs`), each as if alone.
///
/// ARGV[1..5], shared: message tail, history size, publish command, epoch notice tail,
/// idle TTL (seconds, 0 = none). Then six per message: channel, message head, middle,
/// epoch candidate, epoch notice head, idempotency window (seconds, `0`: not
/// idempotent). KEYS, per message: seq, history, epoch, and for an idempotent send its
/// dedupe record. Returns one entry per message, in order: {0, frame} for a stored
/// message, {1, frame} for a repeated send (the original frame; nothing is published),
/// {2, error} for one whose commands failed (the others are not affected).
///
/// A counter that starts at 1 (a new room, or one whose data was lost) drops stale
/// history, makes sure the room has an epoch (a join may have created it already) and
/// publishes an epoch notice before the message, so every instance learns of a reset in
/// order. The timestamp is Redis' clock, read once per call, so `ts` follows id order
/// whatever the instances' clocks say.
///
/// Upkeep is done in steps, not per message: the history list is trimmed back to the
/// history size once it holds an eighth more (reads look at the newest `size` entries
/// only, so the extra ones are never seen), and the room's idle TTL is renewed only when
/// the counter's has fallen below it, to the TTL plus a tenth of it (at most an hour): a
/// room still lives at least the idle TTL after its last use, for one `PTTL` per
/// message instead of three `EXPIRE`s and an `LTRIM`.
const PUBLISH_LUA: &str = r"
local t = redis.call('TIME')
local ts = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
local tail, size, cmd, notice_tail = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local ttl = tonumber(ARGV[5])
local trim_above = size + math.max(1, math.floor(size / 8))
local ttl_ms, lease = ttl * 1000, ttl + math.min(math.floor(ttl / 10), 3600)
local function one(seq, hist, ep, sent, channel, head, middle, candidate, notice, window)
  if sent then
    local prior = redis.call('GET', sent)
    if prior then return {1, prior} end
  end
  local id = redis.call('INCR', seq)
  if id == 1 then
    redis.call('DEL', hist)
    redis.call('SET', ep, candidate, 'NX')
    redis.call(cmd, channel, notice .. redis.call('GET', ep) .. notice_tail)
  end
  local msg = head .. id .. middle .. ts .. tail
  if redis.call('RPUSH', hist, msg) > trim_above then
    redis.call('LTRIM', hist, -size, -1)
  end
  if ttl > 0 and (id == 1 or redis.call('PTTL', seq) < ttl_ms) then
    redis.call('EXPIRE', seq, lease)
    redis.call('EXPIRE', hist, lease)
    redis.call('EXPIRE', ep, lease)
  end
  if sent then redis.call('SET', sent, msg, 'EX', window) end
  redis.call(cmd, channel, msg)
  return {0, msg}
end
local out = {}
local k, a = 1, 6
while a <= #ARGV do
  local window, sent, n = ARGV[a + 5], nil, 3
  if window ~= '0' then sent, n = KEYS[k + 3], 4 end
  local ok, res = pcall(one, KEYS[k], KEYS[k + 1], KEYS[k + 2], sent,
    ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], window)
  if ok then
    out[#out + 1] = res
  else
    if type(res) == 'table' then res = res.err end
    out[#out + 1] = {2, tostring(res)}
  end
  k, a = k + n, a + 6
end
return out
";

/// KEYS: seq, history, epoch. ARGV: since (-1 for none), epoch candidate, idle TTL
/// (seconds, 0 = none), before (-1 for none), limit (0 = no limit), history size.
/// Returns {top, epoch, entries, more}. Only the newest `history size` entries of the list
/// are retained (the publish script trims in steps). With `since`: the retained entries
/// after it when all of them are retained, else every retained entry. Without: up to
/// `limit` entries before `before` (the newest), and `more` = 1 when older retained
/// entries exist. Creates the room's epoch if it has none, so that `joined` always
/// carries one; a read (a join) keeps the room alive as a publish does.
const HISTORY_LUA: &str = r"
local top = tonumber(redis.call('GET', KEYS[1]) or '0')
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  epoch = ARGV[2]
  redis.call('SET', KEYS[3], epoch)
end
if ARGV[3] ~= '0' then
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
end
local total = redis.call('LLEN', KEYS[2])
local n = math.min(total, tonumber(ARGV[6]))
local skip = total - n
local since = tonumber(ARGV[1])
if since >= 0 then
  local start = 0
  if since <= top then
    local newer = top - since
    if newer < n then start = n - newer end
  end
  if start >= n then return {top, epoch, {}, 0} end
  return {top, epoch, redis.call('LRANGE', KEYS[2], skip + start, -1), 0}
end
local first = top - n + 1
local last = top
local before = tonumber(ARGV[4])
if before >= 0 and before - 1 < last then last = before - 1 end
if n == 0 or last < first then return {top, epoch, {}, 0} end
local from = first
local limit = tonumber(ARGV[5])
if limit > 0 and last - limit + 1 > first then from = last - limit + 1 end
local more = 0
if from > first then more = 1 end
return {top, epoch, redis.call('LRANGE', KEYS[2], skip + from - first, skip + last - first), more}
";

/// The scripts, and how a room's calls are spelled.
#[derive(Debug)]
pub(super) struct Scripts {
    publish: Script,
    history: Script,
    pub(super) keys: Keys,
    history_size: String,
    /// `PUBLISH`, or `SPUBLISH` on a Cluster (sharded pub/sub).
    pub(super) publish_command: &'static str,
    /// Longest wait for one script call, as a backstop to fred's own command timeout.
    backstop: Duration,
    /// `ROOM_IDLE_TTL_SECS` (`"0"`: rooms never expire).
    idle_ttl: String,
    /// The publish script's five shared arguments, built once (cloning one is a
    /// reference count).
    publish_shared: [Value; 5],
}

impl Scripts {
    pub(super) fn new(
        keys: Keys,
        history_size: usize,
        sharded: bool,
        timeout: Duration,
        idle_ttl: Option<Duration>,
    ) -> Self {
        let history_size = history_size.to_string();
        let idle_ttl = idle_ttl.map_or(0, |t| t.as_secs().max(1)).to_string();
        let publish_command = if sharded { "SPUBLISH" } else { "PUBLISH" };
        let shared = |s: &str| Value::Bytes(Bytes::copy_from_slice(s.as_bytes()));
        Scripts {
            publish: Script::from_lua(PUBLISH_LUA),
            history: Script::from_lua(HISTORY_LUA),
            keys,
            publish_shared: [
                shared(TEMPLATE_TAIL),
                shared(&history_size),
                shared(publish_command),
                shared(EpochNotice::TAIL),
                shared(&idle_ttl),
            ],
            history_size,
            publish_command,
            backstop: timeout * 4,
            idle_ttl,
        }
    }

    /// One message's part of a publish call. Its names and arguments are written into one
    /// buffer and handed to fred as slices of it: a publish is a few allocations, not
    /// one per string (and cloning them for a `NOSCRIPT` retry copies nothing).
    pub(super) fn publish_request(
        &self,
        room: &RoomName,
        message: &MessageTemplate,
        dedupe: Option<&Dedupe>,
    ) -> PublishRequest {
        let room_len = room.as_str().len();
        let mut buf =
            BytesMut::with_capacity(160 + 5 * room_len + message.head.len() + message.middle.len());
        let names = self.keys.put_room(room, &mut buf);
        let mut put = |write: &dyn Fn(&mut BytesMut)| {
            let start = buf.len();
            write(&mut buf);
            start..buf.len()
        };
        let head = put(&|b| b.extend_from_slice(message.head.as_bytes()));
        let middle = put(&|b| b.extend_from_slice(message.middle.as_bytes()));
        let candidate = put(&|b| put_new_epoch(b));
        let notice = put(&|b| EpochNotice::put_head(room, b));
        let window = dedupe.map_or(0, |d| d.window.as_secs().max(1));
        // Writing to a BytesMut cannot fail (it grows).
        let window = put(&|b| {
            let _ = write!(b, "{window}");
        });
        let buf = buf.freeze();
        let key = |range| Key::from(buf.slice(range));
        let arg = |range| Value::Bytes(buf.slice(range));
        PublishRequest {
            keys: [key(names.seq), key(names.history), key(names.epoch)],
            sent: dedupe.map(|d| Key::from(self.keys.sent(room, &d.key))),
            args: [
                arg(names.channel),
                arg(head),
                arg(middle),
                arg(candidate),
                arg(notice),
                arg(window),
            ],
        }
    }

    /// Runs the publish script for `message` alone.
    pub(super) async fn publish(
        &self,
        client: &Client,
        room: &RoomName,
        message: &MessageTemplate,
        dedupe: Option<&Dedupe>,
    ) -> Result<Published, BusError> {
        let request = self.publish_request(room, message, dedupe);
        self.publish_many(client, std::slice::from_ref(&request))
            .await?
            .pop()
            .ok_or(BusError::Corrupt("publish reply has no entry"))?
    }

    /// Runs the publish script once for `requests`: one outcome per request, in order,
    /// or one error for all of them when the call itself failed.
    pub(super) async fn publish_many(
        &self,
        client: &Client,
        requests: &[PublishRequest],
    ) -> Result<Vec<Result<Published, BusError>>, BusError> {
        let count = requests.len();
        let call = || {
            let mut keys = Vec::with_capacity(count * 4);
            let mut args = Vec::with_capacity(5 + count * 6);
            args.extend(self.publish_shared.iter().cloned());
            for request in requests {
                keys.extend(request.keys.iter().cloned());
                keys.extend(request.sent.iter().cloned());
                args.extend(request.args.iter().cloned());
            }
            (keys, args)
        };
        let reply: Value = self.evalsha_with(client, &self.publish, call).await?;
        let outcomes: Vec<_> = reply
            .into_array()
            .into_iter()
            .map(parse_published)
            .collect();
        if outcomes.len() != count {
            return Err(BusError::Corrupt(
                "publish reply has a wrong number of entries",
            ));
        }
        Ok(outcomes)
    }

    /// Runs the history script from `since`.
    pub(super) async fn history(
        &self,
        client: &Client,
        room: &RoomName,
        since: Option<u64>,
    ) -> Result<History, BusError> {
        let since = since.map_or_else(|| "-1".to_owned(), |s| s.to_string());
        let page = self.read(client, room, since, "-1".to_owned(), 0).await?;
        Ok(History {
            top: page.top,
            epoch: page.epoch,
            messages: page.messages,
        })
    }

    /// Runs the history script for a page before `before`.
    pub(super) async fn page(
        &self,
        client: &Client,
        room: &RoomName,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page, BusError> {
        let before = before.map_or_else(|| "-1".to_owned(), |b| b.to_string());
        self.read(client, room, "-1".to_owned(), before, limit.max(1))
            .await
    }

    async fn read(
        &self,
        client: &Client,
        room: &RoomName,
        since: String,
        before: String,
        limit: usize,
    ) -> Result<Page, BusError> {
        let args = vec![
            since,
            new_epoch(),
            self.idle_ttl.clone(),
            before,
            limit.to_string(),
            self.history_size.clone(),
        ];
        let reply: Value = self
            .evalsha(client, &self.history, self.room_keys(room), args)
            .await?;
        parse_page(reply)
    }

    fn room_keys(&self, room: &RoomName) -> Vec<String> {
        let k = &self.keys;
        vec![k.seq(room), k.history(room), k.epoch(room)]
    }

    /// Runs a script with EVALSHA, loading it first when Redis does not know it. fred's
    /// command timeout bounds each step.
    pub(super) async fn evalsha<R, K, V>(
        &self,
        client: &Client,
        script: &Script,
        keys: Vec<K>,
        args: Vec<V>,
    ) -> Result<R, BusError>
    where
        R: FromValue,
        K: Into<Key>,
        V: Into<Value>,
    {
        // As fred's own types, whose clones share the bytes.
        let keys: Vec<Key> = keys.into_iter().map(Into::into).collect();
        let args: Vec<Value> = args.into_iter().map(Into::into).collect();
        self.evalsha_with(client, script, || (keys.clone(), args.clone()))
            .await
    }

    /// [`Scripts::evalsha`] with the keys and arguments made by `call`, once per try (a
    /// second only after `NOSCRIPT`): nothing is copied ahead for a retry that almost
    /// never happens.
    pub(super) async fn evalsha_with<R: FromValue>(
        &self,
        client: &Client,
        script: &Script,
        call: impl Fn() -> (Vec<Key>, Vec<Value>) + Send + Sync,
    ) -> Result<R, BusError> {
        let run = async {
            let (keys, args) = call();
            let first = client
                .evalsha::<R, _, _, _>(script.sha1().clone(), keys, args)
                .await;
            match first {
                Err(e) if e.details().starts_with("NOSCRIPT") => {
                    // First use on this Redis (or after SCRIPT FLUSH / a restart): the
                    // script did not run, so loading it and trying again cannot double a
                    // write.
                    let lua = script.lua().cloned().unwrap_or_default();
                    client.script_load_cluster::<(), _>(lua).await?;
                    let (keys, args) = call();
                    client.evalsha(script.sha1().clone(), keys, args).await
                }
                other => other,
            }
        };
        match tokio::time::timeout(self.backstop, run).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(BusError::Timeout),
        }
    }
}

/// One message's keys and arguments in a publish call (see `PUBLISH_LUA`).
#[derive(Debug)]
pub(super) struct PublishRequest {
    /// seq, history, epoch.
    keys: [Key; 3],
    /// An idempotent send's dedupe record.
    sent: Option<Key>,
    /// channel, message head, middle, epoch candidate, epoch notice head, window.
    args: [Value; 6],
}

/// Reads one entry of the publish script's reply: `{flag, frame or error}`.
fn parse_published(entry: Value) -> Result<Published, BusError> {
    let mut parts = entry.into_array().into_iter();
    let flag = parts
        .next()
        .and_then(|v| v.as_u64())
        .ok_or(BusError::Corrupt("publish reply has no flag"))?;
    let payload = parts
        .next()
        .ok_or(BusError::Corrupt("publish reply has no payload"))?;
    if flag == 2 {
        let why = payload.into_string().unwrap_or_default();
        return Err(BusError::Redis(fred::error::Error::new(
            fred::error::ErrorKind::Unknown,
            why,
        )));
    }
    let msg = payload
        .into_bytes()
        .and_then(to_msg)
        .ok_or(BusError::Corrupt("publish reply has no message frame"))?;
    Ok(Published {
        msg,
        duplicate: flag == 1,
    })
}

/// A stored or published payload as a message, if it is one.
pub(super) fn to_msg(json: Bytes) -> Option<Msg> {
    std::str::from_utf8(&json).ok()?;
    let id = peek_id(&json)?;
    Some(Msg { id, json })
}

/// Reads the history script's `{top, epoch, entries, more}`.
fn parse_page(reply: Value) -> Result<Page, BusError> {
    let mut parts = reply.into_array().into_iter();
    let top = parts
        .next()
        .and_then(|v| v.as_u64())
        .ok_or(BusError::Corrupt("history top is not an integer"))?;
    let epoch = parts
        .next()
        .and_then(|v| v.into_string())
        .filter(|e| !e.is_empty())
        .map(Epoch::from);
    let entries = parts
        .next()
        .ok_or(BusError::Corrupt("history reply has no entries"))?;
    let messages = entries
        .into_array()
        .into_iter()
        .map(|v| {
            v.into_bytes()
                .and_then(to_msg)
                .ok_or(BusError::Corrupt("history entry is not a message frame"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let has_more = parts.next().and_then(|v| v.as_u64()) == Some(1);
    Ok(Page {
        top,
        epoch,
        messages,
        has_more,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64) -> Value {
        let room = RoomName::new("r").unwrap();
        let json = MessageTemplate::new(&room, "u", "t").render(id, 1);
        Value::Bytes(Bytes::from(json))
    }

    #[test]
    fn a_history_reply_is_read_in_order() {
        let reply = Value::Array(vec![
            Value::Integer(7),
            Value::from("e1"),
            Value::Array(vec![entry(6), entry(7)]),
            Value::Integer(1),
        ]);
        let h = parse_page(reply).unwrap();
        assert_eq!(h.top, 7);
        assert_eq!(h.epoch.as_deref(), Some("e1"));
        assert_eq!(h.messages.iter().map(|m| m.id).collect::<Vec<_>>(), [6, 7]);
        assert!(h.has_more);
    }

    #[test]
    fn a_history_reply_of_foreign_data_is_refused() {
        for reply in [
            Value::Array(vec![]),
            Value::Array(vec![Value::from("x")]),
            Value::Array(vec![Value::Integer(1), Value::from("e")]),
            Value::Array(vec![
                Value::Integer(1),
                Value::from("e"),
                Value::Array(vec![Value::from("not a message")]),
            ]),
        ] {
            assert!(matches!(parse_page(reply), Err(BusError::Corrupt(_))));
        }
    }

    #[test]
    fn the_scripts_render_only_what_rust_gives_them() {
        // The message's closing bytes and the notice's JSON come from Rust, not Lua.
        assert!(PUBLISH_LUA.contains("tail") && !PUBLISH_LUA.contains("'}'"));
        assert!(!PUBLISH_LUA.contains("'{"));
        assert!(!PUBLISH_LUA.contains("\"type\""));
        let room = RoomName::new("lobby").unwrap();
        let mut notice = String::new();
        EpochNotice::put_head(&room, &mut notice);
        notice.push_str("abc");
        notice.push_str(EpochNotice::TAIL);
        let parsed: EpochNotice = serde_json::from_str(&notice).unwrap();
        assert_eq!(
            (
                parsed.kind.as_str(),
                parsed.room.as_str(),
                parsed.epoch.as_str()
            ),
            ("epoch", "lobby", "abc")
        );
    }
}
