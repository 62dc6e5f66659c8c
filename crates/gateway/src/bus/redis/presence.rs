//! Presence on Redis: who is in a room, across instances, with leases.
//!
//! In the room's slot: a sorted set of leases (`INSTANCE\x1fUSER`, scored by expiry in
//! Redis' clock), a hash user → its `{"user","name"}` JSON, and a hash user → how many
//! instances hold a lease. A user is `joined` when the first instance takes a lease and
//! `left` when the last one gives it up — or when it runs out (an instance that died
//! stops renewing): every script that touches a room first sweeps the leases that ran
//! out, and reports those users `left`. The diffs go out on the room's channel.

use std::time::Duration;

use chat_protocol::{PresenceUser, RoomName};
use fred::{
    prelude::*,
    types::{Value, scripts::Script},
};

use super::scripts::Scripts;
use crate::bus::{BusError, PresenceSnapshot, presence_diff};

/// Drops leases that ran out (ARGV: now is computed here), reporting their users `left`
/// with one diff: ARGV[2] channel, ARGV[3] publish command, ARGV[4]/ARGV[5] the diff's
/// JSON around the left users.
const SWEEP: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
local gone = {}
for _, lease in ipairs(expired) do
  redis.call('ZREM', KEYS[1], lease)
  local user = string.match(lease, '\31(.*)$')
  if user and redis.call('HINCRBY', KEYS[3], user, -1) <= 0 then
    local json = redis.call('HGET', KEYS[2], user)
    redis.call('HDEL', KEYS[3], user)
    redis.call('HDEL', KEYS[2], user)
    if json then gone[#gone + 1] = json end
  end
end
if #gone > 0 then redis.call(ARGV[3], ARGV[2], ARGV[4] .. table.concat(gone, ',') .. ARGV[5]) end
";

/// KEYS: leases, users, counts. ARGV: lease ms, channel, publish command, left-diff head
/// and tail, then lease / user / user JSON / joined-diff JSON for each user to renew (a
/// lease that had run out is taken again, and its user reported `joined` if needed).
const RENEW: &str = r"
for i = 6, #ARGV, 4 do
  if redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i]) == 1 then
    redis.call('HSET', KEYS[2], ARGV[i + 1], ARGV[i + 2])
    if redis.call('HINCRBY', KEYS[3], ARGV[i + 1], 1) == 1 then
      redis.call(ARGV[3], ARGV[2], ARGV[i + 3])
    end
  end
end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], 3 * tonumber(ARGV[1])) end
return 1
";

/// KEYS: leases, users, counts. ARGV: lease ms, channel, publish command, left-diff head
/// and tail, lease, user, user JSON, joined-diff JSON.
const ENTER: &str = r"
if redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[6]) == 1 then
  if redis.call('HINCRBY', KEYS[3], ARGV[7], 1) == 1 then
    redis.call('HSET', KEYS[2], ARGV[7], ARGV[8])
    redis.call(ARGV[3], ARGV[2], ARGV[9])
  end
end
redis.call('HSET', KEYS[2], ARGV[7], ARGV[8])
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], 3 * tonumber(ARGV[1])) end
return 1
";

/// KEYS: leases, users, counts. ARGV: unused, channel, publish command, left-diff head
/// and tail, lease, user, left-diff JSON.
const EXIT: &str = r"
if redis.call('ZREM', KEYS[1], ARGV[6]) == 1 then
  if redis.call('HINCRBY', KEYS[3], ARGV[7], -1) <= 0 then
    redis.call('HDEL', KEYS[3], ARGV[7])
    redis.call('HDEL', KEYS[2], ARGV[7])
    redis.call(ARGV[3], ARGV[2], ARGV[8])
  end
end
return 1
";

/// KEYS: leases, users, counts. ARGV: max users, channel, publish command, left-diff head
/// and tail. Returns {count, [user JSON…]} (at most max of them).
const SNAPSHOT: &str = r"
local count = redis.call('HLEN', KEYS[3])
local max = tonumber(ARGV[1])
local users = {}
if count <= max then
  users = redis.call('HVALS', KEYS[2])
else
  local cursor = '0'
  repeat
    local page = redis.call('HSCAN', KEYS[2], cursor, 'COUNT', 100)
    cursor = page[1]
    for i = 2, #page[2], 2 do
      if #users < max then users[#users + 1] = page[2][i] end
    end
  until cursor == '0' or #users >= max
end
return {count, users}
";

/// The presence scripts (each starts with the sweep).
#[derive(Debug)]
pub(super) struct PresenceScripts {
    renew: Script,
    enter: Script,
    exit: Script,
    snapshot: Script,
    /// This process's lease prefix (`INSTANCE-HEX`).
    instance: String,
}

impl PresenceScripts {
    pub(super) fn new(instance: &str) -> Self {
        let with_sweep = |body: &str| Script::from_lua(format!("{SWEEP}{body}"));
        PresenceScripts {
            renew: with_sweep(RENEW),
            enter: with_sweep(ENTER),
            exit: with_sweep(EXIT),
            snapshot: with_sweep(SNAPSHOT),
            instance: instance.to_owned(),
        }
    }

    fn lease(&self, user: &str) -> String {
        format!("{}\u{1f}{user}", self.instance)
    }
}

impl Scripts {
    fn presence_keys(&self, room: &RoomName) -> Vec<String> {
        let k = &self.keys;
        vec![
            k.presence(room),
            k.presence_users(room),
            k.presence_count(room),
        ]
    }

    /// ARGV[1..=5]: lease, channel, command, and the left diff around the users.
    fn presence_args(&self, room: &RoomName, first: String) -> Vec<String> {
        let diff = String::from_utf8_lossy(&presence_diff(room, vec![], vec![])).into_owned();
        // `…"left":[]}` split at the brackets' inside.
        let (head, tail) = diff.split_at(diff.len() - 2);
        vec![
            first,
            self.keys.channel(room),
            self.publish_command.to_owned(),
            head.to_owned(),
            tail.to_owned(),
        ]
    }

    pub(super) async fn presence_enter(
        &self,
        client: &Client,
        scripts: &PresenceScripts,
        room: &RoomName,
        user: &PresenceUser,
        lease: Duration,
    ) -> Result<(), BusError> {
        let mut args = self.presence_args(room, lease.as_millis().to_string());
        args.extend([
            scripts.lease(&user.user),
            user.user.clone(),
            user_json(user),
            diff_json(room, vec![user.clone()], vec![]),
        ]);
        let _: Value = self
            .evalsha(client, &scripts.enter, self.presence_keys(room), args)
            .await?;
        Ok(())
    }

    pub(super) async fn presence_exit(
        &self,
        client: &Client,
        scripts: &PresenceScripts,
        room: &RoomName,
        user: &PresenceUser,
    ) -> Result<(), BusError> {
        let mut args = self.presence_args(room, "0".to_owned());
        args.extend([
            scripts.lease(&user.user),
            user.user.clone(),
            diff_json(room, vec![], vec![user.clone()]),
        ]);
        let _: Value = self
            .evalsha(client, &scripts.exit, self.presence_keys(room), args)
            .await?;
        Ok(())
    }

    pub(super) async fn presence_renew(
        &self,
        client: &Client,
        scripts: &PresenceScripts,
        room: &RoomName,
        users: &[PresenceUser],
        lease: Duration,
    ) -> Result<(), BusError> {
        let mut args = self.presence_args(room, lease.as_millis().to_string());
        for user in users {
            args.extend([
                scripts.lease(&user.user),
                user.user.clone(),
                user_json(user),
                diff_json(room, vec![user.clone()], vec![]),
            ]);
        }
        let _: Value = self
            .evalsha(client, &scripts.renew, self.presence_keys(room), args)
            .await?;
        Ok(())
    }

    pub(super) async fn presence_snapshot(
        &self,
        client: &Client,
        scripts: &PresenceScripts,
        room: &RoomName,
        max: usize,
    ) -> Result<PresenceSnapshot, BusError> {
        let args = self.presence_args(room, max.max(1).to_string());
        let reply: Value = self
            .evalsha(client, &scripts.snapshot, self.presence_keys(room), args)
            .await?;
        let mut parts = reply.into_array().into_iter();
        let count = parts
            .next()
            .and_then(|v| v.as_u64())
            .ok_or(BusError::Corrupt("presence count is not an integer"))?;
        let users = parts
            .next()
            .ok_or(BusError::Corrupt("presence reply has no users"))?
            .into_array()
            .into_iter()
            .filter_map(|v| v.into_bytes())
            .filter_map(|json| serde_json::from_slice::<PresenceUser>(&json).ok())
            .collect();
        Ok(PresenceSnapshot { count, users })
    }
}

fn user_json(user: &PresenceUser) -> String {
    serde_json::to_string(user).unwrap_or_default()
}

fn diff_json(room: &RoomName, joined: Vec<PresenceUser>, left: Vec<PresenceUser>) -> String {
    String::from_utf8_lossy(&presence_diff(room, joined, left)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_left_diff_wraps_the_users_json() {
        let keys = crate::bus::keys::Keys::new("chat");
        let scripts = Scripts::new(keys, 10, false, Duration::from_secs(1), None);
        let room = RoomName::new("r").unwrap();
        let args = scripts.presence_args(&room, "0".into());
        let ann = user_json(&PresenceUser {
            user: "u1".into(),
            name: "ann".into(),
        });
        let diff = format!("{}{ann}{}", args[3], args[4]);
        let parsed: chat_protocol::ServerFrame = serde_json::from_str(&diff).unwrap();
        match parsed {
            chat_protocol::ServerFrame::PresenceDiff { room, joined, left } => {
                assert_eq!((room.as_str(), joined.len(), left.len()), ("r", 0, 1));
                assert_eq!(left[0].name, "ann");
            }
            other => panic!("{other:?}"),
        }
    }
}
